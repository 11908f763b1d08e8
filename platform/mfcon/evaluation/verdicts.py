"""Equal-compute verdicts: configurations retrained with several seeds, scored on the held-out test list.

Pure functions over score arrays (no Ray, MLflow or torch), so the verdict a
user reads can be checked against formulas. A configuration's result is the
mean and spread of its test EER/minDCF over training seeds; its comparison with
the baseline is :func:`seed_paired_eer_difference`: the mean over *paired*
seeds (seed s of both arms shares initialisation and data order) of the
per-seed EER differences, with a Student-t interval whose variance has a
speaker part (a cluster bootstrap over enrollment speakers, shared by every
model) and a seed part (the sample variance of the per-seed differences).
A difference whose interval crosses 0 is reported as "not significant",
whatever its sign: that is the honest answer for a small list or few seeds.
docs/verdict_calibration.md has the formula and its calibration by simulation.

>>> import numpy as np
>>> labels = np.array([0, 1, 0, 1]); groups = np.array([0, 0, 1, 1])
>>> r = replicate_verdicts({"baseline": {0: [0.1, 0.4, 0.35, 0.8]}, "mfcon": {0: [0.1, 0.5, 0.3, 0.8]}},
...                        labels, groups, baseline="baseline", n_boot=50)
>>> r["mfcon"].test_eer, r["mfcon"].seeds, r["mfcon"].delta.seed_variance_known
((0.0,), (0,), False)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from mfcon.evaluation.metrics import _check_trials, _draw_counts, _MAX_DRAW_FACTOR, _System, equal_error_rate, \
    min_dcf
from mfcon.evaluation.student_t import t_quantile, t_two_sided_tail

_ROW_ELEMENTS = 4_000_000  # resampled trial weights evaluated at once (rows x trials)


# ---------------------------------------------------------------- the paired interval


@dataclass(frozen=True)
class PairedInterval:
    """EER(A) - EER(B) in percent points over paired training seeds, with a t interval over speakers and seeds.

    ``per_seed`` are the differences d_s of the paired ``seeds``; ``estimate`` is
    their mean. ``speaker_se`` is the standard error from sampling enrollment
    speakers, ``seed_sd`` the sample sd of d_s (None with one seed: unknown),
    ``se`` the total standard error and ``df`` the effective degrees of
    freedom (half-width = t_df * se). ``unpaired_seeds`` trained in one arm only and
    were left out.
    """

    estimate: float
    low: float
    high: float
    confidence: float
    n_seeds: int
    n_speakers: int
    seed_sd: float | None
    speaker_se: float
    se: float
    df: float
    method: str
    seeds: tuple[int, ...] = ()
    per_seed: tuple[float, ...] = ()
    unpaired_seeds: tuple[int, ...] = ()
    n_boot: int = 0

    @property
    def seed_variance_known(self) -> bool:
        return self.n_seeds >= 2


METHOD_PAIRED = "seed-paired t (speaker bootstrap + seed variance, Banerjee)"
METHOD_ONE_SEED = "speaker bootstrap t (1 seed: seed variance unknown)"


def paired_t_arrays(d: np.ndarray, boot: np.ndarray, n_speakers: int, confidence: float,
                    combine: str = "banerjee") -> dict[str, np.ndarray]:
    """The interval's arithmetic, vectorised over leading axes (the calibration simulation calls it too).

    ``d`` (..., S) per-seed differences of the full list; ``boot`` (..., B, S) the
    same differences on B speaker resamples (shared by all models). Returns
    arrays (...,) estimate, low, high, se, speaker_se, seed_sd, half_width.
    ``combine="banerjee"`` (the verdicts' rule) takes a t quantile per variance
    component; ``"welch"`` one t quantile with Welch-Satterthwaite degrees of
    freedom (kept for the calibration record: too narrow with 2-3 seeds).
    """
    d, boot = np.asarray(d, dtype=np.float64), np.asarray(boot, dtype=np.float64)
    s, k = d.shape[-1], int(n_speakers)
    if k < 2:
        raise ValueError(f"need at least 2 enrollment speakers for an interval, got {k}")
    if boot.shape[-1] != s or boot.shape[-2] < 2:
        raise ValueError(f"boot must be (..., B >= 2, {s}), got {boot.shape}")
    if combine not in ("banerjee", "welch"):
        raise ValueError(f"combine must be 'banerjee' or 'welch', got {combine!r}")
    centred = boot - boot.mean(axis=-2, keepdims=True)
    cov = np.einsum("...bi,...bj->...ij", centred, centred) / (boot.shape[-2] - 1)  # (..., S, S)
    inflate = k / (k - 1.0)  # the bootstrap variance of a mean over k clusters is (k-1)/k of the unbiased one
    p = 0.5 + confidence / 2.0
    t_spk = float(t_quantile(p, k - 1))
    if s >= 2:
        trace = np.trace(cov, axis1=-2, axis2=-1)
        shared = (cov.sum(axis=(-2, -1)) - trace) / (s * (s - 1))  # mean covariance of two seeds' d*
        v_spk = inflate * np.maximum(shared, 0.0)
        seed_var = d.var(axis=-1, ddof=1)
        v_seed = seed_var / s
        seed_sd = np.sqrt(seed_var)
        if combine == "banerjee":
            half = np.sqrt(t_spk ** 2 * v_spk + float(t_quantile(p, s - 1)) ** 2 * v_seed)
        else:
            denom = v_spk ** 2 / (k - 1) + v_seed ** 2 / (s - 1)
            safe = np.where(denom > 0, denom, 1.0)
            df = np.clip(np.where(denom > 0, (v_spk + v_seed) ** 2 / safe, k - 1.0), 1.0, None)
            half = t_quantile(p, df) * np.sqrt(v_spk + v_seed)
    else:
        v_spk = inflate * cov[..., 0, 0]
        v_seed = np.zeros_like(v_spk)
        seed_sd = np.full_like(v_spk, np.nan)
        half = t_spk * np.sqrt(v_spk)
    estimate = d.mean(axis=-1)
    return {"estimate": estimate, "low": estimate - half, "high": estimate + half, "se": np.sqrt(v_spk + v_seed),
            "speaker_se": np.sqrt(v_spk), "seed_sd": seed_sd, "half_width": half}


def effective_df(p: float, factor: float, df_max: float) -> float:
    """The degrees of freedom whose t quantile ``p`` equals ``factor`` (half-width / se), within [1, df_max]."""
    tail = 2.0 * (1.0 - p)
    if factor <= 0 or t_two_sided_tail(factor, 1.0) <= tail:
        return 1.0
    if t_two_sided_tail(factor, df_max) >= tail:
        return float(df_max)
    lo, hi = 0.0, math.log(df_max)
    for _ in range(40):  # the tail beyond ``factor`` shrinks as df grows
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_two_sided_tail(factor, math.exp(mid)) > tail else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def one_model_for_seeds(scores, seeds) -> dict[int, np.ndarray]:
    """{seed: scores} with one model (e.g. the champion) standing in for every seed of the other arm."""
    arr = np.asarray(scores, dtype=np.float64)
    return {int(s): arr for s in seeds}


def _by_seed(scores, what: str) -> dict[int, np.ndarray]:
    if not isinstance(scores, Mapping):
        raise TypeError(f"{what} must be {{seed: scores (N,)}}, got {type(scores).__name__}; "
                        "for one model standing in for every seed use one_model_for_seeds()")
    return {int(s): v for s, v in scores.items()}


def speaker_bootstrap_eers(models: Sequence[np.ndarray], labels: np.ndarray, groups, n_boot: int,
                           rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """EER (fractions) of every model on ``n_boot`` resamples of whole speakers -> ((n_boot, M), n_speakers).

    The resample (a multiplicity per speaker) is the same for every model, so
    trial and speaker difficulty cancel in differences. Resamples lacking a
    class are redrawn.
    """
    if groups is None:
        raise ValueError("groups is required: trials of one speaker are not independent, so pass the enrollment "
                         "speaker of each trial as groups")
    g = np.asarray(groups)
    if g.shape != labels.shape:
        raise ValueError(f"groups must have one entry per trial ({labels.size}), got shape {g.shape}")
    units = np.unique(g, return_inverse=True)[1].reshape(labels.size)
    k = int(units.max()) + 1
    if k < 2:
        raise ValueError(f"need at least 2 enrollment speakers (groups), got {k}")
    dtype = np.int32 if k * np.bincount(units).max() < 2**31 else np.int64
    counts = _draw_counts(rng, k, n_boot, dtype)
    tar_per_unit = np.bincount(units[labels], minlength=k)
    non_per_unit = np.bincount(units[~labels], minlength=k)
    for _ in range(_MAX_DRAW_FACTOR):
        bad = ((counts @ tar_per_unit) == 0) | ((counts @ non_per_unit) == 0)
        if not bad.any():
            break
        counts[bad] = _draw_counts(rng, k, int(bad.sum()), dtype)
    else:
        raise ValueError("too few bootstrap resamples contain both targets and non-targets")
    rows = max(1, _ROW_ELEMENTS // labels.size)
    out = np.empty((n_boot, len(models)))
    for j, m in enumerate(models):
        system = _System(m, labels, units)
        for start in range(0, n_boot, rows):
            out[start:start + rows, j] = system.eers(counts[start:start + rows])[0]
    return out, k


def seed_paired_eer_difference(scores_a: Mapping[int, np.ndarray], scores_b, labels, groups,
                               confidence: float = 0.95, n_boot: int = 1000, seed: int = 0) -> PairedInterval:
    """Mean over paired seeds of EER(A_s) - EER(B_s), percent points, with a t interval over speakers and seeds.

    ``scores_a`` and ``scores_b`` map a training seed to that model's scores on
    the same N trials; seeds present in both are paired (seed s of both arms
    shares initialisation and data order), the others are left out and listed
    in ``unpaired_seeds``. ``scores_b`` may be one array: one model (e.g. the
    champion) for every seed of A (:func:`one_model_for_seeds`). ``groups`` is
    the enrollment speaker of each trial (required).

    With S paired seeds, K speakers and d_s = 100 (EER(A_s) - EER(B_s)) on the full list::

        estimate = mean_s d_s
        C        = covariance over B speaker resamples of (d*_1 .. d*_S)     (every model on the same resample)
        v_spk    = K/(K-1) * max(0, mean_{s != t} C[s, t])     (the speaker effect all seeds share)
        v_seed   = var_s(d_s, ddof=1) / S         (seed-to-seed spread, incl. each model's own trial noise)
        half     = sqrt(t_{K-1}^2 * v_spk + t_{S-1}^2 * v_seed),  t_n = Student-t quantile (1+confidence)/2
        interval = estimate -+ half

    The off-diagonal covariance isolates what seeds share (which speakers were
    sampled); the part of the speaker variance specific to one model shows up
    between seeds and is counted once, in v_seed. Each component gets the t
    quantile of its own degrees of freedom (Banerjee's combination, never
    narrower than a nominal interval); one Welch-Satterthwaite t is too narrow
    when the seed component has 1-2 degrees of freedom (measured:
    docs/verdict_calibration.md). ``se = sqrt(v_spk + v_seed)``; ``df`` is the
    effective degrees of freedom, half = t_df * se. With S = 1 the seed
    variance is unknown: v_spk = K/(K-1) C[1, 1], half = t_{K-1} sqrt(v_spk),
    and ``seed_variance_known`` is False (the interval covers speaker sampling
    only).

    >>> r = seed_paired_eer_difference({0: [0.1, 0.4, 0.35, 0.8]}, [0.1, 0.3, 0.35, 0.8], [0, 0, 1, 1], [0, 0, 1, 1],
    ...                                n_boot=50)
    >>> r.estimate, r.n_seeds, r.seed_variance_known
    (50.0, 1, False)
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if int(n_boot) < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    a = _by_seed(scores_a, "scores_a")
    b = _by_seed(scores_b, "scores_b") if isinstance(scores_b, Mapping) else one_model_for_seeds(scores_b, a)
    seeds = sorted(set(a) & set(b))
    unpaired = tuple(sorted(set(a) ^ set(b)))
    if not seeds:
        raise ValueError(f"no seed trained in both arms: A has seeds {sorted(a)}, B has {sorted(b)}")
    lab = np.asarray(labels)
    models: list[np.ndarray] = []
    index: dict[int, int] = {}  # id of the caller's array -> column, so a repeated model is scored once

    def column(x) -> int:
        if id(x) not in index:
            index[id(x)] = len(models)
            models.append(_check_trials(x, lab)[0])
        return index[id(x)]

    cols_a = [column(a[s]) for s in seeds]
    cols_b = [column(b[s]) for s in seeds]
    lab = _check_trials(models[0], lab)[1]
    full = 100.0 * np.array([equal_error_rate(m, lab)[0] for m in models])
    boot, k = speaker_bootstrap_eers(models, lab, groups, int(n_boot), np.random.default_rng(seed))
    boot *= 100.0
    d = full[cols_a] - full[cols_b]
    r = paired_t_arrays(d, boot[:, cols_a] - boot[:, cols_b], k, confidence)
    n = len(seeds)
    se, half = float(r["se"]), float(r["half_width"])
    df = effective_df(0.5 + confidence / 2.0, half / se, k - 1.0) if se > 0 and n >= 2 else float(k - 1)
    return PairedInterval(
        estimate=float(r["estimate"]), low=float(r["low"]), high=float(r["high"]), confidence=float(confidence),
        n_seeds=n, n_speakers=k, seed_sd=float(r["seed_sd"]) if n >= 2 else None,
        speaker_se=float(r["speaker_se"]), se=se, df=df,
        method=METHOD_PAIRED if n >= 2 else METHOD_ONE_SEED, seeds=tuple(seeds),
        per_seed=tuple(float(x) for x in d), unpaired_seeds=unpaired, n_boot=int(n_boot))


# ---------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class ConfigVerdict:
    """One configuration over its seeds; EER in percent, minDCF (p=0.01) absolute; per seed, in ``seeds`` order."""

    label: str
    test_eer: tuple[float, ...]
    test_min_dcf: tuple[float, ...]
    delta: PairedInterval | None = None  # EER(config) - EER(baseline), percent points; None for the baseline
    params: dict[str, str] = field(default_factory=dict)
    seeds: tuple[int, ...] = ()

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


def replicate_verdicts(scores_by_label_by_seed: Mapping[str, Mapping[int, Sequence[float]]], labels, groups,
                       baseline: str, confidence: float = 0.95, seed: int = 0,
                       n_boot: int = 1000) -> dict[str, ConfigVerdict]:
    """{label: {seed: test scores (N,)}} -> {label: ConfigVerdict}, each compared with ``baseline`` seed by seed."""
    if baseline not in scores_by_label_by_seed:
        raise ValueError(f"no scores for the baseline {baseline!r}; have {sorted(scores_by_label_by_seed)}")
    labels = np.asarray(labels)
    by_label = {label: {s: np.asarray(x, dtype=np.float64) for s, x in _by_seed(rows, f"scores[{label!r}]").items()}
                for label, rows in scores_by_label_by_seed.items()}
    out = {}
    for label, rows in by_label.items():
        seeds = tuple(sorted(rows))
        if not seeds:
            raise ValueError(f"no scored seeds for {label!r}")
        eers = tuple(100.0 * equal_error_rate(rows[s], labels)[0] for s in seeds)
        dcfs = tuple(float(min_dcf(rows[s], labels, p_target=0.01)[0]) for s in seeds)
        delta = None
        if label != baseline:
            delta = seed_paired_eer_difference(rows, by_label[baseline], labels, groups, confidence=confidence,
                                               n_boot=n_boot, seed=seed)
        out[label] = ConfigVerdict(label, eers, dcfs, delta, seeds=seeds)
    return out


def significance(delta) -> str:
    """'better' (whole CI below 0), 'worse' (whole CI above 0) or 'not significant'; reads ``low``/``high``."""
    if delta.high < 0:
        return "significantly better"
    if delta.low > 0:
        return "significantly worse"
    return "not significant"


def verdict_line(v: ConfigVerdict, baseline: str = "baseline") -> str:
    """One sentence a person reads: the effect, its interval, what it covers and whether it is significant."""
    if v.delta is None:
        return f"{v.label} is the baseline"
    d = v.delta
    relative = ""
    base_mean = v.eer_mean - d.estimate
    if base_mean > 0 and math.isfinite(base_mean):
        relative = f" ({100 * d.estimate / base_mean:+.1f}% relative)"
    n_seeds = getattr(d, "n_seeds", len(v.test_eer))
    if getattr(d, "seed_variance_known", n_seeds >= 2):
        over = f"over speakers and paired seeds ({n_seeds} seeds)"
    else:
        over = "over speakers only; seed variance unknown (1 seed)"
    unpaired = getattr(d, "unpaired_seeds", ())
    if unpaired:
        over += f"; unpaired seed(s) {', '.join(map(str, unpaired))} left out"
    return (f"{v.label} vs {baseline}: {d.estimate:+.2f} EER points{relative}, {d.confidence:.0%} CI "
            f"[{d.low:+.2f}, {d.high:+.2f}] {over} -> {significance(d)}")


def format_table(verdicts: Mapping[str, ConfigVerdict]) -> str:
    """The replication table: per configuration, seeds, test EER and minDCF mean +- sd, difference to baseline."""
    header = f"  {'config':<14} {'seeds':>5}  {'test EER %':>15}  {'test minDCF':>16}  delta EER (95% CI)"
    lines = [header]
    for v in verdicts.values():
        if v.delta is None:
            delta = "baseline"
        else:
            delta = f"{v.delta.estimate:+.2f} [{v.delta.low:+.2f}, {v.delta.high:+.2f}]"
            if not getattr(v.delta, "seed_variance_known", True):
                delta += " (1 seed: seed variance unknown)"
        lines.append(f"  {v.label:<14} {len(v.test_eer):>5}  {v.eer_mean:6.2f} +- {v.eer_std:5.2f}  "
                     f"{v.min_dcf_mean:6.4f} +- {v.min_dcf_std:6.4f}  {delta}")
    return "\n".join(lines)
