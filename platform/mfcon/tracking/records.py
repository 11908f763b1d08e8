"""The readers: a study as it stands in MLflow, read back from the runs ``tracking.runs`` writes.

Reads only the store, never Ray or the work dir, so the report and the Optuna
rebuild work for a finished, interrupted or still-running study in any tracking
store. The run layout is docs/ARCHITECTURE.md, "Study outputs".
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from mfcon.evaluation.noise_floor import BaselineComparison, compare_with_baseline
from mfcon.evaluation.selection import best_epoch, best_value
from mfcon.names import SELECTION_METRICS
from mfcon.tracking.store import (
    BASELINE_TAG,
    METRIC_TAG,
    REPLICATION_FILE,
    SEED_PARAM,
    ROLE_TAG,
    SPACE_DIR,
    STATE_TAG,
    STUDY_TAG,
    TRIAL_TAG,
    find_runs,
    no_artifact_progress_bars,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialRecord:
    """One child run of a study, as the report and the Optuna rebuild need it.

    "Best" is :func:`mfcon.evaluation.selection.best_epoch` of the study's metric (``selection``), the
    same epoch whose checkpoint the study exported; EER and minDCF are read at that epoch.
    """

    trial_id: str
    run_id: str
    run_name: str
    state: str  # completed | pruned | failed | running
    params: dict[str, str]
    eer: dict[int, float]  # epoch -> eer (percent)
    min_dcf: dict[int, float]  # epoch -> min_dcf
    epochs_run: int
    start_time: int  # ms
    metric: str = "dev_eer"  # the study's metric
    selection: dict[int, float] = field(default_factory=dict)  # epoch -> the study's metric
    baseline: bool = False  # the study's lambda = 0 reference trial (tag mfcon.baseline)

    @property
    def history(self) -> dict[int, float]:
        return self.selection or (self.eer if self.metric == "dev_eer" else {})

    @property
    def best_epoch(self) -> int | None:
        return best_epoch(self.history)

    @property
    def best_value(self) -> float | None:
        """The study metric at the best epoch."""
        return best_value(self.history)

    @property
    def best_eer(self) -> float | None:
        return self.eer.get(self.best_epoch) if self.best_epoch is not None else None

    @property
    def best_min_dcf(self) -> float | None:
        """min_dcf at the best epoch (the epoch whose checkpoint the trial keeps)."""
        return self.min_dcf.get(self.best_epoch) if self.best_epoch is not None else None

    @property
    def seed(self) -> int | None:
        """The training seed when the trial set its own (baseline seeds); None: the space's base seed."""
        value = self.params.get(SEED_PARAM)
        return int(value) if value not in (None, "") and value.lstrip("-").isdigit() else None


@dataclass(frozen=True)
class StudyRecord:
    name: str
    experiment_id: str
    parent_run_id: str
    tags: dict[str, str]
    space_yaml: str | None
    space_file: str | None
    trials: list[TrialRecord] = field(default_factory=list)
    metric: str = "dev_eer"  # the space's metric: ranking, "best", the searcher and the exported checkpoint

    def ranked(self) -> list[TrialRecord]:
        """Trials by best value of the study's metric (those without one last), ties by trial id."""
        return sorted(self.trials, key=lambda t: (t.best_value is None, t.best_value or 0.0, t.trial_id))

    @property
    def best(self) -> TrialRecord | None:
        """The best finished-or-running trial by the study's metric, the baseline included."""
        ranked = [t for t in self.ranked() if t.best_value is not None and t.state != "failed"]
        return ranked[0] if ranked else None

    @property
    def baseline_trials(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.baseline]

    def baseline_comparison(self) -> BaselineComparison:
        """The best MFCon trial against the baseline seeds, with the study's noise floor."""
        done = [t for t in self.trials if t.state in ("completed", "pruned")]
        return compare_with_baseline(self.name, self.metric, {t.trial_id: t.best_value for t in done if not t.baseline},
                                     [t.best_value for t in done if t.baseline])

    def states(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.state] = out.get(t.state, 0) + 1
        return out


class StudyNotFound(ValueError):
    """No MLflow experiment (or no study run) of that name in the tracking store."""


def _history(client, run_id: str, key: str) -> dict[int, float]:
    return {int(m.step): float(m.value) for m in client.get_metric_history(run_id, key) if math.isfinite(m.value)}


def _trial_record(client, run, metric: str) -> TrialRecord:
    run_id = run.info.run_id
    eer, dcf = _history(client, run_id, "dev_eer"), _history(client, run_id, "dev_min_dcf")
    selection = {"dev_eer": eer, "dev_min_dcf": dcf}.get(metric) or _history(client, run_id, metric)
    epochs = max([*eer, *_history(client, run_id, "train_loss"), 0])
    return TrialRecord(trial_id=run.data.tags.get(TRIAL_TAG, run.info.run_name or run_id),
                       run_id=run_id, run_name=run.info.run_name or "", state=run.data.tags.get(STATE_TAG, "running"),
                       params=dict(run.data.params), eer=eer, min_dcf=dcf, epochs_run=epochs,
                       start_time=int(run.info.start_time or 0), metric=metric, selection=selection,
                       baseline=run.data.tags.get(BASELINE_TAG) == "true")


def study_metric(tags: dict[str, str], space_yaml: str | None) -> str:
    """The metric a study optimised: its run's tag, else its logged space's ``metric``, else dev_eer."""
    if tags.get(METRIC_TAG) in SELECTION_METRICS:
        return tags[METRIC_TAG]
    try:
        declared = (yaml.safe_load(space_yaml or "") or {}).get("metric")
    except yaml.YAMLError:
        declared = None
    declared = f"dev_{declared}" if declared in ("eer", "min_dcf", "min_dcf_005") else declared
    return declared if declared in SELECTION_METRICS else SELECTION_METRICS[0]


def _space_artifact(client, run_id: str) -> tuple[str | None, str | None]:
    """(YAML text, file name) of the study's ``search_space/`` artifact, if it has one."""
    try:
        files = [f.path for f in client.list_artifacts(run_id, SPACE_DIR) if f.path.endswith((".yaml", ".yml"))]
        if not files:
            return None, None
        with tempfile.TemporaryDirectory() as tmp, no_artifact_progress_bars():
            local = client.download_artifacts(run_id, files[0], tmp)
            return Path(local).read_text(), Path(files[0]).name
    except Exception as e:  # noqa: BLE001 - an unreadable artifact store must not stop a report
        logger.warning("cannot read %s/ of run %s: %s", SPACE_DIR, run_id, e)
        return None, None


def load_study(client, study_name: str) -> StudyRecord:
    """The parent run and every trial run of a study, trials in start order."""
    exp = client.get_experiment_by_name(study_name)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments(max_results=50))
        raise StudyNotFound(f"no study {study_name!r} in the tracking store; experiments there: {names}")
    parents = find_runs(client, exp.experiment_id, **{STUDY_TAG: study_name, ROLE_TAG: "study"})
    if not parents:
        raise StudyNotFound(f"experiment {study_name!r} has no study run (tag {ROLE_TAG}=study): not an mfcon study")
    parent = parents[0]
    space_yaml, space_file = _space_artifact(client, parent.info.run_id)
    metric = study_metric(dict(parent.data.tags), space_yaml)
    children = find_runs(client, exp.experiment_id, **{MLFLOW_PARENT_RUN_ID: parent.info.run_id})
    trials = sorted((_trial_record(client, r, metric) for r in children), key=lambda t: (t.start_time, t.trial_id))
    return StudyRecord(study_name, exp.experiment_id, parent.info.run_id, dict(parent.data.tags),
                       space_yaml, space_file, trials, metric)


def read_replication(client, study: str) -> dict[str, Any] | None:
    """The latest ``replication.json`` of a study (for promotion and reports), or None."""
    exp = client.get_experiment_by_name(study)
    if exp is None:
        return None
    parents = [r for r in find_runs(client, exp.experiment_id, **{ROLE_TAG: "replication"})
               if r.info.status == "FINISHED"]
    if not parents:
        return None
    run = max(parents, key=lambda r: r.info.end_time or 0)
    with tempfile.TemporaryDirectory() as tmp, no_artifact_progress_bars():
        try:
            path = client.download_artifacts(run.info.run_id, REPLICATION_FILE, tmp)
        except Exception:  # noqa: BLE001 - a replication that never scored has no table
            return None
        return {**json.loads(Path(path).read_text()), "run_id": run.info.run_id}
