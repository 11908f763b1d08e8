"""The cluster path, end to end: two Ray nodes as separate processes with token authentication, data,
checkpoints and model artifacts only in an S3-compatible store, one shared MLflow server.

This is what the README's cluster section tells a user to do (``ray start`` on each node, an ``mlflow
server`` with its artifacts in the bucket, then ``mfcon prepare / study / promote`` against ``s3://``),
on one machine: both nodes bind 127.0.0.1, each offers one CPU, so a two-worker trial must put its
ranks on different nodes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import pytest
from mfcon.tracking.store import STATE_TAG
from mlflow.tracking import MlflowClient
from mlflow_fixtures import _mlflow_cli, _wait_healthy, free_port, stop_process_group
from object_store_fixtures import S3Server, run_s3_server

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))

SPACE = """
name: {name}
base:
  model_preset: tiny
  epochs: 2
  data: {{speakers_per_batch: 4, utts_per_speaker: 2, crop_seconds: 1.0}}
  optim: {{lr: 0.003, warmup_steps: 2}}
params:
  loss.mfcon_weight: {{type: loguniform, low: 0.01, high: 1.0}}
  loss.mfcon_temperature: {{type: loguniform, low: 0.03, high: 0.5}}
budget: {{num_samples: 2, max_concurrent_trials: 1, grace_period: 2, reduction_factor: 2, seed: 0, baseline: false}}
resources: {{num_workers: 2, cpus_per_worker: 1, use_gpu: false, max_failures: 1}}
"""

# What every node of a cluster gets: Ray's token, the object store's settings, Train's timeouts.
TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "180",
             "RAY_USAGE_STATS_ENABLED": "0"}


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    return {**env, **extra}


def _python(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def _alive_nodes(address: str, env: dict[str, str]) -> int:
    code = (f"import ray; ray.init(address={address!r}, log_to_driver=False); "
            "print('ALIVE', sum(n['Alive'] for n in ray.nodes()))")
    try:
        done = _python(code, env, timeout=60)
    except subprocess.TimeoutExpired:  # a loaded machine: not up yet, the caller's deadline decides
        return 0
    # Ray may print its own log lines (e.g. the raylet's) to stdout around ours: read the marked line only.
    counts = [line.split()[-1] for line in done.stdout.splitlines() if line.startswith("ALIVE ")]
    return int(counts[-1]) if done.returncode == 0 and counts else 0


@contextmanager
def ray_node(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """``ray start --block``: the node lives as long as this process group, which is always torn down."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([RAY, "start", "--block", *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        stop_process_group(proc, grace_s=20)
        with suppress(ProcessLookupError):  # whatever the node left in its group
            os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def two_node_cluster(workdir: Path, env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """(GCS address, dashboard URL) of a head and a second node, each offering one CPU."""
    port, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="mfcon-ray-", dir="/tmp")  # short: Ray's socket paths live in it
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        with ExitStack() as stack:
            stack.enter_context(ray_node(["--head", f"--port={port}", "--include-dashboard=true",
                                          "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                                          f"--temp-dir={temp_dir}", *common], env, workdir / "ray-head.log"))
            _wait_for_nodes(address, env, 1, workdir)
            stack.enter_context(ray_node([f"--address={address}", *common], env, workdir / "ray-node2.log"))
            _wait_for_nodes(address, env, 2, workdir)
            yield address, f"http://127.0.0.1:{dashboard}"
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_nodes(address: str, env: dict[str, str], n: int, workdir: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while _alive_nodes(address, env) < n:
        if time.monotonic() > deadline:
            logs = "\n".join(p.read_text()[-2000:] for p in workdir.glob("ray-*.log"))
            raise TimeoutError(f"{n} Ray node(s) not up at {address} after {timeout_s:.0f}s:\n{logs}")
        time.sleep(1)


@contextmanager
def mlflow_server_on(s3: S3Server, workdir: Path) -> Iterator[str]:
    """The team's server: a database backend here, every artifact in the bucket."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [*_mlflow_cli(), "server", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
           "--artifacts-destination", s3.uri("mlflow"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    log = workdir / "mlflow-server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=_env({**s3.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}))
    try:
        _wait_healthy(url, proc, log, 120)
        yield url
    finally:
        stop_process_group(proc)


def _mfcon(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "mfcon.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"mfcon {args[0]} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


TRAIN_WORKERS = """
import json
from ray.util.state import list_actors
actors = list_actors(address={dashboard!r}, filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000, raise_on_missing_output=False)
print(json.dumps([{{"node": a.node_id, "group": a.placement_group_id}} for a in actors]))
"""


def _train_workers(dashboard: str, env: dict[str, str], attempts: int = 3) -> list[dict[str, str]]:
    """Every Ray Train worker actor this cluster has seen, with its node and placement group (State API)."""
    for attempt in range(attempts):
        done = _python(TRAIN_WORKERS.format(dashboard=dashboard), env)
        if done.returncode == 0 and done.stdout.strip():
            return json.loads(done.stdout.strip().splitlines()[-1])
        time.sleep(5 * (attempt + 1))  # the dashboard answers slowly on a loaded 2-core machine
    raise AssertionError(f"State API query failed ({done.returncode}):\n{done.stderr[-3000:]}")


def test_a_study_runs_on_two_token_authenticated_nodes_with_everything_in_the_object_store(small_corpus, tmp_path):
    local = tmp_path / "local"  # nothing of the study may land here: servers' own logs and database only
    local.mkdir()
    with run_s3_server(local) as s3:
        env = _env({**s3.env, **TRAIN_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)})
        with two_node_cluster(local, env) as (address, dashboard), mlflow_server_on(s3, local) as tracking:
            # Token authentication is really on: a client without the token is turned away.
            refused = _python(f"import ray; ray.init(address={address!r})",
                              _env({**s3.env, "RAY_AUTH_MODE": "disabled"}), timeout=60)
            assert refused.returncode != 0 and "auth" in (refused.stderr + refused.stdout).lower()

            data, runs = s3.uri("data"), s3.uri("runs")
            space = tmp_path / "cluster.yaml"
            space.write_text(SPACE.format(name="cluster"))
            _mfcon(["prepare", "--corpus", str(small_corpus.root), "--test-trials", str(small_corpus.trials),
                    "--dev-speakers", "4", "--out", data], env, tmp_path, timeout=300)
            _mfcon(["study", "--space", str(space), "--data", data, "--workdir", runs, "--tracking-uri", tracking,
                    "--address", address], env, tmp_path, timeout=900)
            _mfcon(["promote", "--study", "cluster", "--data", data, "--tracking-uri", tracking, "--force"],
                   env, tmp_path, timeout=300)

            workers = _train_workers(dashboard, env)
            keys = s3.keys()

    # Every trial's two ranks ran, and on two different nodes.
    by_group: dict[str, set[str]] = {}
    for w in workers:
        by_group.setdefault(w["group"], set()).add(w["node"])
    assert len(by_group) >= 2, workers
    assert all(len(nodes) == 2 for nodes in by_group.values()), by_group

    # Data, study state, checkpoints and models are in the bucket ...
    assert "data/manifest.json" in keys and any(k.startswith("data/train-") for k in keys)
    assert {"runs/cluster/study.json", "runs/cluster/space.yaml"} <= set(keys)
    assert any(k.startswith("runs/cluster/tune/cluster/") for k in keys), "Tune experiment state not in the store"
    assert any(k.startswith("runs/cluster/train/") and k.endswith("/checkpoint.pt") for k in keys)
    assert any(k.startswith("mlflow/") and k.endswith("MLmodel") for k in keys), "no model artifact in the store"
    # ... and nowhere else: the local folder has only the servers' logs and the tracking database.
    stray = [p for p in local.rglob("*") if p.is_file() and not (p.name.endswith(".log") or p.name == "mlflow.db")]
    assert stray == [], stray
    assert not (tmp_path / "runs").exists()

    client = MlflowClient(f"sqlite:///{local / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cluster")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # served by the server, stored in the bucket
    children = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mfcon.role") == "trial"]
    assert len(children) == 2 and all(r.data.tags.get(STATE_TAG) in ("completed", "pruned") for r in children)
    versions = client.search_model_versions("name='mfcon-speaker'")
    assert versions and versions[0].source, "promote registered no model"
