"""Per-list intervals of ``mfcon score``: EER and minDCF with a bootstrap over enrollment speakers (pure NumPy)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mfcon.data.corpus.voxceleb import TrialPair
from mfcon.evaluation.metrics import bootstrap_eer_difference, equal_error_rate, min_dcf


class IntervalError(ValueError):
    """A trial list too small to resample; the message says what it needs."""


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float


def enrollment_speakers(trials: Sequence[TrialPair]) -> np.ndarray:
    """The resampling unit of every trial: its enrollment utterance's speaker (``<speaker>/...``)."""
    return np.array([t.enroll.split("/", 1)[0] for t in trials])


def cluster_bootstrap_min_dcf(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, p_target: float,
                              n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> Interval:
    """minDCF at ``p_target`` with a percentile interval over resampled groups (resamples lacking a class
    are drawn again)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    estimate = float(min_dcf(scores, labels, p_target=p_target)[0])
    _, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    rng = np.random.default_rng(seed)
    values: list[float] = []
    draws = 0
    while len(values) < n_boot:
        if draws > 20 * n_boot:
            raise IntervalError("too few bootstrap resamples contain both targets and non-targets: "
                             "the list needs more enrollment speakers")
        draws += 1
        idx = np.concatenate([members[g] for g in rng.integers(0, len(members), size=len(members))])
        lab = labels[idx]
        if lab.min() == lab.max():
            continue
        values.append(float(min_dcf(scores[idx], lab, p_target=p_target)[0]))
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return Interval(estimate, float(low), float(high))


def eer_interval(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_boot: int = 1000,
                 confidence: float = 0.95, seed: int = 0) -> Interval:
    """EER (%) with its cluster-bootstrap interval: the paired bootstrap against a perfect scorer (EER 0 on
    every resample), as promotion computes it."""
    r = bootstrap_eer_difference(scores, labels.astype(np.float64), labels, groups, n_boot, confidence, seed)
    return Interval(100.0 * float(equal_error_rate(scores, labels)[0]), 100.0 * r.low, 100.0 * r.high)
