"""Equal-compute verdicts: configurations retrained with several seeds, scored on the held-out test list.

Pure functions over score arrays (no Ray, MLflow or torch), so the verdict a
user reads can be checked against formulas. A configuration's result is the
mean and spread of its test EER/minDCF over training seeds; its comparison with
the baseline is the difference of seed means with a bootstrap CI that resamples
enrollment speakers and seeds (:func:`mfcon.evaluation.metrics.bootstrap_seeded_eer_difference`).
A difference whose interval crosses 0 is reported as "not significant", whatever
its sign: that is the honest answer for a small list or few seeds.

>>> import numpy as np
>>> labels = np.array([0, 1, 0, 1]); groups = np.array([0, 0, 1, 1])
>>> r = replicate_verdicts({"baseline": [[0.1, 0.4, 0.35, 0.8]], "mfcon": [[0.1, 0.5, 0.3, 0.8]]},
...                        labels, groups, baseline="baseline", n_boot=50)
>>> r["mfcon"].test_eer
(0.0,)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from mfcon.evaluation.metrics import BootstrapResult, bootstrap_seeded_eer_difference, equal_error_rate, min_dcf


@dataclass(frozen=True)
class ConfigVerdict:
    """One configuration over its seeds; EER in percent, minDCF (p=0.01) absolute."""

    label: str
    test_eer: tuple[float, ...]
    test_min_dcf: tuple[float, ...]
    delta: BootstrapResult | None = None  # EER(config) - EER(baseline), percent points; None for the baseline
    params: dict[str, str] = field(default_factory=dict)

    @property
    def eer_mean(self) -> float:
        return float(np.mean(self.test_eer))

    @property
    def eer_std(self) -> float:
        return float(np.std(self.test_eer, ddof=1)) if len(self.test_eer) > 1 else 0.0

    @property
    def min_dcf_mean(self) -> float:
        return float(np.mean(self.test_min_dcf))

    @property
    def min_dcf_std(self) -> float:
        return float(np.std(self.test_min_dcf, ddof=1)) if len(self.test_min_dcf) > 1 else 0.0


def replicate_verdicts(scores: Mapping[str, Sequence[Sequence[float]]], labels, groups, baseline: str,
                       n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, ConfigVerdict]:
    """{label: (seeds, trials) test scores} -> {label: ConfigVerdict}, each compared with ``baseline``."""
    if baseline not in scores:
        raise ValueError(f"no scores for the baseline {baseline!r}; have {sorted(scores)}")
    labels = np.asarray(labels)
    out = {}
    for label, rows in scores.items():
        rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
        eers = tuple(100.0 * equal_error_rate(r, labels)[0] for r in rows)
        dcfs = tuple(float(min_dcf(r, labels, p_target=0.01)[0]) for r in rows)
        delta = None
        if label != baseline:
            d = bootstrap_seeded_eer_difference(rows, scores[baseline], labels, groups, n_boot, confidence, seed)
            delta = BootstrapResult(100 * d.estimate, 100 * d.low, 100 * d.high, d.confidence, d.n_boot)
        out[label] = ConfigVerdict(label, eers, dcfs, delta)
    return out


def significance(delta: BootstrapResult) -> str:
    """'better' (whole CI below 0), 'worse' (whole CI above 0) or 'not significant'."""
    if delta.high < 0:
        return "significantly better"
    if delta.low > 0:
        return "significantly worse"
    return "not significant"


def verdict_line(v: ConfigVerdict, baseline: str = "baseline") -> str:
    """One sentence a person reads: the effect, its interval and whether it is significant."""
    if v.delta is None:
        return f"{v.label} is the baseline"
    d = v.delta
    relative = ""
    base_mean = v.eer_mean - d.estimate
    if base_mean > 0 and math.isfinite(base_mean):
        relative = f" ({100 * d.estimate / base_mean:+.1f}% relative)"
    return (f"{v.label} vs {baseline}: {d.estimate:+.2f} EER points{relative}, {d.confidence:.0%} CI "
            f"[{d.low:+.2f}, {d.high:+.2f}] over speakers and seeds -> {significance(d)}")


def format_table(verdicts: Mapping[str, ConfigVerdict]) -> str:
    """The replication table: per configuration, seeds, test EER and minDCF mean +- sd, difference to baseline."""
    header = f"  {'config':<14} {'seeds':>5}  {'test EER %':>15}  {'test minDCF':>16}  delta EER (95% CI)"
    lines = [header]
    for v in verdicts.values():
        delta = "baseline" if v.delta is None else f"{v.delta.estimate:+.2f} [{v.delta.low:+.2f}, {v.delta.high:+.2f}]"
        lines.append(f"  {v.label:<14} {len(v.test_eer):>5}  {v.eer_mean:6.2f} +- {v.eer_std:5.2f}  "
                     f"{v.min_dcf_mean:6.4f} +- {v.min_dcf_std:6.4f}  {delta}")
    return "\n".join(lines)
