"""MLflow's basic-auth app as ``mfcon tracking-server --auth`` runs it: ``basic_auth.ini``, the admin's
password, the app's secret key, and accounts created through the auth REST API.

Secrets reach the server through its environment only (argv is readable by every user of the machine
with ``ps``); files that hold or guard them are written 0600 by ``server.write_server_files``.
:func:`ensure_user` is how the cluster head gives its Ray jobs an account of their own (not the admin)::

    ensure_user("http://10.0.1.23:5000", "ray-jobs", "/var/lib/mfcon-db/mlflow_jobs_password",
                admin_password_file="/var/lib/mfcon-db/mlflow_admin_password")
"""
from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"  # MLflow's basic-auth: the admin created on first start
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"  # MLflow's basic-auth: CSRF key, the same for every worker
AUTH_INI, AUTH_DB, SECRET_KEY_FILE = "basic_auth.ini", "basic_auth.db", "flask_secret_key"
DEFAULT_PERMISSION = "READ"  # a signed-in user without a grant reads; writing needs EDIT/MANAGE granted
PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")


class ServerConfigError(ValueError):
    """The server cannot be started as asked; the message names the option."""


@dataclass(frozen=True)
class AuthSpec:
    """MLflow's basic-auth app: where its config lives, who the admin is, where users and grants are stored.

    ``config_dir`` holds ``basic_auth.ini`` (written 0600; it names no password) and, unless
    ``MLFLOW_FLASK_SERVER_SECRET_KEY`` is set, a generated ``flask_secret_key`` (0600).
    ``database_uri`` defaults to ``basic_auth.db`` beside a SQLite tracking database, or the
    tracking database itself for PostgreSQL (MLflow keeps the auth tables and their own
    migration table, ``alembic_version_auth``, apart). The admin password comes from
    ``admin_password_file`` (owner-only) or ``MLFLOW_AUTH_ADMIN_PASSWORD``, never from argv.
    """

    config_dir: str
    admin_username: str = "admin"
    admin_password_file: str | None = None
    database_uri: str | None = None
    default_permission: str = DEFAULT_PERMISSION


def read_secret_file(path: str | Path, option: str) -> str:
    """A secret from a file only its owner can read (first line, stripped); anything else is a clear error."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as e:
        raise ServerConfigError(f"{option} {path}: cannot be read ({e.strerror})") from None
    if mode & 0o077:
        raise ServerConfigError(f"{option} {path}: readable by other users (mode {mode & 0o777:o}); "
                                f"run: chmod 600 {shlex.quote(str(path))}")
    if not text:
        raise ServerConfigError(f"{option} {path}: is empty")
    return text.splitlines()[0].strip()


def auth_launch(auth: AuthSpec, default_database: str | None, environ: Mapping[str, str]
                ) -> tuple[dict[str, str], tuple[tuple[str, str], ...]]:
    """The environment and files of MLflow's basic-auth app (admin password and secret key: environment only).

    ``default_database``: where users and grants go unless ``auth.database_uri`` says (None: no default)."""
    config_dir = Path(auth.config_dir).expanduser()
    if not config_dir.is_absolute():
        raise ServerConfigError(f"--auth-dir {auth.config_dir!r}: give an absolute folder")
    if auth.default_permission not in PERMISSIONS:
        raise ServerConfigError(f"--default-permission {auth.default_permission!r}: one of {', '.join(PERMISSIONS)}")
    if auth.default_permission in ("EDIT", "MANAGE"):
        raise ServerConfigError(f"--default-permission {auth.default_permission}: every signed-in user could then "
                                "write every experiment and move every alias; grant EDIT/MANAGE per user instead")
    if not auth.admin_username or not re.fullmatch(r"[A-Za-z0-9_.@-]+", auth.admin_username):
        raise ServerConfigError(f"--admin-username {auth.admin_username!r}: letters, digits and _.@- only")
    if auth.admin_password_file:
        password = read_secret_file(auth.admin_password_file, "--admin-password-file")
    elif environ.get(ADMIN_PASSWORD_ENV):
        password = environ[ADMIN_PASSWORD_ENV]
    else:
        raise ServerConfigError(f"--auth needs the admin's password: --admin-password-file FILE (mode 0600) or "
                                f"${ADMIN_PASSWORD_ENV} in the environment (never on the command line)")
    database = auth.database_uri or default_database
    if database is None:
        raise ServerConfigError("--auth: give --auth-database-uri for this backend store (the auth database "
                                    "must not carry a password in its URI)")
    if urlsplit(database).password is not None:
        from mfcon.storage import mask_uri

        raise ServerConfigError(f"--auth-database-uri {mask_uri(database)!r}: no password in the URI; PostgreSQL "
                                "reads PGPASSWORD")
    ini = "\n".join(["[mlflow]", f"default_permission = {auth.default_permission}", f"database_uri = {database}",
                     f"admin_username = {auth.admin_username}",
                     "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
                     "grant_default_workspace_access = false", ""])
    files = [(str(config_dir / AUTH_INI), ini)]
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(config_dir / AUTH_INI), ADMIN_PASSWORD_ENV: password,
           "MLFLOW_AUTH_ADMIN_USERNAME": auth.admin_username}
    key_file = config_dir / SECRET_KEY_FILE
    if environ.get(SECRET_KEY_ENV):
        env[SECRET_KEY_ENV] = environ[SECRET_KEY_ENV]
    elif key_file.is_file():
        env[SECRET_KEY_ENV] = read_secret_file(key_file, "the server's secret key")
    else:
        import secrets

        env[SECRET_KEY_ENV] = secrets.token_urlsafe(32)
        files.append((str(key_file), env[SECRET_KEY_ENV] + "\n"))
    return env, tuple(files)


def ensure_user(url: str, username: str, password_file: str | Path, admin_password_file: str | Path,
                admin_username: str = "admin") -> str:
    """Make ``username`` a non-admin account whose password is the one in ``password_file`` (0600): created
    when missing, its password set again when it exists (so a restored database and the file agree).
    Returns "created" or "kept". The admin signs in with the password in ``admin_password_file``.

    What the account may do is MLflow's default: read everything (``default_permission``), create
    experiments and registered models, and MANAGE whatever it creates (runs, versions, aliases in it).
    """
    from mlflow.exceptions import RestException
    from mlflow.utils.rest_utils import MlflowHostCreds, http_request, verify_rest_response

    creds = MlflowHostCreds(url, username=admin_username,
                            password=read_secret_file(admin_password_file, "the admin password file"))
    password = read_secret_file(password_file, f"{username}'s password file")

    def call(endpoint: str, method: str, **kwargs) -> None:
        verify_rest_response(http_request(creds, endpoint, method, **kwargs), endpoint)

    try:
        call("/api/2.0/mlflow/users/get", "GET", params={"username": username})
    except RestException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        call("/api/2.0/mlflow/users/create", "POST", json={"username": username, "password": password})
        return "created"
    call("/api/2.0/mlflow/users/update-password", "PATCH", json={"username": username, "password": password})
    return "kept"
