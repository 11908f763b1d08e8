"""Spool entries into MLflow, idempotently: an entry applied twice leaves MLflow as if applied once.

The spool (``tracking.spool``) may replay an entry the server already took: the
answer was lost in an outage, or the process died before it recorded the ack.
So every operation checks before it writes:

- runs are found by their tags before one is created (the study run by study and
  role, a trial run by its parent and trial id), as a resumed study re-attaches;
- epoch metrics are stepped by epoch, and a point whose (metric, step) the run
  already has is dropped (first value wins, as for an epoch a restored trial reports
  again); other points are dropped when the same (step, timestamp, value) exists;
- params already on the run are not sent again; tags, artifacts and run states
  simply overwrite;
- a new study best is logged only when it beats the run's current best.

Errors are sorted for the spool's writer: ``refused`` (the server answered no),
``outage`` (it does not answer: wait and retry), ``retry`` (it answers, the call
failed anyway: a few more tries).
"""

from __future__ import annotations

import logging
import math
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from mfcon.tracking.store import (
    ROLE_TAG,
    STUDY_TAG,
    TRIAL_TAG,
    ensure_experiment,
    find_runs,
    no_artifact_progress_bars,
)

log = logging.getLogger(__name__)

# A writer that notices an outage in seconds and retries by itself, instead of MLflow's default of ~7 retries with
# backoff (minutes) inside one call. Process-wide (MLflow reads them per request); values set by the user win.
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
HEALTH_TIMEOUT_S = 2.0
REFUSALS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST",
            "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED", "ENDPOINT_NOT_FOUND"}
MODEL_ERROR_TAG = "mfcon.model_error"  # why a trial has no logged model (promote falls back to its checkpoint)
BATCH = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's log_batch limits


class EntryError(ValueError):
    """An entry that can never be applied (unknown operation, its run or file is gone)."""


def is_server(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


class Replayer:
    """Applies spool entries to one tracking store; remembers which MLflow run each run key became."""

    def __init__(self, tracking_uri: str, study: str, files_dir: Path):
        if is_server(tracking_uri):
            for name, value in CLIENT_ENV.items():
                os.environ.setdefault(name, value)
        self.uri, self.study, self.files_dir = tracking_uri, study, files_dir
        self.client = MlflowClient(tracking_uri)
        self.runs: dict[str, str] = {}  # run key ("study", "study/<trial id>") -> MLflow run id
        self.experiments: dict[str, str] = {}
        self.points_written = self.points_skipped = 0
        self._points: dict[tuple[str, str], dict[int, set[tuple[int, float]]]] = {}  # (run, metric) -> step -> pts
        self._fresh: set[str] = set()  # runs this replayer created: nothing on the server it does not know
        self._ops: dict[str, Callable[[dict[str, Any]], dict[str, Any] | None]] = {
            "start_parent": self._start_parent, "start_child": self._start_child, "log": self._log,
            "best": self._best, "artifact": self._artifact, "terminate": self._terminate,
            "model": self._model, "plots": self._plots}

    def remember(self, resolved: dict[str, tuple[str, str | None]]) -> None:
        for key, (run_id, experiment_id) in resolved.items():
            self.runs[key] = run_id
            if experiment_id:
                self.experiments[self.study] = experiment_id

    def apply(self, entry: dict[str, Any]) -> dict[str, Any] | None:
        op = self._ops.get(entry["op"])
        if op is None:
            raise EntryError(f"unknown spool operation {entry['op']!r} (written by a newer mfcon?)")
        return op(entry)

    def doubt(self, entry: dict[str, Any]) -> None:
        """A failed try may still have reached the server: check what it has before the next one."""
        run_id = self.runs.get(entry["run"])
        if run_id:
            self._fresh.discard(run_id)
            for key in [k for k in self._points if k[0] == run_id]:
                del self._points[key]

    def classify(self, error: Exception) -> str:
        if isinstance(error, (EntryError, FileNotFoundError)) or getattr(error, "error_code", None) in REFUSALS:
            return "refused"
        return "retry" if self.reachable() else "outage"

    def reachable(self) -> bool:
        """The server's ``/health`` answers (a local store is always there)."""
        if not is_server(self.uri):
            return True
        try:
            with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    # ------------------------------------------------------------------ runs

    def _experiment(self, artifact_root: str | None = None) -> str:
        if self.study not in self.experiments:
            self.experiments[self.study] = ensure_experiment(self.client, self.study, artifact_root)
        return self.experiments[self.study]

    def _find(self, key: str) -> str | None:
        """The run a key names, by its tags: ``<role>`` is the study's parent run, ``<role>/<trial>`` a child."""
        role, _, trial = key.partition("/")
        if not trial:
            found = find_runs(self.client, self._experiment(), **{STUDY_TAG: self.study, ROLE_TAG: role})
        else:
            found = find_runs(self.client, self._experiment(),
                              **{MLFLOW_PARENT_RUN_ID: self._run_id(role), TRIAL_TAG: trial})
        return found[0].info.run_id if found else None

    def _run_id(self, key: str) -> str:
        if key not in self.runs:
            found = self._find(key)
            if found is None:
                raise EntryError(f"no MLflow run for {key!r} in experiment {self.study!r}")
            self.runs[key] = found
        return self.runs[key]

    def _attach(self, key: str, create: Callable[[], str]) -> dict[str, Any]:
        run_id = self._find(key)
        if run_id is None:
            run_id = create()
            self._fresh.add(run_id)
        else:
            self.client.update_run(run_id, status="RUNNING")  # re-attached: a resumed study, or a replay
        self.runs[key] = run_id
        return {"run": key, "run_id": run_id, "experiment_id": self._experiment()}

    def _start_parent(self, e: dict[str, Any]) -> dict[str, Any]:
        self._experiment(e.get("artifact_root"))

        def create() -> str:
            tags = {STUDY_TAG: self.study, ROLE_TAG: e["run"]}
            return self.client.create_run(self._experiment(), run_name=e["name"], tags=tags).info.run_id
        return self._attach(e["run"], create)

    def _start_child(self, e: dict[str, Any]) -> dict[str, Any]:
        parent = self._run_id(e["parent"])

        def create() -> str:
            tags = {**e["tags"], MLFLOW_PARENT_RUN_ID: parent}
            return self.client.create_run(self._experiment(), run_name=e["name"], tags=tags).info.run_id
        out = self._attach(e["run"], create)
        params = e.get("params", {})
        if params and out["run_id"] not in self._fresh:  # created by an earlier try whose params may be missing
            existing = self.client.get_run(out["run_id"]).data.params
            params = {k: v for k, v in params.items() if k not in existing}
        self._batches(out["run_id"], params=[Param(k, str(v)) for k, v in params.items()])
        return out

    # ------------------------------------------------------------------ data

    def _log(self, e: dict[str, Any]) -> None:
        run_id = self._run_id(e["run"])
        metrics = [Metric(k, v, ts, step) for k, v, ts, step in e.get("metrics", ())
                   if not self._seen(run_id, k, step, ts, v, per_step=e.get("per_step", False))]
        params = e.get("params", {})
        if params:
            existing = self.client.get_run(run_id).data.params
            params = {k: v for k, v in params.items() if k not in existing}
        tags = [RunTag(k, str(v)) for k, v in e.get("tags", {}).items()]
        self._batches(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()], tags=tags)
        for m in metrics:
            self._points.setdefault((run_id, m.key), {}).setdefault(m.step, set()).add((m.timestamp, m.value))
        self.points_written += len(metrics)
        self.points_skipped += len(e.get("metrics", ())) - len(metrics)

    def _known(self, run_id: str, key: str) -> dict[int, set[tuple[int, float]]]:
        """step -> {(timestamp, value)} of a metric on the server: read once, then kept up to date here."""
        known = self._points.get((run_id, key))
        if known is None:
            known = {}
            if run_id not in self._fresh:
                for m in self.client.get_metric_history(run_id, key):
                    known.setdefault(m.step, set()).add((m.timestamp, m.value))
            self._points[(run_id, key)] = known
        return known

    def _seen(self, run_id: str, key: str, step: int, ts: int, value: float, per_step: bool) -> bool:
        known = self._known(run_id, key)
        return step in known if per_step else (ts, value) in known.get(step, ())

    def _batches(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        metrics, params, tags = list(metrics), list(params), list(tags)
        while metrics or params or tags:
            self.client.log_batch(run_id, metrics=metrics[:BATCH["metrics"]], params=params[:BATCH["params"]],
                                  tags=tags[:BATCH["tags"]])
            metrics, params, tags = metrics[BATCH["metrics"]:], params[BATCH["params"]:], tags[BATCH["tags"]:]

    def _best(self, e: dict[str, Any]) -> None:
        """A new study best as the next step of ``best_<metric>`` (MLflow shows a metric's highest step) + tags."""
        run_id, key, value = self._run_id(e["run"]), e["key"], float(e["value"])
        known = self._known(run_id, key)
        if any((e["ts"], value) in points for points in known.values()):
            return  # this entry, applied before its ack was written
        if known and e.get("mode") in ("min", "max"):
            current = max(known[max(known)])[1]  # the value MLflow shows: highest step, then latest timestamp
            if math.isfinite(current) and not (value < current if e["mode"] == "min" else value > current):
                return  # not better than what the run shows (a stale best after a resume must not overwrite it)
        step = max(known, default=-1) + 1
        self.client.log_batch(run_id, metrics=[Metric(key, value, e["ts"], step)],
                              tags=[RunTag("best_trial", e["trial"]), RunTag(key, repr(value))])
        known.setdefault(step, set()).add((e["ts"], value))

    def _file(self, e: dict[str, Any]) -> Path:
        path = self.files_dir / e["file"]
        if not path.is_file():
            raise EntryError(f"{path}: the spooled copy of a file to upload is missing")
        return path

    def _artifact(self, e: dict[str, Any]) -> None:
        with no_artifact_progress_bars():
            self.client.log_artifact(self._run_id(e["run"]), str(self._file(e)), artifact_path=e.get("path"))

    def _terminate(self, e: dict[str, Any]) -> None:
        self.client.set_terminated(self._run_id(e["run"]), status=e["status"])

    def _model(self, e: dict[str, Any]) -> None:
        """The trial's best epoch as a servable pyfunc model (what ``mfcon promote`` registers); at most once."""
        from mfcon.model_files import MODEL_URI_TAG, log_speaker_model

        run_id = self._run_id(e["run"])
        if MODEL_URI_TAG not in self.client.get_run(run_id).data.tags:
            try:
                log_speaker_model(self.client, run_id, self._file(e), e["feature_config"])
            except Exception as err:  # the checkpoint is logged already; promote falls back to it
                if not self.reachable():
                    raise
                log.warning("run %s: model not logged (%s); promote falls back to its checkpoint", run_id, err)
                self.client.set_tag(run_id, MODEL_ERROR_TAG, str(err)[:5000])
        if e.get("status"):  # an attempt cut short by an outage left the reopened run RUNNING
            self.client.set_terminated(run_id, status=e["status"])

    def _plots(self, e: dict[str, Any]) -> None:
        """DET curve and score histograms of a trial's best epoch, drawn here (off Tune's event loop)."""
        import numpy as np

        from mfcon.study.plot_logging import log_trial_plots

        run_id = self._run_id(e["run"])
        with np.load(self._file(e)) as scores:
            try:
                log_trial_plots(self.client, run_id, scores["scores"], scores["labels"])
            except Exception as err:  # a plot must never stop a study
                if not self.reachable():
                    raise
                log.warning("run %s: plots not logged (%s)", run_id, err)
