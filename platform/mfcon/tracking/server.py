"""The team's MLflow tracking server: the ``mlflow server`` command line, built once (pure) and run.

Why not a one-line shell command: a server that anyone on the network can reach must
authenticate its clients (``auth``: MLflow's ``basic-auth`` app, users and per-experiment /
per-registered-model permissions, anonymous requests refused); it binds a loopback or private
address only (never every interface); a password must never reach argv, which every user of
the machine can read with ``ps`` (database and admin passwords and the app's secret key go
through the environment, files mfcon writes are 0600 in 0700 folders); and MLflow 3 spawns
~7 job-runner processes per server unless ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``.

A password is given as ``${VAR}`` in the URI (read from the environment, never typed)
or through libpq's own ``PGPASSWORD``; the auth admin's password from a file
(``admin_password_file``, mode 0600) or ``MLFLOW_AUTH_ADMIN_PASSWORD``::

    auth = AuthSpec(config_dir="/home/ubuntu/.mfcon/mlflow-auth", admin_password_file="~/.mfcon/mlflow_admin_password")
    launch = server_launch(ServerSpec("postgresql://mfcon:${MFCON_DB_PASSWORD}@127.0.0.1:5432/mlflow",
                                      "s3://bucket/mlflow", host="10.0.0.5", auth=auth), environ=os.environ)
    launch.display()  # "MLFLOW_AUTH_ADMIN_PASSWORD=*** ... PGPASSWORD=*** mlflow server ... --app-name basic-auth"
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from mfcon.tracking.server_auth import (  # noqa: F401 (the auth names stay importable from here)
    ADMIN_PASSWORD_ENV,
    AUTH_DB,
    AUTH_INI,
    DEFAULT_PERMISSION,
    PERMISSIONS,
    SECRET_KEY_ENV,
    SECRET_KEY_FILE,
    AuthSpec,
    ServerConfigError,
    auth_launch,
    read_secret_file,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
DEFAULT_WORKERS = 4
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # else ~7 job-runner processes per server
SECRET_ENV = ("PGPASSWORD", "MLFLOW_BACKEND_STORE_URI", ADMIN_PASSWORD_ENV, SECRET_KEY_ENV)  # what display() masks
POSTGRES_DRIVER = "postgresql+psycopg2"
PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class ServerSpec:
    """What the team decides: where runs and artifacts live, which address and port to bind."""

    backend_store_uri: str  # postgresql://user[:${VAR}]@host:port/db (team) or sqlite:////abs/mlflow.db (one user)
    artifacts_destination: str  # s3://bucket/prefix (team) or an absolute local folder
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    workers: int = DEFAULT_WORKERS
    auth: AuthSpec | None = None  # None: no authentication (loopback, one user)


@dataclass(frozen=True)
class ServerLaunch:
    """The process to start: argv (safe to print) plus environment additions (secrets live only here).

    ``files`` are written (0600, folders 0700) just before the server starts (:func:`write_server_files`),
    never by a dry run; ``folders`` are created then too (the SQLite store's folder).
    """

    argv: tuple[str, ...]
    env: dict[str, str] = field(repr=False)
    url: str
    files: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    folders: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def display(self) -> str:
        """The command as a shell line, with secret environment values masked."""
        env = " ".join(f"{k}={'***' if k in SECRET_ENV else shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"{env} {shlex.join(self.argv)}"


def mask_uri(uri: str) -> str:
    """``scheme://user:***@host/db``: a URI that is safe to print (no password, placeholder or not)."""
    from mfcon.storage import mask_uri as mask

    return mask(uri)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``host`` names (brackets and an IPv6 zone stripped), or None for a name."""
    bare = host.strip()
    if bare.startswith("[") and bare.endswith("]"):
        bare = bare[1:-1]
    try:
        return ipaddress.ip_address(bare.split("%", 1)[0])
    except ValueError:
        return None


def check_bind_host(host: str) -> str:
    """A loopback or private IP address; every interface (0.0.0.0, ::, ::0, ...), public addresses and names
    are refused. "Every interface" is the address's own ``is_unspecified``, in whatever spelling it comes."""
    address = _ip(host)
    if not host.strip() or (address is not None and (address.is_unspecified or getattr(
            address, "ipv4_mapped", None) is not None and address.ipv4_mapped.is_unspecified)):
        raise ServerConfigError(f"--host {host!r} would expose the MLflow server on every interface; "
                                "give this node's private IP, e.g. --host \"$(hostname -I | awk '{print $1}')\"")
    if host == "localhost":
        return host
    if address is None:
        raise ServerConfigError(f"--host {host!r} is not an IP address; give a loopback or private IP")
    if address.is_global or address.is_multicast:
        raise ServerConfigError(f"--host {host} is a public address; bind a private address (reach it over a VPN "
                                "or SSH tunnel)")
    return host


def is_loopback(host: str) -> bool:
    address = _ip(host)
    return host == "localhost" or (address is not None and address.is_loopback)


def allowed_hosts(host: str) -> str | None:
    """``--allowed-hosts`` for a private bind: that address, and localhost for SSH tunnels.

    MLflow 3 rejects API calls whose Host header it does not allow (403 "Invalid Host header");
    its default list holds only the RFC 1918 ranges, so a server bound to another private
    address (100.64/10 is not one, nor 192.0.2/24) would answer /health and refuse every client.
    """
    if is_loopback(host):
        return None  # MLflow's defaults cover loopback
    bare = str(_ip(host))
    named = f"[{bare}]" if ":" in bare else bare
    pattern = named.replace("[", "[[]", 1)  # fnmatch: a literal "["
    return ",".join([named, f"{pattern}:*", "localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*"])


def _expand(text: str, environ: Mapping[str, str], option: str) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1)
        if name not in environ:
            raise ServerConfigError(f"{option} refers to ${{{name}}}, which is not set in the environment")
        return environ[name]

    return PLACEHOLDER.sub(value, text)


def backend_store(uri: str, environ: Mapping[str, str]) -> tuple[str | None, dict[str, str]]:
    """Split the backend URI into what argv may show and the secret environment the server needs.

    PostgreSQL: the password goes to ``PGPASSWORD`` (libpq reads it when the URI has none); a bare
    ``postgresql://`` gets the psycopg2 driver.
    Other databases with a password: the whole URI goes to ``MLFLOW_BACKEND_STORE_URI``
    (``mlflow server`` reads it from there) and argv shows no backend at all.
    """
    option = "--backend-store-uri"
    parts = urlsplit(uri)
    if parts.scheme in ("postgresql", "postgres"):
        # SQLAlchemy >= 2.1 maps a bare postgresql:// to psycopg 3; the driver installed with mfcon is psycopg2.
        parts = parts._replace(scheme=POSTGRES_DRIVER)
    if parts.scheme == "sqlite":
        path = uri[len("sqlite:///"):]
        if not uri.startswith("sqlite:///") or not Path(path).is_absolute():
            raise ServerConfigError(f"{option} {uri!r}: give an absolute path, sqlite:////abs/path/mlflow.db")
        return uri, {}
    if not parts.scheme or "://" not in uri:
        raise ServerConfigError(f"{option} {mask_uri(uri)!r}: expected postgresql://user@host:port/db or "
                                "sqlite:////abs/path/mlflow.db")
    if parts.password is None:
        return _expand(urlunsplit(parts), environ, option), {}
    password = unquote(_expand(parts.password, environ, option))
    user = _expand(parts.username or "", environ, option)
    host = _expand(parts.netloc.rsplit("@", 1)[1], environ, option)
    if parts.scheme.startswith("postgresql"):
        return urlunsplit(parts._replace(netloc=f"{user}@{host}")), {"PGPASSWORD": password}
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return None, {"MLFLOW_BACKEND_STORE_URI": urlunsplit(parts._replace(netloc=netloc))}


def check_artifacts_destination(dest: str) -> str:
    """An object-store URI (``s3://bucket/prefix``) or an absolute local folder."""
    if "://" in dest or Path(dest).is_absolute():
        return dest
    raise ServerConfigError(f"--artifacts-destination {dest!r}: give an object-store URI (s3://bucket/mlflow) "
                            "or an absolute folder")


def mlflow_executable() -> list[str]:
    """The venv's ``mlflow`` script beside this interpreter, else ``python -m mlflow``."""
    exe = Path(sys.executable).with_name("mlflow")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]


def _auth_database(backend: str, visible_uri: str | None) -> str | None:
    """Where users and grants go by default: ``basic_auth.db`` beside a SQLite store, or the PostgreSQL
    tracking database itself (MLflow keeps its auth tables and their migrations apart); else None."""
    if backend.startswith("sqlite:///"):
        return f"sqlite:///{Path(backend[len('sqlite:///'):]).parent / AUTH_DB}"
    if visible_uri is not None and visible_uri.startswith(POSTGRES_DRIVER):
        return visible_uri
    return None


def server_launch(spec: ServerSpec, environ: Mapping[str, str], mlflow: list[str] | None = None) -> ServerLaunch:
    """Build the ``mlflow server`` command for ``spec`` (pure: nothing is started or written; ``environ``
    and, with auth, the admin password file and an existing secret key file are read)."""
    host = check_bind_host(spec.host)
    if not 0 < spec.port < 65536:
        raise ServerConfigError(f"--port {spec.port} is not a TCP port")
    if spec.workers < 1:
        raise ServerConfigError(f"--workers {spec.workers}: need at least 1")
    visible_uri, secret_env = backend_store(spec.backend_store_uri, environ)
    argv = [*(mlflow or mlflow_executable()), "server"]
    if visible_uri is not None:
        argv += ["--backend-store-uri", visible_uri]
    argv += ["--artifacts-destination", check_artifacts_destination(spec.artifacts_destination),
             "--host", host, "--port", str(spec.port), "--workers", str(spec.workers)]
    hosts = allowed_hosts(host)
    if hosts:
        argv += ["--allowed-hosts", hosts]
    files: tuple[tuple[str, str], ...] = ()
    warnings: list[str] = []
    if spec.auth is not None:
        auth_env, files = auth_launch(spec.auth, _auth_database(spec.backend_store_uri, visible_uri), environ)
        secret_env = {**secret_env, **auth_env}
        argv += ["--app-name", "basic-auth"]
    elif not is_loopback(host):
        warnings.append(f"warning: the MLflow server on {host} has no authentication: anyone who reaches "
                        f"{host}:{spec.port} can log runs, register models and move the champion alias; "
                        "start it with --auth (docs/tracking_server.md)")
    folders = ()
    if spec.backend_store_uri.startswith("sqlite:///"):
        folders = (str(Path(spec.backend_store_uri[len("sqlite:///"):]).parent),)
    url_host = f"[{_ip(host)}]" if ":" in host else host
    return ServerLaunch(tuple(argv), {**SERVER_ENV, **secret_env}, f"http://{url_host}:{spec.port}", files, folders,
                        tuple(warnings))


def _private_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only: created 0600 with os.open, then renamed over."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)  # an older tmp file of the same name keeps its mode otherwise
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_server_files(launch: ServerLaunch) -> None:
    """Create the launch's folders and private files (config folders 0700, files 0600); just before starting."""
    for folder in launch.folders:
        Path(folder).mkdir(parents=True, exist_ok=True)
    for name, text in launch.files:
        path = Path(name)
        if not path.parent.exists():
            path.parent.mkdir(parents=True, mode=0o700)
        os.chmod(path.parent, 0o700)
        _private_write(path, text)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path | None, timeout_s: float) -> None:
    """Poll ``/health`` until it answers 200; a server that exits or stays silent is an error with its log."""
    deadline = time.monotonic() + timeout_s

    def tail() -> str:
        return log.read_text(errors="replace")[-3000:] if log and log.exists() else ""

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode}:\n{tail()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"mlflow server at {url} not healthy after {timeout_s:.0f}s:\n{tail()}")


def stop_server(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the server's own process group (uvicorn workers are its children), SIGKILL if it lingers."""
    import signal

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def running_server(spec: ServerSpec, log: Path, timeout_s: float = 120.0,
                   environ: Mapping[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start the server in its own process group, wait until healthy, yield (url, process); always stopped."""
    base = dict(os.environ if environ is None else environ)
    launch = server_launch(spec, base)
    write_server_files(launch)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(launch.argv, stdout=out, stderr=subprocess.STDOUT, env={**base, **launch.env},
                                start_new_session=True)
    try:
        wait_healthy(launch.url, proc, log, timeout_s)
        yield launch.url, proc
    finally:
        stop_server(proc)


def serve_forever(spec: ServerSpec) -> None:
    """Replace this process with the server (signals reach it directly); prints the masked command first."""
    launch = server_launch(spec, os.environ)
    for line in launch.warnings:
        print(line, file=sys.stderr, flush=True)
    write_server_files(launch)
    print(f"MLflow tracking server on {launch.url}{' (basic-auth)' if spec.auth else ''}\n  {launch.display()}",
          flush=True)
    os.execve(launch.argv[0], list(launch.argv), {**os.environ, **launch.env})
