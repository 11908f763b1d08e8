"""``use_gpu: auto`` is resolved from what the cluster can provide: launcher node types before live resources.

Real launcher files: the repository's cluster.yaml, the JSON ``ray up`` writes to the head
(``prepare_config`` of it), and small YAML files with and without GPU node types.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from mfcon.study.resources import (
    GPU_ENV,
    ClusterConfigError,
    cluster_use_gpu,
    env_override,
    read_cluster_config,
    resolve_use_gpu,
)

REPO = Path(__file__).resolve().parent.parent
HEAD_ONLY_LIVE = {"CPU": 8.0, "memory": 2e10}  # a GPU cluster just after `ray up`: only the head is up

CPU_ONLY = """
cluster_name: cpu
max_workers: 4
provider: {type: aws, region: us-west-2}
head_node_type: head
available_node_types:
  head: {resources: {CPU: 8}, node_config: {InstanceType: m6i.2xlarge}}
  cpu_worker: {min_workers: 0, max_workers: 4, resources: {CPU: 16}, node_config: {InstanceType: m6i.4xlarge}}
"""
GPU_TYPE_NEVER_LAUNCHED = """
max_workers: 4
head_node_type: head
available_node_types:
  head: {resources: {CPU: 8, GPU: 0}, node_config: {}}
  gpu_worker: {min_workers: 0, max_workers: 0, resources: {CPU: 48, GPU: 4}, node_config: {}}
"""
NO_WORKERS_ALLOWED = """
max_workers: 0
head_node_type: head
available_node_types:
  head: {resources: {CPU: 8}, node_config: {}}
  gpu_worker: {min_workers: 0, max_workers: 8, resources: {CPU: 48, GPU: 4}, node_config: {}}
"""
GPU_HEAD = """
max_workers: 0
head_node_type: head
available_node_types:
  head: {resources: {CPU: 8, GPU: 1}, node_config: {InstanceType: g5.2xlarge}}
"""
UNDECLARED_RESOURCES = """
max_workers: 2
head_node_type: head
available_node_types:
  head: {resources: {CPU: 8}, node_config: {}}
  gpu_worker: {max_workers: 2, resources: {}, node_config: {InstanceType: g5.12xlarge}}
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _auto(path: Path, env: dict | None = None, live: dict | None = None, gcs: dict | None = None):
    return resolve_use_gpu("auto", env=env or {}, cluster_config=read_cluster_config(path), config_source=str(path),
                           gcs_max_resources=gcs, live_resources=HEAD_ONLY_LIVE if live is None else live)


def test_gpu_worker_type_at_min_zero_asks_for_gpus_before_any_is_up():
    decision = _auto(REPO / "cluster.yaml")
    assert decision.use_gpu is True
    assert "gpu_worker has 4 GPUs" in decision.reason and "cluster.yaml" in decision.reason


def test_the_json_config_ray_up_leaves_on_the_head(tmp_path):
    from ray.autoscaler._private.util import prepare_config

    prepared = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    bootstrap = _write(tmp_path, "ray_bootstrap_config.yaml", json.dumps(prepared))
    assert _auto(bootstrap).use_gpu is True


@pytest.mark.parametrize("text, why", [(CPU_ONLY, "no node type has GPUs"),
                                       (GPU_TYPE_NEVER_LAUNCHED, "no node type has GPUs"),
                                       (NO_WORKERS_ALLOWED, "no node type has GPUs")])
def test_clusters_that_cannot_start_a_gpu_never_ask_for_one(tmp_path, text, why):
    decision = _auto(_write(tmp_path, "cluster.yaml", text), live={"CPU": 8.0, "GPU": 1.0})
    assert decision.use_gpu is False and why in decision.reason


def test_a_gpu_head_counts_even_without_workers(tmp_path):
    assert _auto(_write(tmp_path, "cluster.yaml", GPU_HEAD)).use_gpu is True


def test_undeclared_resources_fall_back_to_the_live_cluster(tmp_path):
    path = _write(tmp_path, "cluster.yaml", UNDECLARED_RESOURCES)
    assert _auto(path, live={"CPU": 8.0}).use_gpu is False
    decision = _auto(path, live={"CPU": 56.0, "GPU": 4.0})
    assert decision.use_gpu is True and decision.reason.startswith("live cluster: 4 GPUs")


def test_without_a_launcher_config_the_gcs_config_then_the_live_cluster_decide(tmp_path):
    missing = tmp_path / "absent.yaml"
    assert read_cluster_config(missing) is None
    assert _auto(missing, gcs={"CPU": 392, "GPU": 32}).use_gpu is True
    assert _auto(missing, gcs={"CPU": 16, "GPU": 0}).use_gpu is False
    assert _auto(missing, live={"CPU": 2.0}).reason == "live cluster: 0 GPUs (no autoscaler config)"
    assert _auto(missing, live={"CPU": 2.0, "GPU": 1.0}).use_gpu is True
    assert resolve_use_gpu("auto", env={}, cluster_config=None).use_gpu is False


def test_the_environment_overrides_auto_only(tmp_path):
    gpu_cluster, cpu_cluster = REPO / "cluster.yaml", _write(tmp_path, "cpu.yaml", CPU_ONLY)
    assert _auto(gpu_cluster, env={GPU_ENV: "0"}).use_gpu is False
    decision = _auto(cpu_cluster, env={GPU_ENV: "yes"})
    assert decision.use_gpu is True and decision.reason == f"{GPU_ENV}=yes"
    assert _auto(gpu_cluster, env={GPU_ENV: "auto"}).use_gpu is True
    for explicit in (True, False):
        kept = resolve_use_gpu(explicit, env={GPU_ENV: str(int(not explicit))}, cluster_config=None)
        assert kept.use_gpu is explicit and "search space" in kept.reason


@pytest.mark.parametrize("value, expected", [("1", True), ("TRUE", True), ("on", True), ("0", False),
                                             ("no", False), ("", None), ("auto", None)])
def test_env_override_values(value, expected):
    assert env_override({GPU_ENV: value}) is expected


def test_a_bad_override_names_the_variable():
    with pytest.raises(ValueError, match=f"{GPU_ENV}='maybe'"):
        env_override({GPU_ENV: "maybe"})


@pytest.mark.parametrize("text, field", [
    ("available_node_types:\n  gpu_worker: {max_workers: 2, resources: {GPU: four}, node_config: {}}\n",
     "available_node_types.gpu_worker.resources.GPU"),
    ("available_node_types:\n  gpu_worker: {max_workers: -1, resources: {GPU: 4}, node_config: {}}\n",
     "available_node_types.gpu_worker.max_workers"),
    ("available_node_types:\n  gpu_worker: [GPU]\n", "available_node_types.gpu_worker"),
    ("cluster_name: x\n", "available_node_types is missing"),
])
def test_unreadable_node_types_name_the_file_and_field(tmp_path, text, field):
    path = _write(tmp_path, "bad.yaml", text)
    with pytest.raises(ClusterConfigError, match=re.escape(f"{path}: ")) as err:
        _auto(path)
    assert field in str(err.value)


def test_a_config_that_is_not_a_mapping_names_the_file(tmp_path):
    path = _write(tmp_path, "list.yaml", "- head\n- gpu_worker\n")
    with pytest.raises(ClusterConfigError, match=f"{path}: expected a mapping"):
        read_cluster_config(path)


def test_cluster_use_gpu_reads_the_config_file_and_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(GPU_ENV, raising=False)
    assert cluster_use_gpu("auto", config_path=REPO / "cluster.yaml").use_gpu is True
    assert cluster_use_gpu(False, config_path=REPO / "cluster.yaml").use_gpu is False
    monkeypatch.setenv(GPU_ENV, "0")
    assert cluster_use_gpu("auto", config_path=REPO / "cluster.yaml").use_gpu is False
    bad = _write(tmp_path, "bad.yaml", "- not a config\n")
    assert cluster_use_gpu("auto", config_path=bad).use_gpu is False  # the override wins before the file is read


def test_the_trial_asks_the_resolver(monkeypatch):
    from mfcon.study.trial import use_gpu

    monkeypatch.setenv(GPU_ENV, "1")
    assert use_gpu("auto") is True and use_gpu(False) is False
    monkeypatch.setenv(GPU_ENV, "0")
    assert use_gpu("auto") is False and use_gpu(True) is True


def test_the_study_driver_decides_once_for_every_trial(monkeypatch):
    """The driver (on the head, where the launcher's config is) decides; trials on any node use its answer."""
    from mfcon.study.spaces import SearchSpace
    from mfcon.study.trial import StudyRuntime, with_gpu_decision

    runtime = StudyRuntime(space=SearchSpace(name="s"), train_shards=(), dev_shards=(), dev_trials=(), num_classes=2,
                           train_rows=0, frame_shift_ms=10.0, train_storage="/tmp/x", feature_config={})
    assert runtime.use_gpu is None
    monkeypatch.setenv(GPU_ENV, "1")
    decided = with_gpu_decision(runtime)
    monkeypatch.setenv(GPU_ENV, "0")  # what a trial's node would see no longer matters
    assert decided.use_gpu is True and decided.train_shards == runtime.train_shards


@pytest.mark.slow
def test_a_local_ray_without_launcher_config_uses_live_resources(ray_local_2cpu, tmp_path, monkeypatch):
    from mfcon.study.resources import gcs_max_resources

    monkeypatch.delenv(GPU_ENV, raising=False)
    assert gcs_max_resources() is None  # no autoscaler reported a cluster config
    decision = cluster_use_gpu("auto", config_path=tmp_path / "absent.yaml")
    gpus = ray_local_2cpu.cluster_resources().get("GPU", 0)
    assert decision.use_gpu is (gpus > 0) and decision.reason.startswith(f"live cluster: {gpus:g} GPUs")
