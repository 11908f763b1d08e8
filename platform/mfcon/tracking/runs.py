"""The writers: the study's parent run and a child run per trial.

Trial runs are written by a Tune callback on the driver, not by workers: the
driver sees every trial, including ones ASHA stopped or that crashed, so every
trial appears in MLflow with its final state, and a resumed study re-attaches
to the runs it already has instead of duplicating them.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from mfcon.tracking.store import (
    ROLE_TAG,
    SPACE_DIR,
    STATE_TAG,
    STUDY_TAG,
    TRIAL_TAG,
    artifact_root_for,
    code_version,
    ensure_experiment,
    find_runs,
)

TRIAL_METRICS = ("train_loss", "margin_loss", "mfcon_loss", "dev_eer", "dev_min_dcf", "dev_min_dcf_005", "lr",
                 "startup_seconds", "train_seconds")


CHILD_ROLES = {"study": "trial", "replication": "replica"}  # parent run role -> its child runs' role


def _now_ms() -> int:
    return int(time.time() * 1000)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


class StudyTracker:
    """The study's parent run: search space, code version, data hash, best trial so far."""

    def __init__(self, tracking_uri: str, study: str, workdir: str | Path, role: str = "study"):
        """``role`` "study" (the search) or "replication" (its top configurations retrained with several seeds):
        one parent run of each role per study experiment; their children are ``trial`` or ``replica`` runs."""
        self.uri, self.study, self.role = tracking_uri, study, role
        self.child_role = CHILD_ROLES[role]
        self.client = MlflowClient(tracking_uri)
        self.experiment_id = ensure_experiment(self.client, study, artifact_root_for(tracking_uri, workdir))
        self.parent_run_id = self._parent_run()

    def _parent_run(self) -> str:
        existing = find_runs(self.client, self.experiment_id, **{STUDY_TAG: self.study, ROLE_TAG: self.role})
        if existing:
            run_id = existing[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=f"{self.role}-{self.study}",
                                     tags={STUDY_TAG: self.study, ROLE_TAG: self.role})
        return run.info.run_id

    def log_study_inputs(self, space_file: Path, base_params: dict[str, Any], data_hash: str) -> None:
        tags = {"mfcon.code_version": code_version(), "mfcon.data_manifest_sha256": data_hash,
                "mfcon.search_space": space_file.name}
        self.client.log_batch(self.parent_run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        existing = self.client.get_run(self.parent_run_id).data.params
        params = [Param(f"base.{k}", str(v)[:6000]) for k, v in flatten(base_params).items() if f"base.{k}" not in existing]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.parent_run_id, params=params[i : i + 100])
        self.client.log_artifact(self.parent_run_id, str(space_file), artifact_path=SPACE_DIR)

    def log_best(self, trial_id: str, value: float, metric: str) -> None:
        """Record a new study best: tags ``best_trial``/``best_<metric>`` and the metric ``best_<metric>``.

        MLflow shows a metric's value at its highest step, so each new best is
        logged one step after the last one, whatever epoch it was found at: an
        improvement found at epoch 1 after an earlier best at epoch 4 must not
        hide behind it.
        """
        key = f"best_{metric}"
        step = max((m.step for m in self.client.get_metric_history(self.parent_run_id, key)), default=-1) + 1
        self.client.log_batch(self.parent_run_id, metrics=[Metric(key, float(value), _now_ms(), step)],
                              tags=[RunTag("best_trial", trial_id), RunTag(key, repr(float(value)))])

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_run_id, status=status)


class TrialRuns:
    """Child runs keyed by Tune trial id, re-attached after a resume."""

    def __init__(self, tracker: StudyTracker):
        self.tracker, self.client = tracker, tracker.client
        self.run_ids: dict[str, str] = {}
        self.logged_epochs: dict[str, int] = {}
        for run in find_runs(self.client, tracker.experiment_id, **{MLFLOW_PARENT_RUN_ID: tracker.parent_run_id}):
            trial_id = run.data.tags.get(TRIAL_TAG)
            if trial_id:
                self.run_ids[trial_id] = run.info.run_id
                history = self.client.get_metric_history(run.info.run_id, "train_loss")
                self.logged_epochs[trial_id] = max((m.step for m in history), default=0)

    def start(self, trial_id: str, params: dict[str, Any]) -> str:
        if trial_id in self.run_ids:
            self.client.update_run(self.run_ids[trial_id], status="RUNNING")
            return self.run_ids[trial_id]
        run = self.client.create_run(self.tracker.experiment_id, run_name=f"{self.tracker.child_role}-{trial_id}", tags={
            MLFLOW_PARENT_RUN_ID: self.tracker.parent_run_id, STUDY_TAG: self.tracker.study,
            ROLE_TAG: self.tracker.child_role, TRIAL_TAG: trial_id, STATE_TAG: "running"})
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        self.run_ids[trial_id] = run.info.run_id
        self.logged_epochs[trial_id] = 0
        return run.info.run_id

    def log_epoch(self, trial_id: str, result: dict[str, Any], timestamp_ms: int) -> None:
        epoch = int(result.get("epoch", 0))
        if trial_id not in self.run_ids or epoch <= self.logged_epochs.get(trial_id, 0):
            return  # replayed after a resume: already logged
        metrics = [Metric(k, float(result[k]), timestamp_ms, epoch) for k in TRIAL_METRICS
                   if isinstance(result.get(k), (int, float)) and math.isfinite(result[k])]
        self.client.log_batch(self.run_ids[trial_id], metrics=metrics)
        self.logged_epochs[trial_id] = epoch

    def finish(self, trial_id: str, state: str, checkpoint_file: str | None = None) -> None:
        run_id = self.run_ids.get(trial_id)
        if run_id is None:
            return
        if checkpoint_file:
            self.client.log_artifact(run_id, checkpoint_file, artifact_path="checkpoint")
        self.client.set_tag(run_id, STATE_TAG, state)
        status = {"completed": "FINISHED", "pruned": "FINISHED", "failed": "FAILED"}.get(state, "KILLED")
        self.client.set_terminated(run_id, status=status)
