"""Metrics against hand-computed cases and slow references written from the formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mfcon.evaluation.metrics import (
    BootstrapResult,
    _System,
    bootstrap_eer_difference,
    bootstrap_seeded_eer_difference,
    cosine_scores,
    det_curve,
    equal_error_rate,
    min_dcf,
)
from sklearn.metrics import roc_curve

# classic 4-trial case: sorted scores 0.1 (non), 0.35 (tar), 0.4 (non), 0.8 (tar)
FOUR_SCORES = [0.1, 0.4, 0.35, 0.8]
FOUR_LABELS = [0, 0, 1, 1]
FOUR_GROUPS = [0, 1, 0, 1]  # two enrollment speakers, each with a target and a non-target


def gaussian_trials(n: int, seed: int, d_prime: float = 2.0):
    """Non-targets N(0, 1), targets N(d_prime, 1); half the trials are targets."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    return rng.normal(size=n) + d_prime * labels, labels


def phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def brute_rates(scores, labels, threshold):
    """(p_fa, p_miss) for 'accept if score >= threshold', straight from the definition."""
    tar = [s for s, lab in zip(scores, labels) if lab == 1]
    non = [s for s, lab in zip(scores, labels) if lab == 0]
    p_miss = sum(s < threshold for s in tar) / len(tar)
    p_fa = sum(s >= threshold for s in non) / len(non)
    return p_fa, p_miss


def brute_min_dcf(scores, labels, p_target, c_miss, c_fa):
    best = math.inf
    for t in sorted(set(scores)) + [math.inf]:
        p_fa, p_miss = brute_rates(scores, labels, t)
        best = min(best, c_miss * p_miss * p_target + c_fa * p_fa * (1 - p_target))
    return best / min(c_miss * p_target, c_fa * (1 - p_target))


def sklearn_eer(scores, labels):
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    fnr = 1.0 - tpr
    i = int(np.nanargmin(np.abs(fnr - fpr)))
    return (fpr[i] + fnr[i]) / 2.0


# ---------------------------------------------------------------- hand-computed


def test_perfect_separation_gives_zero_eer():
    eer, thr = equal_error_rate([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    assert eer == 0.0
    assert 0.2 < thr <= 0.8
    assert min_dcf([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])[0] == 0.0


def test_fully_inverted_gives_eer_one():
    assert equal_error_rate([0.8, 0.9, 0.1, 0.2], [0, 0, 1, 1])[0] == 1.0


def test_four_trial_case_by_hand():
    # thresholds 0.1, 0.35, 0.4, 0.8, inf -> (p_fa, p_miss) = (1,0) (.5,0) (.5,.5) (0,.5) (0,1)
    p_fa, p_miss, thr = det_curve(FOUR_SCORES, FOUR_LABELS)
    np.testing.assert_array_equal(p_fa, [1, 0.5, 0.5, 0, 0])
    np.testing.assert_array_equal(p_miss, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_array_equal(thr, [0.1, 0.35, 0.4, 0.8, np.inf])
    assert equal_error_rate(FOUR_SCORES, FOUR_LABELS) == (0.5, 0.4)  # exact crossing at 0.4
    # P_target 0.01: DCF/0.01 = p_miss + 99 p_fa -> 99, 49.5, 50, 0.5, 1
    assert min_dcf(FOUR_SCORES, FOUR_LABELS) == (0.5, 0.8)
    # P_target 0.5: p_miss + p_fa -> 1, .5, 1, .5, 1 (first minimum wins)
    assert min_dcf(FOUR_SCORES, FOUR_LABELS, p_target=0.5) == (0.5, 0.35)
    # C_miss 10, P_target .5: (5 p_miss + .5 p_fa) / .5 -> 1, .5, 5.5, 5, 10
    assert min_dcf(FOUR_SCORES, FOUR_LABELS, p_target=0.5, c_miss=10.0) == (0.5, 0.35)


def test_interpolated_eer_by_hand():
    # tar 0.2, 0.6, 0.9; non 0.5. Points at 0.5: (1, 1/3); at 0.6: (0, 1/3).
    # p_fa - p_miss goes 2/3 -> -1/3, alpha = 2/3: EER = 1 - 2/3 = 1/3, thr = 0.5 + 0.1 * 2/3
    eer, thr = equal_error_rate([0.2, 0.6, 0.9, 0.5], [1, 1, 1, 0])
    assert eer == pytest.approx(1 / 3)
    assert thr == pytest.approx(0.5 + 0.1 * 2 / 3)


def test_ties_are_evaluated_together():
    assert equal_error_rate([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == (0.5, 0.5)
    # tar 0.9, 0.5; non 0.5, 0.1: points (1,0) (.5,0) (0,.5) -> EER .25
    p_fa, p_miss, thr = det_curve([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0])
    np.testing.assert_array_equal(thr, [0.1, 0.5, 0.9, np.inf])
    assert equal_error_rate([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0])[0] == pytest.approx(0.25)


def test_results_do_not_depend_on_trial_order_with_ties():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, size=200).astype(float)  # heavy ties
    labels = (rng.random(200) < 0.4).astype(int)
    perm = rng.permutation(200)
    assert equal_error_rate(scores, labels) == equal_error_rate(scores[perm], labels[perm])
    assert min_dcf(scores, labels, 0.05) == min_dcf(scores[perm], labels[perm], 0.05)


# ---------------------------------------------------------------- references


@pytest.mark.parametrize("seed", range(6))
def test_eer_matches_sklearn_roc_reference(seed):
    rng = np.random.default_rng(seed)
    n = 300 + 100 * seed
    labels = (rng.random(n) < 0.3 + 0.05 * seed).astype(int)
    scores = rng.normal(size=n) + 1.5 * labels
    if seed % 2:
        scores = np.round(scores, 1)  # ties
    assert equal_error_rate(scores, labels)[0] == pytest.approx(sklearn_eer(scores, labels), abs=1.0 / n)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("p_target,c_miss,c_fa", [(0.01, 1, 1), (0.05, 1, 1), (0.5, 1, 1), (0.1, 10, 1), (0.3, 1, 5)])
def test_min_dcf_matches_brute_force(seed, p_target, c_miss, c_fa):
    rng = np.random.default_rng(seed)
    labels = (rng.random(150) < 0.4).astype(int)
    scores = np.round(rng.normal(size=150) + labels, 1 + seed % 2)
    value, thr = min_dcf(scores, labels, p_target, c_miss, c_fa)
    assert value == pytest.approx(brute_min_dcf(list(scores), list(labels), p_target, c_miss, c_fa), abs=1e-12)
    p_fa, p_miss = brute_rates(scores, labels, thr)
    at_thr = (c_miss * p_miss * p_target + c_fa * p_fa * (1 - p_target)) / min(c_miss * p_target, c_fa * (1 - p_target))
    assert at_thr == pytest.approx(value)
    assert value <= 1.0 + 1e-12  # never worse than the best trivial system


def test_det_curve_is_monotone_with_end_points_and_matches_definition():
    rng = np.random.default_rng(0)
    labels = (rng.random(120) < 0.5).astype(int)
    scores = np.round(rng.normal(size=120) + labels, 1)
    p_fa, p_miss, thr = det_curve(scores, labels)
    assert len(thr) == len(np.unique(scores)) + 1
    assert np.all(np.diff(thr) > 0)
    assert np.all(np.diff(p_fa) <= 0) and np.all(np.diff(p_miss) >= 0)
    assert (p_fa[0], p_miss[0], p_fa[-1], p_miss[-1]) == (1.0, 0.0, 0.0, 1.0)
    for t, fa, miss in zip(thr, p_fa, p_miss):
        assert (fa, miss) == pytest.approx(brute_rates(scores, labels, t))


def test_eer_matches_gaussian_theory_on_a_large_sample():
    scores, labels = gaussian_trials(400_000, seed=0, d_prime=2.0)
    assert equal_error_rate(scores, labels)[0] == pytest.approx(phi(-1.0), abs=2e-3)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "scores,labels,match",
    [
        ([0.1, 0.2, 0.3], [0, 1], "differ in length"),
        ([0.1, 0.2], [1, 1], "both targets and non-targets"),
        ([0.1, 0.2], [0, 0], "both targets and non-targets"),
        ([], [], "both targets and non-targets"),
        ([0.1, float("nan")], [0, 1], "non-finite"),
        ([0.1, float("inf")], [0, 1], "non-finite"),
        ([0.1, 0.2], [0, 2], "0/1"),
        ([[0.1, 0.2]], [[0, 1]], "1-D"),
    ],
)
def test_bad_input_raises_value_error(scores, labels, match):
    for fn in (det_curve, equal_error_rate, min_dcf):
        with pytest.raises(ValueError, match=match):
            fn(scores, labels)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="p_target"):
        min_dcf(FOUR_SCORES, FOUR_LABELS, p_target=1.0)
    with pytest.raises(ValueError, match="differ in length"):
        bootstrap_eer_difference(FOUR_SCORES, FOUR_SCORES[:3], FOUR_LABELS, FOUR_GROUPS)
    with pytest.raises(ValueError, match="groups"):
        bootstrap_eer_difference(FOUR_SCORES, FOUR_SCORES, FOUR_LABELS, groups=[0, 1])
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_eer_difference(FOUR_SCORES, FOUR_SCORES, FOUR_LABELS, FOUR_GROUPS, n_boot=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_eer_difference(FOUR_SCORES, FOUR_SCORES, FOUR_LABELS, FOUR_GROUPS, confidence=1.5)


def test_resampling_single_trials_is_refused():
    """Trials of one enrollment speaker are not independent: without groups there is no honest interval."""
    for fn in (bootstrap_eer_difference, bootstrap_seeded_eer_difference):
        with pytest.raises(ValueError, match="trials of one speaker are not independent.*enrollment speaker"):
            fn(FOUR_SCORES, FOUR_SCORES, FOUR_LABELS)
        with pytest.raises(ValueError, match="groups is required"):
            fn(FOUR_SCORES, FOUR_SCORES, FOUR_LABELS, groups=None, n_boot=10)
    # an explicit one-trial-per-group list is the caller's statement that trials are independent
    r = bootstrap_eer_difference(FOUR_SCORES, FOUR_SCORES, FOUR_LABELS, np.arange(4), n_boot=20)
    assert r.estimate == 0.0


def test_bool_labels_are_accepted():
    assert equal_error_rate(FOUR_SCORES, np.array(FOUR_LABELS, dtype=bool)) == (0.5, 0.4)


# ---------------------------------------------------------------- bootstrap


def test_weighted_eer_of_a_resample_equals_eer_of_the_expanded_resample():
    """The vectorised bootstrap path must agree with equal_error_rate on the resampled trials."""
    rng = np.random.default_rng(1)
    labels = (rng.random(300) < 0.5).astype(int)
    scores = np.round(rng.normal(size=300) + labels, 1)
    system = _System(scores, labels.astype(bool), np.arange(300))
    counts = rng.integers(0, 3, size=(20, 300)).astype(np.int32)
    counts[0] = 1
    eers, valid = system.eers(counts)
    assert valid.all()
    for row, eer in zip(counts, eers):
        expected = equal_error_rate(np.repeat(scores, row), np.repeat(labels, row))[0]
        assert eer == pytest.approx(expected, abs=1e-12)


def paired_systems(n: int, seed: int):
    """a: d' = 2; b: targets shifted by 0.5 plus independent N(0, .5^2) noise.

    EER(a) = Phi(-1); EER(b) = Phi(-2.5 / (2 sqrt(1.25))), so the true gap is known.
    """
    scores_a, labels = gaussian_trials(n, seed)
    noise = np.random.default_rng(seed + 1000).normal(scale=0.5, size=n)
    return scores_a, scores_a + 0.5 * labels + noise, labels


TRUE_GAP = phi(-1.0) - phi(-2.5 / (2 * math.sqrt(1.25)))


def test_bootstrap_is_deterministic_for_a_seed():
    a, b, labels = paired_systems(2000, seed=0)
    trials = np.arange(labels.size)  # independent trials: one group each
    first = bootstrap_eer_difference(a, b, labels, trials, n_boot=300, seed=7)
    assert isinstance(first, BootstrapResult)
    assert first == bootstrap_eer_difference(a, b, labels, trials, n_boot=300, seed=7)
    other = bootstrap_eer_difference(a, b, labels, trials, n_boot=300, seed=8)
    assert (other.low, other.high) != (first.low, first.high)
    assert other.estimate == first.estimate
    assert (first.confidence, first.n_boot) == (0.95, 300)
    assert first.low <= first.estimate <= first.high


def test_bootstrap_ci_covers_the_true_gap():
    assert TRUE_GAP == pytest.approx(0.0269, abs=1e-4)  # 0.1587 - 0.1318
    large_a, large_b, large_labels = paired_systems(400_000, seed=99)
    measured = equal_error_rate(large_a, large_labels)[0] - equal_error_rate(large_b, large_labels)[0]
    assert measured == pytest.approx(TRUE_GAP, abs=3e-3)
    covered = 0
    for data_seed in range(5):
        a, b, labels = paired_systems(4000, seed=data_seed)
        r = bootstrap_eer_difference(a, b, labels, np.arange(labels.size), n_boot=500, seed=data_seed)
        covered += r.low <= TRUE_GAP <= r.high
        assert r.low > 0  # the gap is clearly significant at this size
    assert covered >= 4


def test_bootstrap_ci_shrinks_with_more_trials():
    widths = []
    for n in (1000, 16000):
        a, b, labels = paired_systems(n, seed=5)
        r = bootstrap_eer_difference(a, b, labels, np.arange(n), n_boot=400, seed=0)
        widths.append(r.high - r.low)
    assert widths[1] < 0.5 * widths[0]  # ~ 1/sqrt(n): expect about a quarter


def test_grouped_bootstrap_is_wider_when_scores_correlate_within_groups():
    n_groups, per_group = 50, 80
    a, b, labels = paired_systems(n_groups * per_group, seed=2)
    groups = np.repeat(np.arange(n_groups), per_group)  # e.g. the enrollment speaker
    offsets = np.random.default_rng(11).normal(scale=1.0, size=n_groups)
    b = b + offsets[groups] * labels  # system b finds some speakers' targets harder
    trial = bootstrap_eer_difference(a, b, labels, np.arange(labels.size), n_boot=400, seed=0)
    grouped = bootstrap_eer_difference(a, b, labels, groups=groups, n_boot=400, seed=0)
    assert grouped.estimate == trial.estimate
    assert grouped.high - grouped.low > 1.5 * (trial.high - trial.low)  # ~2.7x here


def test_resamples_missing_a_class_are_redrawn():
    # one group holds every target, the other every non-target: half of all draws lack a class
    a, b, labels = paired_systems(200, seed=4)
    r = bootstrap_eer_difference(a, b, labels, groups=labels, n_boot=200, seed=0)
    assert r.n_boot == 200 and np.isfinite([r.low, r.high]).all()


# ---------------------------------------------------------------- cosine


def test_cosine_scores_normalise_rows():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    expected = [x @ y / (np.linalg.norm(x) * np.linalg.norm(y)) for x, y in zip(a, b)]
    np.testing.assert_allclose(cosine_scores(a, b), expected)
    np.testing.assert_allclose(cosine_scores(3.0 * a, b), expected)
    np.testing.assert_allclose(cosine_scores(a, a), np.ones(5))


def test_cosine_scores_reject_bad_input():
    with pytest.raises(ValueError, match="row-paired"):
        cosine_scores(np.ones((3, 4)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="zero-norm"):
        cosine_scores(np.zeros((1, 4)), np.ones((1, 4)))


def test_seeded_bootstrap_reduces_to_paired_with_one_seed():
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 2, 400)
    groups = rng.integers(0, 20, 400)
    a, b = labels + rng.normal(0, 1.0, 400), labels + rng.normal(0, 1.2, 400)
    one = bootstrap_eer_difference(a, b, labels, groups, n_boot=300, seed=4)
    seeded = bootstrap_seeded_eer_difference([a], [b], labels, groups, n_boot=300, seed=4)
    assert seeded == one


def test_seeded_bootstrap_estimate_is_the_difference_of_seed_means_and_widens_with_seed_spread():
    rng = np.random.default_rng(12)
    labels = rng.integers(0, 2, 600)
    groups = rng.integers(0, 30, 600)
    noise = [rng.normal(0, 1.0, 600) for _ in range(6)]
    tight_a = [labels + n for n in noise[:3]]
    b = [labels + 1.05 * n for n in noise[3:]]
    spread_a = [labels * k + n for k, n in zip((0.4, 1.0, 1.8), noise[:3])]  # seeds of very different quality
    r = bootstrap_seeded_eer_difference(tight_a, b, labels, groups, n_boot=400, seed=0)
    expected = np.mean([equal_error_rate(x, labels)[0] for x in tight_a]) - np.mean(
        [equal_error_rate(x, labels)[0] for x in b])
    assert r.estimate == pytest.approx(expected)
    assert r.low <= r.estimate <= r.high
    wide = bootstrap_seeded_eer_difference(spread_a, b, labels, groups, n_boot=400, seed=0)
    assert (wide.high - wide.low) > 1.5 * (r.high - r.low)
