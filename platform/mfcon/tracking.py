"""MLflow at the edge: tracking URI resolution, the study's parent run, a child run per trial.

Trial runs are written by a Tune callback on the driver, not by workers: the
driver sees every trial, including ones ASHA stopped or that crashed, so every
trial appears in MLflow with its final state, and a resumed study re-attaches
to the runs it already has instead of duplicating them.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

STUDY_TAG, ROLE_TAG, TRIAL_TAG, STATE_TAG = "mfcon.study", "mfcon.role", "mfcon.trial_id", "mfcon.trial_state"
TRIAL_METRICS = ("train_loss", "margin_loss", "mfcon_loss", "eer", "min_dcf", "min_dcf_005", "lr", "startup_seconds",
                 "train_seconds")


@contextlib.contextmanager
def no_artifact_progress_bars() -> Iterator[None]:
    """MLflow draws a tqdm bar per artifact upload/download; studies, reports and the CLI do not want them."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached; raised before any training starts."""


def default_tracking_uri(workdir: str | Path) -> str:
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(explicit: str | None, workdir: str | Path) -> str:
    """--tracking-uri, then MLFLOW_TRACKING_URI, then an embedded SQLite store in the workdir."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workdir)


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast: a server that does not answer, or a store that cannot be opened, stops the study here."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                if resp.status != 200:
                    raise TrackingUnavailable(f"MLflow tracking server {uri} answered {resp.status} on /health")
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingUnavailable(f"MLflow tracking server {uri} is unreachable ({reason}); "
                                      "start it, or drop --tracking-uri to use the embedded SQLite store") from None
        return
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:
        raise TrackingUnavailable(f"MLflow tracking store {uri} cannot be opened: {e}") from None


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
                             timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def find_runs(client: MlflowClient, experiment_id: str, **tags: str) -> list:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs([experiment_id], filter_string=query, max_results=1000)


class StudyTracker:
    """The study's parent run: search space, code version, data hash, best trial so far."""

    def __init__(self, tracking_uri: str, study: str, workdir: str | Path):
        self.uri, self.study = tracking_uri, study
        self.client = MlflowClient(tracking_uri)
        self.experiment_id = ensure_experiment(self.client, study, artifact_root_for(tracking_uri, workdir))
        self.parent_run_id = self._parent_run()

    def _parent_run(self) -> str:
        existing = find_runs(self.client, self.experiment_id, **{STUDY_TAG: self.study, ROLE_TAG: "study"})
        if existing:
            run_id = existing[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=f"study-{self.study}",
                                     tags={STUDY_TAG: self.study, ROLE_TAG: "study"})
        return run.info.run_id

    def log_study_inputs(self, space_file: Path, base_params: dict[str, Any], data_hash: str) -> None:
        tags = {"mfcon.code_version": code_version(), "mfcon.data_manifest_sha256": data_hash,
                "mfcon.search_space": space_file.name}
        self.client.log_batch(self.parent_run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        existing = self.client.get_run(self.parent_run_id).data.params
        params = [Param(f"base.{k}", str(v)[:6000]) for k, v in flatten(base_params).items() if f"base.{k}" not in existing]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.parent_run_id, params=params[i : i + 100])
        self.client.log_artifact(self.parent_run_id, str(space_file), artifact_path="search_space")

    def log_best(self, trial_id: str, metrics: dict[str, float], metric: str, step: int) -> None:
        self.client.set_tag(self.parent_run_id, "best_trial", trial_id)
        self.client.log_metric(self.parent_run_id, f"best_{metric}", metrics[metric], step=step)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_run_id, status=status)


class TrialRuns:
    """Child runs keyed by Tune trial id, re-attached after a resume."""

    def __init__(self, tracker: StudyTracker):
        self.tracker, self.client = tracker, tracker.client
        self.run_ids: dict[str, str] = {}
        self.logged_epochs: dict[str, int] = {}
        for run in find_runs(self.client, tracker.experiment_id, **{MLFLOW_PARENT_RUN_ID: tracker.parent_run_id}):
            trial_id = run.data.tags.get(TRIAL_TAG)
            if trial_id:
                self.run_ids[trial_id] = run.info.run_id
                history = self.client.get_metric_history(run.info.run_id, "train_loss")
                self.logged_epochs[trial_id] = max((m.step for m in history), default=0)

    def start(self, trial_id: str, params: dict[str, Any]) -> str:
        if trial_id in self.run_ids:
            self.client.update_run(self.run_ids[trial_id], status="RUNNING")
            return self.run_ids[trial_id]
        run = self.client.create_run(self.tracker.experiment_id, run_name=f"trial-{trial_id}", tags={
            MLFLOW_PARENT_RUN_ID: self.tracker.parent_run_id, STUDY_TAG: self.tracker.study,
            ROLE_TAG: "trial", TRIAL_TAG: trial_id, STATE_TAG: "running"})
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        self.run_ids[trial_id] = run.info.run_id
        self.logged_epochs[trial_id] = 0
        return run.info.run_id

    def log_epoch(self, trial_id: str, result: dict[str, Any], timestamp_ms: int) -> None:
        epoch = int(result.get("epoch", 0))
        if trial_id not in self.run_ids or epoch <= self.logged_epochs.get(trial_id, 0):
            return  # replayed after a resume: already logged
        metrics = [Metric(k, float(result[k]), timestamp_ms, epoch) for k in TRIAL_METRICS
                   if isinstance(result.get(k), (int, float)) and math.isfinite(result[k])]
        self.client.log_batch(self.run_ids[trial_id], metrics=metrics)
        self.logged_epochs[trial_id] = epoch

    def finish(self, trial_id: str, state: str, checkpoint_file: str | None = None) -> None:
        run_id = self.run_ids.get(trial_id)
        if run_id is None:
            return
        if checkpoint_file:
            self.client.log_artifact(run_id, checkpoint_file, artifact_path="checkpoint")
        self.client.set_tag(run_id, STATE_TAG, state)
        status = {"completed": "FINISHED", "pruned": "FINISHED", "failed": "FAILED"}.get(state, "KILLED")
        self.client.set_terminated(run_id, status=status)
