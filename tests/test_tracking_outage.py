"""Fault injection: a real study whose ``mlflow server`` is stopped three times while trials train.

Each outage lasts longer than the MLflow client's retry window. Tracking must
neither block Tune nor stop it: the study finishes, Tune keeps handling results
during the outages, and afterwards MLflow holds one run per trial with every
epoch's metrics exactly once, equal to what Tune recorded.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import pytest
from mfcon.study.runner import run_study, study_paths
from mfcon.tracking import TRIAL_METRICS, open_spool, spool_dir
from mfcon.tracking.replay import CLIENT_ENV
from mfcon.tracking.spool_file import read_lines
from mlflow.tracking import MlflowClient
from mlflow_fixtures import MlflowServer

pytestmark = pytest.mark.slow

OUTAGES, DOWN_S, UP_S = 3, 3.0, 6.0  # server down >= DOWN_S (plus its restart), then up >= UP_S

SPACE = """
name: outage
base:
  model_preset: tiny
  epochs: 4
  data: {speakers_per_batch: 4, utts_per_speaker: 2, crop_seconds: 1.0}
  optim: {lr: 0.003, warmup_steps: 2}
params:
  loss.mfcon_weight: {type: loguniform, low: 0.01, high: 1.0}
budget: {num_samples: 2, max_concurrent_trials: 2, grace_period: 4, reduction_factor: 2, seed: 0, baseline: false}
resources: {num_workers: 1, cpus_per_worker: 1}
"""


class OutageInjector(threading.Thread):
    """Once the first epoch result is spooled, stops the server ``OUTAGES`` times; records each outage."""

    def __init__(self, server: MlflowServer, spool_folder: Path):
        super().__init__(daemon=True, name="outage-injector")
        self.server, self.spool_folder = server, spool_folder
        self.outages: list[tuple[float, float]] = []  # (down at, up again at), epoch seconds
        self.error: BaseException | None = None

    def first_result_spooled(self) -> bool:
        return any(e.get("op") == "log" and e.get("per_step") for f in self.spool_folder.glob("*.jsonl")
                   for e in read_lines(f))

    def run(self) -> None:
        try:
            while not self.first_result_spooled():
                time.sleep(0.5)
            for _ in range(OUTAGES):
                down = time.time()
                self.server.stop()
                time.sleep(DOWN_S)
                self.server.start()
                self.outages.append((down, time.time()))
                time.sleep(UP_S)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


def retry_window_s() -> float:
    """The longest one MLflow call can keep retrying a stopped server under the spool's client settings."""
    retries, factor = int(CLIENT_ENV["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]), float(
        CLIENT_ENV["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
    return sum(factor * 2**i + 1.0 for i in range(retries))  # backoff plus jitter (<= 1 s) per retry


def tune_history(experiment_dir: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """trial id -> metric -> [(epoch, value)] as Tune recorded them."""
    from ray.tune import ExperimentAnalysis

    out = {}
    for df in ExperimentAnalysis(experiment_dir).trial_dataframes.values():
        trial = str(df["trial_id"].iloc[0])
        out[trial] = {k: sorted((int(e), float(v)) for e, v in zip(df["epoch"], df[k], strict=True)
                                if math.isfinite(v)) for k in TRIAL_METRICS if k in df}
    return out


def test_study_survives_three_tracking_outages_and_logs_every_epoch_once(ray_local_2cpu, small_data, tmp_path):
    assert DOWN_S > retry_window_s()
    server = MlflowServer(tmp_path / "server-store")
    (tmp_path / "server-store").mkdir()
    server.start()
    space = tmp_path / "outage.yaml"
    space.write_text(SPACE)
    injector = OutageInjector(server, spool_dir(tmp_path / "work", "outage"))
    injector.start()
    try:
        started = time.time()
        summary = run_study(space, small_data, workdir=tmp_path / "work", tracking_uri=server.url)
        injector.join(timeout=180)
        assert injector.error is None, injector.error
        assert len(injector.outages) == OUTAGES, "the study ended before every outage was injected"
        assert summary.num_trials == 2 and summary.states.get("failed", 0) == 0, summary.states
        spool = open_spool(tmp_path / "work", "outage", server.url)
        assert spool.close(120) == 0, "writes still pending after the server came back"

        client = MlflowClient(server.url)
        exp = client.get_experiment_by_name("outage")
        runs = client.search_runs([exp.experiment_id], max_results=100)
        parents = [r for r in runs if r.data.tags.get("mfcon.role") == "study"]
        children = [r for r in runs if r.data.tags.get("mfcon.role") == "trial"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        trial_ids = sorted(c.data.tags["mfcon.trial_id"] for c in children)
        assert len(children) == 2 and len(set(trial_ids)) == 2, trial_ids  # one run per trial
        logged = {c.data.tags["mfcon.trial_id"]: {k: sorted((m.step, m.value) for m in client.get_metric_history(
            c.info.run_id, k)) for k in (*TRIAL_METRICS, "startup_request_seconds")} for c in children}
        recorded = tune_history(study_paths(tmp_path / "work", "outage")["experiment"])
        assert sorted(recorded) == trial_ids
        for trial, metrics in recorded.items():
            # The driver adds the wait from Tune's request to the worker's start-up before logging it.
            (_, request_s), = logged[trial]["startup_request_seconds"]
            metrics["startup_seconds"] = [(e, v + request_s) for e, v in metrics["startup_seconds"]]
            for key, points in metrics.items():  # every epoch, exactly once, Tune's values
                assert [e for e, _ in logged[trial][key]] == [e for e, _ in points], (trial, key)
                assert [v for _, v in logged[trial][key]] == pytest.approx([v for _, v in points]), (trial, key)
            assert [e for e, _ in metrics["dev_eer"]] == list(range(1, 5))
        for child in children:
            assert child.data.tags["mfcon.trial_state"] == "completed" and child.info.status == "FINISHED"
            assert [a.path for a in client.list_artifacts(child.info.run_id, "checkpoint")] == ["checkpoint/best.pt"]

        # Tune kept handling results while the server was down: epochs were logged with times inside outages.
        stamps = [m.timestamp / 1000 for c in children for m in client.get_metric_history(c.info.run_id, "dev_eer")]
        during = [t for t in stamps if any(down <= t <= up for down, up in injector.outages)]
        assert during, f"no result handled during an outage: {injector.outages} vs {sorted(stamps)}"
        print(f"study {time.time() - started:.0f} s, outages {[round(u - d, 1) for d, u in injector.outages]} s, "
              f"{len(during)} of {len(stamps)} epochs reported during one")
    finally:
        injector.join(timeout=60)
        server.stop()
