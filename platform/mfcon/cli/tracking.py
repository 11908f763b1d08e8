"""``mfcon sync``: replay a study's tracking spool (writes its MLflow server did not take) to that server."""

from __future__ import annotations

import argparse


class SyncIncomplete(RuntimeError):
    """Some spooled writes are still not in MLflow after the sync (the server stayed away)."""


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sync", help="replay a study's spooled tracking writes to its MLflow server (idempotent)")
    p.add_argument("--name", required=True, help="study name")
    p.add_argument("--workdir", default="runs", help="the study's work dir (its spool is <workdir>/<name>/)")
    p.add_argument("--tracking-uri", help="replay to this server instead of the one the spool was written for")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to keep trying an unreachable server")
    p.set_defaults(func=_sync)


def _sync(args: argparse.Namespace) -> None:
    from mfcon.tracking.sync import sync_study

    reports = sync_study(args.workdir, args.name, tracking_uri=args.tracking_uri, timeout_s=args.timeout)
    for report in reports:
        print(report.line())
    left = sum(r.pending for r in reports)
    if left:
        raise SyncIncomplete(f"{left} writes of study {args.name!r} are still pending; run mfcon sync again "
                             "once the tracking server answers")
