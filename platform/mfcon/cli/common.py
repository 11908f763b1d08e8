"""What every ``mfcon`` command shares: the MLflow store options and the error handling.

MLflow-free on import: commands import their work lazily, so ``mfcon --help``
stays fast (checked by tests/test_cli.py).
"""

from __future__ import annotations

import argparse
import sys


def add_store_options(p: argparse.ArgumentParser) -> None:
    """``--workdir`` and ``--tracking-uri``: where the studies' MLflow store is."""
    p.add_argument("--workdir", default="runs", help="studies and their embedded MLflow store (mlflow.db) live here")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite in --workdir)")


def tracking_uri(args: argparse.Namespace) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``<workdir>/mlflow.db``."""
    from mfcon.tracking import resolve_tracking_uri

    return resolve_tracking_uri(args.tracking_uri, args.workdir)


def run(args: argparse.Namespace) -> int:
    """Call the command; mfcon's own input errors (and missing files) become one line on stderr and exit code 2."""
    try:
        args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        if type(e).__module__.startswith("mfcon") or isinstance(e, FileNotFoundError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0
