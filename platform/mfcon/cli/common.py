"""What every ``mfcon`` command shares: the MLflow store options, credentials in URIs, the error handling.

MLflow-free on import: commands import their work lazily, so ``mfcon --help``
stays fast (checked by tests/test_cli.py).

Credentials never travel inside a tracking URI past the command line: MLflow
prints run links built from the URI ("View run ... at http://user:pw@host/...")
and mfcon records the URI in ``study.json``, reports and error messages. So
:func:`run` moves ``user:password@`` out of ``--tracking-uri`` and
``$MLFLOW_TRACKING_URI`` into the variables the clients read themselves
(``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` for an MLflow
server, ``PGPASSWORD`` for PostgreSQL) for the duration of the command, and
masks any ``scheme://user:password@`` left in an error it prints.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit, urlunsplit

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s/@:]*):(?P<password>[^\s/@]*)@")
# scheme -> (user variable or None to keep the user in the URI, password variable)
_CREDENTIAL_ENV = {"http": ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
                   "https": ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
                   "postgresql": (None, "PGPASSWORD")}


def add_store_options(p: argparse.ArgumentParser) -> None:
    """``--workdir`` and ``--tracking-uri``: where the studies' MLflow store is."""
    p.add_argument("--workdir", default="runs", help="studies and their embedded MLflow store (mlflow.db) live here")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite in --workdir); "
                                          "a user:password@ in it is passed to the client through its environment "
                                          "variables, never stored")


def add_score_norm_options(p: argparse.ArgumentParser) -> None:
    """How test trials are scored: the same choice for replication, promotion and (through the registry) serving."""
    p.add_argument("--score-norm", choices=("mean", "asnorm"), default="mean",
                   help="mean: cosine after subtracting the mean embedding; asnorm: also adaptive s-norm against "
                        "a cohort of training speakers (3 utterances each)")
    p.add_argument("--top-n", type=int, default=300, help="AS-norm: cohort scores averaged per side (default 300)")


def tracking_uri(args: argparse.Namespace) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``<workdir>/mlflow.db``."""
    from mfcon.tracking import resolve_tracking_uri

    return resolve_tracking_uri(args.tracking_uri, args.workdir)


def redact_credentials(text: str) -> str:
    """Mask every ``scheme://user:password@`` in ``text`` as ``scheme://user:***@``.

    >>> redact_credentials("store http://alice:s3cret@10.0.0.5:5000 is down")
    'store http://alice:***@10.0.0.5:5000 is down'
    """
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """(the URI without its password, the environment variables that carry it instead).

    Only schemes whose client reads a password from the environment are split
    (an MLflow server over http(s), PostgreSQL with any driver); others come back unchanged.

    >>> split_credentials("http://alice:s3cret@10.0.0.5:5000")
    ('http://10.0.0.5:5000', {'MLFLOW_TRACKING_USERNAME': 'alice', 'MLFLOW_TRACKING_PASSWORD': 's3cret'})
    >>> split_credentials("postgresql+psycopg2://bob:pw@db:5432/mlflow")
    ('postgresql+psycopg2://bob@db:5432/mlflow', {'PGPASSWORD': 'pw'})
    """
    parts = urlsplit(uri)
    names = _CREDENTIAL_ENV.get(parts.scheme.split("+")[0].lower())
    if names is None or parts.password is None:
        return uri, {}
    user_env, password_env = names
    host = parts.netloc.rpartition("@")[2]
    if user_env is not None:
        env, netloc = {user_env: unquote(parts.username or "")}, host
    else:
        env, netloc = {}, f"{parts.netloc.rpartition('@')[0].partition(':')[0]}@{host}"
    env[password_env] = unquote(parts.password)
    return urlunsplit(parts._replace(netloc=netloc)), env


@contextlib.contextmanager
def credentials_out_of_uris(args: argparse.Namespace) -> Iterator[None]:
    """For one command: ``--tracking-uri`` and ``$MLFLOW_TRACKING_URI`` without passwords, which go to the
    clients' own variables; the environment is put back afterwards (in-process callers, tests)."""
    moved: dict[str, str] = {}
    if getattr(args, "tracking_uri", None):
        args.tracking_uri, env = split_credentials(args.tracking_uri)
        moved.update(env)
    if os.environ.get(TRACKING_URI_ENV):
        clean, env = split_credentials(os.environ[TRACKING_URI_ENV])
        if env:
            moved[TRACKING_URI_ENV] = clean
            moved.update({k: v for k, v in env.items() if k not in moved})
    saved = {name: os.environ.get(name) for name in moved}
    os.environ.update(moved)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _message(e: BaseException) -> str:
    """One readable line (or block) for an input error: OS errors as ``<file>: <reason>``."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)


def run(args: argparse.Namespace) -> int:
    """Call the command; mfcon's own input errors and OS errors (a missing or unreadable file) become one
    message on stderr and exit code 2, never a traceback. Anything else is a bug and keeps its traceback."""
    with credentials_out_of_uris(args):
        try:
            args.func(args)
        except (ValueError, RuntimeError, OSError) as e:
            if type(e).__module__.startswith("mfcon") or isinstance(e, OSError):
                print(f"error: {redact_credentials(_message(e))}", file=sys.stderr)
                return 2
            raise
    return 0
