"""The ``mfcon`` command: parse, call one function, print something a person reads."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _make_corpus(args: argparse.Namespace) -> None:
    from mfcon.data.corpus.synthetic import CorpusSpec, make_corpus

    spec = CorpusSpec(n_speakers=args.speakers, utts_per_speaker=args.utts, n_test_speakers=args.test_speakers,
                      seed=args.seed)
    layout = make_corpus(Path(args.out), spec)
    print(f"corpus: {layout.root}\ntrials: {layout.trials}")


def _prepare(args: argparse.Namespace) -> None:
    from mfcon.data.prepare import prepare_dataset

    manifest = prepare_dataset(args.corpus, args.trials, args.out, rows_per_shard=args.rows_per_shard,
                               num_workers=args.workers)
    for name, split in manifest.splits.items():
        print(f"{name:5s}: {split.rows} utterances, {split.num_speakers} speakers, {len(split.shards)} shards")
    if manifest.skipped:
        print(f"skipped {len(manifest.skipped)} unreadable files:")
        for item in manifest.skipped[:20]:
            print(f"  {item.path}: {item.reason}")


def _train(args: argparse.Namespace) -> None:
    from mfcon.config import load_train_config
    from mfcon.train.local import train_local

    cfg = load_train_config(args.config)
    history = train_local(cfg, args.data, args.out, resume=not args.no_resume)
    if history:
        print(f"best EER {min(h.get('eer', float('inf')) for h in history):.2f}%  checkpoints in {args.out}")


def _study(args: argparse.Namespace) -> None:
    from mfcon.study.report import print_summary
    from mfcon.study.runner import run_study

    summary = run_study(args.space, args.data, workdir=args.workdir, num_samples=args.num_samples,
                        address=args.address, tracking_uri=args.tracking_uri, resume=args.resume,
                        study_name=args.name)
    print_summary(summary)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mfcon", description="MFA-Conformer + MFCon speaker-verification studies")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-corpus", help="generate the synthetic multi-speaker demo corpus (espeak-ng voices)")
    p.add_argument("--out", required=True)
    p.add_argument("--speakers", type=int, default=40)
    p.add_argument("--utts", type=int, default=10)
    p.add_argument("--test-speakers", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_corpus)

    p = sub.add_parser("prepare", help="audio -> 80-dim fbank -> Parquet shards + manifest.json")
    p.add_argument("--corpus", required=True, help="VoxCeleb-layout root <speaker>/<video>/<utt>.wav")
    p.add_argument("--trials", required=True, help="trial list: <0|1> <enroll> <test> per line")
    p.add_argument("--out", required=True)
    p.add_argument("--rows-per-shard", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=_prepare)

    p = sub.add_parser("train", help="train one model locally (no Ray)")
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True, help="folder made by `mfcon prepare`")
    p.add_argument("--out", required=True)
    p.add_argument("--no-resume", action="store_true")
    p.set_defaults(func=_train)

    p = sub.add_parser("study", help="hyperparameter study: Ray Tune + Optuna + ASHA, tracked in MLflow")
    p.add_argument("--space", help="search_spaces/*.yaml")
    p.add_argument("--data", help="folder made by `mfcon prepare`")
    p.add_argument("--workdir", default="runs", help="studies and the embedded MLflow store live here")
    p.add_argument("--name", help="study name (default: the space's name)")
    p.add_argument("--num-samples", type=int)
    p.add_argument("--address", help="Ray cluster address, e.g. auto (default: a private local Ray)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite in --workdir)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study")
    p.set_defaults(func=_study)

    from mfcon.cli_registry import add_commands as add_registry_commands
    from mfcon.cli_report import add_commands as add_report_commands

    add_registry_commands(sub)
    add_report_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        if type(e).__module__.startswith("mfcon") or isinstance(e, FileNotFoundError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
