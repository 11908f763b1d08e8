"""Speaker-verification metrics: DET curve, EER, minDCF, paired cluster bootstrap.

Pure NumPy. All rates are fractions (training code multiplies the EER by 100).
Convention: a trial is *accepted* when ``score >= threshold``; labels are
1 = target (same speaker), 0 = non-target. Operating points are evaluated at
every distinct score value, so tied scores are always accepted or rejected
together and results do not depend on trial order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_BATCH_ELEMENTS = 2_000_000  # bootstrap resamples per batch ~ this / n_trials
_MAX_DRAW_FACTOR = 100  # give up after this many draws per wanted resample


def _check_trials(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (float64 scores, bool labels), both (N,)."""
    s = np.asarray(scores, dtype=np.float64)
    lab = np.asarray(labels)
    if s.ndim != 1 or lab.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D, got shapes {s.shape} and {lab.shape}")
    if s.shape != lab.shape:
        raise ValueError(f"scores and labels differ in length ({s.size} vs {lab.size})")
    if not np.isin(lab, (0, 1)).all():
        raise ValueError("labels must be 0/1 or bool (1 = target)")
    lab = lab.astype(bool)
    n_tar = int(lab.sum())
    if n_tar == 0 or n_tar == lab.size:
        raise ValueError(
            f"need both targets and non-targets, got {n_tar} targets and {lab.size - n_tar} non-targets"
        )
    bad = int((~np.isfinite(s)).sum())
    if bad:
        raise ValueError(f"scores contain {bad} non-finite value(s) (NaN or inf)")
    return s, lab


def _sorted_layout(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort once: (order, cut, thresholds).

    ``cut[j]`` is the number of sorted trials strictly below ``thresholds[j]``;
    thresholds are the distinct scores followed by +inf (reject everything).
    """
    order = np.argsort(scores, kind="stable")
    uniq, first = np.unique(scores[order], return_index=True)
    cut = np.append(first, scores.size)  # (K+1,)
    return order, cut, np.append(uniq, np.inf)


def _interpolate(fa_lo, miss_lo, fa_hi, miss_hi):
    """Where the segment between two operating points has p_fa == p_miss.

    Needs p_fa > p_miss at ``lo`` and p_fa <= p_miss at ``hi``; both rates move
    by the same fraction ``alpha`` in (0, 1], so they meet exactly. -> (eer, alpha)
    """
    d_lo, d_hi = fa_lo - miss_lo, fa_hi - miss_hi
    alpha = d_lo / (d_lo - d_hi)
    return fa_lo + alpha * (fa_hi - fa_lo), alpha


def det_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Operating points at every distinct score plus +inf, thresholds ascending.

    Starts at (p_fa=1, p_miss=0) (threshold = lowest score, accept all) and ends
    at (p_fa=0, p_miss=1) (threshold = +inf, reject all).

    >>> det_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])[0]
    array([1. , 0.5, 0.5, 0. , 0. ])
    """
    s, lab = _check_trials(scores, labels)
    order, cut, thresholds = _sorted_layout(s)
    tar_below = np.append(0, np.cumsum(lab[order]))[cut]  # (K+1,) targets below each threshold
    non_below = cut - tar_below
    n_tar = tar_below[-1]
    n_non = non_below[-1]
    p_miss = tar_below / n_tar
    p_fa = (n_non - non_below) / n_non
    return p_fa, p_miss, thresholds


def equal_error_rate(scores, labels) -> tuple[float, float]:
    """(EER, threshold) as fractions, interpolated between adjacent DET points.

    No ROC convex hull: the two neighbouring DET points where p_fa - p_miss
    changes sign (from > 0 to <= 0) are joined by a straight line and the EER
    is where it crosses p_fa == p_miss; the threshold is interpolated with the
    same fraction (the last score is used when the upper point is +inf).

    >>> round(equal_error_rate([0.2, 0.6, 0.9, 0.5], [1, 1, 1, 0])[0], 6)
    0.333333
    """
    p_fa, p_miss, thresholds = det_curve(scores, labels)
    hi = int(np.argmax(p_fa <= p_miss))  # first point at or past the crossing; >= 1
    lo = hi - 1
    eer, alpha = _interpolate(p_fa[lo], p_miss[lo], p_fa[hi], p_miss[hi])
    t_hi = thresholds[hi] if np.isfinite(thresholds[hi]) else thresholds[lo]  # crossing past top score
    thr = thresholds[lo] + alpha * (t_hi - thresholds[lo])
    return float(eer), float(thr)


def min_dcf(scores, labels, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0) -> tuple[float, float]:
    """(normalised minimum detection cost, threshold), NIST / VoxCeleb convention.

    DCF = C_miss*P_miss*P_target + C_fa*P_fa*(1-P_target), divided by the cost of
    the best trivial system min(C_miss*P_target, C_fa*(1-P_target)), so 1.0
    means "no better than always accepting or always rejecting".

    >>> min_dcf([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    (0.5, 0.8)
    """
    if not 0.0 < p_target < 1.0 or c_miss <= 0 or c_fa <= 0:
        raise ValueError(f"need 0 < p_target < 1 and positive costs, got {p_target=}, {c_miss=}, {c_fa=}")
    p_fa, p_miss, thresholds = det_curve(scores, labels)
    dcf = c_miss * p_miss * p_target + c_fa * p_fa * (1.0 - p_target)
    best = int(np.argmin(dcf))
    return float(dcf[best] / min(c_miss * p_target, c_fa * (1.0 - p_target))), float(thresholds[best])


@dataclass(frozen=True)
class BootstrapResult:
    """Point estimate and percentile confidence interval of a bootstrapped statistic."""

    estimate: float
    low: float
    high: float
    confidence: float
    n_boot: int


class _System:
    """One score set sorted once; EERs of many resamples from weighted counts.

    Targets and non-targets are kept as two score-ordered lists of resampling
    units, so a resample costs one gather and one cumsum per list, and the
    EER crossing is found by a per-row binary search (exact integer test).
    """

    def __init__(self, scores: np.ndarray, labels: np.ndarray, units: np.ndarray):
        order, cut, _ = _sorted_layout(scores)
        lab_sorted = labels[order]
        self.tar_units, self.non_units = units[order[lab_sorted]], units[order[~lab_sorted]]
        self.tar_cut = np.append(0, np.cumsum(lab_sorted))[cut]  # targets below each threshold
        self.non_cut = cut - self.tar_cut

    def eers(self, counts: np.ndarray):
        """counts (B, U) unit multiplicities -> (eer (B,), valid (B,))."""
        cum_tar, cum_non = _cum_counts(counts, self.tar_units), _cum_counts(counts, self.non_units)
        n_tar, n_non = cum_tar[:, -1].astype(np.int64), cum_non[:, -1].astype(np.int64)
        valid = (n_tar > 0) & (n_non > 0)
        rows = np.arange(counts.shape[0])

        def counts_at(j):  # weighted (targets, non-targets) strictly below threshold j
            return cum_tar[rows, self.tar_cut[j]], cum_non[rows, self.non_cut[j]]

        lo, hi = np.zeros(rows.size, dtype=np.int64), np.full(rows.size, self.tar_cut.size - 1)
        while np.any(hi - lo > 1):  # invariant: p_fa > p_miss at lo, p_fa <= p_miss at hi
            mid = (lo + hi) // 2
            tar_below, non_below = counts_at(mid)
            ok = (n_non - non_below) * n_tar <= tar_below * n_non
            lo, hi = np.where(ok, lo, mid), np.where(ok, mid, hi)
        with np.errstate(divide="ignore", invalid="ignore"):  # invalid rows are dropped
            (t_lo, n_lo), (t_hi, n_hi) = counts_at(lo), counts_at(hi)
            eer, _ = _interpolate(1 - n_lo / n_non, t_lo / n_tar, 1 - n_hi / n_non, t_hi / n_tar)
        return eer, valid


def _cum_counts(counts: np.ndarray, units: np.ndarray) -> np.ndarray:
    """(B, U) counts gathered at ``units`` -> (B, len(units)+1) running sums from 0."""
    out = np.zeros((counts.shape[0], units.size + 1), dtype=counts.dtype)
    np.cumsum(np.take(counts, units, axis=1), axis=1, out=out[:, 1:])
    return out


GROUPS_REQUIRED = ("groups is required: trials of one speaker are not independent, so resampling single trials "
                   "makes the interval too narrow; pass the enrollment speaker of each trial as groups")


def _unit_ids(groups, n: int) -> np.ndarray:
    """Trial -> resampling-unit index (0..U-1): its group. ``groups=None`` is refused (:data:`GROUPS_REQUIRED`)."""
    if groups is None:
        raise ValueError(GROUPS_REQUIRED)
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups must have one entry per trial ({n}), got shape {g.shape}")
    return np.unique(g, return_inverse=True)[1].reshape(n)


def _draw_counts(rng: np.random.Generator, n_units: int, batch: int, dtype) -> np.ndarray:
    """(batch, U) multiplicities: each row resamples U units with replacement."""
    picks = rng.integers(0, n_units, size=(batch, n_units))
    picks += np.arange(batch)[:, None] * n_units  # row offset -> one bincount for all rows
    return np.bincount(picks.ravel(), minlength=batch * n_units).reshape(batch, n_units).astype(dtype)


def _check_bootstrap_args(n_boot: int, confidence: float) -> None:
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def bootstrap_eer_difference(
    scores_a, scores_b, labels, groups=None, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> BootstrapResult:
    """Paired bootstrap of EER(a) - EER(b) on the same trials, percentile CI.

    Both systems are scored on each resample, so trial difficulty cancels
    (paired). ``groups`` (the enrollment speaker of each trial) is required:
    whole groups are resampled (cluster bootstrap), since trials sharing a
    speaker are not independent and trial resampling would make the CI too
    narrow; ``None`` raises ValueError (pass ``np.arange(n)`` only for trials
    that really are independent). Resamples lacking a class are redrawn. Each
    resample is a vector of multiplicities over trials sorted once per system,
    so no re-sorting.

    >>> r = bootstrap_eer_difference([0.1, 0.4, 0.35, 0.8], [0.1, 0.3, 0.35, 0.8], [0, 0, 1, 1], [0, 1, 0, 1],
    ...                              n_boot=50)
    >>> r.estimate
    0.5
    """
    _check_bootstrap_args(n_boot, confidence)
    a, lab = _check_trials(scores_a, labels)
    b, _ = _check_trials(scores_b, labels)
    if a.size != b.size:
        raise ValueError(f"scores_a and scores_b differ in length ({a.size} vs {b.size})")
    diffs = _bootstrap_diffs([a], [b], lab, groups, n_boot, seed)
    estimate = equal_error_rate(a, lab)[0] - equal_error_rate(b, lab)[0]
    return _percentile_ci(diffs, float(estimate), confidence)


def bootstrap_seeded_eer_difference(
    scores_a, scores_b, labels, groups=None, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> BootstrapResult:
    """Mean EER over A's training seeds minus mean over B's, with a CI that resamples speakers *and* seeds.

    Superseded for verdicts by :func:`mfcon.evaluation.verdicts.seed_paired_eer_difference`:
    this interval ignores that both arms train the same seeds and, with 2-5
    seeds, excludes 0 for equal systems far more often than 5% of the time
    (docs/verdict_calibration.md). Kept as the "old method" of that comparison
    and for bench/shard_size.py. ``groups`` is required, as in
    :func:`bootstrap_eer_difference`.

    ``scores_a`` (S_a, N) and ``scores_b`` (S_b, N) hold one row of trial scores
    per independently trained model (seed) of each configuration. A seed-to-seed
    spread is part of the uncertainty of "configuration A beats B": each
    resample draws the trial clusters once (shared by every model, so trial
    difficulty cancels) and, independently for A and B, S seeds with
    replacement. With one seed each it is the paired cluster bootstrap of
    :func:`bootstrap_eer_difference`, draw for draw.

    >>> r = bootstrap_seeded_eer_difference([[0.1, 0.4, 0.35, 0.8]], [[0.1, 0.3, 0.35, 0.8]], [0, 0, 1, 1],
    ...                                     [0, 1, 0, 1], n_boot=50)
    >>> r.estimate
    0.5
    """
    _check_bootstrap_args(n_boot, confidence)
    rows_a, rows_b = np.atleast_2d(np.asarray(scores_a, dtype=np.float64)), np.atleast_2d(
        np.asarray(scores_b, dtype=np.float64))
    if rows_a.ndim != 2 or rows_b.ndim != 2 or rows_a.shape[1] != rows_b.shape[1]:
        raise ValueError(f"scores must be (seeds, trials) with the same trials, got {rows_a.shape} and {rows_b.shape}")
    checked_a = [_check_trials(r, labels)[0] for r in rows_a]
    checked_b = [_check_trials(r, labels)[0] for r in rows_b]
    lab = _check_trials(rows_a[0], labels)[1]
    diffs = _bootstrap_diffs(checked_a, checked_b, lab, groups, n_boot, seed)
    estimate = (np.mean([equal_error_rate(x, lab)[0] for x in checked_a])
                - np.mean([equal_error_rate(x, lab)[0] for x in checked_b]))
    return _percentile_ci(diffs, float(estimate), confidence)


def _bootstrap_diffs(rows_a: list[np.ndarray], rows_b: list[np.ndarray], lab: np.ndarray, groups, n_boot: int,
                     seed: int) -> np.ndarray:
    """(n_boot,) resampled mean-EER(A) - mean-EER(B); seeds are resampled only when there are several."""
    units = _unit_ids(groups, lab.size)
    n_units = int(units.max()) + 1
    # resampled weight totals are at most U * (largest unit size): int32 when safe
    dtype = np.int32 if n_units * np.bincount(units).max() < 2**31 else np.int64
    systems_a = [_System(x, lab, units) for x in rows_a]
    systems_b = [_System(x, lab, units) for x in rows_b]
    rng = np.random.default_rng(seed)
    batch = max(1, _BATCH_ELEMENTS // (lab.size * max(1, (len(rows_a) + len(rows_b)) // 2)))
    diffs, draws = [], 0
    while sum(map(len, diffs)) < n_boot:
        if draws >= _MAX_DRAW_FACTOR * n_boot:
            raise ValueError("too few bootstrap resamples contain both targets and non-targets")
        counts = _draw_counts(rng, n_units, batch, dtype)
        draws += batch
        results_a = [s.eers(counts) for s in systems_a]
        ok = results_a[0][1]  # a resample lacks a class for every system alike
        eers_a = np.stack([eer for eer, _ in results_a], axis=1)  # (batch, S_a)
        eers_b = np.stack([s.eers(counts)[0] for s in systems_b], axis=1)  # (batch, S_b)
        diffs.append((_seed_mean(eers_a, rng) - _seed_mean(eers_b, rng))[ok])
    return np.concatenate(diffs)[:n_boot]


def _seed_mean(eers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(batch, S) -> (batch,): mean over S seeds drawn with replacement (no draw for a single seed)."""
    n = eers.shape[1]
    if n == 1:
        return eers[:, 0]
    picks = rng.integers(0, n, size=eers.shape)
    return np.take_along_axis(eers, picks, axis=1).mean(axis=1)


def _percentile_ci(diffs: np.ndarray, estimate: float, confidence: float) -> BootstrapResult:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    return BootstrapResult(float(estimate), float(low), float(high), float(confidence), int(diffs.size))


def cosine_scores(emb_a, emb_b) -> np.ndarray:
    """Row-paired cosine similarity: (N, D), (N, D) -> (N,).

    Zero-norm rows raise instead of silently scoring 0 (a dead embedding is a bug).

    >>> cosine_scores(np.array([[1.0, 0.0]]), np.array([[2.0, 2.0]])).round(4)
    array([0.7071])
    """
    a, b = np.asarray(emb_a, dtype=np.float64), np.asarray(emb_b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"embeddings must be row-paired (N, D) arrays, got {a.shape} and {b.shape}")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    if not (np.all(na > 0) and np.all(nb > 0) and np.isfinite(na).all() and np.isfinite(nb).all()):
        raise ValueError("embeddings contain zero-norm or non-finite rows")
    return np.einsum("nd,nd->n", a / na[:, None], b / nb[:, None])
