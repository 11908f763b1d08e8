"""The tracking store and its layout: URI resolution, fail-fast checks, experiments, run lookup.

Tag names and artifact folders are defined here once, because both the writers
(``tracking.runs``) and the readers (``tracking.records``) depend on them; the
layout itself is described in docs/ARCHITECTURE.md, "Study outputs".
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from mlflow.tracking import MlflowClient

from mfcon.model_files import quiet_artifacts
from mfcon.names import SEED_KEY

STUDY_TAG, ROLE_TAG, TRIAL_TAG, STATE_TAG = "mfcon.study", "mfcon.role", "mfcon.trial_id", "mfcon.trial_state"
PLOTS_DIR = "plots"  # artifact folder on trial and study runs
REPLICATION_FILE = "replication.json"  # the replication run's table
BASELINE_TAG = "mfcon.baseline"  # "true" on a study's lambda = 0 reference trials
METRIC_TAG = "mfcon.metric"  # on the study run: the space's metric (what "best" means for every reader)
SEED_PARAM = SEED_KEY  # a trial run's param: its own training seed, when not the space's base seed
SPACE_DIR = "search_space"  # artifact folder of the study's search-space YAML on the parent run


# MLflow draws a tqdm bar per artifact upload/download; studies, reports and the CLI do not want them.
no_artifact_progress_bars = quiet_artifacts


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached; raised before any training starts."""


def default_tracking_uri(workdir: str | Path) -> str:
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(explicit: str | None, workdir: str | Path) -> str:
    """--tracking-uri, then MLFLOW_TRACKING_URI, then an embedded SQLite store in the workdir."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workdir)


_DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}  # default ports of database stores
_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/@:]*):[^\s/@]*@")


def masked(text: str) -> str:
    """``scheme://user:***@host``: every URI password in ``text`` hidden, for messages and logs."""
    return _PASSWORD.sub(r"\1:***@", text)


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast: a server that does not answer, or a store that cannot be opened, stops the study here."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                if resp.status != 200:
                    raise TrackingUnavailable(f"MLflow tracking server {masked(uri)} answered {resp.status} on /health")
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingUnavailable(f"MLflow tracking server {masked(uri)} is unreachable ({reason}); "
                                      "start it, or drop --tracking-uri to use the embedded SQLite store") from None
        return
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    _probe_database(uri, timeout_s)
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure to open the store means the same to a user
        raise TrackingUnavailable(f"MLflow tracking store {masked(uri)} cannot be opened: {masked(str(e))}") from None


def _probe_database(uri: str, timeout_s: float) -> None:
    """A database store whose host:port takes no connection: fail now, not after MLflow's minutes of retries."""
    parts = urlsplit(uri)
    port = parts.port or _DB_PORTS.get(parts.scheme.split("+")[0])
    if not parts.hostname or port is None:  # sqlite, a unix socket (?host=/run/postgresql), an unknown scheme
        return
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise TrackingUnavailable(f"MLflow tracking store {masked(uri)} is unreachable ({parts.hostname}:{port}: "
                                  f"{e.strerror or e}); start the database or fix --tracking-uri") from None


def artifact_root_for(uri: str, workdir: str | Path) -> str | None:
    """Embedded stores keep artifacts beside the database; servers choose their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def ensure_experiment(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = f"{artifact_root}/{name}" if artifact_root else None
    return client.create_experiment(name, artifact_location=location)


def code_version() -> str:
    """Git commit of the working tree when there is one, else the package version."""
    from mfcon import __version__

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=False, timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def find_runs(client: MlflowClient, experiment_id: str, **tags: str) -> list:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs([experiment_id], filter_string=query, max_results=1000)
