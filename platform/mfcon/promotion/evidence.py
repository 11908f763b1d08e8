"""What ``mfcon promote`` judges: the challenger model(s), scored on the held-out test list.

The challenger is chosen on the dev list and judged on the test list, which no
selection has seen (see :mod:`mfcon.promotion.gate` for why). Two kinds of
evidence, recorded on the registered version (tag ``evidence``):

* ``replication``: the study has a replication (:mod:`mfcon.study.replicate`)
  with a best MFCon configuration (``best``, chosen by mean dev EER, never by
  test). Every seed model of that configuration is scored on the test list and
  all of them are compared with the champion
  (:func:`mfcon.evaluation.verdicts.seed_paired_eer_difference`: mean over the
  seeds of EER(seed model) - EER(champion), with a t interval over enrollment
  speakers and seeds). The version registered is the seed whose run has the
  lowest dev selection metric (dev picks the model).
* ``study_trial``: no usable replication. The study's best finished trial by
  the dev selection metric, re-scored on the test list, compared with the
  champion by the paired cluster bootstrap
  (:func:`mfcon.evaluation.metrics.bootstrap_eer_difference`).

Scores are :class:`mfcon.evaluation.score_norm.TrialScorer` scores of the registered
pyfunc's embeddings: centred cosine, AS-normalised when the eval set carries a
cohort (the scoring contract shared with :func:`mfcon.serving.verify`). The
serving settings, the centring mean and the EER threshold, are fitted on the
**dev** list with each model's own embeddings and stored with the version; the
test list is only ever scored with them.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mfcon.data.corpus.voxceleb import TrialPair
from mfcon.data.shards import read_manifest
from mfcon.evaluation.metrics import BootstrapResult, bootstrap_eer_difference, equal_error_rate
from mfcon.evaluation.selection import best_value
from mfcon.evaluation.verdicts import PairedInterval, seed_paired_eer_difference
from mfcon.names import SELECTION_METRICS, RegistryError
from mfcon.evaluation.score_norm import DEFAULT_TOP_N, TrialScorer, speaker_cohort
from mfcon.evaluation.scoring import EvalSet
from mfcon.serving import (
    MODEL_URI_TAG,
    SpeakerEmbedder,
    embedder_of,
    load_embedder,
    log_speaker_model,
)
from mfcon.tracking import ROLE_TAG, STATE_TAG, TRIAL_TAG, find_runs, no_artifact_progress_bars, read_replication
from mfcon.train.checkpoint import EXPORTED_ARTIFACT

FINISHED_STATES = ("completed", "pruned")
REPLICATION, STUDY_TRIAL = "replication", "study_trial"  # values of the version tag ``evidence``


@dataclass(frozen=True)
class StudyTrial:
    """A finished run of a study (a tuning trial, or a replica), a candidate for promotion."""

    run_id: str
    trial_id: str
    value: float  # best value of the dev selection metric over the run's epochs
    params: dict[str, str]
    tags: dict[str, str]


@dataclass
class Scored:
    """One model's scores on the test trial list (``eer`` in percent) and its serving settings fitted on dev."""

    scores: np.ndarray
    labels: np.ndarray
    eer: float
    threshold: float  # the EER threshold of the model's dev-list scores (what `verify` accepts at)
    mean: np.ndarray  # (E,) float32: the mean dev embedding, subtracted before cosine
    eer_ci: tuple[float, float] = (math.nan, math.nan)
    cohort: np.ndarray | None = None  # (S, E) AS-norm cohort of this model's embeddings, when the scoring uses one
    top_n: int = DEFAULT_TOP_N
    lists: dict[str, Scored] = field(default_factory=dict)  # the same model on each other named test list


@dataclass
class Evidence:
    """The registered model and every challenger model the gate compares with the champion."""

    kind: str  # REPLICATION or STUDY_TRIAL
    detail: str  # one sentence: what was judged on which list
    trial: StudyTrial  # the run whose model is registered
    model_uri: str
    challenger: Scored  # the registered model on the test list
    models: list[Scored]  # every challenger model gated (the replication's seeds, or the one trial)
    replication_run_id: str | None = None
    config: str | None = None  # the replication's configuration label
    seeds: list[int] = field(default_factory=list)  # the training seed of each of ``models`` (a replication)

    def on_list(self, name: str) -> Evidence:
        """The same evidence judged on another named test list (every model was scored on it too)."""
        return dataclasses.replace(self, challenger=self.challenger.lists[name],
                                   models=[m.lists[name] for m in self.models])

    def delta(self, champion: Scored, groups: np.ndarray, n_boot: int, confidence: float,
              seed: int) -> BootstrapResult | PairedInterval:
        """EER(challenger) - EER(champion) on the test list, percent points (for a replication: the mean over
        its seed models, each compared with the one champion, with a t interval over speakers and seeds)."""
        labels = self.challenger.labels
        if self.kind == REPLICATION:
            seeds = self.seeds if len(self.seeds) == len(self.models) else list(range(len(self.models)))
            return seed_paired_eer_difference({s: m.scores for s, m in zip(seeds, self.models)}, champion.scores,
                                              labels, groups, confidence=confidence, n_boot=n_boot, seed=seed)
        r = bootstrap_eer_difference(self.challenger.scores, champion.scores, labels, groups, n_boot,
                                     confidence, seed)
        return BootstrapResult(100 * r.estimate, 100 * r.low, 100 * r.high, r.confidence, r.n_boot)


# ---------------------------------------------------------------- study trials

def _min_metric(client: MlflowClient, run_id: str, metric: str) -> float | None:
    """The run's best value of ``metric`` (:func:`mfcon.evaluation.selection.best_value`)."""
    return best_value({int(m.step): m.value for m in client.get_metric_history(run_id, metric)})


def finished_trials(client: MlflowClient, study: str, metric: str = SELECTION_METRICS[0]
                    ) -> tuple[str, list[StudyTrial]]:
    """(experiment id, completed/pruned trials with a finite ``metric``, best first).

    Trials are the child runs tagged ``mfcon.role=trial`` (a replication's
    ``replica`` runs are not study trials).
    """
    if metric not in SELECTION_METRICS:
        raise RegistryError(f"unknown selection metric {metric!r}; use one of {SELECTION_METRICS}")
    exp = client.get_experiment_by_name(study)
    if exp is None or exp.lifecycle_stage == "deleted":
        known = sorted(e.name for e in client.search_experiments() if e.name != "Default")
        raise RegistryError(f"unknown study {study!r} in {client.tracking_uri}; studies there: {known or 'none'}")
    runs = find_runs(client, exp.experiment_id, **{ROLE_TAG: "trial"})
    trials = []
    for run in runs:
        if run.data.tags.get(STATE_TAG) not in FINISHED_STATES:
            continue
        value = _min_metric(client, run.info.run_id, metric)
        if value is not None:
            trials.append((value, run.info.start_time or 0, StudyTrial(
                run.info.run_id, run.data.tags.get(TRIAL_TAG, run.info.run_id), value,
                dict(run.data.params), dict(run.data.tags))))
    if not trials:
        states = dict(sorted(Counter(r.data.tags.get(STATE_TAG, "unknown") for r in runs).items()))
        raise RegistryError(f"study {study!r} has no finished trials (completed or pruned) with metric {metric!r}; "
                            f"trial states: {states or 'no trials'}")
    return exp.experiment_id, [t for _, _, t in sorted(trials, key=lambda x: x[:2])]


def challenger_model_uri(client: MlflowClient, trial: StudyTrial, data_dir: Path, notes: list[str]) -> str:
    """The pyfunc model logged for the trial's run; logs one from ``checkpoint/best.pt`` when there is none."""
    if trial.tags.get(MODEL_URI_TAG):
        return trial.tags[MODEL_URI_TAG]
    run = client.get_run(trial.run_id)
    for output in (run.outputs.model_outputs if run.outputs else []):
        if client.get_logged_model(output.model_id).name == "model":
            return f"models:/{output.model_id}"
    with tempfile.TemporaryDirectory() as tmp, no_artifact_progress_bars():
        try:
            ckpt = client.download_artifacts(trial.run_id, EXPORTED_ARTIFACT, tmp)
        except (MlflowException, OSError):
            raise RegistryError(f"trial {trial.trial_id} (run {trial.run_id}) has neither a logged model nor a "
                                "checkpoint/best.pt artifact") from None
        uri = log_speaker_model(client, trial.run_id, ckpt, read_manifest(data_dir).feature_config)
    notes.append(f"logged the checkpoint of {trial.trial_id} as pyfunc model {uri}")
    return uri


# ---------------------------------------------------------------- scoring

def _trial_scores(scorer: TrialScorer, emb: np.ndarray, eval_set: EvalSet) -> tuple[np.ndarray, np.ndarray]:
    index = {u: i for i, u in enumerate(eval_set.utt_ids)}
    a = emb[[index[t.enroll] for t in eval_set.trials]]
    b = emb[[index[t.test] for t in eval_set.trials]]
    return scorer.score(a, b), np.array([t.label for t in eval_set.trials], dtype=np.int64)


OtherLists = Mapping[str, Sequence[TrialPair]]  # other named test lists over the eval set's utterances


def score_embedder(model: SpeakerEmbedder, eval_set: EvalSet, data_dir: Path, dev_set: EvalSet | None = None,
                   others: OtherLists | None = None) -> Scored:
    """The model's serving settings fitted on ``dev_set`` (mean embedding, then the EER threshold of its dev
    trials) and every trial of ``eval_set`` scored with them (AS-norm with the set's cohort); the test EER.
    ``others``: further test lists over the same utterances, scored alike into ``Scored.lists``.

    Without ``dev_set`` (a data folder without dev trials) the eval set's own mean and threshold are used."""
    data_cfg = read_manifest(data_dir).feature_config
    if model.feature_config != data_cfg:
        raise RegistryError(f"{data_dir}: features were prepared with {data_cfg}, the model expects "
                            f"{model.feature_config}; prepare the data with the model's feature config")
    emb = model.embed_features(eval_set.features)  # (N, E)
    cohort = (speaker_cohort(model.embed_features(eval_set.cohort.features), eval_set.cohort.speakers)
              if eval_set.cohort is not None else None)
    fit_set, fit_emb = eval_set, emb
    if dev_set is not None:
        fit_set, fit_emb = dev_set, model.embed_features(dev_set.features)
    scorer = TrialScorer(fit_emb.mean(axis=0), cohort, eval_set.top_n)
    threshold = equal_error_rate(*_trial_scores(scorer, fit_emb, fit_set))[1]
    def scored(trials: Sequence[TrialPair]) -> Scored:
        scores, labels = _trial_scores(scorer, emb, dataclasses.replace(eval_set, trials=list(trials)))
        eer = equal_error_rate(scores, labels)[0]
        return Scored(scores, labels, 100.0 * eer, threshold, scorer.mean, cohort=cohort, top_n=eval_set.top_n)

    result = scored(eval_set.trials)
    result.lists = {name: scored(trials) for name, trials in (others or {}).items()}
    return result


def score_model(model_uri: str, tracking_uri: str, eval_set: EvalSet, data_dir: Path,
                dev_set: EvalSet | None = None, others: OtherLists | None = None) -> Scored:
    return score_embedder(embedder_of(load_embedder(model_uri, tracking_uri)), eval_set, data_dir, dev_set, others)


def eer_interval(s: Scored, groups: np.ndarray, n_boot: int, confidence: float, seed: int) -> tuple[float, float]:
    """Cluster-bootstrap CI of one system's EER (%): paired against a perfect scorer (EER 0 on every resample)."""
    r = bootstrap_eer_difference(s.scores, s.labels.astype(np.float64), s.labels, groups, n_boot, confidence, seed)
    return 100 * r.low, 100 * r.high


# ---------------------------------------------------------------- the evidence

def gather_evidence(client: MlflowClient, study: str, trials: list[StudyTrial], metric: str, eval_set: EvalSet,
                    data_dir: Path, tracking_uri: str, notes: list[str], dev_set: EvalSet | None = None,
                    others: OtherLists | None = None) -> Evidence:
    """The study's replication when it has a usable one, else its best trial; models scored on ``eval_set``
    (and ``others``) with serving settings fitted on ``dev_set``."""

    table = read_replication(client, study)
    if table is not None:
        if table.get("best") is None:
            notes.append(f"replication {table['run_id']} has no MFCon configuration to promote: "
                         "judged the best study trial instead")
        else:
            return replication_evidence(client, table, metric, eval_set, data_dir, tracking_uri, notes, dev_set,
                                        others)
    trial, uri = _first_with_model(client, study, trials, data_dir, notes)
    scored = score_model(uri, tracking_uri, eval_set, data_dir, dev_set, others)
    detail = f"best trial {trial.trial_id} by {metric}, re-scored on the test list of {len(eval_set.trials)} trials"
    return Evidence(STUDY_TRIAL, detail, trial, uri, scored, [scored])


def _first_with_model(client: MlflowClient, study: str, trials: list[StudyTrial], data_dir: Path,
                      notes: list[str]) -> tuple[StudyTrial, str]:
    """The best trial that has a model or a checkpoint (a trial stopped before its first report has neither)."""
    for trial in trials:
        try:
            return trial, challenger_model_uri(client, trial, data_dir, notes)
        except RegistryError as e:
            notes.append(f"skipped: {e}")
    raise RegistryError(f"no finished trial of study {study!r} has a logged model or checkpoint/best.pt")


def replication_evidence(client: MlflowClient, table: dict[str, Any], metric: str, eval_set: EvalSet,
                         data_dir: Path, tracking_uri: str, notes: list[str],
                         dev_set: EvalSet | None = None, others: OtherLists | None = None) -> Evidence:
    """Every seed model of the replication's best configuration; registers the seed with the lowest ``metric``."""
    label, run_id = table["best"], table["run_id"]
    config = table.get("configs", {}).get(label) or {}
    runs, seeds = list(config.get("runs") or []), list(config.get("seeds") or [])
    if not runs:
        raise RegistryError(f"replication {run_id} names configuration {label!r} as best but lists no replica runs")
    replicas, models = [], []
    for replica_run in runs:
        try:
            run = client.get_run(replica_run)
        except MlflowException:
            raise RegistryError(f"replica run {replica_run} of replication {run_id} is missing") from None
        value = _min_metric(client, replica_run, metric)
        replica = StudyTrial(replica_run, run.data.tags.get(TRIAL_TAG, replica_run),
                             math.inf if value is None else value, dict(run.data.params), dict(run.data.tags))
        uri = challenger_model_uri(client, replica, data_dir, notes)
        replicas.append((replica, uri))
        models.append(score_model(uri, tracking_uri, eval_set, data_dir, dev_set, others))
    pick = min(range(len(replicas)), key=lambda i: (replicas[i][0].value, i))
    trial, uri = replicas[pick]
    seed = seeds[pick] if pick < len(seeds) else trial.params.get("replica.seed", "?")
    detail = (f"replication {run_id}: config {label}, {len(models)} seeds, test list of {len(eval_set.trials)} "
              f"trials; registered seed {seed}, the lowest {metric} ({trial.value:.4g})")
    seed_ids = [int(s) for s in seeds] if len(seeds) == len(models) else list(range(len(models)))
    return Evidence(REPLICATION, detail, trial, uri, models[pick], models, run_id, label, seed_ids)
