"""The search-efficiency bench's bookkeeping (bench/search_efficiency.py), on hand-computed examples."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "search_efficiency.py"
_spec = importlib.util.spec_from_file_location("search_efficiency_bench", _PATH)
se = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(se)


def test_budget_stopper_counts_scored_epochs_across_trials_and_stops_everything_at_the_budget():
    stop = se.TrialEpochBudget(3)
    assert stop("a", {"epoch": 1, "dev_eer": 20.0}) is False  # never stops a single trial (ASHA does)
    assert not stop.stop_all()
    stop("b", {"epoch": 1, "train_loss": 3.0})  # an epoch without a score is not a trial-epoch of the search
    stop("b", {"epoch": 1, "dev_eer": 18.0})
    assert not stop.stop_all()
    stop("b", {"epoch": 1, "dev_eer": 18.0, "done": True})  # Tune's copy of a finished trial's last result
    assert stop.spent == 2 and not stop.stop_all()
    stop("a", {"epoch": 2, "dev_eer": 15.0})
    assert stop.spent == 3 and stop.stop_all()
    with pytest.raises(ValueError):
        se.TrialEpochBudget(0)


def test_first_epochs_are_taken_in_reporting_order_across_trials():
    rows = [{"trial": "a", "epoch": 2, "reported_at": 30.0}, {"trial": "b", "epoch": 1, "reported_at": 20.0},
            {"trial": "a", "epoch": 1, "reported_at": 10.0}, {"trial": "b", "epoch": 2, "reported_at": 40.0}]
    assert [(r["trial"], r["epoch"]) for r in se.first_epochs(rows, 3)] == [("a", 1), ("b", 1), ("a", 2)]


def test_epochs_to_within_five_percent_of_a_target():
    eers = [20.0, 12.0, 10.6, 9.0, 8.0]
    assert se.running_best(eers) == [20.0, 12.0, 10.6, 9.0, 8.0]
    assert se.running_best([5.0, 7.0, 4.0]) == [5.0, 5.0, 4.0]
    assert se.epochs_to_within(eers, 10.0) == 4  # 10.6 > 10.0 x 1.05 = 10.5; 9.0 is the first at or under it
    assert se.epochs_to_within(eers, 10.1) == 3  # 10.6 <= 10.605
    assert se.epochs_to_within(eers, 8.0) == 5  # the target itself counts
    assert se.epochs_to_within(eers, 7.0) is None  # 7.35 is never reached


def test_an_arm_is_summarised_over_its_first_budget_epochs_only():
    rows = [{"trial": "a", "epoch": 1, "eer": 20.0, "reported_at": 1.0},
            {"trial": "b", "epoch": 1, "eer": 25.0, "reported_at": 2.0},
            {"trial": "a", "epoch": 2, "eer": 10.0, "reported_at": 3.0},  # a ran both epochs: a full trial
            {"trial": "c", "epoch": 1, "eer": 18.0, "reported_at": 4.0},
            {"trial": "c", "epoch": 2, "eer": 5.0, "reported_at": 5.0}]  # past a budget of 4: not counted
    s = se.summarize_arm(rows, budget=4, max_epochs=2)
    assert s["eers"] == [20.0, 25.0, 10.0, 18.0]
    assert (s["best_eer"], s["best_full_eer"], s["trials"], s["full_trials"]) == (10.0, 10.0, 3, 1)


def test_score_targets_the_best_arm_of_each_seed_and_pairs_pruned_with_complete_reporting():
    def run(arm, seed, eers):
        return {"arm": arm, "seed": seed, "eers": eers, "best_eer": min(eers), "best_full_eer": min(eers),
                "trials": 1, "full_trials": 1, "wall_s": 1.0}

    runs = [run("random", 0, [20.0, 12.0, 11.0]), run("tpe_asha_ray", 0, [20.0, 10.4, 10.0]),
            run("tpe_asha", 0, [15.0, 10.0, 12.0]),
            run("random", 1, [9.0, 8.0, 8.0]), run("tpe_asha_ray", 1, [12.0, 12.0, 9.0]),
            run("tpe_asha", 1, [10.0, 8.3, 8.0])]
    out = se.score(runs, budget=3)
    # seed 0: target 10.0 (<= 10.5): random never (counted as 3), ray at 2, study at 2
    # seed 1: target 8.0 (<= 8.4): random at 2, ray never (3), study at 2
    assert [r["epochs_to_5pct"] for r in runs] == [None, 2, 2, 2, None, 2]
    assert out["arms"]["random"]["epochs_to_5pct_mean"] == 2.5
    assert out["arms"]["random"]["epochs_to_5pct_reached"] == "1/2"
    assert out["arms"]["tpe_asha"]["best_eer"] == (9.0, pytest.approx(2 ** 0.5))
    assert out["pruned_vs_complete"] == {"best_eer_diff": [0.0, -1.0], "epochs_to_5pct_diff": [0, -1]}
