"""``mfcon train``: one model, locally, without Ray."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one model locally (no Ray)",
                       description="Train one model on a prepared data folder, scoring the dev list after each "
                                   "epoch. Writes <out>/last.pt every epoch, <out>/best.pt at the best dev EER and "
                                   "<out>/metrics.jsonl; re-running continues from last.pt. A progress bar with ETA "
                                   "goes to stderr when it is a terminal (MFCON_PROGRESS=0 hides it, 1 forces it).")
    p.add_argument("--config", required=True, help="training config YAML, e.g. configs/tiny.yaml")
    p.add_argument("--data", required=True, help="folder made by `mfcon prepare`")
    p.add_argument("--out", required=True, help="checkpoint folder (last.pt, best.pt, metrics.jsonl)")
    p.add_argument("--no-resume", action="store_true",
                   help="start from epoch 1 even if --out holds a last.pt (it is overwritten)")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> None:
    from pathlib import Path

    from mfcon.config import load_train_config
    from mfcon.data.shards import read_manifest

    from mfcon.train.local import best_dev_epoch, check_training_inputs, train_local

    cfg = load_train_config(args.config)  # config and data folder checked before torch loads
    check_training_inputs(cfg, read_manifest(args.data), args.data, args.config)

    history = train_local(cfg, args.data, args.out, resume=not args.no_resume, config_name=args.config)
    out = Path(args.out)
    best = best_dev_epoch(history)
    if best is None:
        print(f"trained {len(history)} epochs; no epoch scored the dev list (eval_every?); last checkpoint "
              f"{out / 'last.pt'}")
        return
    eer, epoch = best
    print(f"best dev EER {eer:.2f}% at epoch {epoch} of {len(history)}: {out / 'best.pt'} "
          f"(last epoch: {out / 'last.pt'}, per-epoch metrics: {out / 'metrics.jsonl'})")
    print(f"next: score it on the held-out test list: mfcon score test --data {args.data} --model {out / 'best.pt'}")
