"""Fault injection on real studies (2 CPUs): Train workers, cluster nodes and the study driver killed mid-trial,
and a trial whose loss turns NaN. After each, nothing is lost or duplicated: one MLflow run per Tune trial, the
epochs of each run unbroken 1..N with no step logged twice, every Tune trial finished, and no epoch trained twice
(a restarted trial resumes from its last checkpoint; its replayed result is marked ``replayed``)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mfcon.study.worker import REPLAYED
from mfcon.tracking import default_tracking_uri
from mlflow.tracking import MlflowClient

SPACE = """
name: {name}
base:
  model_preset: tiny
  epochs: {epochs}
  data: {{speakers_per_batch: 4, utts_per_speaker: 2, crop_seconds: 1.0}}
  optim: {{lr: 0.003, warmup_steps: 2}}
params: {params}
budget: {{num_samples: {samples}, max_concurrent_trials: {concurrent}, grace_period: 1, reduction_factor: 2, seed: 0,
          study_time_budget_s: 420, baseline: false}}
resources: {{num_workers: 1, cpus_per_worker: 1, max_failures: {max_failures}}}
"""
# The time budget only guards against a hang: Tune stops a study that runs past it, and the checks then fail.


def write_space(tmp_path: Path, name: str, *, epochs: int, samples: int = 1, concurrent: int = 1,
                max_failures: int = 3, params: str = "{}") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(SPACE.format(name=name, epochs=epochs, samples=samples, concurrent=concurrent,
                                 max_failures=max_failures, params=params))
    return path


# ---------------------------------------------------------------- what a study left behind

@dataclass
class TuneTrial:
    trial_id: str
    status: str
    config: dict
    results: list[dict]  # every result Tune recorded, in order
    error: str = ""

    def trained_epochs(self) -> list[int]:
        return [int(r["epoch"]) for r in self.results if not r.get(REPLAYED)]

    def replayed_epochs(self) -> list[int]:
        return [int(r["epoch"]) for r in self.results if r.get(REPLAYED)]


@dataclass
class StudyRecord:
    tune: dict[str, TuneTrial]
    runs: dict[str, object]  # trial id -> MLflow run
    parent: object
    client: MlflowClient
    epochs: dict[str, list[int]] = field(default_factory=dict)  # trial id -> logged train_loss steps


def read_study(workdir: Path, study: str) -> StudyRecord:
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(workdir / study / "tune" / study))
    tune = {}
    for trial in analysis.trials:
        results, error_file = Path(trial.path, "result.json"), trial.run_metadata.error_filename
        lines = results.read_text().splitlines() if results.exists() else []
        error = Path(trial.path, error_file).read_text() if error_file else ""
        tune[trial.trial_id] = TuneTrial(trial.trial_id, trial.status, trial.config,
                                         [json.loads(x) for x in lines if x.strip()], error)
    client = MlflowClient(default_tracking_uri(workdir))
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("mfcon.role") == "study"]
    children = [r for r in runs if r.data.tags.get("mfcon.role") == "trial"]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    by_trial = {c.data.tags["mfcon.trial_id"]: c for c in children}
    assert len(by_trial) == len(children), sorted(c.data.tags["mfcon.trial_id"] for c in children)  # one run each
    record = StudyRecord(tune, by_trial, parents[0], client)
    record.epochs = {t: sorted(m.step for m in client.get_metric_history(r.info.run_id, "train_loss"))
                     for t, r in by_trial.items()}
    return record


def assert_nothing_lost_or_duplicated(record: StudyRecord, epochs: int) -> None:
    """One MLflow run per Tune trial; each run's epochs 1..N once each (train loss and dev EER); every Tune trial
    ended; Tune recorded each epoch of a trial that ended normally, none as trained twice (a restart resumed, it
    did not redo). An epoch Tune knows only as replayed was trained by a driver killed before it heard of it."""
    assert set(record.runs) == set(record.tune), (sorted(record.runs), sorted(record.tune))
    for trial_id, trial in record.tune.items():
        run = record.runs[trial_id]
        state = run.data.tags["mfcon.trial_state"]
        assert trial.status in ("TERMINATED", "ERROR"), (trial_id, trial.status)
        assert state == ("failed" if trial.status == "ERROR" else state), (trial_id, state)
        logged = record.epochs[trial_id]
        eers = sorted(m.step for m in record.client.get_metric_history(run.info.run_id, "dev_eer"))
        assert logged == eers == list(range(1, len(logged) + 1)), (trial_id, logged, eers)
        if trial.status == "TERMINATED":
            assert state in ("completed", "pruned") and logged, (trial_id, state, logged)
            assert (state == "completed") == (len(logged) == epochs), (trial_id, state, logged)
            trained, replayed = trial.trained_epochs(), trial.replayed_epochs()
            assert sorted(set(trained) | set(replayed)) == logged, (trial_id, trained, replayed, logged)
            assert len(set(trained)) == len(trained), (trial_id, trained)


def recovery_seconds(record: StudyRecord, faults: list[dict]) -> list[float]:
    """Per fault: seconds from the fault to the next epoch MLflow got (printed: the cost of a fault here)."""
    stamps = sorted(m.timestamp / 1000 for run in record.runs.values()
                    for m in record.client.get_metric_history(run.info.run_id, "train_loss"))
    waits = [round(next((t for t in stamps if t > f["at"]), float("nan")) - f["at"], 1) for f in faults]
    print(f"recovery after each fault (s): {waits}")
    return waits


# ---------------------------------------------------------------- watching a running study

def logged_epochs(db: Path) -> dict[str, int]:
    """Trial id -> epochs logged so far: a read-only peek at the driver's store, safe while it writes."""
    if not db.exists():
        return {}
    query = ("SELECT t.value, MAX(m.step) FROM metrics m JOIN tags t ON t.run_uuid = m.run_uuid "
             "WHERE m.key = 'train_loss' AND t.key = 'mfcon.trial_id' GROUP BY t.value")
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return dict(conn.execute(query).fetchall())
    except sqlite3.Error:
        return {}


def wait_for(condition: Callable[[], object], timeout: float, what: str, poll: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"no {what} after {timeout:.0f}s")


def alive_train_workers() -> dict[int, str]:
    """Pid -> node id of every live Ray Train worker, from the GCS actor table."""
    import ray

    actors = ray._private.state.actors(actor_state_name="ALIVE")
    return {a["Pid"]: a["Address"]["NodeID"] for a in actors.values()
            if a["ActorClassName"] == "RayTrainWorker" and a["Pid"]}


class StudyInBackground:
    """``run_study`` on a thread of its own (Tune allows it), so that the test's main thread injects the faults:
    adding a cluster node has to happen on the main thread (Ray installs signal handlers)."""

    def __init__(self, *args, **kwargs):
        from mfcon.study.runner import run_study

        self._pool = ThreadPoolExecutor(1, thread_name_prefix="study")
        self.future = self._pool.submit(run_study, *args, **kwargs)

    def running(self) -> bool:
        return not self.future.done()

    def summary(self, timeout: float = 900):
        try:
            return self.future.result(timeout=timeout)
        finally:
            self._pool.shutdown(wait=False)


def inject_after_epochs(study: StudyInBackground, db: Path, after: list[int], inject: Callable[[int], object],
                        prepare: Callable[[int], object] = lambda k: None, timeout: float = 300) -> list[object]:
    """For each epoch k in ``after``: ``prepare(k)``, then ``inject(k)`` as soon as the study has logged epoch k
    of a trial, so the fault lands while that trial trains its next epoch."""
    injected = []
    for epoch in after:
        prepare(epoch)
        wait_for(lambda e=epoch: max(logged_epochs(db).values(), default=0) >= e or not study.running(), timeout,
                 f"epoch {epoch} in MLflow")
        assert study.running(), f"the study ended before fault {len(injected) + 1}: {study.future.exception()}"
        injected.append(inject(epoch))
    return injected


# ---------------------------------------------------------------- d. a trial whose loss turns NaN

def test_a_nan_loss_stops_training_with_its_epoch_and_step(small_data, tmp_path):
    """The loop itself (no Ray): an absurd learning rate diverges at the second step, and the error says so."""
    from mfcon.config import TrainConfig
    from mfcon.train.local import train_local
    from mfcon.train.loop import NonFiniteLossError

    cfg = TrainConfig.model_validate({"model_preset": "tiny", "epochs": 1, "optim": {"lr": 1e30},
                                      "data": {"speakers_per_batch": 4, "utts_per_speaker": 2, "crop_seconds": 1.0}})
    with pytest.raises(NonFiniteLossError, match=r"^loss became nan at epoch 1 step 2 \(margin nan") as caught:
        train_local(cfg, small_data, tmp_path / "run", echo=False)
    assert (caught.value.epoch, caught.value.step) == (1, 2)
    assert not (tmp_path / "run" / "last.pt").exists()  # nothing was checkpointed from a diverged epoch
    again = pickle.loads(pickle.dumps(caught.value))  # how Ray ships it from a worker to the driver
    assert str(again) == str(caught.value) and again.step == 2


DIVERGING = "{optim.lr: {type: categorical, choices: [0.003, 1.0e+30]}}"


def optuna_view(experiment: Path) -> dict[str, tuple[str, float]]:
    """What the study's searcher told Optuna, from the searcher state Tune saved: lr -> trial states."""
    (state_file,) = experiment.glob("searcher-state-*.pkl")
    with open(state_file, "rb") as f:
        state = pickle.load(f)
    study = state["_ot_study"] if "_ot_study" in state else state["searcher"]._ot_study
    return [(t.state.name, t.params["optim.lr"]) for t in study.trials]


@pytest.mark.slow
def test_a_diverging_trial_fails_with_its_reason_and_the_study_goes_on(ray_local_2cpu, small_data, tmp_path):
    from mfcon.study.runner import run_study

    space = write_space(tmp_path, "nanloss", epochs=2, samples=3, concurrent=2, params=DIVERGING, max_failures=0)
    summary = run_study(space, small_data, workdir=tmp_path)
    record = read_study(tmp_path, "nanloss")
    assert_nothing_lost_or_duplicated(record, epochs=2)
    diverged = {t for t, trial in record.tune.items() if trial.config["optim.lr"] > 1}
    assert diverged and len(diverged) < 3, {t: trial.config for t, trial in record.tune.items()}  # seeded: 2 of 3
    assert summary.states.get("failed") == len(diverged), summary.states
    for trial_id, trial in record.tune.items():
        run = record.runs[trial_id]
        if trial_id in diverged:  # failed at once, with the reason, in Tune and in MLflow
            assert trial.status == "ERROR" and not trial.results
            assert "NonFiniteLossError: loss became nan at epoch 1 step 2" in trial.error, trial.error[-2000:]
            assert run.info.status == "FAILED" and run.data.tags["mfcon.trial_state"] == "failed"
            assert run.data.tags.get("mfcon.error", "").startswith("NonFiniteLossError: loss became nan at epoch 1 "
                                                                    "step 2"), run.data.tags
        else:  # the others trained on
            assert trial.status == "TERMINATED" and record.epochs[trial_id]
            assert "mfcon.error" not in run.data.tags
    # The searcher was told: Optuna has the diverged configurations as FAIL, the others as COMPLETE or PRUNED.
    told = optuna_view(tmp_path / "nanloss" / "tune" / "nanloss")
    assert sorted(state for state, lr in told if lr > 1) == ["FAIL"] * len(diverged), told
    assert {state for state, lr in told if lr < 1} <= {"COMPLETE", "PRUNED"}, told


# ---------------------------------------------------------------- c. the study driver killed, then resumed

SEARCHED = "{loss.mfcon_weight: {type: loguniform, low: 0.01, high: 1.0}, " \
           "loss.mfcon_temperature: {type: loguniform, low: 0.03, high: 0.5}}"


def trained_results(experiment: Path) -> int:
    """Trained (not replayed) results Tune has recorded so far, over all trials."""
    count = 0
    for path in experiment.glob("*/result.json"):
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line being written
                count += not json.loads(line).get(REPLAYED)
    return count


class CheckpointWatch:
    """Every Train checkpoint a study's workers have written (the moment an epoch is trained, before the driver
    hears of it); Train deletes old ones, so names are remembered across looks."""

    def __init__(self, train_dir: Path):
        self.train_dir, self.seen = train_dir, set()

    def count(self) -> int:
        self.seen.update(str(p.relative_to(self.train_dir)) for p in self.train_dir.glob("*/checkpoint_*")
                         if p.is_dir())
        return len(self.seen)


def start_driver(args: list[str], log: Path) -> subprocess.Popen:
    """``mfcon study ...`` in a process group of its own."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "mfcon.cli", "study", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (from /proc: no psutil needed)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def sigkill_driver(driver: subprocess.Popen) -> int:
    """SIGKILL the driver process alone, as a crash or an OOM kill would; returns how many processes it had
    started were still alive 10 s later (then killed here, so that nothing outlives the test)."""
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    deadline = time.monotonic() + 10
    while (left := group_members(driver.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(driver.pid, signal.SIGKILL)
    return len(left)


@pytest.mark.slow
def test_killed_driver_resumes_three_times_without_losing_or_duplicating(ray_local_2cpu, small_data, tmp_path):
    """Each driver is a job on the test's Ray cluster (``--address``): killing one ends its trials; the next
    ``mfcon study --resume`` restores Tune's experiment and the Train runs' checkpoints."""
    space = write_space(tmp_path, "driverkill", epochs=3, samples=2, params=SEARCHED, max_failures=0)
    experiment = tmp_path / "driverkill" / "tune" / "driverkill"
    log = tmp_path / "drivers.log"
    cluster = ["--address", ray_local_2cpu.get_runtime_context().gcs_address, "--workdir", str(tmp_path)]
    first = ["--space", str(space), "--data", str(small_data), *cluster]
    resume = ["--resume", "--name", "driverkill", *cluster]
    checkpoints = CheckpointWatch(tmp_path / "driverkill" / "train")
    kills = []
    for attempt in range(3):
        trained, started = checkpoints.count(), time.time()
        driver = start_driver(resume if attempt else first, log)
        try:
            # Killed as soon as this driver's trials have trained an epoch (the first time: once Tune has its
            # first result), so it dies mid-study, often before it has recorded the epoch its worker just kept.
            wait_for(lambda t=trained, d=driver: (checkpoints.count() > t and trained_results(experiment) > 0)
                     or d.poll() is not None, 300, "an epoch trained by the driver's trials")
            assert driver.poll() is None, f"driver {attempt} ended before it was killed:\n{log.read_text()[-3000:]}"
            kills.append({"after_s": round(time.time() - started, 1), "left_running": sigkill_driver(driver)})
        finally:
            if driver.poll() is None:
                sigkill_driver(driver)
    started = time.time()
    final = start_driver(resume, log)
    assert final.wait(timeout=600) == 0, log.read_text()[-5000:]
    print(f"drivers killed (seconds after start, processes left): {kills}; "
          f"last resume finished in {time.time() - started:.0f} s")

    record = read_study(tmp_path, "driverkill")
    assert_nothing_lost_or_duplicated(record, epochs=3)
    assert len(record.tune) == 2 and {t.status for t in record.tune.values()} == {"TERMINATED"}
    # The parent run names the true best over every trial, whichever driver saw it.
    best = {t: min(m.value for m in record.client.get_metric_history(r.info.run_id, "dev_eer"))
            for t, r in record.runs.items()}
    parent = record.client.get_run(record.parent.info.run_id)
    assert parent.data.tags["best_trial"] in best
    assert best[parent.data.tags["best_trial"]] == pytest.approx(min(best.values()))
    assert parent.data.metrics["best_dev_eer"] == pytest.approx(min(best.values()))
    assert parent.info.status == "FINISHED"


# ---------------------------------------------------------------- a + b. Train workers and cluster nodes killed

WORKER_NODE = {"num_cpus": 1, "memory": 128 * 1024**2, "object_store_memory": 100 * 1024**2}
# GCS declares a silent node dead after 5 missed 1 s health checks (default 3 s each): until then the controller
# cannot tell that a killed node's Train worker is gone.
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_timeout_ms": 3000,
                   "health_check_failure_threshold": 5}


@pytest.fixture
def two_node_cluster():
    """A head with no CPUs (it hosts the Tune trial driver, which asks for 256 MiB of memory) and one 1-CPU worker
    node too small for a trial driver: a trial's Ray Train worker can only run on a worker node."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "_system_config": FAST_NODE_DEATH})
    cluster.add_node(**WORKER_NODE)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_trial_survives_killed_train_workers_and_nodes(two_node_cluster, small_data, tmp_path):
    """One trial, six faults while it trains (one after each of epochs 1..6): its Ray Train worker process is
    SIGKILLed (epochs 1, 3, 5) or the node it runs on dies (epochs 2, 4, 6; a spare node is added first).
    Each time Train restarts the worker group from the newest checkpoint (``FailureConfig(max_failures)``)."""
    cluster = two_node_cluster
    (first_node,) = [n.node_id for n in cluster.worker_nodes]
    spares: list[str] = []
    killed_pids: list[int] = []

    def add_spare(epoch: int) -> None:
        if epoch % 2 == 0:  # before a node kill: a node for the trial to move to
            spares.append(cluster.add_node(**WORKER_NODE).node_id)
            cluster.wait_for_nodes()

    def kill(epoch: int) -> dict:
        pid, node_id = wait_for(lambda: next(((p, n) for p, n in alive_train_workers().items()
                                              if p not in killed_pids), None), 120, "live Train worker")
        if epoch % 2:
            os.kill(pid, signal.SIGKILL)
            killed_pids.append(pid)
            return {"epoch": epoch, "worker": pid, "node": node_id, "at": time.time()}
        (node,) = [n for n in cluster.worker_nodes if n.node_id == node_id]
        cluster.remove_node(node, allow_graceful=False)  # raylet, object store and workers SIGKILLed
        killed_pids.append(pid)
        return {"epoch": epoch, "killed_node": node_id, "at": time.time()}

    space = write_space(tmp_path, "trainfaults", epochs=7, max_failures=6)
    study = StudyInBackground(space, small_data, workdir=tmp_path)
    faults = inject_after_epochs(study, tmp_path / "mlflow.db", [1, 2, 3, 4, 5, 6], kill, prepare=add_spare)
    summary = study.summary()
    assert summary.states == {"completed": 1}, summary.states
    workers = [f["worker"] for f in faults if "worker" in f]
    nodes = [f["killed_node"] for f in faults if "killed_node" in f]
    assert len(set(workers)) == 3 and len(set(nodes)) == 3, faults
    # After each node's death the trial trained on a node that survived it (the head has no CPU for it).
    assert set(nodes) <= set(spares) | {first_node}, (faults, spares)

    record = read_study(tmp_path, "trainfaults")
    assert_nothing_lost_or_duplicated(record, epochs=7)
    recovery_seconds(record, faults)
    (trial,) = record.tune.values()
    assert trial.trained_epochs() == [1, 2, 3, 4, 5, 6, 7]  # a restart from scratch would train epoch 1 again
    replayed = trial.replayed_epochs()  # one restart per fault, each from the newest checkpoint it had
    assert len(replayed) == 6 and replayed == sorted(replayed), replayed
