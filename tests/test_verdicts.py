"""Replication verdicts from synthetic test scores: means, spreads, the seeded CI and the wording."""

from __future__ import annotations

import numpy as np
import pytest
from mfcon.evaluation.metrics import BootstrapResult, equal_error_rate
from mfcon.evaluation.verdicts import ConfigVerdict, format_table, replicate_verdicts, significance, verdict_line


def _scores(rng, labels, separation, seeds):
    return [labels * separation + rng.normal(0, 1, labels.size) for _ in range(seeds)]


@pytest.fixture(scope="module")
def trial_list():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 30)  # 40 enrollment speakers x 30 trials
    labels = rng.integers(0, 2, groups.size)
    return rng, labels, groups


def test_means_spreads_and_difference_match_the_formulas(trial_list):
    rng, labels, groups = trial_list
    scores = {"baseline": _scores(rng, labels, 1.5, 3), "mfcon": _scores(rng, labels, 2.5, 3)}
    v = replicate_verdicts(scores, labels, groups, "baseline", n_boot=300)
    per_seed = [100 * equal_error_rate(s, labels)[0] for s in scores["mfcon"]]
    assert v["mfcon"].test_eer == pytest.approx(tuple(per_seed))
    assert v["mfcon"].eer_std == pytest.approx(np.std(per_seed, ddof=1))
    assert v["mfcon"].delta.estimate == pytest.approx(v["mfcon"].eer_mean - v["baseline"].eer_mean)
    assert v["baseline"].delta is None
    assert significance(v["mfcon"].delta) == "significantly better"  # a large, real effect
    assert "significantly better" in verdict_line(v["mfcon"])


def test_equal_systems_are_not_significant(trial_list):
    rng, labels, groups = trial_list
    scores = {"baseline": _scores(rng, labels, 2.0, 3), "mfcon": _scores(rng, labels, 2.0, 3)}
    v = replicate_verdicts(scores, labels, groups, "baseline", n_boot=300)
    assert v["mfcon"].delta.low < 0 < v["mfcon"].delta.high
    assert verdict_line(v["mfcon"]).endswith("-> not significant")
    table = format_table(v)
    assert "baseline" in table and "mfcon" in table and table.count("\n") == 2


def test_significance_reads_the_interval_not_the_sign():
    assert significance(BootstrapResult(-1.0, -2.0, -0.1, 0.95, 100)) == "significantly better"
    assert significance(BootstrapResult(-1.0, -2.0, 0.1, 0.95, 100)) == "not significant"
    assert significance(BootstrapResult(1.0, 0.2, 2.0, 0.95, 100)) == "significantly worse"
    line = verdict_line(ConfigVerdict("x", (9.0,), (0.5,), BootstrapResult(-1.0, -2.0, 0.5, 0.95, 100)))
    assert "-1.00 EER points (-10.0% relative)" in line and "[-2.00, +0.50]" in line


def test_missing_baseline_is_named():
    with pytest.raises(ValueError, match="no scores for the baseline 'base'"):
        replicate_verdicts({"a": [[0.1, 0.2]]}, [0, 1], [0, 1], "base")
