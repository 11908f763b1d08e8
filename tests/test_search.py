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


def test_a_completed_trial_is_told_its_best_epoch_not_its_last():
    """One "best" everywhere: TPE ranks a finished trial by the value every other reader ranks it by."""
    s = _searcher(max_epochs=3)
    s.suggest("t")
    for epoch, eer in ((1, 30.0), (2, 12.0), (3, 15.0)):
        s.on_trial_result("t", {"dev_eer": eer, "epoch": epoch, "training_iteration": epoch})
    s.on_trial_complete("t", {"dev_eer": 15.0, "epoch": 3})
    assert _states(s)[0][:2] == ("COMPLETE", 12.0)


def _demo_searcher():
    from pathlib import Path

    from mfcon.study.runner import study_search
    from mfcon.study.spaces import load_search_space

    space = load_search_space(Path(__file__).resolve().parent.parent / "search_spaces" / "demo.yaml")
    s = study_search(space, seed=0)
    s.set_search_properties("dev_eer", "min", {})
    return space, s


def test_the_baseline_comes_first_at_each_seed_and_tpe_learns_from_the_first():
    from mfcon.names import BASELINE_KEY, SEED_KEY
    from mfcon.study.spaces import trial_config, trial_params

    space, s = _demo_searcher()
    first, second, searched = s.suggest("b0"), s.suggest("b1"), s.suggest("t0")
    assert (first[BASELINE_KEY], first[SEED_KEY], second[BASELINE_KEY], second[SEED_KEY]) == (True, 0, True, 1)
    assert BASELINE_KEY not in searched and SEED_KEY not in searched
    for config, seed in ((first, 0), (second, 1)):
        cfg = trial_config(space, config)
        assert cfg.loss.mfcon_weight == 0.0 and cfg.selected_blocks() == () and cfg.seed == seed
        params = trial_params(space, config)
        assert (params["loss.mfcon_weight"], params["loss.mfcon_blocks"], params["seed"]) == (0.0, "none", seed)
    # The first baseline is Optuna's trial 0 with every block off (what "no MFCon" is in this space); the other
    # seed only measures noise and is not in Optuna, so TPE never sees the same point twice.
    trials = s._ot_study.get_trials()
    assert len(trials) == 2 and trials[0].params == {k: v for k, v in first.items() if k not in (BASELINE_KEY, SEED_KEY)}
    assert not any(v for k, v in trials[0].params.items() if k.startswith("loss.mfcon_blocks.b"))
    for epoch in (1, 2, 3, 4):
        s.on_trial_result("b0", {"dev_eer": 20.0 - epoch, "epoch": epoch})
        s.on_trial_result("b1", {"dev_eer": 21.0 - epoch, "epoch": epoch})  # not Optuna's: ignored, no error
    s.on_trial_complete("b0", {"dev_eer": 16.0, "epoch": 4})
    s.on_trial_complete("b1", {"dev_eer": 17.0, "epoch": 4})
    assert s._ot_study.get_trials()[0].state.name == "COMPLETE" and s._ot_study.get_trials()[0].value == 16.0


def test_a_resumed_searcher_does_not_run_the_baseline_again(tmp_path):
    from mfcon.names import BASELINE_KEY

    _, s = _demo_searcher()
    s.suggest("b0")
    s.save(str(tmp_path / "searcher.pkl"))
    _, restored = _demo_searcher()
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("b1")[BASELINE_KEY] is True  # the second seed is still to come
    assert BASELINE_KEY not in restored.suggest("t0")


def test_asha_never_stops_a_baseline_trial_but_stops_a_searched_one_as_bad():
    from pathlib import Path

    from mfcon.names import BASELINE_KEY
    from mfcon.study.runner import study_scheduler
    from mfcon.study.spaces import load_search_space
    from ray.tune.experiment import Trial

    space = load_search_space(Path(__file__).resolve().parent.parent / "search_spaces" / "demo.yaml")
    scheduler = study_scheduler(space)
    scheduler.set_search_properties("dev_eer", "min")
    good, base, bad = (Trial("fn", config=c, stub=True) for c in ({}, {BASELINE_KEY: True}, {}))
    for t in (good, base, bad):
        scheduler.on_trial_add(None, t)
    assert scheduler.on_trial_result(None, good, {"epoch": 1, "dev_eer": 5.0}) == scheduler.CONTINUE
    assert scheduler.on_trial_result(None, base, {"epoch": 1, "dev_eer": 50.0}) == scheduler.CONTINUE  # kept
    assert scheduler.on_trial_result(None, bad, {"epoch": 1, "dev_eer": 60.0}) == scheduler.STOP
