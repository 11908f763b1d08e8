"""Replication verdicts from synthetic test scores: per-seed differences, the seed-paired interval and the wording."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mfcon.evaluation.metrics import equal_error_rate
from mfcon.evaluation.verdicts import (
    ConfigVerdict,
    PairedInterval,
    format_table,
    one_model_for_seeds,
    paired_t_arrays,
    replicate_verdicts,
    seed_paired_eer_difference,
    significance,
    t_quantile,
    verdict_line,
)


def _model(rng, labels, groups, separation, speaker_effect=None):
    """One trained model's test scores: its own trial noise, optionally a speaker effect on target trials."""
    shift = 0.0 if speaker_effect is None else speaker_effect[groups] * labels
    return labels * separation + shift + rng.normal(0, 1, labels.size)


@pytest.fixture(scope="module")
def trial_list():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 30)  # 40 enrollment speakers x 30 trials
    labels = np.tile(np.arange(30) % 2, 40)
    return rng, labels, groups


def _interval(**kw) -> PairedInterval:
    defaults = dict(estimate=-1.0, low=-2.0, high=0.5, confidence=0.95, n_seeds=3, n_speakers=40,
                    seed_sd=0.5, speaker_se=0.4, se=0.6, df=4.0, method="seed-paired t")
    return PairedInterval(**{**defaults, **kw})


def test_estimate_and_per_seed_differences_match_the_formulas(trial_list):
    rng, labels, groups = trial_list
    scores = {"baseline": {s: _model(rng, labels, groups, 1.5) for s in (3, 1, 2)},
              "mfcon": {s: _model(rng, labels, groups, 2.5) for s in (1, 2, 3)}}
    v = replicate_verdicts(scores, labels, groups, "baseline", confidence=0.95, seed=0)
    eer = {label: {s: 100 * equal_error_rate(x, labels)[0] for s, x in rows.items()} for label, rows in scores.items()}
    assert v["mfcon"].seeds == v["baseline"].seeds == (1, 2, 3)  # seed order, whatever the dict order
    assert v["mfcon"].test_eer == pytest.approx(tuple(eer["mfcon"][s] for s in (1, 2, 3)))
    assert v["mfcon"].eer_std == pytest.approx(np.std(list(eer["mfcon"].values()), ddof=1))
    d = v["mfcon"].delta
    want = [eer["mfcon"][s] - eer["baseline"][s] for s in (1, 2, 3)]
    assert d.seeds == (1, 2, 3) and d.per_seed == pytest.approx(want)
    assert d.estimate == pytest.approx(np.mean(want)) == pytest.approx(v["mfcon"].eer_mean - v["baseline"].eer_mean)
    assert d.seed_sd == pytest.approx(np.std(want, ddof=1))
    assert (d.n_seeds, d.n_speakers, d.confidence, d.seed_variance_known) == (3, 40, 0.95, True)
    assert d.low < d.estimate < d.high and d.high - d.estimate == pytest.approx(d.estimate - d.low)
    assert v["baseline"].delta is None
    assert significance(d) == "significantly better"  # a large, real effect
    line = verdict_line(v["mfcon"])
    assert "significantly better" in line and "over speakers and paired seeds (3 seeds)" in line


def test_the_interval_is_the_documented_formula():
    """half = sqrt(t_{K-1}^2 v_spk + t_{S-1}^2 v_seed), v_spk from the off-diagonal bootstrap covariance."""
    rng = np.random.default_rng(5)
    k, s = 12, 4
    d = rng.normal(-1.0, 1.5, s)
    boot = d + rng.normal(0, 1, (300, 1)) * 0.8 + rng.normal(0, 0.5, (300, s))  # a shared and an own part
    r = paired_t_arrays(d, boot, k, 0.9)
    cov = np.cov(boot, rowvar=False)
    v_spk = k / (k - 1) * (cov.sum() - np.trace(cov)) / (s * (s - 1))
    v_seed = np.var(d, ddof=1) / s
    half = math.sqrt(float(t_quantile(0.95, k - 1)) ** 2 * v_spk + float(t_quantile(0.95, s - 1)) ** 2 * v_seed)
    assert float(r["estimate"]) == pytest.approx(d.mean())
    assert float(r["speaker_se"]) == pytest.approx(math.sqrt(v_spk))
    assert float(r["se"]) == pytest.approx(math.sqrt(v_spk + v_seed))
    assert float(r["half_width"]) == pytest.approx(half)
    assert (float(r["low"]), float(r["high"])) == pytest.approx((d.mean() - half, d.mean() + half))


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 1.7, 2, 3, 4, 9, 39, 99, 150, 1e4):
        for p in (0.95, 0.975, 0.995):
            assert float(t_quantile(p, df)) == pytest.approx(stats.t.ppf(p, df), rel=1e-6)
    dfs = np.array([1.0, 2.5, 30.0, 500.0])
    np.testing.assert_allclose(t_quantile(0.975, dfs), stats.t.ppf(0.975, dfs), rtol=1e-6)


def test_pairing_seeds_narrows_the_interval_when_seeds_share_an_effect(trial_list):
    """Seed s of both arms shares initialisation and data order: a good seed is good in both arms.

    Paired, the shared effect cancels in d_s; paired with the wrong seed (an unpaired treatment), it does not.
    """
    rng, labels, groups = trial_list
    seed_effect = {s: e for s, e in enumerate((-0.8, 0.0, 0.9, -0.4, 0.5))}  # large, shared by both arms
    a = {s: _model(rng, labels, groups, 2.2 + e) for s, e in seed_effect.items()}
    b = {s: _model(rng, labels, groups, 2.0 + e) for s, e in seed_effect.items()}
    paired = seed_paired_eer_difference(a, b, labels, groups, confidence=0.95, seed=1)
    shifted = {s: b[(s + 1) % 5] for s in b}  # the same models, each A seed against another seed's B
    unpaired = seed_paired_eer_difference(a, shifted, labels, groups, confidence=0.95, seed=1)
    assert paired.estimate == pytest.approx(unpaired.estimate)  # the same means...
    assert paired.seed_sd < 0.5 * unpaired.seed_sd  # ...but the shared seed effect cancels only when paired
    assert paired.high - paired.low < 0.6 * (unpaired.high - unpaired.low)


def test_one_seed_covers_speakers_only_and_says_so(trial_list):
    rng, labels, groups = trial_list
    scores = {"baseline": {7: _model(rng, labels, groups, 2.0)}, "mfcon": {7: _model(rng, labels, groups, 2.1)}}
    v = replicate_verdicts(scores, labels, groups, "baseline", confidence=0.95, seed=0)
    d = v["mfcon"].delta
    assert (d.n_seeds, d.seed_sd, d.seed_variance_known, d.df) == (1, None, False, 39.0)
    assert "1 seed" in d.method
    assert d.high - d.estimate == pytest.approx(float(t_quantile(0.975, 39)) * d.speaker_se)
    line = verdict_line(v["mfcon"])
    assert "over speakers only; seed variance unknown (1 seed)" in line
    assert "seed variance unknown" in format_table(v)


def test_unpaired_seeds_are_left_out_and_named(trial_list):
    rng, labels, groups = trial_list
    a = {s: _model(rng, labels, groups, 2.0) for s in (0, 1, 2)}
    b = {s: _model(rng, labels, groups, 2.0) for s in (1, 2, 3)}
    r = seed_paired_eer_difference(a, b, labels, groups, confidence=0.95, seed=0)
    assert (r.seeds, r.unpaired_seeds, r.n_seeds) == ((1, 2), (0, 3), 2)
    eer = lambda x: 100 * equal_error_rate(x, labels)[0]  # noqa: E731
    assert r.per_seed == pytest.approx([eer(a[s]) - eer(b[s]) for s in (1, 2)])
    v = ConfigVerdict("mfcon", (eer(a[0]), eer(a[1]), eer(a[2])), (0.1, 0.1, 0.1), r, seeds=(0, 1, 2))
    assert "unpaired seed(s) 0, 3 left out" in verdict_line(v)
    with pytest.raises(ValueError, match=r"no seed trained in both arms: A has seeds \[0, 1\], B has \[5\]"):
        seed_paired_eer_difference({0: a[0], 1: a[1]}, {5: b[1]}, labels, groups)


def test_one_model_can_stand_in_for_every_seed_of_the_baseline(trial_list):
    """Promotion: S challenger seeds against one champion model."""
    rng, labels, groups = trial_list
    a = {s: _model(rng, labels, groups, 2.3 + 0.1 * s) for s in range(4)}
    champion = _model(rng, labels, groups, 2.0)
    r = seed_paired_eer_difference(a, one_model_for_seeds(champion, a), labels, groups, confidence=0.95, seed=3)
    same = seed_paired_eer_difference(a, champion, labels, groups, confidence=0.95, seed=3)  # one array: same thing
    assert r == same
    eer_a = [100 * equal_error_rate(a[s], labels)[0] for s in range(4)]
    eer_c = 100 * equal_error_rate(champion, labels)[0]
    assert r.per_seed == pytest.approx([e - eer_c for e in eer_a])
    assert r.seed_sd == pytest.approx(np.std(eer_a, ddof=1))  # all seed spread is the challenger's
    assert r.n_seeds == 4 and r.unpaired_seeds == ()


def test_equal_systems_are_not_significant(trial_list):
    rng, labels, groups = trial_list
    scores = {"baseline": {s: _model(rng, labels, groups, 2.0) for s in range(3)},
              "mfcon": {s: _model(rng, labels, groups, 2.0) for s in range(3)}}
    v = replicate_verdicts(scores, labels, groups, "baseline", confidence=0.95, seed=0)
    assert v["mfcon"].delta.low < 0 < v["mfcon"].delta.high
    assert verdict_line(v["mfcon"]).endswith("-> not significant")
    table = format_table(v)
    assert "baseline" in table and "mfcon" in table and table.count("\n") == 2


def test_a_speaker_effect_of_the_configuration_widens_the_interval(trial_list):
    """A configuration that is better on some speakers and worse on others: speaker sampling is uncertain."""
    rng, labels, groups = trial_list
    quirk = np.random.default_rng(9).normal(0, 1.2, 40)  # the configuration's own speaker effect, all its seeds
    plain = {s: _model(rng, labels, groups, 2.0) for s in range(3)}
    quirky = {s: _model(rng, labels, groups, 2.0, quirk) for s in range(3)}
    base = {s: _model(rng, labels, groups, 2.0) for s in range(3)}
    calm = seed_paired_eer_difference(plain, base, labels, groups, seed=0)
    wide = seed_paired_eer_difference(quirky, base, labels, groups, seed=0)
    assert wide.speaker_se > 2 * calm.speaker_se


def test_significance_reads_the_interval_not_the_sign():
    assert significance(_interval(estimate=-1.0, low=-2.0, high=-0.1)) == "significantly better"
    assert significance(_interval(estimate=-1.0, low=-2.0, high=0.1)) == "not significant"
    assert significance(_interval(estimate=1.0, low=0.2, high=2.0)) == "significantly worse"
    line = verdict_line(ConfigVerdict("x", (9.0,), (0.5,), _interval(estimate=-1.0, low=-2.0, high=0.5)))
    assert "-1.00 EER points (-10.0% relative)" in line and "[-2.00, +0.50]" in line


def test_bad_input_is_named(trial_list):
    rng, labels, groups = trial_list
    with pytest.raises(ValueError, match="no scores for the baseline 'base'"):
        replicate_verdicts({"a": {0: [0.1, 0.2]}}, [0, 1], [0, 1], "base")
    with pytest.raises(TypeError, match=r"\{seed: scores"):
        replicate_verdicts({"base": [[0.1, 0.2]], "a": [[0.2, 0.1]]}, [0, 1], [0, 1], "base")
    x = {0: _model(rng, labels, groups, 2.0)}
    with pytest.raises(ValueError, match="trials of one speaker are not independent"):
        seed_paired_eer_difference(x, x, labels, None)
    with pytest.raises(ValueError, match="at least 2 enrollment speakers"):
        seed_paired_eer_difference(x, x, labels, np.zeros(labels.size))
