"""``mfcon train``: one model, locally, without Ray."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one model locally (no Ray)")
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True, help="folder made by `mfcon prepare`")
    p.add_argument("--out", required=True)
    p.add_argument("--no-resume", action="store_true")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> None:
    from mfcon.config import load_train_config
    from mfcon.train.local import train_local

    cfg = load_train_config(args.config)
    history = train_local(cfg, args.data, args.out, resume=not args.no_resume)
    if history:
        print(f"best EER {min(h.get('eer', float('inf')) for h in history):.2f}%  checkpoints in {args.out}")
