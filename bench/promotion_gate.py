"""Promotion rates of the gate under the biased and the dev/test protocol, on synthetic scores (no training).

Each row simulates N studies (see mfcon.promotion.gate): a pool of systems, the
best picked on the test list itself ("same list") or on a speaker-disjoint dev
list ("dev -> test"), then gated against an equally good champion on the test
list (paired cluster bootstrap, promote iff the CI upper bound < 0).

    .venv/bin/python bench/promotion_gate.py [--studies 200] [--systems 20] [--effect 0.6] [--n-boot 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

try:
    from mfcon.promotion.gate import TrialModel, simulate_promotions
except ImportError:  # not installed: run from the checkout
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))
    from mfcon.promotion.gate import TrialModel, simulate_promotions

PROTOCOLS = {"same": "same list (select+gate on test)", "dev": "dev-selected, test-gated"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=200)
    ap.add_argument("--systems", type=int, default=20)
    ap.add_argument("--effect", type=float, default=0.6, help="d' gain of the one truly better system")
    ap.add_argument("--n-boot", type=int, default=1000, help="as `mfcon promote`")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model = TrialModel()
    print(f"machine: {platform.platform()} | {platform.processor() or platform.machine()} | "
          f"{os.cpu_count()} CPUs | Python {platform.python_version()} | NumPy {np.__version__}")
    print(f"trial list: {model.n_speakers} speakers x ({model.n_target} target + {model.n_nontarget} non-target) "
          f"= {model.n_trials} trials; d' {model.d_prime}, speaker sd {model.speaker_sd} shared / "
          f"{model.system_speaker_sd} per system, shared trial-noise share {model.trial_corr}; "
          f"bootstrap {args.n_boot} speaker resamples, 95% CI, promote iff upper bound < 0")
    rows = [("dev", 1, 0.0), ("same", args.systems, 0.0), ("dev", args.systems, 0.0),
            ("same", args.systems, args.effect), ("dev", args.systems, args.effect)]
    head = (f"{'protocol':<32} {'studies':>7} {'systems':>7} {'effect':>22} {'promoted':>8} "
            f"{'rate':>6} {'Wilson 95% CI':>15} {'picked better':>13} {'s':>5}")
    print(head)
    print("-" * len(head))
    started = time.perf_counter()
    results = []
    for select_on, n_systems, effect in rows:
        r = simulate_promotions(args.studies, n_systems, effect, select_on, seed=args.seed, model=model,
                                n_boot=args.n_boot)
        results.append(r)
        proto = "single challenger (no selection)" if n_systems == 1 else PROTOCOLS[select_on]
        eff = "none (all equal)" if effect == 0 else f"d' +{effect:g} = {r.eer_reduction_points:.1f} pts"
        picked = "-" if effect == 0 else f"{r.picked_better:.1%}"
        print(f"{proto:<32} {r.n_studies:>7} {r.n_systems:>7} {eff:>22} {r.n_promoted:>8} {r.rate:>6.1%} "
              f"{f'[{r.ci[0]:.1%}, {r.ci[1]:.1%}]':>15} {picked:>13} {r.seconds:>5.1f}")
    last = results[-1]
    print(f"EER on the test lists (mean over studies): champion {100 * last.eer_champion:.1f}%, "
          f"pool system 0 {100 * last.eer_better:.1f}% (the better one when effect > 0); "
          f"pts = the difference, in EER points")
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
