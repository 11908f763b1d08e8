"""Corpus -> shards as a pipeline file (``mfcon prepare``); on a cluster, feature extraction runs as Ray tasks,
which read the audio, so the corpus must be at the same path on every node (a read-only mount); the shards go
to the bucket the study reads:

    ray job submit --working-dir . -- python pipelines/prepare.py \\
        --corpus /mnt/voxceleb1/wav --test-trials /mnt/voxceleb1/veri_test2.txt --dev-speakers 40 \\
        --out s3://bucket/vox1-shards --ray auto

With Kaldi-style augmented copies and WeSpeaker speed perturbation of the train split (the MUSAN and RIR
folders must be readable at the same path on every node):

        ... --augment-copies 2 --musan /mnt/musan --rir /mnt/RIRS_NOISES/simulated_rirs --speed-perturb 0.9,1.1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))

from mfcon.cli.data import add_augment_options


def augment_argv(args: argparse.Namespace) -> list[str]:
    """The augmentation options, forwarded to ``mfcon prepare`` as given."""
    argv = ["--augment-copies", str(args.augment_copies), "--augment-kinds", ",".join(args.augment_kinds)]
    if args.speed_perturb:
        argv += ["--speed-perturb", ",".join(f"{f:g}" for f in args.speed_perturb)]
    for flag, value in (("--musan", args.musan), ("--rir", args.rir), ("--augment-seed", args.augment_seed)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True)
    p.add_argument("--test-trials", "--trials", dest="test_trials", required=True)
    dev = p.add_mutually_exclusive_group(required=True)
    dev.add_argument("--dev-trials")
    dev.add_argument("--dev-speakers", type=int)
    p.add_argument("--out", required=True)
    p.add_argument("--rows-per-shard", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ray", metavar="ADDRESS", help="run the shard tasks on this Ray cluster (e.g. auto)")
    add_augment_options(p)
    args = p.parse_args()
    if args.ray:
        import ray

        ray.init(address=args.ray)
    from mfcon.cli import main as cli_main

    dev = ["--dev-trials", args.dev_trials] if args.dev_trials else ["--dev-speakers", str(args.dev_speakers)]
    return cli_main(["prepare", "--corpus", args.corpus, "--test-trials", args.test_trials, *dev, "--out", args.out,
                     "--rows-per-shard", str(args.rows_per_shard), "--workers", str(args.workers),
                     "--seed", str(args.seed), *augment_argv(args)])


if __name__ == "__main__":
    sys.exit(main())
