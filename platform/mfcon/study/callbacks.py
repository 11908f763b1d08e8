"""Tune callbacks on the study driver: every trial and every epoch into MLflow.

Tune does not guard callbacks: a slow hook blocks its event loop (no trial makes
progress) and an exception stops every trial. So the per-epoch hooks only spool
their writes (``mfcon.tracking.spool``: one fsynced line on local disk, sent to
MLflow in the background), and the end of a trial, which reads its best weights
from the bucket, is queued to :class:`mfcon.study.finisher.TrialFinisher`'s
thread. A hook that fails anyway is logged, never raised: tracking must not stop
training.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.tune import Callback

from mfcon import storage
from mfcon.names import BASELINE_KEY
from mfcon.study.spaces import SearchSpace, trial_params
from mfcon.tracking import BASELINE_TAG, StudyTracker, TrialRuns
from mfcon.study.finisher import TrialFinisher
from mfcon.train.checkpoint import EXPORTED_FILE, RAY_CHECKPOINT_FILE, export_file, export_weights

log = logging.getLogger(__name__)


FINISH_DRAIN_S = 600.0  # how long the end of a study waits for trials still being finished
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
                 role: str = "study", params_of: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 train_storage: str | None = None, finish_in_background: bool = True):
        """``role`` "replication" writes replica runs under the replication run; ``params_of`` (picklable) maps
        a trial's Tune config to the params logged on its run (default: sampled values + resolved overrides).
        ``train_storage``: where the trials' Train runs keep their checkpoints (and ``best_weights.pt``);
        ``finish_in_background`` False finishes each trial inside Tune's hook (the old behaviour, for benches)."""
        self.tracking_uri, self.workdir, self.space = tracking_uri, workdir, space
        self.role, self.params_of = role, params_of
        self.feature_config = feature_config
        self.train_storage, self.finish_in_background = train_storage, finish_in_background
        self.max_epochs = space.base_config().epochs
        self._runs: TrialRuns | None = None
        self._checkpoints: dict[str, list[tuple[float, int, str]]] = {}  # trial -> (metric, epoch, checkpoint dir)
        self._study_best: float | None = None
        self._requested_at: dict[str, float] = {}  # trial -> wall clock when Tune first had it pending
        self._finishing: dict[str, str] = {}  # trial -> final state, submitted and not yet spooled
        self._resubmit = False  # restored with trials in _finishing: submit them again at the next step
        self._finisher: TrialFinisher | None = None
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_runs"] = state["_finisher"] = state["_lock"] = None
        return state

    def __setstate__(self, state):
        defaults = {"train_storage": None, "finish_in_background": True, "_finishing": {}, "_resubmit": False,
                    "_finisher": None}  # an experiment pickled by an older mfcon
        self.__dict__.update({**defaults, **state})
        self._lock = threading.Lock()

    @property
    def finisher(self) -> TrialFinisher:
        if self._finisher is None:
            self._finisher = TrialFinisher(self._finish_job, background=self.finish_in_background)
        return self._finisher

    def get_state(self) -> dict[str, Any]:
        """What must survive ``Tuner.restore``: the best so far (else the first result after a resume would
        become the study's best), every trial's checkpoints (a trial's best epoch may predate the resume) and
        the trials ended but not yet finished (the driver may die with them queued)."""
        with self._lock:
            finishing = dict(self._finishing)
        return {"study_best": self._study_best, "finishing": finishing,
                "checkpoints": {trial: [list(c) for c in cps] for trial, cps in self._checkpoints.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        self._study_best = state.get("study_best")
        self._checkpoints = {trial: [(float(v), int(e), str(p)) for v, e, p in cps]
                             for trial, cps in state.get("checkpoints", {}).items()}
        with self._lock:
            self._finishing = dict(state.get("finishing", {}))
        self._resubmit = bool(self._finishing)

    @property
    def runs(self) -> TrialRuns:
        if self._runs is None:
            tracker = StudyTracker(self.tracking_uri, self.space.name, self.workdir, role=self.role, wait_s=0)
            self._runs = TrialRuns(tracker)  # wait_s=0: writes are spooled, Tune's event loop never waits on MLflow
        return self._runs

    @never_raises
    def setup(self, **info):
        """The tracker before the first trial: an MLflow client, the spool and, on SQLite, the store's schema take
        seconds, which the first trial's start would otherwise hold Tune's loop for."""
        self.runs  # noqa: B018

    @never_raises
    def on_step_begin(self, iteration, trials, **info):
        if self._resubmit:  # ended before the last driver died, never spooled: finish them now
            self._resubmit = False
            with self._lock:
                finishing = list(self._finishing)
            for trial_id in finishing:
                self.finisher.submit(trial_id)
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

    def best_weights(self, trial_id: str) -> str | None:
        """The ``best_weights.pt`` the trial's rank 0 published (a policy with ``best_weights``), if any."""
        if self.train_storage is None:
            return None
        from mfcon.study.trial import best_weights_location  # imports Ray Train: only on the driver that uses it

        location = best_weights_location(self.train_storage, self.space.name, trial_id)
        return location if storage.is_file(location) else None

    def _export(self, trial_id: str, tmp: Path) -> tuple[str | None, dict[str, Any]]:
        """(exported weights file, the state it came from): the trial's own best_weights.pt when it wrote one,
        else exported here from the best full checkpoint; (None, {}) when neither can be read."""
        weights = tmp / EXPORTED_FILE
        source = None
        try:
            source = self.best_weights(trial_id)
            if source is not None:
                with storage.local_copy(source) as local:
                    return str(weights), export_file(local, weights)
            source = self.best_checkpoint(trial_id)
            if source is not None:
                return str(weights), export_weights(storage.download_dir(source, tmp / "checkpoint"), weights)
        except Exception as e:  # noqa: BLE001 - an unreadable checkpoint must not leave the run unfinished
            log.warning("trial %s: best checkpoint %s not exported (%s)", trial_id, source, e)
        return None, {}

    def _finish_job(self, trial_id: str) -> None:
        """The trial's last writes, on the finisher's thread: its best epoch's weights, plots and model."""
        with self._lock:
            state = self._finishing.get(trial_id)
        if state is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            weights, ckpt = self._export(trial_id, Path(tmp))
            # Spooled (files copied into the spool): drawn, uploaded and logged as a model in the background.
            self.runs.finish(trial_id, state, weights)
            if "eval_scores" in ckpt:
                self.runs.log_plots(trial_id, ckpt["eval_scores"].numpy(), ckpt["eval_labels"].numpy())
            if weights and state in ("completed", "pruned"):
                # The trial's best epoch as a servable pyfunc model (what `mfcon promote` registers); a model
                # that cannot be logged leaves the tag mfcon.model_error, and promote falls back to the checkpoint.
                self.runs.log_model(trial_id, weights, self.feature_config, state=state)
        with self._lock:
            self._finishing.pop(trial_id, None)

    def _finish(self, trial, state: str) -> None:
        """Queue the trial's end (Tune's event loop goes on at once); recorded first, so a resume finishes it."""
        self.runs  # made here, on Tune's thread, before the finisher's thread uses it  # noqa: B018
        with self._lock:
            self._finishing[trial.trial_id] = state
        self.finisher.submit(trial.trial_id)

    def drain(self, timeout_s: float = FINISH_DRAIN_S) -> int:
        """Wait for the trials being finished; returns how many are left."""
        return self.finisher.drain(timeout_s) if self._finisher is not None else 0

    @never_raises
    def on_experiment_end(self, trials, **info):
        left = self.drain()
        if left:
            log.warning("tracking: %d trials not finished after %.0f s; a resumed study finishes them", left,
                        FINISH_DRAIN_S)

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
