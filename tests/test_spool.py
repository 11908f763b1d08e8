"""The tracking spool against a real ``mlflow server`` that the tests stop and start again.

Writes during an outage return at once; the spool outlives the process that wrote
it; replay after a restart, after lost acks or by ``mfcon sync`` gives every metric
point exactly once and one run per trial; a second sync is a no-op.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mfcon.cli import tracking as tracking_cli
from mfcon.cli.common import run as run_command
from mfcon.tracking import SpoolBusy, StudyTracker, TrackingWriteError, TrialRuns, spool_dir
from mfcon.tracking.spool_file import read_lines
from mfcon.tracking.sync import sync_study
from mlflow.tracking import MlflowClient
from mlflow_fixtures import MlflowServer, epoch_result

pytestmark = pytest.mark.slow
EPOCH_KEYS = ("dev_eer", "dev_min_dcf", "train_loss", "lr")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def running(server):
    """The server, up at the start of the test (a test that stops it need not restart it)."""
    if not server.healthy():
        server.start()
    return server


def histories(uri: str, study: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """trial id -> metric -> [(step, value)] of every trial run, sorted; run names must be unique per trial."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`mfcon.role` = 'trial'")
    trial_ids = [r.data.tags["mfcon.trial_id"] for r in runs]
    assert len(trial_ids) == len(set(trial_ids)), f"more than one run per trial: {trial_ids}"
    return {r.data.tags["mfcon.trial_id"]: {k: sorted((m.step, m.value) for m in client.get_metric_history(
        r.info.run_id, k)) for k in EPOCH_KEYS} for r in runs}


def expected(eers: dict[str, list[float]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    return {t: {k: [(e, float(epoch_result(v, e)[k])) for e, v in enumerate(vals, start=1)] for k in EPOCH_KEYS}
            for t, vals in eers.items()}


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_writes_during_an_outage_return_at_once_and_arrive_exactly_once(running, tmp_path):
    tracker = StudyTracker(running.url, "outage", tmp_path, wait_s=0)
    runs = TrialRuns(tracker)
    runs.start("t0", {"loss.mfcon_weight": 0.5})
    eers = [30.0, 27.0, 29.0, 22.0, 21.0, 25.0, 18.0]
    for epoch, eer in enumerate(eers[:2], start=1):
        runs.log_epoch("t0", epoch_result(eer, epoch), 1_700_000_000_000 + epoch)
    assert tracker.spool.flush(60)

    running.stop()
    slowest = 0.0
    for epoch, eer in enumerate(eers[2:], start=3):
        started = time.perf_counter()
        runs.log_epoch("t0", epoch_result(eer, epoch), 1_700_000_000_000 + epoch)
        tracker.log_best("t0", eer, "dev_eer", mode="min")
        slowest = max(slowest, time.perf_counter() - started)
    wait_for(lambda: tracker.spool.in_outage, 30, "the writer to notice the outage")
    runs.log_epoch("t0", epoch_result(eers[-1], len(eers)), 1_700_000_000_000 + len(eers))  # again: replayed epoch
    assert slowest < 0.5, f"a write took {slowest:.2f} s with the server down"
    assert tracker.pending() >= 2 * (len(eers) - 2)

    running.start()
    runs.finish("t0", "completed")
    tracker.finish()
    assert not tracker.close(timeout_s=120), "the spool did not drain after the server came back"
    assert histories(running.url, "outage") == expected({"t0": eers})
    client = MlflowClient(running.url)
    parent = client.search_runs([client.get_experiment_by_name("outage").experiment_id],
                                filter_string="tags.`mfcon.role` = 'study'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    best = client.get_metric_history(parent[0].info.run_id, "best_dev_eer")
    assert sorted((m.step, m.value) for m in best) == [(0, 29.0), (1, 22.0), (2, 21.0), (3, 18.0)]


WRITER = """
import os, sys, time
from mfcon.tracking import StudyTracker, TrialRuns
sys.path.insert(0, {tests!r})
from mlflow_fixtures import epoch_result

tracker = StudyTracker({uri!r}, "crashed", {workdir!r}, wait_s=0)
runs = TrialRuns(tracker)
for trial, eers in {eers!r}.items():
    runs.start(trial, {{"loss.mfcon_weight": 0.1}})
    for epoch, eer in enumerate(eers, start=1):
        runs.log_epoch(trial, epoch_result(eer, epoch), 1_700_000_000_000 + epoch)
runs.finish("t0", "completed")  # t1 is still running when the process dies
print("written", tracker.pending(), flush=True)
time.sleep(600)
"""


def test_a_spool_outlives_its_process_and_mfcon_sync_replays_it_once(running, tmp_path, capsys):
    eers = {"t0": [30.0, 25.0, 20.0], "t1": [35.0, 33.0]}
    running.stop()  # the whole life of the writing process is one outage
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(Path(__file__).parent), uri=running.url, workdir=str(tmp_path),
                                    eers=eers))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("written"), line
        assert int(line.split()[1]) == 1 + 2 + 5 + 2  # study run, 2 trial runs, 5 epochs, t0's state tag + end
        with pytest.raises(SpoolBusy, match=f"process {proc.pid}"):
            sync_study(tmp_path, "crashed", timeout_s=1)  # the study still holds its spool
    finally:
        proc.send_signal(signal.SIGKILL)  # a crash: no finish, no close
        proc.wait()

    running.start()
    parser = argparse.ArgumentParser(prog="mfcon")
    tracking_cli.add_commands(parser.add_subparsers(dest="command", required=True))
    assert run_command(parser.parse_args(["sync", "--workdir", str(tmp_path), "--name", "crashed"])) == 0
    first = capsys.readouterr().out
    assert "replayed 12 writes (35 metric points, 0 already there), 0 refused, 2 runs left RUNNING by a crash " \
           "marked FAILED; 0 still pending" in first, first
    assert histories(running.url, "crashed") == expected(eers)
    client = MlflowClient(running.url)
    states = {r.data.tags.get("mfcon.trial_id", "study"): (r.info.status, r.data.tags.get("mfcon.trial_state"))
              for r in client.search_runs([client.get_experiment_by_name("crashed").experiment_id])}
    assert states == {"study": ("FAILED", None), "t0": ("FINISHED", "completed"), "t1": ("FAILED", "running")}

    assert run_command(parser.parse_args(["sync", "--workdir", str(tmp_path), "--name", "crashed"])) == 0
    assert "nothing to replay (12 writes, all in" in capsys.readouterr().out
    assert histories(running.url, "crashed") == expected(eers)


def test_replay_after_lost_acks_logs_nothing_twice(running, tmp_path):
    """A process that dies after MLflow took its writes but before it recorded so replays them all."""
    eers = {"t0": [30.0, 25.0, 26.0], "t1": [28.0, 24.0]}
    tracker = StudyTracker(running.url, "lost-acks", tmp_path)  # waits: every write is in MLflow on return
    runs = TrialRuns(tracker)
    best = None
    for trial, values in eers.items():
        runs.start(trial, {"optim.lr": 0.003})
        for epoch, eer in enumerate(values, start=1):
            runs.log_epoch(trial, epoch_result(eer, epoch), 1_700_000_000_000 + epoch)
            if best is None or eer < best:
                best = eer
                tracker.log_best(trial, eer, "dev_eer", mode="min")
        runs.finish(trial, "completed")
    tracker.finish()
    assert not tracker.close(30)
    client = MlflowClient(running.url)
    parent_id = tracker.parent_run_id
    before = sorted((m.step, m.value) for m in client.get_metric_history(parent_id, "best_dev_eer"))

    spool_file = next(spool_dir(tmp_path, "lost-acks").glob("*.jsonl"))
    lines = spool_file.read_text().splitlines(keepends=True)
    spool_file.write_text("".join(line for line in lines if '"ack"' not in line))
    reports = sync_study(tmp_path, "lost-acks", timeout_s=60)
    assert [(r.pending_before, r.replayed, r.points_written, r.refused, r.pending) for r in reports] == \
        [(len([x for x in lines if '"seq"' in x]), len([x for x in lines if '"seq"' in x]), 0, 0, 0)]
    assert reports[0].points_skipped == 5 * 7  # 5 epochs of the 7 reported metrics, all there already
    assert histories(running.url, "lost-acks") == expected(eers)
    assert sorted((m.step, m.value) for m in client.get_metric_history(parent_id, "best_dev_eer")) == before
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name("lost-acks").experiment_id])) == 3


def test_a_line_torn_by_a_crash_is_dropped_and_the_rest_replays(tmp_path):
    """A crash in the middle of an append leaves half a line, which was never acknowledged to its writer."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = StudyTracker(uri, "torn", tmp_path)
    runs = TrialRuns(tracker)
    runs.start("t0", {})
    runs.log_epoch("t0", epoch_result(30.0, 1), 1_700_000_000_001)
    assert not tracker.close(30)
    spool_file = next(spool_dir(tmp_path, "torn").glob("*.jsonl"))
    with open(spool_file, "a") as f:
        f.write(json.dumps({"seq": 99, "op": "log", "run": "study/t0"})[:25])  # no newline: torn
    runs.log_epoch("t0", epoch_result(20.0, 2), 1_700_000_000_002)  # reopens the spool
    runs.finish("t0", "completed")
    assert not tracker.close(30)
    assert all("seq" in r or "ack" in r or "spool" in r for r in read_lines(spool_file))
    assert histories(uri, "torn") == expected({"t0": [30.0, 20.0]})


def test_a_write_the_server_refuses_is_reported_and_skipped(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = StudyTracker(uri, "refused", tmp_path)
    with pytest.raises(TrackingWriteError, match="no MLflow run for 'study/ghost'"):
        tracker.write("log", "study/ghost", tags={"x": "1"})
    runs = TrialRuns(tracker)
    runs.start("t0", {})  # the spool goes on after a refused entry
    runs.log_epoch("t0", epoch_result(30.0, 1), 1_700_000_000_001)
    assert not tracker.close(30)
    assert histories(uri, "refused") == expected({"t0": [30.0]})
    assert os.path.exists(next(spool_dir(tmp_path, "refused").glob("*.jsonl")))


def test_sync_names_a_study_without_a_spool(tmp_path):
    with pytest.raises(ValueError, match=r"no tracking spool for study 'nope' under .* \(looked in .*nope"):
        sync_study(tmp_path, "nope")


def test_credentials_in_the_tracking_uri_never_reach_the_spool(tmp_path):
    from mlflow_fixtures import free_port

    uri = f"http://alice:s3cret-pw@127.0.0.1:{free_port()}"  # nothing listens: every write stays spooled
    tracker = StudyTracker(uri, "secret", tmp_path, wait_s=0)
    TrialRuns(tracker).start("t0", {"a": 1})
    pending = tracker.close(timeout_s=0)
    assert pending.count == 2 and "s3cret" not in pending.message() and "alice" not in pending.message()
    files = [f for f in spool_dir(tmp_path, "secret").rglob("*") if f.is_file()]
    assert files and not any("s3cret" in f.name or b"s3cret" in f.read_bytes() for f in files)


def test_a_failing_study_marks_its_run_failed_and_never_hides_its_error(running, tmp_path, caplog):
    with pytest.raises(ValueError, match="no such data"), StudyTracker(running.url, "fails", tmp_path):
        raise ValueError("no such data")  # e.g. Ray or the Tuner failing before any trial started
    client = MlflowClient(running.url)
    (run,) = client.search_runs([client.get_experiment_by_name("fails").experiment_id])
    assert run.info.status == "FAILED"

    from mlflow_fixtures import free_port

    started = time.monotonic()
    gone = f"http://127.0.0.1:{free_port()}"  # the server is gone too: still the study's own error
    with pytest.raises(ValueError, match="no such data"), StudyTracker(gone, "fails", tmp_path) as tracker:
        tracker.drain_s = 1.0
        raise ValueError("no such data")
    assert time.monotonic() - started < 30
    assert "mfcon sync --workdir" in caplog.text  # what is left, and how to replay it


def test_a_model_write_cut_short_by_an_outage_leaves_the_run_finished(tmp_path):
    """Logging a model reopens the run; an attempt an outage interrupts leaves it RUNNING. The replayed
    write ends with the trial's final status, whatever state the aborted attempt left behind."""
    from mfcon.serving.embedder import MODEL_URI_TAG
    from mfcon.tracking.replay import Replayer
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("s"))
    client.set_terminated(run.info.run_id, status="FINISHED")
    client.set_tag(run.info.run_id, MODEL_URI_TAG, "models:/m-1")  # the model itself went in before the outage
    client.update_run(run.info.run_id, status="RUNNING")  # ...but the attempt never put the status back
    replayer = Replayer(uri, "s", tmp_path)
    replayer.remember({"s/t0": (run.info.run_id, None)})
    replayer.apply({"op": "model", "run": "s/t0", "feature_config": {}, "status": "FINISHED"})
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
