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
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from mfcon import __version__

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
OPTUNA_STORAGE_ENV = "MFCON_OPTUNA_STORAGE"  # == mfcon.study.optuna_storage.OPTUNA_STORAGE_ENV (no Optuna to parse)
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
    p.add_argument("--top-n", type=top_n_value, default=300, metavar="N",
                   help=f"AS-norm: the N highest cohort scores averaged per side (at least {MIN_TOP_N}; a smaller "
                        "cohort is used whole)")


def tracking_uri(args: argparse.Namespace) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``<workdir>/mlflow.db``."""
    from mfcon.tracking import resolve_tracking_uri

    return resolve_tracking_uri(args.tracking_uri, args.workdir)


def check_store_exists(uri: str) -> None:
    """An embedded (SQLite) store must already exist for commands that read it; said before MLflow loads."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise FileNotFoundError(2, "MLflow store does not exist; run a study (and mfcon promote) first, or point "
                                   "--workdir/--tracking-uri at the store they used", uri)


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
    if getattr(args, "optuna_storage", None) or os.environ.get(OPTUNA_STORAGE_ENV):
        _move_optuna_credentials(args, moved)
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


def _move_optuna_credentials(args: argparse.Namespace, moved: dict[str, str]) -> None:
    """``--optuna-storage`` / ``$MFCON_OPTUNA_STORAGE`` without a password (it would be pickled into Tune's searcher
    state and written to study.json); PostgreSQL reads it from ``PGPASSWORD``, one for both stores."""
    url = getattr(args, "optuna_storage", None) or os.environ[OPTUNA_STORAGE_ENV]
    clean, env = split_credentials(url)
    for name, value in env.items():
        if moved.get(name, value) != value:
            print(error_text(f"the tracking URI and the Optuna storage carry different passwords; both are given to "
                             f"PostgreSQL as ${name}: use one login for both, or put it in ${name} yourself"),
                  file=sys.stderr)
            raise SystemExit(2)
    if env:
        if getattr(args, "optuna_storage", None):
            args.optuna_storage = clean
        else:
            moved[OPTUNA_STORAGE_ENV] = clean
        moved.update(env)


def _message(e: BaseException) -> str:
    """One readable line (or block) for an input error: OS errors as ``<file>: <reason>``."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)


def _raised_in_mfcon(e: BaseException) -> bool:
    """The innermost frame that raised ``e`` is mfcon's own code (a deliberate ``raise ValueError(...)``)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("mfcon")


def is_input_error(e: BaseException) -> bool:
    """A mistake in what the user gave (printed as one ``error:`` line, exit 2), not a bug in mfcon.

    mfcon's own ``ValueError``/``RuntimeError`` subclasses, a plain ``ValueError`` raised by mfcon code
    itself (not deep inside a library), and OS errors (a missing or unreadable file)."""
    if isinstance(e, OSError):
        return True
    if isinstance(e, (ValueError, RuntimeError)) and type(e).__module__.startswith("mfcon"):
        return True
    return type(e) is ValueError and _raised_in_mfcon(e)


def error_text(message: str) -> str:
    """``error: <first line>``; further lines (details, one per field) indented, so exactly one line starts with
    ``error:``; credentials masked."""
    lines = redact_credentials(message).strip().splitlines() or ["(no message)"]
    rest = [line if line[:1].isspace() else f"  {line}" for line in lines[1:] if line.strip()]
    return "\n".join([f"error: {lines[0]}", *rest])


def crash_dir() -> Path:
    """Where an unexpected error's traceback goes: ``$MFCON_CRASH_DIR``, else ``$XDG_CACHE_HOME/mfcon`` (default
    ``~/.cache/mfcon``), else the temp folder."""
    if os.environ.get("MFCON_CRASH_DIR"):
        return Path(os.environ["MFCON_CRASH_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "mfcon"


def write_crash_report(e: BaseException, argv: list[str] | None = None) -> Path | None:
    """The full traceback of an unexpected error in a file (``crash-<time>-<pid>.txt``); None if none can be
    written anywhere."""
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    header = f"mfcon {__version__}: {' '.join(argv) if argv is not None else ' '.join(sys.argv)}\n\n"
    for folder in (crash_dir(), Path(tempfile.gettempdir()) / "mfcon"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"crash-{stamp}-{os.getpid()}.txt"
            path.write_text(redact_credentials(header + text))
            return path
        except OSError:
            continue
    return None


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Call the command. An input error (:func:`is_input_error`) becomes one ``error:`` line on stderr and exit
    code 2, never a traceback; Ctrl-C exits 130; anything else is a bug: one ``error:`` line naming the file that
    holds its full traceback, exit code 1 (``MFCON_TRACEBACK=1`` prints it instead)."""
    with credentials_out_of_uris(args):
        try:
            args.func(args)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 - every failure ends as one line
            if is_input_error(e):
                print(error_text(_message(e)), file=sys.stderr)
                return 2
            if os.environ.get("MFCON_TRACEBACK") == "1":
                raise
            where = write_crash_report(e, argv)
            first = redact_credentials(str(e)).strip().splitlines()[:1] or [""]
            saved = f"the full traceback is in {where}" if where else "no traceback file could be written"
            print(f"error: unexpected {type(e).__name__}: {first[0]} (a bug in mfcon; {saved})", file=sys.stderr)
            return 1
    return 0


# ---------------------------------------------------------------- the parser


def has_default(action: argparse.Action) -> bool:
    """An option with a default worth showing (not None, a store_true's False, an empty list or SUPPRESS)."""
    d = action.default
    return bool(action.option_strings) and not (d is None or d is False or d is argparse.SUPPRESS
                                                or (isinstance(d, list) and not d))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless it says it already or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "(default" in text or "default:" in text:
            return text
        if not has_default(action):
            return text
        shown = ",".join(map(str, action.default)) if isinstance(action.default, list) else "%(default)s"
        return f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    """argparse with mfcon's error shape: one ``error:`` line naming the command and the flag, exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


MIN_TOP_N = 10  # == mfcon.evaluation.score_norm.MIN_TOP_N (tests/test_cli.py checks), kept here: no numpy to parse


def top_n_value(text: str) -> int:
    """An argparse type: AS-norm's top_n, an integer >= MIN_TOP_N."""
    return _int_at_least(text, MIN_TOP_N)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value
