"""``mfcon tracking-server``: the shared MLflow server (PostgreSQL + object store for a team, SQLite for one user).

Without options it serves the same store ``mfcon study`` writes by default
(``<workdir>/mlflow.db`` and ``<workdir>/mlartifacts``) on 127.0.0.1. A database
password is written as ``'${VAR}'`` (single quotes: the shell must not expand it) and
read from the environment; it never appears in argv or in what is printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tracking-server", help="run the shared MLflow tracking server (bound to a private address)")
    p.add_argument("--backend-store-uri",
                   help="postgresql://USER:'${VAR}'@HOST:PORT/DB (password from $VAR or $PGPASSWORD) or "
                        "sqlite:////abs/mlflow.db (default: sqlite in --workdir)")
    p.add_argument("--artifacts-destination",
                   help="object store (s3://bucket/mlflow) or absolute folder (default: <workdir>/mlartifacts)")
    p.add_argument("--workdir", default="runs", help="where the default SQLite store lives (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="loopback or private IP to bind (default: %(default)s; 0.0.0.0 is refused)")
    p.add_argument("--port", type=int, default=5000, help="default: %(default)s")
    p.add_argument("--workers", type=int, default=4, help="uvicorn worker processes (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the command (secrets masked) and exit")
    p.set_defaults(func=_tracking_server)


def server_spec(args: argparse.Namespace):
    """The options as a ``ServerSpec``; the defaults point at the embedded store in ``--workdir``."""
    from mfcon.tracking.server import ServerSpec

    workdir = Path(args.workdir).resolve()
    backend = args.backend_store_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    artifacts = args.artifacts_destination or str(workdir / "mlartifacts")
    if backend.startswith("sqlite:///"):
        workdir.mkdir(parents=True, exist_ok=True)
    return ServerSpec(backend, artifacts, host=args.host, port=args.port, workers=args.workers)


def _tracking_server(args: argparse.Namespace) -> None:
    import os

    from mfcon.tracking.server import serve_forever, server_launch

    spec = server_spec(args)
    if args.dry_run:
        print(server_launch(spec, os.environ).display())
        return
    serve_forever(spec)


def main(argv: list[str] | None = None) -> int:
    """``python -m mfcon.cli.tracking_server``: this command on its own."""
    from mfcon.cli.common import run

    parser = argparse.ArgumentParser(prog="mfcon")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["tracking-server", *(argv or [])]))


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
