"""Did the search find anything? The study's best trial against its own lambda = 0 baseline and noise floor.

Every MFCon study trains the baseline (its base config with MFCon weight 0) at
k seeds beside the searched trials. The seed-to-seed standard deviation ``sd``
of the baseline's best dev value is the study's noise floor: a single-seed
trial and the mean of k baseline seeds differ by chance with standard
deviation ``sd * sqrt(1 + 1/k)``, so a difference smaller than twice that
(:data:`FLOOR_SDS`) is within noise. The best trial is also the best of N, which
inflates its margin further; the line says so and points at ``mfcon replicate``,
which answers on the held-out test list with fresh seeds.

>>> c = compare_with_baseline("demo", "dev_eer", {"t1": 5.0, "t2": 6.0}, [5.5, 6.1])
>>> c.verdict
'within noise'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

FLOOR_SDS = 2.0  # a difference beyond this many standard deviations of chance is "beyond noise"
UNITS = {"dev_eer": "EER points"}  # other metrics (minDCF) are unitless


@dataclass(frozen=True)
class BaselineComparison:
    """The best MFCon trial's best dev value against the baseline seeds' (same metric, same rule for "best")."""

    study: str
    metric: str
    best_trial: str | None
    best_value: float | None
    baseline_values: tuple[float, ...]  # each baseline seed's best dev value
    n_trials: int  # finished MFCon trials the best was chosen from

    @property
    def baseline_mean(self) -> float | None:
        return float(np.mean(self.baseline_values)) if self.baseline_values else None

    @property
    def seed_sd(self) -> float | None:
        """Seed-to-seed standard deviation of the baseline (None with fewer than 2 seeds)."""
        return float(np.std(self.baseline_values, ddof=1)) if len(self.baseline_values) >= 2 else None

    @property
    def noise_floor(self) -> float | None:
        """Half-width of chance differences between one trial and the baseline mean (None when unknown)."""
        sd = self.seed_sd
        return None if sd is None else FLOOR_SDS * sd * math.sqrt(1 + 1 / len(self.baseline_values))

    @property
    def difference(self) -> float | None:
        """best - baseline mean (negative: the best trial has the lower error)."""
        if self.best_value is None or self.baseline_mean is None:
            return None
        return self.best_value - self.baseline_mean

    @property
    def verdict(self) -> str:
        """'better', 'worse', 'within noise', or 'unknown' (no baseline, no MFCon trial, or no noise floor)."""
        diff, floor = self.difference, self.noise_floor
        if diff is None or floor is None:
            return "unknown"
        if diff < -floor:
            return "better"
        if diff > floor:
            return "worse"
        return "within noise"

    def within_noise_of_best(self, value: float | None) -> bool:
        """Whether a trial's value is indistinguishable from the best's (the report marks such trials)."""
        floor = self.noise_floor
        return value is not None and self.best_value is not None and floor is not None \
            and value - self.best_value <= floor

    def line(self) -> str:
        """The one sentence the study summary, the report and the parent run show."""
        replicate = f"`mfcon replicate --study {self.study}`"
        if not self.baseline_values:
            return (f"no finished lambda = 0 baseline trial: the study cannot say whether the search found "
                    f"anything; compare with {replicate}")
        if self.best_value is None:
            return "no finished MFCon trial to compare with the lambda = 0 baseline"
        k = len(self.baseline_values)
        amount = _amount(self.metric, self.difference)
        head = (f"best vs baseline on dev: {amount} ({self.best_trial}, best of {self.n_trials} trials, "
                + (f"vs the mean of {k} baseline seeds)" if k > 1 else "vs the baseline, 1 seed)"))
        if self.noise_floor is None:
            return f"{head}; noise floor unknown (1 baseline seed): replicate before believing it ({replicate})"
        digits = 2 if self.metric in UNITS else 4
        spread = (f"{head}; seed spread sd {self.seed_sd:.{digits}f} -> noise floor "
                  f"+-{self.noise_floor:.{digits}f}")
        if self.verdict == "within noise":
            return f"{spread} -> within noise: replicate before believing it ({replicate})"
        if self.verdict == "better":
            return (f"{spread} -> beyond noise on dev, but chosen as the best of {self.n_trials}: "
                    f"confirm on the test list with {replicate}")
        return f"{spread} -> worse than the baseline: the search found nothing better than lambda = 0"


def _amount(metric: str, value: float) -> str:
    return f"{value:+.2f} {UNITS[metric]}" if metric in UNITS else f"{value:+.4f} {metric}"


def compare_with_baseline(study: str, metric: str, mfcon_values: Mapping[str, float | None],
                          baseline_values: Sequence[float | None]) -> BaselineComparison:
    """``mfcon_values``: trial -> best dev value of each finished MFCon trial; ``baseline_values`` per seed."""
    finite = {t: float(v) for t, v in mfcon_values.items() if v is not None and math.isfinite(v)}
    base = tuple(float(v) for v in baseline_values if v is not None and math.isfinite(v))
    best = min(finite, key=lambda t: (finite[t], t)) if finite else None
    return BaselineComparison(study, metric, best, finite.get(best) if best else None, base, len(finite))
