"""A replication's result on its MLflow run: the JSON table, per-configuration metrics of every test list, the
verdict, best configuration and seeds as tags, and the replication plot."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from mfcon.evaluation.verdicts import ConfigVerdict
from mfcon.plots import replication_plot
from mfcon.study.plot_logging import log_figures
from mfcon.tracking import REPLICATION_FILE

if TYPE_CHECKING:
    from mfcon.study.replicate import ReplicationResult

BASELINE = "baseline"  # the label of the lambda = 0 configuration in every replication


def _interval(d) -> dict[str, Any] | None:
    """The verdict's interval as JSON (every field of the paired interval)."""
    if d is None:
        return None
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(d).items()}


def _verdict_metrics(verdicts: dict[str, ConfigVerdict], prefix: str, now: int) -> list[Metric]:
    """``<prefix>_eer_mean.<label>``, ``..._sd``, ``<prefix>_min_dcf_mean``, and ``delta_<prefix>_eer`` (+ CI)."""
    metrics = []
    for label, v in verdicts.items():
        metrics += [Metric(f"{prefix}_eer_mean.{label}", v.eer_mean, now, 0),
                    Metric(f"{prefix}_eer_sd.{label}", v.eer_std, now, 0),
                    Metric(f"{prefix}_min_dcf_mean.{label}", v.min_dcf_mean, now, 0)]
        if v.delta is not None:
            metrics += [Metric(f"delta_{prefix}_eer.{label}", v.delta.estimate, now, 0),
                        Metric(f"delta_{prefix}_eer_low.{label}", v.delta.low, now, 0),
                        Metric(f"delta_{prefix}_eer_high.{label}", v.delta.high, now, 0)]
    return metrics


def log_replication(client: MlflowClient, r: ReplicationResult) -> None:
    """``replication.json``, the per-list metrics, the verdict tags and the plot on the replication run."""
    table = {"study": r.study, "best": r.best, "verdict": r.verdict(), "n_trials": r.n_trials,
             "n_speakers": r.n_speakers, "epochs": r.epochs, "metric": r.metric,
             "seeds": sorted({s for runs in r.replica_runs.values() for s, _ in runs}),
             "configs": {label: {"params": v.params, "seeds": [s for s, _ in r.replica_runs[label]],
                                 "runs": [run for _, run in r.replica_runs[label]], "test_eer": list(v.test_eer),
                                 "test_min_dcf": list(v.test_min_dcf), "delta_eer": _interval(v.delta)}
                         for label, v in r.verdicts.items()}}
    table["decided_on"] = r.decided_on
    if r.lists:
        table["lists"] = {name: {"n_trials": r.list_trials[name][0], "n_speakers": r.list_trials[name][1],
                                 "configs": {label: {"test_eer": list(v.test_eer), "test_min_dcf": list(v.test_min_dcf),
                                                     "delta_eer": _interval(v.delta)} for label, v in verdicts.items()}}
                          for name, verdicts in r.lists.items()}
    client.log_dict(r.run_id, table, REPLICATION_FILE)
    now = int(time.time() * 1000)
    metrics = _verdict_metrics(r.verdicts, "test", now)
    for name, verdicts in r.lists.items():
        metrics += _verdict_metrics(verdicts, f"test_{name}", now)
    client.log_batch(r.run_id, metrics=metrics)
    client.set_tag(r.run_id, "mfcon.verdict", r.verdict())
    client.set_tag(r.run_id, "mfcon.replication_best", r.best or "")
    client.set_tag(r.run_id, "mfcon.replication_seeds", ",".join(map(str, table["seeds"])))
    log_figures(client, r.run_id, {"replication": replication_plot(r.verdicts, BASELINE)})
