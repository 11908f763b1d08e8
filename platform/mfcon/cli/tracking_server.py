"""``mfcon tracking-server``: the shared MLflow server (PostgreSQL + object store for a team, SQLite for one user).

Without options it serves the same store ``mfcon study`` writes by default
(``<workdir>/mlflow.db`` and ``<workdir>/mlartifacts``) on 127.0.0.1. ``--auth`` runs
MLflow's basic-auth app (docs/tracking_server.md: users, roles, credential files). A database
password is written as ``'${VAR}'`` (single quotes: the shell must not expand it) and
read from the environment; the admin password comes from ``--admin-password-file`` or
``$MLFLOW_AUTH_ADMIN_PASSWORD``; none appears in argv or in what is printed. ``--dry-run``
and a refused option write nothing.
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
    auth = p.add_argument_group("authentication (MLflow basic-auth; docs/tracking_server.md)")
    auth.add_argument("--auth", action="store_true",
                      help="require a user name and password for every request; per-experiment and per-model "
                           "permissions (READ/EDIT/MANAGE); anonymous requests are refused")
    auth.add_argument("--auth-dir", help="folder (0700) for basic_auth.ini and the generated secret key (default: "
                                         "the SQLite store's folder, else ~/.mfcon/mlflow-auth)")
    auth.add_argument("--admin-username", default="admin", help="the admin created on first start (default: "
                                                                "%(default)s)")
    auth.add_argument("--admin-password-file", help="file (mode 0600) holding the admin's password (default: "
                                                    "$MLFLOW_AUTH_ADMIN_PASSWORD)")
    auth.add_argument("--auth-database-uri", help="users and permissions (default: basic_auth.db beside a SQLite "
                                                  "store; the tracking database itself for PostgreSQL)")
    auth.add_argument("--default-permission", default="READ", choices=("READ", "NO_PERMISSIONS"),
                      help="what a signed-in user may do without a grant (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the command (secrets masked) and exit; writes "
                                                          "nothing")
    p.set_defaults(func=_tracking_server)


def server_spec(args: argparse.Namespace):
    """The options as a ``ServerSpec``; the defaults point at the embedded store in ``--workdir``. Creates nothing."""
    from mfcon.tracking.server import AuthSpec, ServerSpec

    workdir = Path(args.workdir).resolve()
    backend = args.backend_store_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    artifacts = args.artifacts_destination or str(workdir / "mlartifacts")
    auth = None
    if getattr(args, "auth", False):
        if args.auth_dir:
            auth_dir = str(Path(args.auth_dir).expanduser().resolve())
        elif backend.startswith("sqlite:///"):
            auth_dir = str(Path(backend[len("sqlite:///"):]).parent)
        else:
            auth_dir = str(Path("~/.mfcon/mlflow-auth").expanduser())
        auth = AuthSpec(auth_dir, admin_username=args.admin_username, admin_password_file=args.admin_password_file,
                        database_uri=args.auth_database_uri, default_permission=args.default_permission)
    return ServerSpec(backend, artifacts, host=args.host, port=args.port, workers=args.workers, auth=auth)


def _tracking_server(args: argparse.Namespace) -> None:
    import os
    import sys

    from mfcon.tracking.server import serve_forever, server_launch

    spec = server_spec(args)
    if args.dry_run:
        launch = server_launch(spec, os.environ)  # every check, nothing written
        for line in launch.warnings:
            print(line, file=sys.stderr)
        print(launch.display())
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
