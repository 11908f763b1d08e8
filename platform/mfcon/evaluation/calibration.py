"""Calibration of replication verdicts by simulation: synthetic test scores of seeded models, no training.

Pure NumPy. One replication is a trial list of K enrollment speakers x (n_target
+ n_nontarget) trials scored by 2S models: arm A (the configuration) and arm B
(the baseline), each trained with the same S seeds. Model m = (arm, seed)
scores trial t of speaker k (label y) as::

    score = d_m * y + A[k, y] + B[arm, k, y] + sqrt(c) * E[k, t] + sqrt(1 - c) * e[m, k, t]
    d_m   = d_arm + tau * (sqrt(rho) * g[seed] + sqrt(1 - rho) * h[arm, seed])

A (speaker difficulty) and E (trial difficulty) are shared by every model, so
they cancel in paired differences; B is a configuration's own speaker effect
(shared by its seeds: what speaker sampling adds to a verdict); e is each
model's own trial noise; g is the seed effect both arms share (same
initialisation and data order, weight ``rho``), h each model's own. ``tau``
is set so that the population EER's seed-to-seed sd is the wanted number of
EER points. The population EER of arm a over seeds is
Phi(-d_a / sqrt(4 sigma^2 + tau^2)), sigma^2 = 1 + sd_A^2 + sd_B^2, so the true
gap between the arms is known exactly.

Each replication is judged by the verdict interval of
:mod:`mfcon.evaluation.verdicts` (the same arithmetic, :func:`paired_t_arrays`,
on speaker resamples drawn exactly as :func:`seed_paired_eer_difference` draws
them) and by the former unpaired seed bootstrap
(:func:`mfcon.evaluation.metrics.bootstrap_seeded_eer_difference`: per
resample, S seeds drawn with replacement independently per arm; percentile
interval) on the same resamples. bench/verdict_calibration.py prints the grid;
tests/test_verdict_calibration.py checks a reduced one.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

from mfcon.evaluation.metrics import _draw_counts, _interpolate
from mfcon.evaluation.verdicts import paired_t_arrays
from mfcon.promotion.gate import wilson_interval

_CHUNK_ELEMENTS = 8_000_000  # per chunk: cumulative counts (reps x models x thresholds x speakers)
_PHI = NormalDist()


@dataclass(frozen=True)
class SeedTrialModel:
    """Shape of one synthetic test list and its variance components (see the module docstring)."""

    n_speakers: int = 40
    n_target: int = 10  # target trials per enrollment speaker
    n_nontarget: int = 10  # non-target trials per enrollment speaker
    d_prime: float = 3.0  # baseline separation; population EER ~ 10%
    speaker_sd: float = 0.5  # A[k, y], shared by every model
    arm_speaker_sd: float = 0.3  # B[arm, k, y], shared by the seeds of one configuration
    trial_corr: float = 0.5  # c: share of the unit trial noise common to every model
    seed_corr: float = 0.5  # rho: share of the seed effect common to seed s of both arms

    def __post_init__(self):
        if min(self.n_speakers - 1, self.n_target, self.n_nontarget) < 1:
            raise ValueError("need at least 2 speakers and one target and one non-target trial per speaker")
        if self.speaker_sd < 0 or self.arm_speaker_sd < 0:
            raise ValueError("standard deviations must be >= 0")
        if not (0.0 <= self.trial_corr <= 1.0 and 0.0 <= self.seed_corr <= 1.0):
            raise ValueError("trial_corr and seed_corr must be in [0, 1]")

    @property
    def class_sd(self) -> float:
        return math.sqrt(1.0 + self.speaker_sd ** 2 + self.arm_speaker_sd ** 2)

    @property
    def trials_per_speaker(self) -> int:
        return self.n_target + self.n_nontarget

    @property
    def n_trials(self) -> int:
        return self.n_speakers * self.trials_per_speaker

    def population_eer(self, d_prime: float, tau: float = 0.0) -> float:
        """EER (fraction) of an arm with separation ``d_prime`` averaged over seeds (seed effect sd ``tau``)."""
        return _PHI.cdf(-d_prime / math.sqrt(4 * self.class_sd ** 2 + tau ** 2))

    def d_prime_for(self, eer: float, tau: float = 0.0) -> float:
        """Separation whose seed-averaged population EER is ``eer`` (fraction)."""
        return -math.sqrt(4 * self.class_sd ** 2 + tau ** 2) * _PHI.inv_cdf(eer)

    def seed_sd_points(self, tau: float, d_prime: float | None = None) -> float:
        """sd over seeds of the population EER (percent points) for seed-effect sd ``tau`` (Gauss-Hermite)."""
        x, w = np.polynomial.hermite_e.hermegauss(80)
        w = w / w.sum()
        d = self.d_prime if d_prime is None else d_prime
        eer = 100.0 * np.array([_PHI.cdf(v) for v in -(d + tau * x) / (2 * self.class_sd)])
        return float(math.sqrt(max(0.0, w @ eer ** 2 - (w @ eer) ** 2)))

    def tau_for(self, seed_sd_points: float) -> float:
        """Seed-effect sd (d' units) whose baseline population EER varies by ``seed_sd_points`` over seeds."""
        if seed_sd_points <= 0:
            return 0.0
        lo, hi = 0.0, 20.0
        if self.seed_sd_points(hi) < seed_sd_points:
            raise ValueError(f"a seed sd of {seed_sd_points} EER points is out of reach")
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if self.seed_sd_points(mid) < seed_sd_points else (lo, mid)
        return 0.5 * (lo + hi)

    def layout(self) -> tuple[np.ndarray, np.ndarray]:
        """(labels (N,), groups (N,)): speaker by speaker, targets first."""
        y = np.zeros(self.trials_per_speaker, dtype=np.int64)
        y[:self.n_target] = 1
        return np.tile(y, self.n_speakers), np.repeat(np.arange(self.n_speakers), self.trials_per_speaker)


def simulate_scores(model: SeedTrialModel, d_arms, tau: float, n_seeds: int, n_reps: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """-> (scores (R, 2S, N), d' per model (R, 2S)); models 0..S-1 are arm A's seeds, S..2S-1 arm B's, same order."""
    k, t, s = model.n_speakers, model.trials_per_speaker, n_seeds
    y = model.layout()[0][:t]
    arm = np.repeat([0, 1], s)  # (M,)
    shared_spk = model.speaker_sd * rng.standard_normal((n_reps, 1, k, 2))
    arm_spk = model.arm_speaker_sd * rng.standard_normal((n_reps, 2, k, 2))[:, arm]
    shared_trial = rng.standard_normal((n_reps, 1, k, t))
    own_trial = rng.standard_normal((n_reps, 2 * s, k, t))
    g = rng.standard_normal((n_reps, 1, s))
    h = rng.standard_normal((n_reps, 2, s))
    rho, c = model.seed_corr, model.trial_corr
    d = np.asarray(d_arms, dtype=np.float64)[None, :, None] + tau * (math.sqrt(rho) * g + math.sqrt(1 - rho) * h)
    d = d.reshape(n_reps, 2 * s)
    scores = (d[:, :, None, None] * y + (shared_spk + arm_spk)[..., y]
              + math.sqrt(c) * shared_trial + math.sqrt(1 - c) * own_trial)
    return scores.reshape(n_reps, 2 * s, k * t), d


def full_list_eers(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(..., N) scores without ties -> (...,) EER fractions, with the arithmetic of ``equal_error_rate``."""
    lab = np.asarray(labels).astype(bool)
    order = np.argsort(scores, axis=-1, kind="stable")
    tar_below = np.concatenate([np.zeros(order.shape[:-1] + (1,), dtype=np.int64),
                                np.cumsum(lab[order], axis=-1)], axis=-1)  # (..., N+1)
    non_below = np.arange(lab.size + 1) - tar_below
    n_tar, n_non = int(lab.sum()), int((~lab).sum())
    p_miss, p_fa = tar_below / n_tar, (n_non - non_below) / n_non
    hi = np.argmax(p_fa <= p_miss, axis=-1)[..., None]
    take = lambda a, i: np.take_along_axis(a, i, axis=-1)[..., 0]  # noqa: E731
    return _interpolate(take(p_fa, hi - 1), take(p_miss, hi - 1), take(p_fa, hi), take(p_miss, hi))[0]


def speaker_bootstrap_eers_batch(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                                 counts: np.ndarray) -> np.ndarray:
    """EERs on speaker resamples, many replications at once: scores (R, M, N) without ties, counts (R, B, K)
    speaker multiplicities -> (R, B, M) fractions, equal to ``metrics._System.eers`` resample for resample."""
    lab = np.asarray(labels).astype(bool)
    g = np.asarray(groups)
    r, m, n = scores.shape
    k = counts.shape[-1]
    order = np.argsort(scores, axis=-1, kind="stable")  # (R, M, N)
    onehot = np.zeros((r, m, n + 1, k), dtype=np.float32)
    np.put_along_axis(onehot[:, :, 1:], g[order][..., None], 1.0, axis=-1)
    all_cum = np.cumsum(onehot, axis=2)  # (R, M, N+1, K): trials of speaker k among the j lowest scores
    onehot[:, :, 1:] *= lab[order][..., None]
    tar_cum = np.cumsum(onehot, axis=2)
    n_tar = (counts @ np.bincount(g[lab], minlength=k)).astype(np.float64)[:, None, :]  # (R, 1, B)
    n_non = (counts @ np.bincount(g[~lab], minlength=k)).astype(np.float64)[:, None, :]
    w = counts.astype(np.float32)  # every product and sum below is an exact small integer
    tar_rows, all_rows = tar_cum.reshape(-1, k), all_cum.reshape(-1, k)
    base = (np.arange(r * m).reshape(r, m, 1)) * (n + 1)  # row of threshold 0 of (rep, model)

    def below(j):  # weighted (targets, non-targets) strictly below threshold j (R, M, B)
        rows = base + j
        t = np.einsum("rmbk,rbk->rmb", tar_rows[rows], w).astype(np.float64)
        return t, np.einsum("rmbk,rbk->rmb", all_rows[rows], w).astype(np.float64) - t

    lo = np.zeros((r, m, counts.shape[1]), dtype=np.int64)
    hi = np.full_like(lo, n)
    while np.any(hi - lo > 1):  # invariant: p_fa > p_miss at lo, p_fa <= p_miss at hi (as metrics._System)
        mid = (lo + hi) // 2
        tar_below, non_below = below(mid)
        ok = (n_non - non_below) * n_tar <= tar_below * n_non
        lo, hi = np.where(ok, lo, mid), np.where(ok, mid, hi)
    (t_lo, n_lo), (t_hi, n_hi) = below(lo), below(hi)
    eer, _ = _interpolate(1 - n_lo / n_non, t_lo / n_tar, 1 - n_hi / n_non, t_hi / n_tar)
    return eer.transpose(0, 2, 1)


def unpaired_seed_bootstrap_arrays(full: np.ndarray, boot: np.ndarray, n_seeds: int, confidence: float,
                                   rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The former interval (``bootstrap_seeded_eer_difference``) from the same resamples, percent points.

    full (R, 2S), boot (R, B, 2S): per resample, S seeds of each arm drawn with
    replacement, independently per arm; percentile interval of the mean difference.
    """
    s = n_seeds
    r, b, _ = boot.shape
    pick_a = rng.integers(0, s, size=(r, b, s))
    pick_b = rng.integers(0, s, size=(r, b, s))
    diffs = (np.take_along_axis(boot[..., :s], pick_a, axis=-1).mean(-1)
             - np.take_along_axis(boot[..., s:], pick_b, axis=-1).mean(-1))
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(diffs, [tail, 1.0 - tail], axis=-1)
    return {"estimate": full[:, :s].mean(-1) - full[:, s:].mean(-1), "low": low, "high": high}


@dataclass(frozen=True)
class Scenario:
    """One replication batch's verdicts: the new interval, the old one, and what the truth was."""

    true_gap: float  # EER(A) - EER(B), population, percent points
    new: dict[str, np.ndarray]
    old: dict[str, np.ndarray]
    boot_seeds: np.ndarray  # (R,) the ``seed`` argument that reproduces each replication's speaker resamples
    scores: np.ndarray | None = None  # (R, 2S, N), kept only when asked for


def run_scenario(model: SeedTrialModel, n_seeds: int, seed_sd: float, gap: float, n_reps: int, seed: int,
                 n_boot: int = 200, confidence: float = 0.95, keep_scores: bool = False) -> Scenario:
    """``n_reps`` replications with arm A better than B by ``gap`` population EER points (0: equal systems)."""
    tau = model.tau_for(seed_sd)
    d_b = model.d_prime
    eer_b = model.population_eer(d_b, tau)
    d_a = model.d_prime_for(eer_b - gap / 100.0, tau)
    true_gap = 100.0 * (model.population_eer(d_a, tau) - eer_b)
    labels, groups = model.layout()
    s, m, k, n = n_seeds, 2 * n_seeds, model.n_speakers, model.n_trials
    data_rng = np.random.default_rng([seed, 0])
    pick_rng = np.random.default_rng([seed, 1])
    boot_seeds = np.random.default_rng([seed, 2]).integers(0, 2**31, size=n_reps)
    chunk = max(1, _CHUNK_ELEMENTS // (m * (n + 1) * max(k, n_boot // 4)))
    new_parts, old_parts, kept = [], [], []
    for start in range(0, n_reps, chunk):
        reps = min(chunk, n_reps - start)
        scores, d = simulate_scores(model, (d_a, d_b), tau, s, reps, data_rng)
        counts = np.stack([_draw_counts(np.random.default_rng(int(bs)), k, n_boot, np.int32)
                           for bs in boot_seeds[start:start + reps]])
        full = 100.0 * full_list_eers(scores, labels)  # (R, M)
        boot = 100.0 * speaker_bootstrap_eers_batch(scores, labels, groups, counts)  # (R, B, M)
        d_full, d_boot = full[:, :s] - full[:, s:], boot[..., :s] - boot[..., s:]
        new = paired_t_arrays(d_full, d_boot, k, confidence)
        welch = paired_t_arrays(d_full, d_boot, k, confidence, combine="welch")
        new["welch_low"], new["welch_high"] = welch["low"], welch["high"]
        new_parts.append(new)
        old = unpaired_seed_bootstrap_arrays(full, boot, s, confidence, pick_rng)
        old["eer_b_sd"] = full[:, s:].std(axis=-1, ddof=1) if s > 1 else np.full(reps, np.nan)
        pop_b = 100.0 * _phi(-d[:, s:] / (2 * model.class_sd))
        old["pop_b_sd"] = pop_b.std(axis=-1, ddof=1) if s > 1 else np.full(reps, np.nan)
        old_parts.append(old)
        if keep_scores:
            kept.append(scores)
    cat = lambda parts: {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}  # noqa: E731
    return Scenario(true_gap, cat(new_parts), cat(old_parts), boot_seeds,
                    np.concatenate(kept) if keep_scores else None)


@dataclass(frozen=True)
class CellResult:
    """One grid cell: false significance for equal systems, coverage and power at a true gap, new vs old method."""

    n_seeds: int
    seed_sd: float  # wanted seed-to-seed sd of the baseline's population EER, points
    n_speakers: int
    seed_corr: float
    reps: int
    realised_seed_sd: float  # sd over seeds of the baseline's population EER in the simulation, points
    list_seed_sd: float  # pooled sd over seeds of the baseline's EER on the test list, points (adds trial noise)
    true_gap: float
    false_sig: float
    false_sig_ci: tuple[float, float]
    coverage: float
    coverage_ci: tuple[float, float]
    power: float
    power_ci: tuple[float, float]
    mean_estimate: float  # in the gap scenario: unbiased if close to true_gap
    median_half_width: float  # gap scenario, new interval
    old_false_sig: float
    old_false_sig_ci: tuple[float, float]
    old_coverage: float
    old_power: float
    old_median_half_width: float
    welch_false_sig: float  # one Welch-Satterthwaite t instead of Banerjee's per-component t (rejected)
    welch_coverage: float
    welch_power: float
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def _rate(hits: np.ndarray) -> tuple[float, tuple[float, float]]:
    n = int(hits.size)
    k = int(hits.sum())
    return k / n, wilson_interval(k, n)


def calibrate_cell(n_seeds: int, seed_sd: float, n_speakers: int, gap: float = 2.5, reps: int = 1000,
                   seed: int = 0, seed_corr: float = 0.5, n_boot: int = 200, confidence: float = 0.95,
                   model: SeedTrialModel | None = None) -> CellResult:
    """Run the equal-systems and the true-gap scenario of one cell on the same settings."""
    started = time.perf_counter()
    base = model or SeedTrialModel()
    model = SeedTrialModel(**{**asdict(base), "n_speakers": n_speakers, "seed_corr": seed_corr})
    cell_seed = [seed, n_seeds, int(round(100 * seed_sd)), n_speakers, int(round(100 * seed_corr))]
    null = run_scenario(model, n_seeds, seed_sd, 0.0, reps, seed=_mix(cell_seed + [0]), n_boot=n_boot,
                        confidence=confidence)
    alt = run_scenario(model, n_seeds, seed_sd, gap, reps, seed=_mix(cell_seed + [1]), n_boot=n_boot,
                       confidence=confidence)
    sig = lambda r: (r["low"] > 0) | (r["high"] < 0)  # noqa: E731
    false_sig, false_ci = _rate(sig(null.new))
    cover, cover_ci = _rate((alt.new["low"] <= alt.true_gap) & (alt.true_gap <= alt.new["high"]))
    power, power_ci = _rate(alt.new["high"] < 0)
    old_false, old_false_ci = _rate(sig(null.old))
    welch = lambda r: {"low": r["welch_low"], "high": r["welch_high"]}  # noqa: E731
    pooled = lambda key: float(np.sqrt(np.nanmean(np.concatenate([null.old[key], alt.old[key]]) ** 2)))  # noqa: E731
    realised, list_sd = pooled("pop_b_sd"), pooled("eer_b_sd")
    return CellResult(
        n_seeds=n_seeds, seed_sd=float(seed_sd), n_speakers=n_speakers, seed_corr=float(seed_corr), reps=reps,
        realised_seed_sd=realised, list_seed_sd=list_sd, true_gap=alt.true_gap,
        false_sig=false_sig, false_sig_ci=false_ci, coverage=cover, coverage_ci=cover_ci,
        power=power, power_ci=power_ci, mean_estimate=float(alt.new["estimate"].mean()),
        median_half_width=float(np.median(alt.new["high"] - alt.new["estimate"])),
        old_false_sig=old_false, old_false_sig_ci=old_false_ci,
        old_coverage=float(np.mean((alt.old["low"] <= alt.true_gap) & (alt.true_gap <= alt.old["high"]))),
        old_power=float(np.mean(alt.old["high"] < 0)),
        old_median_half_width=float(np.median((alt.old["high"] - alt.old["low"]) / 2)),
        welch_false_sig=float(np.mean(sig(welch(null.new)))),
        welch_coverage=float(np.mean((alt.new["welch_low"] <= alt.true_gap) & (alt.true_gap <= alt.new["welch_high"]))),
        welch_power=float(np.mean(alt.new["welch_high"] < 0)),
        seconds=time.perf_counter() - started)


def _phi(x: np.ndarray) -> np.ndarray:
    return 0.5 * np.vectorize(math.erfc)(-np.asarray(x) / math.sqrt(2.0))


def _mix(parts: list[int]) -> int:
    return int(np.random.SeedSequence(parts).generate_state(1)[0])
