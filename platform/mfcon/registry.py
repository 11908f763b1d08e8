"""Promote a study's best trial to the model registry, and roll back.

Aliases only (stages are deprecated in MLflow 3): ``champion`` is the model in
use, ``previous`` the champion it replaced. :func:`promote` registers a new
version for every call (tagged ``promoted=true|false``) and moves ``champion``
only when the challenger is *significantly* better on the same trial list:
the upper bound of the paired cluster-bootstrap CI of EER(challenger) -
EER(champion) is below 0 (:func:`mfcon.metrics.bootstrap_eer_difference`,
resampling enrollment speakers), or when forced (tag ``forced=true``).

Scoring contract (shared with :func:`mfcon.serving.verify`): embeddings from
the registered pyfunc, cosine after subtracting the mean embedding of the
promotion's eval set, as :func:`mfcon.scoring.score_trials`. That mean is
stored on the version (tag ``score_mean``, JSON floats, exact float32 round
trip) together with the EER threshold of those scores (``eer_threshold``), so
a single pair is scored exactly as the trial list was. Using a model (verify,
embed, loading by alias) belongs to :mod:`mfcon.serving`.

Rollback: ``champion`` <- ``previous``; the rolled-back version is tagged
``rolled_back=true``; ``previous`` <- the version the restored champion had
itself replaced (tag ``replaced_version``), or is removed when there is none,
so repeated rollbacks walk back the promotion history and never re-promote a
rolled-back version.

Example::

    result = promote("demo", "sqlite:////abs/runs/mlflow.db", data_dir="data/synth")
    rollback("sqlite:////abs/runs/mlflow.db")
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mfcon.data.local import read_eval_set
from mfcon.data.shards import manifest_hash, read_manifest
from mfcon.metrics import BootstrapResult, bootstrap_eer_difference, equal_error_rate
from mfcon.names import (
    CHAMPION,
    DEFAULT_MODEL,
    PREVIOUS,
    SELECTION_METRICS,
    RegistryError,
)
from mfcon.scoring import EvalSet
from mfcon.serving import (
    MODEL_URI_TAG,
    SpeakerEmbedder,
    centered_cosine,
    embedder_of,
    load_embedder,
    log_speaker_model,
    open_registry,
    use_tracking_uri,
)
from mfcon.tracking import (
    ROLE_TAG,
    STATE_TAG,
    TRIAL_TAG,
    code_version,
    find_runs,
    no_artifact_progress_bars,
)
from mfcon.train.checkpoint import EXPORTED_ARTIFACT

FINISHED_STATES = ("completed", "pruned")


@dataclass(frozen=True)
class StudyTrial:
    """A finished tuning trial of a study (its MLflow child run), a candidate for promotion."""

    run_id: str
    trial_id: str
    value: float  # best value of the selection metric over the run's epochs
    params: dict[str, str]
    tags: dict[str, str]


@dataclass
class Scored:
    """One model's scores on the promotion trial list; ``eer`` in percent."""

    scores: np.ndarray
    labels: np.ndarray
    eer: float
    threshold: float
    mean: np.ndarray  # (E,) float32: subtracted before cosine
    eer_ci: tuple[float, float] = (math.nan, math.nan)


@dataclass
class PromotionResult:
    model_name: str
    version: str
    study: str
    trial: StudyTrial
    metric: str
    challenger: Scored
    champion: Scored | None
    champion_version: str | None
    delta: BootstrapResult | None  # EER(challenger) - EER(champion), percent points
    promoted: bool
    forced: bool
    reason: str
    n_trials: int
    n_groups: int
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RollbackResult:
    model_name: str
    champion: str  # version restored
    rolled_back: str | None
    previous: str | None


# ---------------------------------------------------------------- aliases

def _aliases(client: MlflowClient, name: str) -> dict[str, str] | None:
    """Alias -> version of registered model ``name``; None when it does not exist."""
    found = client.search_registered_models(filter_string=f"name = '{name}'")
    return {k: str(v) for k, v in found[0].aliases.items()} if found else None


# ---------------------------------------------------------------- choosing the challenger

def finished_trials(client: MlflowClient, study: str, metric: str = "eer") -> tuple[str, list[StudyTrial]]:
    """(experiment id, completed/pruned trials with a finite ``metric``, best first)."""
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
        values = [m.value for m in client.get_metric_history(run.info.run_id, metric) if math.isfinite(m.value)]
        if values:
            trials.append((min(values), run.info.start_time or 0, StudyTrial(
                run.info.run_id, run.data.tags.get(TRIAL_TAG, run.info.run_id), min(values),
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
    notes.append(f"logged the trial's checkpoint as pyfunc model {uri}")
    return uri


# ---------------------------------------------------------------- scoring

def score_embedder(model: SpeakerEmbedder, eval_set: EvalSet, data_dir: Path) -> Scored:
    """Embed the eval split, score every trial with ``centered_cosine`` (== score_trials), EER + threshold."""
    data_cfg = read_manifest(data_dir).feature_config
    if model.feature_config != data_cfg:
        raise RegistryError(f"{data_dir}: features were prepared with {data_cfg}, the model expects "
                            f"{model.feature_config}; prepare the data with the model's feature config")
    emb = model.embed_features(eval_set.features)  # (N, E)
    mean = emb.mean(axis=0)
    index = {u: i for i, u in enumerate(eval_set.utt_ids)}
    a = emb[[index[t.enroll] for t in eval_set.trials]]
    b = emb[[index[t.test] for t in eval_set.trials]]
    scores = centered_cosine(a, b, mean)
    labels = np.array([t.label for t in eval_set.trials], dtype=np.int64)
    eer, threshold = equal_error_rate(scores, labels)
    return Scored(scores, labels, 100.0 * eer, threshold, mean)


def _percent(r: BootstrapResult) -> BootstrapResult:
    return BootstrapResult(100 * r.estimate, 100 * r.low, 100 * r.high, r.confidence, r.n_boot)


def eer_interval(s: Scored, groups: np.ndarray, n_boot: int, confidence: float, seed: int) -> tuple[float, float]:
    """Cluster-bootstrap CI of one system's EER (%): paired against a perfect scorer (EER 0 on every resample)."""
    r = bootstrap_eer_difference(s.scores, s.labels.astype(np.float64), s.labels, groups, n_boot, confidence, seed)
    return 100 * r.low, 100 * r.high


# ---------------------------------------------------------------- promote / rollback

def promote(study: str, tracking_uri: str, model_name: str = DEFAULT_MODEL, metric: str = "eer",
            data_dir: str | Path | None = None, force: bool = False, n_boot: int = 1000, seed: int = 0,
            confidence: float = 0.95) -> PromotionResult:
    """Register the study's best finished trial; make it ``champion`` if significantly better (or forced)."""
    if data_dir is None:
        raise RegistryError("promote needs data_dir: the prepared data folder whose eval trials rescore the models")
    data_dir = Path(data_dir)
    client = open_registry(tracking_uri)
    exp_id, trials = finished_trials(client, study, metric)
    eval_set = read_eval_set(data_dir)
    groups = np.array([t.enroll.split("/")[0] for t in eval_set.trials])
    notes: list[str] = []
    trial, chal_uri = _first_with_model(client, study, trials, data_dir, notes)
    challenger = score_embedder(embedder_of(load_embedder(chal_uri, tracking_uri)), eval_set, data_dir)
    challenger.eer_ci = eer_interval(challenger, groups, n_boot, confidence, seed)

    champ_version = (_aliases(client, model_name) or {}).get(CHAMPION)
    champion, delta = None, None
    if champ_version:
        champ_model = embedder_of(load_embedder(f"models:/{model_name}/{champ_version}", tracking_uri))
        champion = score_embedder(champ_model, eval_set, data_dir)
        champion.eer_ci = eer_interval(champion, groups, n_boot, confidence, seed)
        delta = _percent(bootstrap_eer_difference(challenger.scores, champion.scores, challenger.labels, groups,
                                                  n_boot, confidence, seed))
    promoted, reason = _decide(champ_version, delta, force)
    study_tags = _study_tags(client, exp_id)
    data_hash = manifest_hash(data_dir)
    if study_tags.get("mfcon.data_manifest_sha256", data_hash) != data_hash:
        notes.append("the data folder differs from the study's (manifest sha256 mismatch)")
    tags = _version_tags(study, trial, metric, challenger, champion, champ_version, delta, promoted, force, reason,
                         data_hash, study_tags.get("mfcon.code_version") or code_version(), confidence, n_boot,
                         chal_uri)
    version = _register(client, model_name, chal_uri, trial.run_id, tags)
    if promoted:
        if champ_version:
            client.set_registered_model_alias(model_name, PREVIOUS, champ_version)
            client.set_model_version_tag(model_name, version, "replaced_version", champ_version)
        client.set_registered_model_alias(model_name, CHAMPION, version)
    return PromotionResult(model_name, version, study, trial, metric, challenger, champion, champ_version, delta,
                           promoted, force, reason, len(eval_set.trials), len(set(groups)), notes)


def _first_with_model(client: MlflowClient, study: str, trials: list[StudyTrial], data_dir: Path,
                      notes: list[str]) -> tuple[StudyTrial, str]:
    """The best trial that has a model or a checkpoint (a trial stopped before its first report has neither)."""
    for trial in trials:
        try:
            return trial, challenger_model_uri(client, trial, data_dir, notes)
        except RegistryError as e:
            notes.append(f"skipped: {e}")
    raise RegistryError(f"no finished trial of study {study!r} has a logged model or checkpoint/best.pt")


def _decide(champ_version: str | None, delta: BootstrapResult | None, force: bool) -> tuple[bool, str]:
    if champ_version is None:
        return True, "no champion yet"
    ci = f"{delta.confidence:.0%} CI of the EER difference [{delta.low:+.2f}, {delta.high:+.2f}] points"
    if delta.high < 0:
        return True, f"significantly better: {ci}"
    if force:
        return True, f"forced although not significantly better: {ci}"
    return False, f"not significantly better: {ci} does not lie below 0"


def _study_tags(client: MlflowClient, exp_id: str) -> dict[str, str]:
    parents = find_runs(client, exp_id, **{ROLE_TAG: "study"})
    return dict(parents[0].data.tags) if parents else {}


def _version_tags(study, trial, metric, chal, champ, champ_version, delta, promoted, forced, reason, data_hash,
                  code, confidence, n_boot, model_uri) -> dict[str, str]:
    tags = {
        "study": study, "trial_id": trial.trial_id, "run_id": trial.run_id, "model_uri": model_uri,
        "params": json.dumps(trial.params, sort_keys=True), "selection_metric": metric,
        f"trial_{metric}": repr(trial.value), "eer": f"{chal.eer:.4f}",
        "eer_ci_low": f"{chal.eer_ci[0]:.4f}", "eer_ci_high": f"{chal.eer_ci[1]:.4f}",
        "eer_threshold": repr(float(chal.threshold)), "score_mean": json.dumps([float(x) for x in chal.mean]),
        "scoring": "cosine(emb - score_mean); accept if score >= eer_threshold",
        "confidence": str(confidence), "n_boot": str(n_boot), "data_manifest_sha256": data_hash,
        "code_version": code, "promoted": str(promoted).lower(), "forced": str(forced).lower(), "decision": reason,
    }
    if champ is not None:
        tags.update({"champion_version": champ_version, "champion_eer": f"{champ.eer:.4f}",
                     "delta_eer": f"{delta.estimate:.4f}", "delta_ci_low": f"{delta.low:.4f}",
                     "delta_ci_high": f"{delta.high:.4f}"})
    return tags


def _register(client: MlflowClient, name: str, model_uri: str, run_id: str, tags: dict[str, str]) -> str:
    if _aliases(client, name) is None:
        try:
            client.create_registered_model(name, description="MFA-Conformer speaker embedder (mfcon promote)")
        except MlflowException as e:  # created concurrently
            if "already exists" not in str(e).lower():
                raise
    model_id = model_uri.split("/", 1)[1] if model_uri.startswith("models:/m-") else None
    with use_tracking_uri(client.tracking_uri):  # the SQL registry resolves models:/m-... with a default client
        mv = client.create_model_version(name, source=model_uri, run_id=run_id, tags=tags, model_id=model_id)
    return str(mv.version)


def rollback(tracking_uri: str, model_name: str = DEFAULT_MODEL) -> RollbackResult:
    """``champion`` <- ``previous``; see the module docstring for what ``previous`` becomes."""
    client = open_registry(tracking_uri)
    aliases = _aliases(client, model_name)
    if aliases is None:
        raise RegistryError(f"no registered model {model_name!r} in {tracking_uri}")
    champion, previous = aliases.get(CHAMPION), aliases.get(PREVIOUS)
    if previous is None:
        raise RegistryError(f"{model_name} has no '{PREVIOUS}' version to roll back to "
                            f"(champion is {'v' + champion if champion else 'unset'})")
    if champion:
        client.set_model_version_tag(model_name, champion, "rolled_back", "true")
    client.set_registered_model_alias(model_name, CHAMPION, previous)
    older = client.get_model_version(model_name, previous).tags.get("replaced_version")
    usable = older and older != champion and \
        client.get_model_version(model_name, older).tags.get("rolled_back") != "true"
    if usable:
        client.set_registered_model_alias(model_name, PREVIOUS, older)
    else:
        client.delete_registered_model_alias(model_name, PREVIOUS)
    return RollbackResult(model_name, previous, champion, older if usable else None)
