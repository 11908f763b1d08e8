"""``mfcon report``: parse, write one study summary, print where it is."""

from __future__ import annotations

import argparse
from pathlib import Path


def _report(args: argparse.Namespace) -> None:
    from mfcon.report import write_report
    from mfcon.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri, args.workdir)
    out = Path(args.out) if args.out else Path(args.workdir) / args.study / "report"
    path = write_report(uri, args.study, out, fmt=args.format)
    print(f"report for study {args.study}: {path.resolve()}")


def add_commands(subparsers) -> None:
    """Register ``report`` on the ``mfcon`` sub-command parser (called from ``mfcon.cli.build_parser``)."""
    p = subparsers.add_parser("report", help="study summary (trials by eer, best trial, plots) as HTML or Markdown")
    p.add_argument("--study", required=True, help="study name (its MLflow experiment)")
    p.add_argument("--workdir", default="runs", help="where the study's embedded MLflow store lives")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite in --workdir)")
    p.add_argument("--out", help="output folder (default: <workdir>/<study>/report)")
    p.add_argument("--format", choices=("html", "md"), default="html")
    p.set_defaults(func=_report)
