"""Promotion gate: the decision rule, and its error rates on synthetic scores (no training).

Statistical checks are seeded (pure NumPy), so they are deterministic; the
parameters put the expected rates far from the thresholds (measured, see
docs/promotion_gate.md: false promotion 1.5-3.5% for one fixed challenger and
~2% under the dev/test protocol; power ~92-96% at d' +0.6). ~15 s on 2 cores.
"""

from __future__ import annotations

import numpy as np
import pytest
from mfcon.evaluation.metrics import BootstrapResult
from mfcon.promotion.gate import (
    GateDecision,
    TrialModel,
    gate,
    simulate_promotions,
    synthetic_trials,
    wilson_interval,
)

N_SYSTEMS = 20
EFFECT = 0.6  # d' gain of the one truly better system: ~5 EER points (14% -> 9%) on the default list


def delta(low, high, estimate=None, confidence=0.95):
    est = (low + high) / 2 if estimate is None else estimate
    return BootstrapResult(est, low, high, confidence, 500)


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize("high, promoted", [(-0.001, True), (-1e-12, True), (0.0, False), (0.004, False)])
def test_gate_promotes_iff_upper_bound_below_zero(high, promoted):
    d = gate(delta(-0.02, high))
    assert isinstance(d, GateDecision)
    assert d.promote is promoted and d.significant is promoted and d.forced is False
    assert d.delta == delta(-0.02, high)


def test_gate_force_promotes_only_what_is_not_significant_as_forced():
    d = gate(delta(-0.01, 0.02), force=True)
    assert d.promote and d.forced and not d.significant
    assert d.reason == "forced although not significantly better: 95% CI of the EER difference [-1.00, +2.00] points"
    significant = gate(delta(-0.03, -0.01), force=True)
    assert significant.promote and significant.significant and not significant.forced


def test_gate_reason_wording_units_and_evidence():
    assert gate(delta(-0.03, -0.01)).reason == (
        "significantly better: 95% CI of the EER difference [-3.00, -1.00] points")
    assert gate(delta(-0.01, 0.02)).reason == (
        "not significantly better: 95% CI of the EER difference [-1.00, +2.00] points does not lie below 0")
    pct = gate(delta(-1.0, 2.0, confidence=0.9), units="percent", evidence="the held-out test list (1200 trials)")
    assert pct.reason == ("not significantly better on the held-out test list (1200 trials): "
                          "90% CI of the EER difference [-1.00, +2.00] points does not lie below 0")
    assert gate(None, evidence="x") == GateDecision(True, False, False, "no champion yet", None)
    with pytest.raises(ValueError, match="units"):
        gate(delta(-1, 1), units="points")


def test_wilson_interval():
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    low, high = wilson_interval(5, 200)
    assert low == pytest.approx(0.01072, abs=1e-4) and high == pytest.approx(0.05718, abs=1e-4)  # by hand
    assert wilson_interval(100, 200) == pytest.approx((0.4314, 0.5686), abs=1e-4)


# ---------------------------------------------------------------- the model


def test_synthetic_trials_are_paired_and_clustered():
    model = TrialModel(n_speakers=6, n_target=3, n_nontarget=5)
    scores, labels, groups = synthetic_trials(model, [2.0, 2.0, 4.0], np.random.default_rng(0))
    assert scores.shape == (3, 48) and labels.shape == groups.shape == (48,)
    assert labels.sum() == 18 and np.bincount(groups).tolist() == [8] * 6
    assert np.corrcoef(scores[0], scores[1])[0, 1] > 0.5  # shared speaker and trial terms
    big, lab, _ = synthetic_trials(TrialModel(n_speakers=400), [0.0, 1.5], np.random.default_rng(1))
    gap = big[1] - big[0]  # difference of two systems on the same trials: mean 1.5 on targets, 0 on non-targets
    assert gap[lab == 1].mean() == pytest.approx(1.5, abs=0.05) and abs(gap[lab == 0].mean()) < 0.05


def test_simulation_is_deterministic():
    def run():
        return simulate_promotions(5, 3, 0.0, "dev", seed=11, model=TrialModel(n_speakers=10), n_boot=50)

    a, b = run(), run()
    assert (a.n_promoted, a.eer_champion, a.eer_better) == (b.n_promoted, b.eer_champion, b.eer_better)
    with pytest.raises(ValueError, match="select_on"):
        simulate_promotions(n_studies=1, select_on="test")


# ---------------------------------------------------------------- error rates


@pytest.fixture(scope="module")
def null_dev():
    return simulate_promotions(n_studies=300, n_systems=N_SYSTEMS, effect=0.0, select_on="dev", seed=1)


@pytest.fixture(scope="module")
def null_same():
    return simulate_promotions(n_studies=200, n_systems=N_SYSTEMS, effect=0.0, select_on="same", seed=1)


def test_null_dev_selected_test_gated_promotes_at_most_5_percent(null_dev):
    """20 equally good systems, best on dev, gated on a speaker-disjoint test list: false promotion <= 5%."""
    assert null_dev.n_studies >= 200
    assert null_dev.rate <= 0.05, null_dev
    assert abs(null_dev.eer_reduction_points) < 0.5  # equally good: no real EER gap


def test_same_list_selection_is_biased(null_same, null_dev):
    """Selecting and gating on one list promotes equally good systems far more often (the reported bug)."""
    assert null_same.rate >= 0.10, null_same
    assert null_same.ci[0] > null_dev.ci[1]  # Wilson intervals do not overlap


def test_power_truly_better_system_promoted_at_least_80_percent():
    """One system in the pool with d' +0.6 (~5 EER points better than the champion): promoted in >= 80%."""
    r = simulate_promotions(n_studies=200, n_systems=N_SYSTEMS, effect=EFFECT, select_on="dev", seed=2)
    assert r.eer_reduction_points > 4.0, r
    assert r.rate >= 0.80, r
