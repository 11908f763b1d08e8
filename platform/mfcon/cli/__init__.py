"""The ``mfcon`` command: parse, call one function, print something a person reads.

One module per command group, each with ``add_commands(subparsers)``:
:mod:`~mfcon.cli.data` (make-corpus, prepare), :mod:`~mfcon.cli.train`,
:mod:`~mfcon.cli.study` (study, replicate, report), :mod:`~mfcon.cli.registry` (promote),
:mod:`~mfcon.cli.serving` (verify, embed), :mod:`~mfcon.cli.score` (score),
:mod:`~mfcon.cli.tracking` (sync) and :mod:`~mfcon.cli.tracking_server` (tracking-server);
shared options, the parser class (one-line ``error:`` messages, defaults in every help)
and error handling in :mod:`~mfcon.cli.common`, shared names in :mod:`mfcon.names`.
Building the parser imports neither MLflow nor Ray nor torch.
"""

from __future__ import annotations

import argparse

from mfcon import __version__
from mfcon.cli import data, registry, score, serving, study, tracking, tracking_server, train
from mfcon.cli.common import Parser, run

GROUPS = (data, train, study, registry, serving, score, tracking, tracking_server)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mfcon", description="MFA-Conformer + MFCon speaker-verification studies. "
                    "Typical order: make-corpus -> prepare -> train | study -> replicate -> promote -> "
                    "score | verify | embed")
    parser.add_argument("--version", action="version", version=f"mfcon {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for group in GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv), argv)


__all__ = ["build_parser", "main"]
