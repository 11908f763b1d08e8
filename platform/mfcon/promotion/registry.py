"""Promote a study's challenger to the model registry, and roll back.

Aliases only (stages are deprecated in MLflow 3): ``champion`` is the model in
use, ``previous`` the champion it replaced. :func:`promote` registers a new
version for every call (tagged ``promoted=true|false``) and moves ``champion``
per :func:`mfcon.promotion.gate.gate`: when the upper bound of the cluster-
bootstrap CI of EER(challenger) - EER(champion) on the held-out **test** list
(resampling enrollment speakers) is below 0, or when forced (tag
``forced=true``). The dev list picks the challenger, the test list judges it.

Several named test lists (``prepare --test-trials O=... --test-trials E=...``):
every model is scored on each, the EER, minDCF and difference to the champion
are reported per list (version tags ``list.<NAME>.*``), and the gate decides on
one, ``decide_on`` (``--decide-on``; default ``test`` when the folder has it,
else its first list), recorded as tag ``decided_on``.

Evidence (:mod:`mfcon.promotion.evidence`, tags ``evidence`` and
``evidence_detail``): with a replication of the study, its best configuration
(chosen on dev): all of its seed models are gated, the seed with the lowest dev
metric is registered (``replication``); without one, the study's best trial by
the dev selection metric, re-scored on the test list (``study_trial``).

Scoring contract (shared with :func:`mfcon.serving.verify`): embeddings from
the registered model, cosine after subtracting the mean embedding of the **dev**
split, as :func:`mfcon.evaluation.scoring.score_trials` with a fitted centre. That
mean is stored on the version (tag ``score_mean``, JSON floats, exact float32
round trip) together with the EER threshold of the dev trials' scores
(``eer_threshold``; tag ``serving_fit=dev``), so a single pair is scored
exactly as the trial lists were, and the test list is only ever scored. Using a model (verify, embed, loading by
alias) belongs to :mod:`mfcon.serving`.

Rollback: ``champion`` <- ``previous``; the rolled-back version is tagged
``rolled_back=true``; ``previous`` <- the version the restored champion had
itself replaced (tag ``replaced_version``), or is removed when there is none,
so repeated rollbacks walk back the promotion history and never re-promote a
rolled-back version.

Example::

    result = promote("demo", "sqlite:////abs/runs/mlflow.db", data_dir="data/synth")
    result.evidence, result.evidence_detail  # "study_trial", "best trial ... re-scored on the test list of ..."
    rollback("sqlite:////abs/runs/mlflow.db")
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mfcon import storage
from mfcon.data.local import read_eval_set, read_test_sets
from mfcon.data.shards import manifest_hash
from mfcon.evaluation.metrics import BootstrapResult, min_dcf
from mfcon.evaluation.verdicts import PairedInterval
from mfcon.names import (
    CHAMPION,
    DEFAULT_MODEL,
    PREVIOUS,
    SELECTION_METRICS,
    RegistryError,
)
from mfcon.promotion.evidence import (
    FINISHED_STATES,
    REPLICATION,
    STUDY_TRIAL,
    Evidence,
    Scored,
    StudyTrial,
    challenger_model_uri,
    eer_interval,
    finished_trials,
    gather_evidence,
    score_embedder,
    score_model,
)
from mfcon.promotion.gate import gate
from mfcon.evaluation.score_norm import DEFAULT_TOP_N
from mfcon.serving import open_registry, use_tracking_uri
from mfcon.serving.verify import store_cohort
from mfcon.tracking import ROLE_TAG, code_version, find_runs
from mfcon.tracking.records import study_metric

__all__ = [
    "FINISHED_STATES", "REPLICATION", "SELECTION_METRICS", "STUDY_TRIAL", "ListComparison", "PromotionResult",
    "RegistryError",
    "RollbackResult", "Scored", "StudyTrial", "challenger_model_uri", "finished_trials", "promote", "rollback",
    "score_embedder",
]
TEST_SPLIT = "test"  # judges the models
DEV_SPLIT = "dev"  # fits the serving settings (centring mean, threshold); the challenger was picked on it


def study_selection_metric(client: MlflowClient, study: str) -> str:
    """The metric the study optimised (its run's tag ``mfcon.metric``, else its logged space), so promotion
    picks its challenger by the same "best" as the study, the report and the replication."""
    exp = client.get_experiment_by_name(study)
    parents = find_runs(client, exp.experiment_id, **{ROLE_TAG: "study"}) if exp is not None else []
    if not parents:
        return SELECTION_METRICS[0]
    return study_metric(dict(parents[0].data.tags), None)


@dataclass(frozen=True)
class ListComparison:
    """Challenger (and champion) on one named test list, with their difference; EER in percent, minDCF p=0.01."""

    name: str
    n_trials: int
    n_speakers: int
    challenger_eer: float
    challenger_min_dcf: float
    champion_eer: float | None = None
    champion_min_dcf: float | None = None
    delta: BootstrapResult | PairedInterval | None = None  # EER(challenger) - EER(champion), points


def _min_dcf(s: Scored) -> float:
    return float(min_dcf(s.scores, s.labels, p_target=0.01)[0])


def compare_on_list(name: str, ev: Evidence, champion: Scored | None, groups: np.ndarray, n_boot: int,
                    confidence: float, seed: int) -> ListComparison:
    """The evidence and the champion on list ``name`` (``ev`` and ``champion`` already judged on it)."""
    delta = ev.delta(champion, groups, n_boot, confidence, seed) if champion is not None else None
    return ListComparison(name, len(groups), len(set(groups)), ev.challenger.eer, _min_dcf(ev.challenger),
                          None if champion is None else champion.eer,
                          None if champion is None else _min_dcf(champion), delta)


@dataclass
class PromotionResult:
    model_name: str
    version: str
    study: str
    trial: StudyTrial  # the run whose model was registered (a study trial or a replica)
    metric: str  # the dev selection metric
    challenger: Scored  # the registered model on the test list
    champion: Scored | None
    champion_version: str | None
    delta: BootstrapResult | PairedInterval | None  # EER(challenger) - EER(champion) on the test list, points
    promoted: bool
    forced: bool  # promoted only because it was forced
    reason: str
    n_trials: int  # test trials
    n_groups: int  # test enrollment speakers
    evidence: str  # "replication" or "study_trial"
    evidence_detail: str
    replication_run_id: str | None = None
    seed_eers: list[float] = field(default_factory=list)  # test EER (%) of every challenger model gated
    notes: list[str] = field(default_factory=list)
    decided_on: str = TEST_SPLIT  # the named test list the gate decided on
    lists: list[ListComparison] = field(default_factory=list)  # every test list, the decided one first (when >1)


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


# ---------------------------------------------------------------- promote / rollback

def promote(study: str, tracking_uri: str, model_name: str = DEFAULT_MODEL, metric: str | None = None,
            data_dir: str | Path | None = None, force: bool = False, n_boot: int = 1000, seed: int = 0,
            confidence: float = 0.95, score_norm: str = "mean", top_n: int = DEFAULT_TOP_N,
            decide_on: str | None = None) -> PromotionResult:
    """Register the study's challenger; make it ``champion`` if significantly better on the test list (or forced).

    ``metric`` (a dev metric; default: the one the study optimised) picks the best trial, or the replica to
    register; serving settings are fitted on the dev split of ``data_dir``, whose test split scores challenger
    and champion on every named test list; the gate decides on ``decide_on`` (default: ``test`` when the folder
    has it, else its first list).
    """
    if data_dir is None:
        raise RegistryError("promote needs data_dir: the prepared data folder whose test trials judge the models")
    data_dir = storage.normalize(data_dir)  # a local folder or an object-store URI
    client = open_registry(tracking_uri)
    metric = metric or study_selection_metric(client, study)
    exp_id, trials = finished_trials(client, study, metric)
    decided, tests = read_test_sets(data_dir, score_norm, top_n, decide_on)  # champion and challenger alike
    eval_set = tests[decided]
    others = {name: s.trials for name, s in tests.items() if name != decided}
    dev_set = read_eval_set(data_dir, DEV_SPLIT, "mean")  # fits each model's serving settings
    groups = np.array([t.enroll.split("/")[0] for t in eval_set.trials])
    notes: list[str] = []
    ev = gather_evidence(client, study, trials, metric, eval_set, data_dir, tracking_uri, notes, dev_set, others)
    challenger = ev.challenger
    challenger.eer_ci = eer_interval(challenger, groups, n_boot, confidence, seed)

    champ_version = (_aliases(client, model_name) or {}).get(CHAMPION)
    champion, delta = None, None
    if champ_version:
        champion = score_model(f"models:/{model_name}/{champ_version}", tracking_uri, eval_set, data_dir, dev_set,
                               others)
        champion.eer_ci = eer_interval(champion, groups, n_boot, confidence, seed)
        delta = ev.delta(champion, groups, n_boot, confidence, seed)
    lists = []
    if others:
        lists.append(compare_on_list(decided, ev, champion, groups, n_boot, confidence, seed))
        for name, trials in others.items():
            list_groups = np.array([t.enroll.split("/")[0] for t in trials])
            lists.append(compare_on_list(name, ev.on_list(name), None if champion is None else champion.lists[name],
                                         list_groups,
                                         n_boot, confidence, seed))
    named = "the test list" if decided == TEST_SPLIT else f"test list {decided}"
    on = f"{named} ({len(eval_set.trials)} trials, {len(set(groups))} speakers)"
    if ev.kind == REPLICATION:
        on += f" with {len(ev.models)} seeds of {ev.config}"
    decision = gate(delta, force=force, evidence=on, units="percent")
    study_tags = _study_tags(client, exp_id)
    data_hash = manifest_hash(data_dir)
    if study_tags.get("mfcon.data_manifest_sha256", data_hash) != data_hash:
        notes.append("the data folder differs from the study's (manifest sha256 mismatch)")
    tags = _version_tags(study, ev, metric, champion, champ_version, delta, decision.promote, decision.forced,
                         decision.reason, data_hash, study_tags.get("mfcon.code_version") or code_version(),
                         confidence, n_boot, len(eval_set.trials), len(set(groups)))
    tags.update(_list_tags(decided, lists))
    version = _register(client, model_name, ev.model_uri, ev.trial.run_id, tags)
    if challenger.cohort is not None:
        store_cohort(client, model_name, version, ev.trial.run_id, challenger.cohort)
    if decision.promote:
        if champ_version:
            client.set_registered_model_alias(model_name, PREVIOUS, champ_version)
            client.set_model_version_tag(model_name, version, "replaced_version", champ_version)
        client.set_registered_model_alias(model_name, CHAMPION, version)
    return PromotionResult(
        model_name=model_name, version=version, study=study, trial=ev.trial, metric=metric, challenger=challenger,
        champion=champion, champion_version=champ_version, delta=delta, promoted=decision.promote,
        forced=decision.forced, reason=decision.reason, n_trials=len(eval_set.trials), n_groups=len(set(groups)),
        evidence=ev.kind, evidence_detail=ev.detail, replication_run_id=ev.replication_run_id,
        seed_eers=[m.eer for m in ev.models], notes=notes, decided_on=decided, lists=lists)


def _study_tags(client: MlflowClient, exp_id: str) -> dict[str, str]:
    parents = find_runs(client, exp_id, **{ROLE_TAG: "study"})
    return dict(parents[0].data.tags) if parents else {}


def _version_tags(study: str, ev: Evidence, metric: str, champ: Scored | None, champ_version: str | None,
                  delta: BootstrapResult | PairedInterval | None, promoted: bool, forced: bool, reason: str, data_hash: str,
                  code: str, confidence: float, n_boot: int, n_trials: int, n_speakers: int) -> dict[str, str]:
    chal, trial = ev.challenger, ev.trial
    tags = {
        "study": study, "trial_id": trial.trial_id, "run_id": trial.run_id, "model_uri": ev.model_uri,
        "params": json.dumps(trial.params, sort_keys=True), "selection_metric": metric,
        f"trial_{metric}": repr(trial.value), "eer": f"{chal.eer:.4f}",
        "eer_ci_low": f"{chal.eer_ci[0]:.4f}", "eer_ci_high": f"{chal.eer_ci[1]:.4f}",
        "eer_threshold": repr(float(chal.threshold)), "score_mean": json.dumps([float(x) for x in chal.mean]),
        "serving_fit": DEV_SPLIT,  # score_mean and eer_threshold come from the dev list, never the test list
        "score_norm": "mean" if chal.cohort is None else "asnorm",
        "scoring": ("cosine(emb - score_mean); accept if score >= eer_threshold" if chal.cohort is None else
                    f"asnorm(cosine(emb - score_mean), cohort - score_mean, top_n={chal.top_n}); "
                    "accept if score >= eer_threshold"),
        "evidence": ev.kind, "evidence_detail": ev.detail, "eval_split": TEST_SPLIT,
        "n_trials": str(n_trials), "n_speakers": str(n_speakers),
        "confidence": str(confidence), "n_boot": str(n_boot), "data_manifest_sha256": data_hash,
        "code_version": code, "promoted": str(promoted).lower(), "forced": str(forced).lower(), "decision": reason,
    }
    if chal.cohort is not None:
        tags["score_top_n"] = str(chal.top_n)
    if ev.kind == REPLICATION:
        tags.update({"replication_run_id": ev.replication_run_id, "replication_config": ev.config,
                     "n_seeds": str(len(ev.models)), "seed_eers": json.dumps([round(m.eer, 4) for m in ev.models])})
    if champ is not None:
        tags.update({"champion_version": champ_version, "champion_eer": f"{champ.eer:.4f}",
                     "delta_eer": f"{delta.estimate:.4f}", "delta_ci_low": f"{delta.low:.4f}",
                     "delta_ci_high": f"{delta.high:.4f}"})
    return tags


def _list_tags(decided: str, lists: list[ListComparison]) -> dict[str, str]:
    """``decided_on``, and per list ``list.<NAME>.eer`` / ``.min_dcf`` (+ ``.champion_eer``, ``.delta_eer`` and its
    CI when there is a champion) when there are several lists."""
    tags = {"decided_on": decided}
    for c in lists:
        prefix = f"list.{c.name}."
        tags.update({prefix + "n_trials": str(c.n_trials), prefix + "eer": f"{c.challenger_eer:.4f}",
                     prefix + "min_dcf": f"{c.challenger_min_dcf:.4f}"})
        if c.delta is not None:
            tags.update({prefix + "champion_eer": f"{c.champion_eer:.4f}",
                         prefix + "delta_eer": f"{c.delta.estimate:.4f}",
                         prefix + "delta_ci_low": f"{c.delta.low:.4f}",
                         prefix + "delta_ci_high": f"{c.delta.high:.4f}"})
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
