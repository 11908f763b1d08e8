"""``mfcon make-corpus | prepare``: a demo corpus, and audio to feature shards."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mfcon.data.augment import AugmentConfig


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-corpus", help="generate the synthetic multi-speaker demo corpus (espeak-ng voices)")
    p.add_argument("--out", required=True)
    p.add_argument("--speakers", type=int, default=40)
    p.add_argument("--utts", type=int, default=10)
    p.add_argument("--test-speakers", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_corpus)

    p = sub.add_parser("prepare", help="audio -> 80-dim fbank -> Parquet shards + manifest.json")
    p.add_argument("--corpus", required=True, help="VoxCeleb-layout root <speaker>/<video>/<utt>.wav")
    p.add_argument("--test-trials", "--trials", dest="test_trials", required=True,
                   help="held-out test trial list (e.g. VoxCeleb1-O), <0|1> <enroll> <test> per line; "
                        "read only by replication, promotion and reports")
    dev = p.add_mutually_exclusive_group(required=True)
    dev.add_argument("--dev-trials", help="dev trial list (what studies select on), speakers disjoint from test")
    dev.add_argument("--dev-speakers", type=int,
                     help="hold out N training speakers (seeded) and generate the dev trial list over them")
    p.add_argument("--dev-trials-per-utt", type=int, default=3,
                   help="generated dev list: target trials per enrolment utterance, plus as many non-targets")
    p.add_argument("--seed", type=int, default=0, help="shard order and dev speakers")
    p.add_argument("--out", required=True)
    p.add_argument("--rows-per-shard", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--feature-dtype", choices=("float32", "float16"), default="float32",
                   help="how shards store the fbank features: float32 (default), or float16 for compact shards "
                        "(about 0.36x the bytes, zstd + byte-stream-split; training still reads float32); "
                        "recorded in manifest.json")
    add_augment_options(p)
    p.set_defaults(func=_prepare)


def add_augment_options(p: argparse.ArgumentParser) -> None:
    """Train-split augmentation (Kaldi MUSAN/RIR copies, WeSpeaker speed perturbation); off unless asked for."""
    g = p.add_argument_group("augmentation (train split only; dev and test are never augmented)")
    g.add_argument("--augment-copies", type=int, default=0, metavar="N",
                   help="augmented copies per training utterance (0 = none), kinds in a seeded rotation")
    g.add_argument("--augment-kinds", type=_names, default=["noise", "music", "babble", "reverb"], metavar="KINDS",
                   help="comma list of noise (SNR 0-15 dB), music (5-15), babble (3-7 speakers, 13-20), reverb "
                        "(default: all four)")
    g.add_argument("--musan", metavar="DIR", help="MUSAN folder: <DIR>/{noise,music,speech}/**/*.wav")
    g.add_argument("--rir", metavar="DIR", help="room impulse responses, **/*.wav (e.g. RIRS_NOISES/simulated_rirs)")
    g.add_argument("--speed-perturb", type=_factors, default=[], metavar="FACTORS",
                   help="comma list, e.g. 0.9,1.1: each factor adds every training speaker again as a new "
                        "speaker <speaker>-sp<factor>")
    g.add_argument("--augment-seed", type=int, help="seed of the copies' kinds, files, offsets and SNRs "
                                                    "(default: --seed)")


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _factors(text: str) -> list[float]:
    try:
        return [float(f) for f in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.9,1.1, got {text!r}") from None


def augment_from_args(args: argparse.Namespace) -> AugmentConfig | None:
    """The AugmentConfig the options ask for, or None when they ask for none (AugmentError names a bad option)."""
    from mfcon.data.augment import AugmentError, augment_config

    if not args.augment_copies:
        given = [flag for flag, value in (("--musan", args.musan), ("--rir", args.rir)) if value]
        if given:
            raise AugmentError(f"{' and '.join(given)} given without --augment-copies N (N >= 1): nothing would use it")
        if not args.speed_perturb:
            return None

    seed = args.seed if args.augment_seed is None else args.augment_seed
    return augment_config("mfcon prepare options", copies=args.augment_copies, kinds=args.augment_kinds,
                          musan_dir=args.musan, rir_dir=args.rir, speed_factors=args.speed_perturb, seed=seed)


def _make_corpus(args: argparse.Namespace) -> None:
    from mfcon.data.corpus.synthetic import CorpusSpec, make_corpus

    spec = CorpusSpec(n_speakers=args.speakers, utts_per_speaker=args.utts, n_test_speakers=args.test_speakers,
                      seed=args.seed)
    layout = make_corpus(Path(args.out), spec)
    print(f"corpus: {layout.root}\ntrials: {layout.trials}")


def _prepare(args: argparse.Namespace) -> None:
    from mfcon.data.prepare import prepare_dataset

    manifest = prepare_dataset(args.corpus, args.test_trials, args.out, dev_trials=args.dev_trials,
                               dev_speakers=args.dev_speakers, dev_trials_per_utt=args.dev_trials_per_utt,
                               rows_per_shard=args.rows_per_shard, num_workers=args.workers, seed=args.seed,
                               augment=augment_from_args(args), feature_dtype=args.feature_dtype)
    for name, split in manifest.splits.items():
        print(f"{name:5s}: {split.rows} rows, {split.num_speakers} speakers, {len(split.shards)} shards")
    if manifest.feature_dtype != "float32":
        print(f"features stored as {manifest.feature_dtype} (compact shards)")
    if (aug := manifest.augmentation) is not None:
        kinds = f" ({', '.join(aug.kinds)})" if aug.copies else ""
        speeds = f", speed {', '.join(f'{f:g}' for f in aug.speed_factors)} as new speakers" if aug.speed_factors else ""
        print(f"augmented train: {aug.copies} copies per utterance{kinds}{speeds}; "
              f"{len(manifest.speakers)} classes")
    if manifest.skipped:
        print(f"skipped {len(manifest.skipped)} unreadable files:")
        for item in manifest.skipped[:20]:
            print(f"  {item.path}: {item.reason}")
