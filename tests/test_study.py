"""Real Ray studies on 2 CPUs: ASHA + Optuna, Ray Train workers, MLflow children, resume, fail-fast tracking."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mfcon.study.runner import StudyError, run_study
from mfcon.tracking import TrackingUnavailable, default_tracking_uri
from mlflow.tracking import MlflowClient
from optuna_fixtures import dashboard_study, optuna_dashboard

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent

SPACE = """
name: {name}
base:
  model_preset: tiny
  epochs: {epochs}
  data: {{speakers_per_batch: 4, utts_per_speaker: 2, crop_seconds: 1.0, reader: {reader}}}
  optim: {{lr: 0.003, warmup_steps: 2}}
params:
  loss.mfcon_weight: {{type: loguniform, low: 0.01, high: 1.0}}
  loss.mfcon_temperature: {{type: loguniform, low: 0.03, high: 0.5}}
  loss.mfcon_blocks: {{type: blocks, encoding: per_block}}{extra}
budget: {{num_samples: {samples}, max_concurrent_trials: {concurrent}, grace_period: 1, reduction_factor: 2, seed: 0,
          baseline: {baseline}}}
resources: {{num_workers: {workers}, cpus_per_worker: 1}}
"""


def write_space(tmp_path: Path, name: str, epochs=3, samples=4, concurrent=2, workers=1, extra: str = "",
                reader: str = "files", baseline: bool = False) -> Path:
    """A tiny MFCon space; ``baseline`` (off here: these tests count and order the searched trials) adds the
    study's lambda = 0 trials (tests/test_replicate.py runs a study with them)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(SPACE.format(name=name, epochs=epochs, samples=samples, concurrent=concurrent, workers=workers,
                                 extra=extra, reader=reader, baseline=str(baseline).lower()))
    return path


def trial_runs(workdir: Path, study: str):
    client = MlflowClient(default_tracking_uri(workdir))
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parent = [r for r in runs if r.data.tags.get("mfcon.role") == "study"]
    children = [r for r in runs if r.data.tags.get("mfcon.role") == "trial"]
    return client, parent, children


def test_asha_study_of_8_trials_on_2_cpus_finishes_and_is_tracked(ray_local_2cpu, small_data, tmp_path):
    """8 trials, ASHA stops some: their leaked placement groups must not starve later trials."""
    # Known-bad and known-good trials: lr 1e-7 leaves the seeded initial weights as they are (every such trial
    # scores the untrained model's dev EER), lr 3e-3 trains (strictly lower EER after an epoch). TPE's seeded
    # random start draws bad, good, bad, bad: whichever of the first two finishes epoch 1 first, the third
    # (bad) trial reaches epoch 1 with a good one recorded before it, which is worse than ASHA's cutoff.
    space = write_space(tmp_path, "asha8", epochs=2, samples=8, concurrent=2,
                        extra="\n  optim.lr: {type: categorical, choices: [1.0e-7, 0.003]}")
    summary = run_study(space, small_data, workdir=tmp_path)
    assert summary.num_trials == 8
    assert summary.states.get("failed", 0) == 0, summary.states
    assert summary.states.get("pruned", 0) >= 1, summary.states  # ASHA really stopped trials
    assert summary.states.get("completed", 0) >= 1

    client, parent, children = trial_runs(tmp_path, "asha8")
    assert len(parent) == 1 and len(children) == 8
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent[0].info.run_id}
    assert len({c.data.tags["mfcon.trial_id"] for c in children}) == 8
    for child in children:
        state = child.data.tags["mfcon.trial_state"]
        history = client.get_metric_history(child.info.run_id, "dev_eer")
        steps = sorted(m.step for m in history)
        assert steps == list(range(1, len(steps) + 1)) and steps, steps  # one eer per epoch, stepped by epoch
        assert (len(steps) == 2) == (state == "completed")
        assert "loss.mfcon_weight" in child.data.params and "loss.mfcon_blocks" in child.data.params
        assert [a.path for a in client.list_artifacts(child.info.run_id, "checkpoint")] == ["checkpoint/best.pt"]
    best_eer = {c.data.tags["mfcon.trial_id"]: min(m.value for m in client.get_metric_history(c.info.run_id, "dev_eer"))
                for c in children}
    assert best_eer[summary.best_trial] == pytest.approx(min(best_eer.values()))  # ties are possible
    assert summary.best_metric == pytest.approx(min(best_eer.values()))
    assert best_eer[parent[0].data.tags["best_trial"]] == pytest.approx(summary.best_metric)
    assert parent[0].data.metrics["best_dev_eer"] == pytest.approx(summary.best_metric)
    assert parent[0].data.tags["mfcon.data_manifest_sha256"]
    assert_optuna_study_matches(tmp_path, "asha8", summary, children, best_eer)
    # Nothing left holding CPUs once the study is over.
    import ray
    from mfcon.study.reaper import orphaned_placement_groups

    assert orphaned_placement_groups() == []
    assert ray.available_resources().get("CPU", 0) == 2


def optuna_trials(workdir: Path, study: str) -> list:
    import optuna

    return optuna.load_study(study_name=study, storage=f"sqlite:///{workdir / 'optuna.db'}").trials


def assert_optuna_study_matches(workdir: Path, study: str, summary, children, best_eer: dict) -> None:
    """TPE's record (``<workdir>/optuna.db``, what optuna-dashboard opens) has each Tune trial once, in the state
    and with the params MLflow has, a completed trial's value its best dev EER; the real dashboard serves it."""
    url = f"sqlite:///{workdir / 'optuna.db'}"
    assert summary.optuna_storage == url
    trials = optuna_trials(workdir, study)
    by_id = {c.data.tags["mfcon.trial_id"]: c for c in children}
    assert sorted(t.user_attrs["trial_id"] for t in trials) == sorted(by_id)
    states = {"completed": "COMPLETE", "pruned": "PRUNED", "failed": "FAIL"}
    for t in trials:
        child = by_id[t.user_attrs["trial_id"]]
        assert t.state.name == states[child.data.tags["mfcon.trial_state"]], (t.number, child.data.tags)
        assert t.params["optim.lr"] == pytest.approx(float(child.data.params["optim.lr"]))
        assert {"loss.mfcon_weight", "loss.mfcon_temperature"} <= set(t.params)
        if t.state.name == "COMPLETE":
            assert t.value == pytest.approx(best_eer[t.user_attrs["trial_id"]])
    with optuna_dashboard(url, workdir / "dashboard.log") as base:
        served = dashboard_study(base, study)
    assert sorted(t["state"] for t in served["trials"]) == sorted(t.state.name.title() for t in trials)


def test_two_worker_trial_trains_data_parallel_and_reports(ray_local_2cpu, small_data, tmp_path):
    # One worker through Ray Data (data.reader: ray_data), two reading their shares of the files directly.
    one = run_study(write_space(tmp_path, "w1", epochs=2, samples=1, concurrent=1, workers=1, reader="ray_data"),
                    small_data, workdir=tmp_path)
    two = run_study(write_space(tmp_path, "w2", epochs=2, samples=1, concurrent=1, workers=2), small_data,
                    workdir=tmp_path)
    assert one.states == {"completed": 1} and two.states == {"completed": 1}
    with pytest.raises(StudyError, match="--resume"):  # a finished study is never silently overwritten
        run_study(write_space(tmp_path, "w1", epochs=2, samples=1, concurrent=1), small_data, workdir=tmp_path)
    client, _, children = trial_runs(tmp_path, "w2")
    losses = client.get_metric_history(children[0].info.run_id, "train_loss")
    assert len(losses) == 2 and all(m.value > 0 for m in losses)
    # Same recipe, half the steps per worker each: the result agrees with one worker up to noise.
    assert two.best_metric < 45.0 and one.best_metric < 45.0
    assert abs(two.best_metric - one.best_metric) < 15.0
    # Start-up is logged stage by stage, counted from Tune's request, on the first epoch only.
    for study in ("w1", "w2"):
        metrics = trial_runs(tmp_path, study)[2][0].data.metrics
        stages = [metrics[f"startup_{s}_seconds"] for s in ("request", "workers", "setup", "first_batch")]
        assert all(s >= 0 for s in stages) and stages[1] > 0
        assert metrics["startup_seconds"] == pytest.approx(sum(stages), abs=1e-3)


def test_unreachable_tracking_server_fails_before_any_training(small_data, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    space = write_space(tmp_path, "nowhere")
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=f"127.0.0.1:{port}.*unreachable"):
        run_study(space, small_data, workdir=tmp_path, tracking_uri=f"http://127.0.0.1:{port}")
    assert time.monotonic() - started < 30
    assert not (tmp_path / "nowhere").exists()  # no study folder, no Ray, no training


def kill_tree(proc: subprocess.Popen) -> None:
    try:
        parent = psutil.Process(proc.pid)
        family = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


def finished_trial_states(db: Path) -> list[str]:
    """Read-only peek at the driver's store: an MlflowClient here would race it creating the schema."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            rows = conn.execute("SELECT value FROM tags WHERE key = 'mfcon.trial_state'").fetchall()
    except sqlite3.Error:
        return []
    return [v for (v,) in rows if v in ("completed", "pruned")]


def test_killed_study_resumes_without_rerunning_finished_trials(small_data, tmp_path):
    space = write_space(tmp_path, "resumable", epochs=2, samples=2, concurrent=1)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "mfcon.cli", "study", "--space", str(space), "--data", str(small_data),
           "--workdir", str(tmp_path)]
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = default_tracking_uri(tmp_path)
    finished_before: dict[str, list] = {}
    try:
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(2)
            if not finished_trial_states(tmp_path / "mlflow.db"):
                continue
            _, _, children = trial_runs(tmp_path, "resumable")
            done = [c for c in children if c.data.tags.get("mfcon.trial_state") in ("completed", "pruned")]
            if done:
                client = MlflowClient(uri)
                finished_before = {c.data.tags["mfcon.trial_id"]: client.get_metric_history(c.info.run_id, "dev_eer")
                                   for c in done}
                break
        assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        assert finished_before, "no trial finished in time"
    finally:
        kill_tree(proc)
        log.close()

    import ray

    if ray.is_initialized():
        ray.shutdown()
    try:
        summary = run_study(None, None, workdir=tmp_path, resume=True, study_name="resumable")
    finally:
        ray.shutdown()
    assert summary.num_trials == 2 and summary.states.get("failed", 0) == 0, summary
    client, parent, children = trial_runs(tmp_path, "resumable")
    trial_ids = [c.data.tags["mfcon.trial_id"] for c in children]
    assert len(parent) == 1 and len(children) == 2 and len(set(trial_ids)) == 2  # no duplicate child runs
    for trial_id, history in finished_before.items():
        run = next(c for c in children if c.data.tags["mfcon.trial_id"] == trial_id)
        after = client.get_metric_history(run.info.run_id, "dev_eer")
        assert [(m.step, m.value, m.timestamp) for m in after] == [(m.step, m.value, m.timestamp) for m in history]
    # The resumed study went on in the same Optuna study: each trial finished there once, nothing left RUNNING;
    # a trial asked after the checkpoint the resume restored (Tune never ran it) is failed and says so.
    trials = optuna_trials(tmp_path, "resumable")
    finished = [t.user_attrs["trial_id"] for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert sorted(finished) == sorted(trial_ids), [(t.state.name, t.user_attrs) for t in trials]
    assert all(t.state.name != "RUNNING" for t in trials)
    assert all("mfcon.orphaned" in t.user_attrs for t in trials if t.state.name == "FAIL")


def test_batches_wider_than_the_training_speakers_fail_before_anything_starts(small_data, tmp_path):
    path = write_space(tmp_path, "toowide")
    path.write_text(path.read_text().replace("speakers_per_batch: 4", "speakers_per_batch: 64"))
    with pytest.raises(StudyError, match="toowide: base.data.speakers_per_batch = 64, but .* has only 8 training"):
        run_study(path, small_data, workdir=tmp_path / "runs")
    assert not (tmp_path / "runs" / "toowide").exists()
