"""Tune callbacks on the study driver: every trial and every epoch into MLflow."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback

from mfcon import storage
from mfcon.serving import log_speaker_model
from mfcon.study.plot_logging import log_trial_plots
from mfcon.study.spaces import SearchSpace, sampled_to_overrides
from mfcon.tracking import StudyTracker, TrialRuns
from mfcon.train.checkpoint import EXPORTED_FILE, RAY_CHECKPOINT_FILE, export_weights

log = logging.getLogger(__name__)


def trial_params(space: SearchSpace, sampled: dict[str, Any]) -> dict[str, Any]:
    """Everything a person compares in the MLflow UI: raw samples plus resolved overrides."""
    params = dict(sampled)
    for key, value in sampled_to_overrides(space, sampled).items():
        params[key] = ",".join(map(str, value)) if isinstance(value, list) else value
    if "loss.mfcon_blocks" in params and params["loss.mfcon_blocks"] == "":
        params["loss.mfcon_blocks"] = "none"
    return params


class MLflowStudyCallback(Callback):
    """Child run per trial (params, per-epoch metrics, final state, best checkpoint); best so far on the parent.

    Holds only plain settings when pickled with the experiment state; the
    MLflow client is made on first use, so ``Tuner.restore`` re-attaches.
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

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_runs"] = None
        return state

    @property
    def runs(self) -> TrialRuns:
        if self._runs is None:
            self._runs = TrialRuns(StudyTracker(self.tracking_uri, self.space.name, self.workdir, role=self.role))
        return self._runs

    def on_trial_start(self, iteration, trials, trial, **info):
        params = self.params_of(trial.config) if self.params_of else trial_params(self.space, trial.config)
        self.runs.start(trial.trial_id, params)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.runs.log_epoch(trial.trial_id, result, int(time.time() * 1000))
        value = result.get(self.space.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            if result.get("checkpoint_path"):
                self._checkpoints.setdefault(trial.trial_id, []).append(
                    (float(value), int(result.get("epoch", 0)), str(result["checkpoint_path"])))
            if self.role == "study" and (self._study_best is None or self._better(value, self._study_best)):
                self._study_best = value
                self.runs.tracker.log_best(trial.trial_id, value, self.space.metric)

    def _better(self, value: float, than: float) -> bool:
        return value < than if self.space.mode == "min" else value > than

    def best_checkpoint(self, trial_id: str) -> str | None:
        """The best-scoring epoch whose checkpoint Ray Train still keeps; on ties the later epoch.

        Train keeps the top ``num_to_keep`` checkpoints by the metric, and which of
        several tied ones it drops is its own choice, so the choice here is made
        among the checkpoints that exist, not the first one seen.
        """
        sign = 1.0 if self.space.mode == "min" else -1.0
        ranked = sorted(self._checkpoints.get(trial_id, []), key=lambda c: (sign * c[0], -c[1]))
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
            if best is not None:
                weights = str(Path(tmp) / EXPORTED_FILE)
                ckpt = export_weights(storage.download_dir(best, Path(tmp) / "checkpoint"), Path(weights))
            self.runs.finish(trial.trial_id, state, weights)
            run_id = self.runs.run_ids.get(trial.trial_id)
            if run_id and "eval_scores" in ckpt:
                self._plots(trial.trial_id, run_id, ckpt)
            if weights and run_id and state in ("completed", "pruned"):
                # The trial's best epoch as a servable pyfunc model (what `mfcon promote` registers).
                # A failure here must not take the study down: the checkpoint is already logged.
                try:
                    log_speaker_model(self.runs.client, run_id, weights, self.feature_config)
                except Exception as e:  # noqa: BLE001
                    log.warning("trial %s: model not logged (%s); promote falls back to its checkpoint",
                                trial.trial_id, e)
                    self.runs.client.set_tag(run_id, "mfcon.model_error", str(e)[:5000])

    def _plots(self, trial_id: str, run_id: str, ckpt: dict[str, Any]) -> None:
        """DET curve and score histograms of the trial's best epoch."""
        try:
            log_trial_plots(self.runs.client, run_id, ckpt["eval_scores"].numpy(), ckpt["eval_labels"].numpy())
        except Exception as e:  # noqa: BLE001 - a plot must never stop a study
            log.warning("trial %s: plots not logged (%s)", trial_id, e)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last_epoch = int((trial.last_result or {}).get("epoch", 0))
        self._finish(trial, "completed" if last_epoch >= self.max_epochs else "pruned")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, "failed")
