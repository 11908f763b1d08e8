"""Promotion gate and a synthetic check of its error rates under a dev/test protocol.

Why a dev/test protocol. A study picks its best trial (at its best epoch) by
EER on a trial list; if promotion then tests that same challenger against the
champion on the *same* list, the selection has already favoured the trial whose
noise happened to fall its way on those trials, and the paired bootstrap test,
which assumes a challenger fixed in advance, promotes equally good systems far
more often than its nominal 2.5% (one-sided at 95%). The fix: a study selects
on a DEV trial list; promotion gates on a speaker-disjoint held-out TEST list
that played no part in selection, so on it the chosen challenger is just one
system, and the test keeps its error rate.

The gate rule (:func:`gate`) is the one ``mfcon promote`` uses: promote iff the
upper bound of the paired cluster-bootstrap CI of EER(challenger) -
EER(champion) (:func:`mfcon.evaluation.metrics.bootstrap_eer_difference`, resampling
enrollment speakers) is below 0, or when forced.

Synthetic trial model (:class:`TrialModel`, :func:`synthetic_trials`). A list
has ``S`` enrollment speakers, each with ``n_target`` target and
``n_nontarget`` non-target trials. The score of system ``k`` on trial ``t`` of
speaker ``s`` with label ``y`` (1 = target) is::

    x[k, s, t] = d_k * y                       separation (d' of system k)
               + A[s, y]                       speaker effect, shared by all systems
               + B[k, s, y]                    speaker effect, specific to system k
               + sqrt(rho) * E[s, t]           trial noise shared by all systems
               + sqrt(1 - rho) * e[k, s, t]    trial noise specific to system k

    A ~ N(0, speaker_sd^2), B ~ N(0, system_speaker_sd^2), E, e ~ N(0, 1), all independent.

Shared terms make systems scored on one list correlated (paired, like real
systems on the same trials: hard speakers and hard trials are hard for all);
the system-specific per-speaker term makes the *difference* between two
systems clustered by speaker, which is why the bootstrap resamples speakers.
Systems differ in expectation only through ``d_k``; "equally good" systems
share ``d_k``. A dev list and a test list are drawn independently (different
speakers, so every random term is fresh).

Simulation (:func:`simulate_promotions`), one study: a pool of ``n_systems``
challengers (all at the baseline d', or with system 0 better by ``effect``) and
a champion at the baseline d'. The challenger is the pool's lowest-EER system on
the selection list: the test list itself (``select_on="same"``, the biased
protocol) or an independent dev list (``select_on="dev"``). It is then gated
against the champion on the test list. The promotion rate over many studies is
the false-promotion rate when ``effect == 0`` and the power otherwise; the
effect is also reported as the measured mean EER reduction (points) of the
better system against the champion on the test lists.

Example::

    r = simulate_promotions(n_studies=200, n_systems=20, effect=0.0, select_on="dev", seed=1)
    r.rate, r.ci   # ~0.025 and its Wilson 95% interval
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np

from mfcon.evaluation.metrics import BootstrapResult, bootstrap_eer_difference, equal_error_rate

__all__ = [
    "GateDecision",
    "SimulationResult",
    "TrialModel",
    "gate",
    "simulate_promotions",
    "synthetic_trials",
    "wilson_interval",
]

_UNIT_SCALE = {"fraction": 100.0, "percent": 1.0}


# ---------------------------------------------------------------- the gate


@dataclass(frozen=True)
class GateDecision:
    """Outcome of :func:`gate`.

    ``promote``: move the champion alias. ``significant``: the CI upper bound is
    below 0. ``forced``: promoted only because ``force`` was given (not
    significant). ``reason``: human-readable, for the version's ``decision`` tag.
    """

    promote: bool
    significant: bool
    forced: bool
    reason: str
    delta: BootstrapResult | None


def gate(delta: BootstrapResult | None, force: bool = False, evidence: str | None = None,
         units: Literal["fraction", "percent"] = "fraction") -> GateDecision:
    """Promote iff the CI of EER(challenger) - EER(champion) lies below 0 (``delta.high < 0``), or ``force``.

    ``delta`` is :func:`mfcon.evaluation.metrics.bootstrap_eer_difference` of (challenger,
    champion) on the gating list, or None when there is no champion yet
    (promote). ``evidence`` names the list the difference was measured on (the
    caller knows it, e.g. ``"the held-out test list (1200 trials, 40 speakers)"``)
    and is put into the reason. ``units`` says whether ``delta`` is in fractions
    (as the metrics return it) or already in percent; the reason always reports
    points (percent). The decision depends only on the sign of ``delta.high``.

    >>> gate(BootstrapResult(-0.012, -0.02, -0.004, 0.95, 500), evidence="the test list").reason
    'significantly better on the test list: 95% CI of the EER difference [-2.00, -0.40] points'
    """
    if units not in _UNIT_SCALE:
        raise ValueError(f"units must be 'fraction' or 'percent', got {units!r}")
    if delta is None:
        return GateDecision(True, False, False, "no champion yet", None)
    if math.isnan(delta.high):
        raise ValueError("delta.high is NaN")
    scale = _UNIT_SCALE[units]
    on = f" on {evidence}" if evidence else ""
    ci = (f"{delta.confidence:.0%} CI of the EER difference "
          f"[{scale * delta.low:+.2f}, {scale * delta.high:+.2f}] points")
    if delta.high < 0:
        return GateDecision(True, True, False, f"significantly better{on}: {ci}", delta)
    if force:
        return GateDecision(True, False, True, f"forced although not significantly better{on}: {ci}", delta)
    return GateDecision(False, False, False, f"not significantly better{on}: {ci} does not lie below 0", delta)


# ---------------------------------------------------------------- synthetic trials


@dataclass(frozen=True)
class TrialModel:
    """Shape of one synthetic trial list and its variance components (see the module docstring).

    Defaults: 40 enrollment speakers x (10 target + 20 non-target) trials =
    1200 trials; baseline d' 2.5 in units of the per-trial noise; EER ~ 12%.
    """

    n_speakers: int = 40
    n_target: int = 10  # target trials per enrollment speaker
    n_nontarget: int = 20  # non-target trials per enrollment speaker
    d_prime: float = 2.5  # baseline separation of target and non-target means
    speaker_sd: float = 0.5  # sd of A[s, y], shared by all systems
    system_speaker_sd: float = 0.3  # sd of B[k, s, y], specific to each system
    trial_corr: float = 0.5  # rho: share of the unit trial-noise variance common to all systems

    def __post_init__(self):
        if min(self.n_speakers, self.n_target, self.n_nontarget) < 1:
            raise ValueError("need at least one speaker, one target and one non-target trial per speaker")
        if self.speaker_sd < 0 or self.system_speaker_sd < 0 or not 0.0 <= self.trial_corr <= 1.0:
            raise ValueError("standard deviations must be >= 0 and trial_corr in [0, 1]")

    @property
    def n_trials(self) -> int:
        return self.n_speakers * (self.n_target + self.n_nontarget)


def synthetic_trials(model: TrialModel, d_primes, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One trial list scored by ``len(d_primes)`` systems -> (scores (K, N), labels (N,), groups (N,)).

    ``labels`` are 1 = target, ``groups`` the enrollment-speaker index of each
    trial (for the cluster bootstrap). Trials are ordered speaker by speaker,
    targets first; order does not matter to any metric.
    """
    d = np.asarray(d_primes, dtype=np.float64).reshape(-1)
    k, s, t = d.size, model.n_speakers, model.n_target + model.n_nontarget
    y = np.zeros(t, dtype=np.int64)
    y[:model.n_target] = 1
    shared_spk = model.speaker_sd * rng.standard_normal((s, 2))  # A[s, y]
    system_spk = model.system_speaker_sd * rng.standard_normal((k, s, 2))  # B[k, s, y]
    shared_trial = rng.standard_normal((s, t))  # E[s, t]
    own_trial = rng.standard_normal((k, s, t))  # e[k, s, t]
    rho = model.trial_corr
    scores = (d[:, None, None] * y[None, None, :]
              + shared_spk[None, :, y] + system_spk[:, :, y]
              + math.sqrt(rho) * shared_trial[None] + math.sqrt(1.0 - rho) * own_trial)
    labels = np.tile(y, s)
    groups = np.repeat(np.arange(s), t)
    return scores.reshape(k, s * t), labels, groups


# ---------------------------------------------------------------- simulation


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion.

    >>> [round(x, 4) for x in wilson_interval(5, 200)]
    [0.0107, 0.0572]
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes=}, {n=}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends, no rounding residue
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class SimulationResult:
    """Promotion rate over simulated studies (fractions unless named ``_points``)."""

    select_on: str  # "same" (select and gate on the test list) or "dev" (select on dev, gate on test)
    n_studies: int
    n_systems: int
    effect: float  # d' gain of the one better system in the pool (0: all equally good)
    n_promoted: int
    rate: float  # n_promoted / n_studies
    ci: tuple[float, float]  # Wilson 95% interval of the rate
    picked_better: float  # share of studies whose challenger was the better system (0 when effect == 0)
    eer_champion: float  # mean EER of the champion on the test lists
    eer_better: float  # mean EER of pool system 0 (the better one when effect > 0) on the test lists
    eer_reduction_points: float  # 100 * (eer_champion - eer_better): the effect in EER points
    n_boot: int
    confidence: float
    seconds: float
    model: TrialModel


def simulate_promotions(n_studies: int = 200, n_systems: int = 20, effect: float = 0.0,
                        select_on: Literal["same", "dev"] = "dev", seed: int = 0, *,
                        model: TrialModel = TrialModel(), n_boot: int = 1000,
                        confidence: float = 0.95) -> SimulationResult:
    """Run ``n_studies`` simulated promote decisions; see the module docstring for the protocol.

    Deterministic for a given seed (NumPy's default generator, one child stream
    per study; each study's bootstrap gets its own seed from that stream).
    ``n_boot`` defaults to ``mfcon promote``'s 1000; on a 1200-trial list the
    bootstrap draws ~1600 resamples per batch anyway, so fewer saves no time.
    ~200 studies of 20 systems take ~5 s on one core.
    """
    if select_on not in ("same", "dev"):
        raise ValueError(f"select_on must be 'same' or 'dev', got {select_on!r}")
    if n_studies < 1 or n_systems < 1:
        raise ValueError("need n_studies >= 1 and n_systems >= 1")
    started = time.perf_counter()
    pool = np.full(n_systems, model.d_prime)
    pool[0] += effect
    test_d = np.append(pool, model.d_prime)  # last row: the champion
    promoted = picked_better = 0
    eer_champ, eer_sys0 = [], []
    for child in np.random.SeedSequence(seed).spawn(n_studies):
        rng = np.random.default_rng(child)
        test, labels, groups = synthetic_trials(model, test_d, rng)
        test_eers = [equal_error_rate(row, labels)[0] for row in test]
        if select_on == "same":
            pick = int(np.argmin(test_eers[:n_systems]))
        else:
            dev, dev_labels, _ = synthetic_trials(model, pool, rng)
            pick = int(np.argmin([equal_error_rate(row, dev_labels)[0] for row in dev]))
        delta = bootstrap_eer_difference(test[pick], test[-1], labels, groups, n_boot, confidence,
                                         seed=int(rng.integers(2**31)))
        promoted += gate(delta).promote
        picked_better += effect != 0 and pick == 0
        eer_champ.append(test_eers[-1])
        eer_sys0.append(test_eers[0])
    champ, better = float(np.mean(eer_champ)), float(np.mean(eer_sys0))
    return SimulationResult(
        select_on=select_on, n_studies=n_studies, n_systems=n_systems, effect=float(effect),
        n_promoted=int(promoted), rate=promoted / n_studies, ci=wilson_interval(int(promoted), n_studies),
        picked_better=picked_better / n_studies, eer_champion=champ, eer_better=better,
        eer_reduction_points=100.0 * (champ - better), n_boot=int(n_boot), confidence=float(confidence),
        seconds=time.perf_counter() - started, model=model)
