"""The study's searcher: Ray's OptunaSearch, telling Optuna what really happened to each trial.

Ray's ``OptunaSearch`` reports a trial that ASHA stopped after one epoch as
COMPLETE with its epoch-1 value, so TPE ranks early, noisy scores beside final
ones as if they were equal; and it reads ``result[metric]`` from every result,
so an epoch without an evaluation ends the study with a KeyError. Here:

* each evaluated epoch is reported as an intermediate value at step = epoch
  (Tune's ``training_iteration`` restarts at 1 after a restore; the epoch does not);
* a trial stopped before its last epoch is told to Optuna as PRUNED, so TPE
  ranks it by how far it got and its value there, as Optuna's own pruning does;
* a result without the metric (or with a non-finite one) is skipped;
* a failed trial is FAIL, whatever value it reported last;
* a completed trial's value is its best epoch's (:mod:`mfcon.evaluation.selection`), the value
  every other reader of the study ranks it by, not its last epoch's.

It also runs the study's baseline: the first trials it suggests are the lambda = 0
configuration of the base config, one per baseline seed. The first is told to
Optuna when the space can express it (so TPE learns from it); the other seeds
only measure the noise floor and stay out of TPE.

Given a storage (:mod:`mfcon.study.optuna_storage`), each Optuna trial carries its
Tune trial id (user attribute ``trial_id``, the MLflow run's ``mfcon.trial_id``), and a
restore fails the trials asked after the checkpoint it restores: Tune does not know
them and asks for their replacements, so they would otherwise stay RUNNING for ever.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from mfcon.names import BASELINE_KEY, SEED_KEY

log = logging.getLogger(__name__)


class StudySearch(OptunaSearch):
    """``OptunaSearch`` that reports epochs as steps and ASHA-stopped trials as pruned, and starts with the
    baseline trials (``baseline_seeds``: their training seeds; ``baseline``: their sampled values and whether
    Optuna can express them, see :func:`mfcon.study.spaces.baseline_sample`)."""

    def __init__(self, *args: Any, max_epochs: int, baseline_seeds: tuple[int, ...] = (),
                 baseline: tuple[dict[str, Any], bool] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_epochs = max_epochs
        self._baseline_seeds = tuple(baseline_seeds) if baseline is not None else ()
        self._baseline_queue = list(self._baseline_seeds)  # saved with the searcher: a resume continues it
        self._baseline = baseline
        self._best: dict[str, float] = {}  # trial -> best value so far (what a COMPLETE trial is told)
        if self._ot_study is not None and self._storage is not None and self.metric:
            with warnings.catch_warnings():  # set_metric_names is experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._ot_study.set_metric_names([self.metric])  # the dashboard's axis label

    def suggest(self, trial_id: str) -> dict | None:
        if not self._baseline_queue:
            return self._label(trial_id, super().suggest(trial_id))
        sample, expressed = self._baseline
        seed = self._baseline_queue.pop(0)
        if seed == self._baseline_seeds[0] and expressed:  # Optuna's own trial with these values, so TPE learns from the baseline
            self._ot_study.enqueue_trial(sample)
            config = self._label(trial_id, super().suggest(trial_id)) or {}
        else:
            config = dict(sample)
        return {**config, BASELINE_KEY: True, SEED_KEY: seed}

    def _label(self, trial_id: str, config: dict | None) -> dict | None:
        """Name the Optuna trial after its Tune trial (a stored study is read by people, beside MLflow)."""
        if self._storage is not None and trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("trial_id", trial_id)
        return config

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        if self._storage is None or self._ot_study is None:
            return
        known = {t._trial_id for t in self._ot_trials.values()}
        running = self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        for orphan in (t for t in running if t._trial_id not in known):
            self._ot_study._storage.set_trial_user_attr(orphan._trial_id, "mfcon.orphaned",
                                                        "asked after the checkpoint a resume restored")
            self._ot_study._storage.set_trial_state_values(orphan._trial_id, optuna.trial.TrialState.FAIL)

    def _value(self, result: dict | None) -> float | None:
        value = (result or {}).get(self.metric)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        value = self._value(result)
        if value is None:  # an epoch without an evaluation, or a diverged one: nothing to report
            return
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        self._best[trial_id] = min(value, self._best.get(trial_id, value))
        self._ot_trials[trial_id].report(value, step)  # a step seen before (a restored trial) is ignored by Optuna

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        last = self._value(result)
        value = min(self._best.get(trial_id, last), last) if last is not None else self._best.get(trial_id)
        epoch = int((result or {}).get("epoch", 0))
        if error:
            state, value = optuna.trial.TrialState.FAIL, None
        elif value is None or epoch < self.max_epochs:
            state, value = optuna.trial.TrialState.PRUNED, None  # ranked by its intermediate values
        else:
            state = optuna.trial.TrialState.COMPLETE
        try:
            self._ot_study.tell(ot_trial, value, state=state)
        except Exception as e:  # noqa: BLE001 - the searcher must never end the study
            log.warning("trial %s: optuna did not take its %s state: %s", trial_id, state.name, e)
        self._completed_trials.add(trial_id)
