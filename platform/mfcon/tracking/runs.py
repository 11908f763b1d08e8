"""The writers: the study's parent run and a child run per trial, through the durable spool.

Trial runs are written by a Tune callback on the driver, not by workers: the
driver sees every trial, including ones ASHA stopped or that crashed, so every
trial appears in MLflow with its final state, and a resumed study re-attaches
to the runs it already has instead of duplicating them.

Every write goes through ``tracking.spool``: it is on local disk before the call
returns and reaches MLflow in order, in the background. A tracker made with
``wait_s=0`` (the study callback) never waits for MLflow, so an outage delays
logging but never blocks Tune; other callers (the study runner, tests, scripts)
wait up to ``wait_s`` for each write to land, as a plain MLflow client would,
without ever waiting out an outage.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Self

from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from mfcon.tracking.spool import PendingWrites, TrackingWriteError, open_spool
from mfcon.tracking.store import (
    ROLE_TAG,
    SPACE_DIR,
    STATE_TAG,
    STUDY_TAG,
    TRIAL_TAG,
    TrackingUnavailable,
    artifact_root_for,
    code_version,
    find_runs,
)

log = logging.getLogger(__name__)

TRIAL_METRICS = ("train_loss", "margin_loss", "mfcon_loss", "dev_eer", "dev_min_dcf", "dev_min_dcf_005", "lr",
                 "startup_seconds", "train_seconds")


CHILD_ROLES = {"study": "trial", "replication": "replica"}  # parent run role -> its child runs' role
WAIT_S = 60.0  # how long a waiting tracker waits for one write (an outage ends the wait at once)
DRAIN_S = float(os.environ.get("MFCON_TRACKING_DRAIN_S", "120"))  # how long a study's end waits for the spool
INTERRUPTED_DRAIN_S = 10.0  # after Ctrl-C, a person is waiting
TRIAL_STATUS = {"completed": "FINISHED", "pruned": "FINISHED", "failed": "FAILED"}  # trial state -> run status


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
    """The study's parent run: search space, code version, data hash, best trial so far.

    Use it as a context manager around a study: a study that raises marks its
    run FAILED (KILLED on Ctrl-C) without ever raising over the original error,
    and the end waits up to ``DRAIN_S`` for the spool, then says what is left
    and how to replay it.
    """

    def __init__(self, tracking_uri: str, study: str, workdir: str | Path, role: str = "study",
                 wait_s: float = WAIT_S):
        """``role`` "study" (the search) or "replication" (its top configurations retrained with several seeds):
        one parent run of each role per study experiment; their children are ``trial`` or ``replica`` runs.
        ``wait_s``: how long each write waits to reach MLflow (0: never wait; the study callback)."""
        self.uri, self.study, self.role, self.wait_s = tracking_uri, study, role, wait_s
        self.child_role = CHILD_ROLES[role]
        self.client = MlflowClient(tracking_uri)  # reads, and writes that need an answer now
        self.spool = open_spool(workdir, study, tracking_uri)
        self.drain_s = DRAIN_S
        self._finished = False
        self.write("start_parent", role, name=f"{role}-{study}", artifact_root=artifact_root_for(tracking_uri, workdir))

    def write(self, op: str, run: str, file: Path | tuple[str, bytes] | None = None, **payload: Any) -> None:
        """Spool one write; wait for it unless this tracker never waits. Raises only when MLflow said no."""
        seq = self.spool.append(op, run, file=file, **payload)
        if self.wait_s > 0 and self.spool.wait(seq, self.wait_s) == "refused":
            raise TrackingWriteError(f"{op} of run {run} refused by {self.spool.public_uri}: {self.spool.refusal(seq)}")

    def _resolved(self, what: str, value_of) -> str:
        """An id a caller reads MLflow with: a waiting tracker first lets MLflow take what is spooled (also the
        study callback's writes: reads after ``tuner.fit()`` see every trial), unless the server is away."""
        if self.wait_s > 0:
            self.spool.flush(self.wait_s)
        value = value_of()
        if value is None:
            self.spool.flush(self.wait_s or WAIT_S)
            value = value_of()
        if value is None:
            raise TrackingUnavailable(f"the {what} of study {self.study!r} is not known yet: {self.spool.public_uri} "
                                      f"has not taken the spooled writes ({self.spool.pending()} pending in "
                                      f"{self.spool.path})")
        return value

    @property
    def parent_run_id(self) -> str:
        return self._resolved("run id", lambda: self.spool.run_id(self.role))

    @property
    def experiment_id(self) -> str:
        return self._resolved("experiment id", self.spool.experiment_id)

    def log_study_inputs(self, space_file: Path, base_params: dict[str, Any], data_hash: str) -> None:
        tags = {"mfcon.code_version": code_version(), "mfcon.data_manifest_sha256": data_hash,
                "mfcon.search_space": Path(space_file).name}
        params = {f"base.{k}": str(v)[:6000] for k, v in flatten(base_params).items()}  # only new ones are sent
        self.write("log", self.role, tags=tags, params=params)
        self.write("artifact", self.role, file=Path(space_file), path=SPACE_DIR)

    def log_best(self, trial_id: str, value: float, metric: str, mode: str | None = None) -> None:
        """Record a new study best: tags ``best_trial``/``best_<metric>`` and the metric ``best_<metric>``.

        MLflow shows a metric's value at its highest step, so each new best is
        logged one step after the last one, whatever epoch it was found at: an
        improvement found at epoch 1 after an earlier best at epoch 4 must not
        hide behind it. With ``mode`` ("min"/"max") a value that does not beat the
        run's current best is not logged (a stale best after a resume).
        """
        self.write("best", self.role, key=f"best_{metric}", value=float(value), ts=_now_ms(), trial=trial_id,
                   mode=mode)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        """``data`` as a JSON artifact of the study run (as ``MlflowClient.log_dict``, but spooled)."""
        folder, _, name = artifact_file.rpartition("/")
        text = json.dumps(data, indent=2, default=str)
        self.write("artifact", self.role, file=(name, text.encode()), path=folder or None)

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the study run ended. Never raises: it is also what a failing study calls on its way out."""
        try:
            self.write("terminate", self.role, status=status)
            self._finished = True
        except Exception as e:  # noqa: BLE001 - an error here must not hide the study's own
            log.error("tracking: study run of %s not marked %s: %s", self.study, status, e)

    def pending(self) -> int:
        """Writes not in MLflow yet."""
        return self.spool.pending()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until MLflow has every write so far; False when it has not within ``timeout_s`` (default
        ``DRAIN_S``) or is unreachable (then at once: the writes wait in the spool)."""
        return self.spool.flush(self.drain_s if timeout_s is None else timeout_s)

    def close(self, timeout_s: float | None = None) -> PendingWrites:
        """Wait up to ``timeout_s`` (default ``DRAIN_S``) for MLflow to take every spooled write, then stop the
        writer; what is left stays in the spool file, and the returned value says how to replay it."""
        left = self.spool.close(self.drain_s if timeout_s is None else timeout_s)
        pending = PendingWrites(left, self.spool.path, self.spool.public_uri, self.spool.pending_writes().sync_command)
        if pending:
            log.warning("tracking: %s", pending.message())
        return pending

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        elif not self._finished:
            self.finish("FINISHED")
        try:
            self.close(INTERRUPTED_DRAIN_S if exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
                       else None)
        except Exception as e:  # noqa: BLE001 - never raise over the study's own error or result
            log.error("tracking: spool of %s not closed: %s", self.study, e)
        return False


class TrialRuns:
    """Child runs keyed by Tune trial id, re-attached after a resume."""

    def __init__(self, tracker: StudyTracker):
        self.tracker, self.client = tracker, tracker.client

    def key(self, trial_id: str) -> str:
        return f"{self.tracker.role}/{trial_id}"

    def start(self, trial_id: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> str | None:
        """Create (or re-attach to) the trial's run (with extra ``tags``); its run id, or None when the tracker
        does not wait."""
        t = self.tracker
        tags = {STUDY_TAG: t.study, ROLE_TAG: t.child_role, TRIAL_TAG: trial_id, STATE_TAG: "running", **(tags or {})}
        t.write("start_child", self.key(trial_id), parent=t.role, name=f"{t.child_role}-{trial_id}", tags=tags,
                params={k: str(v) for k, v in params.items()})
        return t.spool.run_id(self.key(trial_id)) if t.wait_s > 0 else None

    def log_epoch(self, trial_id: str, result: dict[str, Any], timestamp_ms: int) -> None:
        """The epoch's metrics, stepped by epoch; an epoch the run already has is not logged again."""
        epoch = int(result.get("epoch", 0))
        names = [*TRIAL_METRICS, *(k for k in result if k.startswith("startup_") and k.endswith("_seconds")
                                   and k not in TRIAL_METRICS)]  # the start-up breakdown, stage by stage
        metrics = [[k, float(result[k]), timestamp_ms, epoch] for k in names
                   if isinstance(result.get(k), (int, float)) and math.isfinite(result[k])]
        if epoch >= 1 and metrics:
            self.tracker.write("log", self.key(trial_id), metrics=metrics, per_step=True)

    def finish(self, trial_id: str, state: str, checkpoint_file: str | None = None) -> None:
        """The trial's final state (tag and run status) and best checkpoint; nothing for a trial never started."""
        key = self.key(trial_id)
        if not self.tracker.spool.started(key):
            return
        if checkpoint_file:
            self.tracker.write("artifact", key, file=Path(checkpoint_file), path="checkpoint")
        self.tracker.write("log", key, tags={STATE_TAG: state})
        self.tracker.write("terminate", key, status=TRIAL_STATUS.get(state, "KILLED"))

    def log_plots(self, trial_id: str, scores, labels) -> None:
        """DET curve and score histograms of the trial's best epoch (drawn by the spool's writer)."""
        import numpy as np

        buffer = io.BytesIO()
        np.savez(buffer, scores=np.asarray(scores), labels=np.asarray(labels))
        self.tracker.write("plots", self.key(trial_id), file=("scores.npz", buffer.getvalue()))

    def log_model(self, trial_id: str, weights_file: str | Path, feature_config: dict[str, Any],
                  state: str | None = None) -> None:
        """The trial's best weights as a servable pyfunc model (``mfcon.serving.log_speaker_model``).

        ``state`` is the trial's final state: logging a model reopens the run, and an attempt cut short by
        an outage leaves it RUNNING, so the replayed write ends by setting the run's final status again."""
        config = (feature_config.model_dump(mode="json") if hasattr(feature_config, "model_dump")
                  else dict(feature_config))
        status = {"status": TRIAL_STATUS.get(state, "KILLED")} if state else {}
        self.tracker.write("model", self.key(trial_id), file=Path(weights_file), feature_config=config, **status)

    def run_id(self, trial_id: str) -> str | None:
        self.tracker.spool.flush(self.tracker.wait_s or WAIT_S)
        return self.tracker.spool.run_id(self.key(trial_id))

    @property
    def run_ids(self) -> dict[str, str]:
        """Trial id -> run id of every child run of the study run in MLflow (after the spool has drained)."""
        t = self.tracker
        t.spool.flush(t.wait_s or WAIT_S)
        runs = find_runs(self.client, t.experiment_id, **{MLFLOW_PARENT_RUN_ID: t.parent_run_id})
        return {r.data.tags[TRIAL_TAG]: r.info.run_id for r in runs if TRIAL_TAG in r.data.tags}
