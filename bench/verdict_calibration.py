"""Calibration of the replication verdict's interval on synthetic scores (no training): new vs current method.

For every cell of S seeds x seed-to-seed sd (EER points) x enrollment speakers,
simulates --reps replications of "configuration A vs the baseline B, both
trained with the same S seeds" (mfcon.evaluation.calibration) twice: equal
systems (false significance: the 95% interval excludes 0) and A better by
--gap population EER points (coverage of the true gap; power = interval below
0). Judged by the seed-paired interval of `mfcon replicate`
(mfcon.evaluation.verdicts.seed_paired_eer_difference) and by the former
unpaired seed bootstrap (bootstrap_seeded_eer_difference) on the same data and
speaker resamples. Rates come with Wilson 95% intervals. Goal per cell (new
method): false significance <= 6.5% with its Wilson lower bound <= 5%, coverage
>= 93%.

    .venv/bin/python bench/verdict_calibration.py [--reps 1000] [--seed 0] [--n-boot 200] [--gap 2.5]
        [--json bench/results/verdict_calibration.json]
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, as the README states
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_facts import machine_facts  # noqa: E402

try:
    from mfcon.evaluation.calibration import SeedTrialModel, calibrate_cell
except ImportError:  # not installed: run from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))
    from mfcon.evaluation.calibration import SeedTrialModel, calibrate_cell

SEEDS, SDS, SPEAKERS = (2, 3, 5), (0.0, 1.0, 2.0, 3.0), (10, 40)
RHO0_CELLS = [(s, sd, k) for k in SPEAKERS for s in (2, 5) for sd in (1.0, 3.0)]  # independent seed effects
GOAL_FALSE_SIG, GOAL_FALSE_SIG_WILSON_LOW, GOAL_COVERAGE = 0.065, 0.05, 0.93


def meets_goal(c) -> bool:
    return (c.false_sig <= GOAL_FALSE_SIG and c.false_sig_ci[0] <= GOAL_FALSE_SIG_WILSON_LOW
            and c.coverage >= GOAL_COVERAGE)


def pct(x: float) -> str:
    return f"{100 * x:5.1f}"


def ci(lo_hi) -> str:
    return f"[{100 * lo_hi[0]:4.1f},{100 * lo_hi[1]:5.1f}]"


HEAD = (f"{'S':>2} {'sd':>3} {'K':>3} {'rho':>4} {'sd real/list':>12} | {'false sig % new [Wilson]':>24} "
        f"{'old [Wilson]':>18} | {'coverage % new [Wilson]':>23} {'old':>5} | {'power % new':>11} {'old':>5} | "
        f"{'half-width new':>14} {'old':>5} | {'Welch fs/cov/pow':>16} | {'goal':>4} {'s':>4}")


def row(c) -> str:
    return (f"{c.n_seeds:>2} {c.seed_sd:>3.0f} {c.n_speakers:>3} {c.seed_corr:>4.1f} "
            f"{c.realised_seed_sd:>5.2f}/{c.list_seed_sd:<6.2f} | {pct(c.false_sig):>11} {ci(c.false_sig_ci):>12} "
            f"{pct(c.old_false_sig):>5} {ci(c.old_false_sig_ci):>12} | {pct(c.coverage):>10} {ci(c.coverage_ci):>12} "
            f"{pct(c.old_coverage):>5} | {pct(c.power):>11} {pct(c.old_power):>5} | "
            f"{c.median_half_width:>14.2f} {c.old_median_half_width:>5.2f} | "
            f"{pct(c.welch_false_sig)}/{pct(c.welch_coverage)}/{pct(c.welch_power)} | "
            f"{'ok' if meets_goal(c) else 'MISS':>4} {c.seconds:>4.0f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=1000, help="simulated replications per cell and scenario")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=200, help="speaker resamples per replication (both methods)")
    ap.add_argument("--gap", type=float, default=2.5, help="true EER gap (points) for coverage and power")
    ap.add_argument("--json", type=Path, default=None, help="write every cell here")
    args = ap.parse_args(argv)
    model = SeedTrialModel()
    facts = machine_facts("numpy")
    print("machine: " + " | ".join(f"{k} {v}" for k, v in facts.items()))
    print(f"model: {model.n_target}+{model.n_nontarget} trials per enrollment speaker; baseline d' {model.d_prime} "
          f"(population EER {100 * model.population_eer(model.d_prime):.1f}%); speaker sd {model.speaker_sd} shared, "
          f"{model.arm_speaker_sd} per configuration; trial noise {model.trial_corr:.0%} shared; seed effect "
          f"shared by seed s of both arms: rho; true gap {args.gap} points; {args.reps} replications per scenario; "
          f"{args.n_boot} speaker resamples each; 95% intervals")
    print("new = seed-paired t (Banerjee), old = unpaired seed bootstrap (percentile), Welch = the paired interval "
          "with one Welch-Satterthwaite t (rejected); sd real/list = seed-to-seed sd of the baseline's population "
          "EER / of its EER on the test list (points)")
    print(HEAD)
    print("-" * len(HEAD))
    started = time.perf_counter()
    cells = []
    grid = [(s, sd, k, 0.5) for k in SPEAKERS for s in SEEDS for sd in SDS] + [(s, sd, k, 0.0)
                                                                                for s, sd, k in RHO0_CELLS]
    for s, sd, k, rho in grid:
        if rho == 0.0 and not any(c.seed_corr == 0.0 for c in cells):
            print("-- rho = 0 (no shared seed effect) --")
        c = calibrate_cell(s, sd, k, gap=args.gap, reps=args.reps, seed=args.seed, seed_corr=rho,
                           n_boot=args.n_boot, model=model)
        cells.append(c)
        print(row(c), flush=True)
    misses = [c for c in cells if not meets_goal(c)]
    old_ok = sum(c.old_false_sig <= GOAL_FALSE_SIG and c.old_false_sig_ci[0] <= GOAL_FALSE_SIG_WILSON_LOW
                 and c.old_coverage >= GOAL_COVERAGE for c in cells)
    total = time.perf_counter() - started
    print(f"{len(cells) - len(misses)}/{len(cells)} cells meet the goal (false significance <= "
          f"{100 * GOAL_FALSE_SIG:.1f}%, its Wilson lower bound <= {100 * GOAL_FALSE_SIG_WILSON_LOW:.0f}%, "
          f"coverage >= {100 * GOAL_COVERAGE:.0f}%); old method: "
          f"{old_ok}/{len(cells)}; {total:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": facts, "model": asdict(model), "reps": args.reps, "seed": args.seed, "n_boot": args.n_boot,
            "gap": args.gap, "seconds": round(total, 1),
            "goal": {"false_sig_max": GOAL_FALSE_SIG, "false_sig_wilson_low_max": GOAL_FALSE_SIG_WILSON_LOW,
                     "coverage_min": GOAL_COVERAGE},
            "cells": [c.as_dict() for c in cells]}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
