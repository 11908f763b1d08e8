"""StudySearch tells Optuna the truth: ASHA-stopped trials are PRUNED with their epochs, failures FAIL."""

from __future__ import annotations

import optuna
import pytest
from mfcon.study.search import StudySearch
from ray.tune.search.optuna import OptunaSearch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _space(trial):
    trial.suggest_float("x", 0.0, 1.0)


def _searcher(cls=StudySearch, **kwargs):
    s = cls(space=_space, metric="dev_eer", mode="min", sampler=optuna.samplers.TPESampler(seed=0), **kwargs)
    s.set_search_properties("dev_eer", "min", {})
    return s


def _states(searcher) -> dict[int, tuple[str, float | None, dict]]:
    return {t.number: (t.state.name, t.value, dict(t.intermediate_values)) for t in searcher._ot_study.get_trials()}


def test_stopped_trials_are_pruned_with_their_epochs_finished_ones_complete():
    s = _searcher(max_epochs=3)
    for tid in ("done", "stopped", "broken"):
        assert s.suggest(tid) is not None
    for epoch, eer in ((1, 30.0), (2, 20.0), (3, 10.0)):
        s.on_trial_result("done", {"dev_eer": eer, "epoch": epoch, "training_iteration": epoch})
    s.on_trial_complete("done", {"dev_eer": 10.0, "epoch": 3})
    s.on_trial_result("stopped", {"dev_eer": 40.0, "epoch": 1, "training_iteration": 1})
    s.on_trial_complete("stopped", {"dev_eer": 40.0, "epoch": 1})
    s.on_trial_result("broken", {"dev_eer": 35.0, "epoch": 1, "training_iteration": 1})
    s.on_trial_complete("broken", {"dev_eer": 35.0, "epoch": 1}, error=True)
    assert _states(s) == {0: ("COMPLETE", 10.0, {1: 30.0, 2: 20.0, 3: 10.0}),
                          1: ("PRUNED", 40.0, {1: 40.0}),  # optuna keeps the last intermediate value
                          2: ("FAIL", None, {1: 35.0})}


def test_ray_optuna_search_would_call_the_stopped_trial_complete():
    """The behaviour StudySearch replaces (if Ray fixes it, this test says the subclass can go)."""
    s = _searcher(OptunaSearch)
    s.suggest("stopped")
    s.on_trial_result("stopped", {"dev_eer": 40.0, "epoch": 1, "training_iteration": 1})
    s.on_trial_complete("stopped", {"dev_eer": 40.0, "epoch": 1})
    assert _states(s)[0][:2] == ("COMPLETE", 40.0)
    with pytest.raises(KeyError):
        OptunaSearch.on_trial_result(s, "other", {"epoch": 2})


def test_results_without_the_metric_or_with_nan_are_skipped_not_fatal():
    s = _searcher(max_epochs=2)
    s.suggest("t")
    s.on_trial_result("t", {"epoch": 1, "train_loss": 3.0})  # an epoch with no evaluation
    s.on_trial_result("t", {"epoch": 1, "dev_eer": float("nan")})
    s.on_trial_result("t", {"epoch": 2, "dev_eer": 12.0})
    s.on_trial_result("t", {"epoch": 2, "dev_eer": 99.0})  # a restored trial repeating its epoch
    s.on_trial_complete("t", {"epoch": 2, "dev_eer": 12.0})
    assert _states(s) == {0: ("COMPLETE", 12.0, {2: 12.0})}
    s.on_trial_complete("t", {"epoch": 2, "dev_eer": 1.0})  # told twice: ignored
    s.on_trial_result("unknown", {"epoch": 1, "dev_eer": 1.0})
    assert _states(s) == {0: ("COMPLETE", 12.0, {2: 12.0})}
