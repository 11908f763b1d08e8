"""The ``mfcon`` command: parse, call one function, print something a person reads.

One module per command group, each with ``add_commands(subparsers)``:
:mod:`~mfcon.cli.data` (make-corpus, prepare), :mod:`~mfcon.cli.train`,
:mod:`~mfcon.cli.study` (study, replicate, report), :mod:`~mfcon.cli.registry` (promote),
:mod:`~mfcon.cli.serving` (verify, embed), :mod:`~mfcon.cli.tracking` (sync) and
:mod:`~mfcon.cli.tracking_server` (tracking-server); shared options and error
handling in :mod:`~mfcon.cli.common`, shared names in :mod:`mfcon.names`.
Building the parser imports neither MLflow nor Ray nor torch.
"""

from __future__ import annotations

import argparse

from mfcon.cli import data, registry, serving, study, tracking, tracking_server, train
from mfcon.cli.common import run

GROUPS = (data, train, study, registry, serving, tracking, tracking_server)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mfcon", description="MFA-Conformer + MFCon speaker-verification studies")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


__all__ = ["build_parser", "main"]
