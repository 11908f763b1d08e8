"""Tune callbacks on the study driver: every trial and every epoch into MLflow.

Tune does not guard callbacks: a slow hook blocks its event loop (no trial makes
progress) and an exception stops every trial. So the hooks here only spool their
writes (``mfcon.tracking.spool``: on local disk in milliseconds, sent to MLflow in
the background), and a hook that fails anyway is logged, never raised: tracking
must not stop training.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.tune import Callback

from mfcon import storage
from mfcon.names import BASELINE_KEY
from mfcon.study.spaces import SearchSpace, trial_params
from mfcon.tracking import BASELINE_TAG, StudyTracker, TrialRuns
from mfcon.train.checkpoint import EXPORTED_FILE, RAY_CHECKPOINT_FILE, export_weights

log = logging.getLogger(__name__)


ERROR_TAG = "mfcon.error"  # on a failed trial's run: what went wrong, e.g. "NonFiniteLossError: loss became nan ..."
_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Interrupt)\b.*)$")


def failure_reason(trial) -> str | None:
    """The line of a failed trial's traceback (Tune's error.txt) that says what went wrong: its last
    "SomeError: message" line, module path dropped, e.g. "NonFiniteLossError: loss became nan at epoch 1 step 2
    (margin nan, mfcon 0)"; the last line of the text when no line looks like an exception.

    Read from the driver's copy (``trial.error_file``): when ``on_trial_error`` runs, Tune has written it there
    but not yet synced it to the experiment's storage, which is what ``trial.get_error()`` reads."""
    try:
        local = trial.error_file
        text = Path(local).read_text() if local and Path(local).exists() else str(trial.get_error() or "")
    except Exception:  # noqa: BLE001 - no error file: nothing to say
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    named = [m.group(1) for m in map(_ERROR_LINE.match, lines) if m]
    reason = (named or lines or [None])[-1]
    return reason[:5000] if reason else None


def never_raises(hook):
    """A Tune hook whose failure is logged instead of stopping every trial of the study."""
    @functools.wraps(hook)
    def guarded(self, *args, **kwargs):
        try:
            return hook(self, *args, **kwargs)
        except Exception:  # Tune would stop every trial over a tracking error
            log.exception("tracking: %s failed; the study goes on (see the spool in %s)", hook.__name__,
                          self.workdir)
            return None
    return guarded


def with_request_time(result: dict[str, Any], requested_at: float | None) -> dict[str, Any]:
    """The trial's start-up counted from Tune's request: the worker counts from the trial function's start
    (``startup_started_at``); the time before it (placement, the trial's actor, its imports), seen only by
    the driver, is ``startup_request_seconds``."""
    started_at = result.get("startup_started_at")
    if requested_at is None or not isinstance(started_at, (int, float)) or "startup_seconds" not in result:
        return result
    wait = max(0.0, started_at - requested_at)
    return {**result, "startup_request_seconds": wait, "startup_seconds": result["startup_seconds"] + wait}


class MLflowStudyCallback(Callback):
    """Child run per trial (params, per-epoch metrics, final state, best checkpoint); best so far on the parent.

    Holds only plain settings when pickled with the experiment state; the
    tracker is made on first use, so ``Tuner.restore`` re-attaches. The best so
    far and each trial's checkpoints are callback state (``get_state``), which
    Tune saves with the experiment, so a resumed study keeps its true best.
    """

    def __init__(self, tracking_uri: str, workdir: str, space: SearchSpace, feature_config: dict[str, Any],
                 role: str = "study", params_of: Callable[[dict[str, Any]], dict[str, Any]] | None = None):
        """``role`` "replication" writes replica runs under the replication run; ``params_of`` (picklable) maps
        a trial's Tune config to the params logged on its run (default: sampled values + resolved overrides)."""
        self.tracking_uri, self.workdir, self.space = tracking_uri, workdir, space
        self.role, self.params_of = role, params_of
        self.feature_config = feature_config
        self.max_epochs = space.base_config().epochs
        self._runs: TrialRuns | None = None
        self._checkpoints: dict[str, list[tuple[float, int, str]]] = {}  # trial -> (metric, epoch, checkpoint dir)
        self._study_best: float | None = None
        self._requested_at: dict[str, float] = {}  # trial -> wall clock when Tune first had it pending

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_runs"] = None
        return state

    def get_state(self) -> dict[str, Any]:
        """What must survive ``Tuner.restore``: the best so far (else the first result after a resume would
        become the study's best) and every trial's checkpoints (a trial's best epoch may predate the resume)."""
        return {"study_best": self._study_best,
                "checkpoints": {trial: [list(c) for c in cps] for trial, cps in self._checkpoints.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        self._study_best = state.get("study_best")
        self._checkpoints = {trial: [(float(v), int(e), str(p)) for v, e, p in cps]
                             for trial, cps in state.get("checkpoints", {}).items()}

    @property
    def runs(self) -> TrialRuns:
        if self._runs is None:
            tracker = StudyTracker(self.tracking_uri, self.space.name, self.workdir, role=self.role, wait_s=0)
            self._runs = TrialRuns(tracker)  # wait_s=0: writes are spooled, Tune's event loop never waits on MLflow
        return self._runs

    @never_raises
    def on_step_begin(self, iteration, trials, **info):
        now = time.time()
        for trial in trials:
            if trial.status == "PENDING":  # a new trial: Tune is about to ask for its resources
                self._requested_at.setdefault(trial.trial_id, now)

    @never_raises
    def on_trial_start(self, iteration, trials, trial, **info):
        self._requested_at.setdefault(trial.trial_id, time.time())
        params = self.params_of(trial.config) if self.params_of else trial_params(self.space, trial.config)
        tags = {BASELINE_TAG: "true"} if (trial.config or {}).get(BASELINE_KEY) else None
        self.runs.start(trial.trial_id, params, tags)

    @never_raises
    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.runs.log_epoch(trial.trial_id, with_request_time(result, self._requested_at.get(trial.trial_id)),
                            int(time.time() * 1000))
        value = result.get(self.space.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            if result.get("checkpoint_path"):
                self._checkpoints.setdefault(trial.trial_id, []).append(
                    (float(value), int(result.get("epoch", 0)), str(result["checkpoint_path"])))
            if self.role == "study" and (self._study_best is None or value < self._study_best):
                self._study_best = value
                self.runs.tracker.log_best(trial.trial_id, value, self.space.metric, mode="min")

    def best_checkpoint(self, trial_id: str) -> str | None:
        """The checkpoint of the trial's best epoch (:func:`mfcon.evaluation.selection.best_epoch`: lowest
        value, ties to the later epoch), which Ray Train keeps (it ranks checkpoints by ``checkpoint_rank``,
        the same rule); should it be gone anyway, the next best that still exists."""
        ranked = sorted(self._checkpoints.get(trial_id, []), key=lambda c: (c[0], -c[1]))
        locations = (self._checkpoint_location(path) for _, _, path in ranked)
        return next((loc for loc in locations if storage.is_file(storage.join(loc, RAY_CHECKPOINT_FILE))), None)

    def _checkpoint_location(self, path: str) -> str:
        """Ray Train reports a checkpoint's path inside its filesystem ("bucket/key" on S3): make it a location."""
        if storage.is_remote(self.workdir) and not storage.is_remote(path):
            return f"{self.workdir.split('://', 1)[0]}://{path}"
        return path

    def _finish(self, trial, state: str) -> None:
        best = self.best_checkpoint(trial.trial_id)
        with tempfile.TemporaryDirectory() as tmp:
            weights, ckpt = None, {}
            try:
                if best is not None:
                    weights = str(Path(tmp) / EXPORTED_FILE)
                    ckpt = export_weights(storage.download_dir(best, Path(tmp) / "checkpoint"), Path(weights))
            except Exception as e:  # noqa: BLE001 - an unreadable checkpoint must not leave the run unfinished
                log.warning("trial %s: best checkpoint %s not exported (%s)", trial.trial_id, best, e)
                weights, ckpt = None, {}
            # Spooled (files copied into the spool): drawn, uploaded and logged as a model in the background.
            self.runs.finish(trial.trial_id, state, weights)
            if "eval_scores" in ckpt:
                self.runs.log_plots(trial.trial_id, ckpt["eval_scores"].numpy(), ckpt["eval_labels"].numpy())
            if weights and state in ("completed", "pruned"):
                # The trial's best epoch as a servable pyfunc model (what `mfcon promote` registers); a model
                # that cannot be logged leaves the tag mfcon.model_error, and promote falls back to the checkpoint.
                self.runs.log_model(trial.trial_id, weights, self.feature_config, state=state)

    @never_raises
    def on_trial_complete(self, iteration, trials, trial, **info):
        last_epoch = int((trial.last_result or {}).get("epoch", 0))
        self._finish(trial, "completed" if last_epoch >= self.max_epochs else "pruned")

    @never_raises
    def on_trial_error(self, iteration, trials, trial, **info):
        key = self.runs.key(trial.trial_id)
        reason = failure_reason(trial)
        if reason and self.runs.tracker.spool.started(key):
            self.runs.tracker.write("log", key, tags={ERROR_TAG: reason})
        self._finish(trial, "failed")
