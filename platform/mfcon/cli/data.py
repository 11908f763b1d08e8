"""``mfcon make-corpus | prepare``: a demo corpus, and audio to feature shards."""

from __future__ import annotations

import argparse
from pathlib import Path


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
    p.set_defaults(func=_prepare)


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
                               rows_per_shard=args.rows_per_shard, num_workers=args.workers, seed=args.seed)
    for name, split in manifest.splits.items():
        print(f"{name:5s}: {split.rows} utterances, {split.num_speakers} speakers, {len(split.shards)} shards")
    if manifest.skipped:
        print(f"skipped {len(manifest.skipped)} unreadable files:")
        for item in manifest.skipped[:20]:
            print(f"  {item.path}: {item.reason}")
