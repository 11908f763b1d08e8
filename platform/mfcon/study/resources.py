"""Do ``use_gpu: auto`` trials ask for GPUs? Decided from what the cluster CAN provide, not what is up now.

Why: ``ray.cluster_resources()`` lists only the nodes that are running. With an
autoscaling GPU worker type at ``min_workers: 0`` no GPU is up when the first trials
start, so they would never ask for one, and the autoscaler, which scales on requests,
would never start one.

For ``auto`` the first source that answers wins (an explicit true/false in the space is kept):

1. ``MFCON_USE_GPU`` = 1/0 (true/false, yes/no): the operator's override. It must be set where
   trials run: on the nodes, or ``ray job submit --runtime-env-json '{"env_vars": {"MFCON_USE_GPU": "1"}}'``.
2. The cluster launcher's config, which ``ray up`` writes to ``~/ray_bootstrap_config.yaml`` on the
   head (node types with their resources, filled in from the instance type): GPUs in any node type
   that can run (the head, or a worker type with ``max_workers > 0``).
3. The cluster config an autoscaler reports to the GCS (KubeRay does; Ray Train V2 reads it the same
   way to refuse impossible worker groups), when there is one.
4. The live cluster (local runs): ``ray.cluster_resources()["GPU"]``.

    resolve_use_gpu("auto", env={}, cluster_config=yaml.safe_load(open("cluster.yaml")), live_resources={})
    -> GpuDecision(use_gpu=True, reason="cluster.yaml: node type gpu_worker has 4 GPUs ...")
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

GPU_ENV = "MFCON_USE_GPU"
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the launcher config on the head
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class ClusterConfigError(ValueError):
    """A launcher config whose node types cannot be read; the message names the file and field."""


@dataclass(frozen=True)
class GpuDecision:
    use_gpu: bool
    reason: str  # which source decided, for logs and error messages


def env_override(env: Mapping[str, str]) -> bool | None:
    """``MFCON_USE_GPU`` as a bool; unset, empty or ``auto`` -> None (no override)."""
    value = env.get(GPU_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in TRUE_WORDS or value in FALSE_WORDS:
        return value in TRUE_WORDS
    raise ValueError(f"{GPU_ENV}={env[GPU_ENV]!r}: expected 1/0, true/false, yes/no or auto")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ClusterConfigError(f"{where}: expected a number >= 0, got {value!r}")
    return float(value)


def launchable_gpus(config: Mapping[str, Any], source: str) -> dict[str, float] | None:
    """GPUs per node of every node type that can run (the head, or workers with max_workers > 0).

    None when a node type that can run declares no ``resources`` or ``{}`` (the config cannot tell).
    """
    types = config.get("available_node_types")
    if not isinstance(types, Mapping) or not types:
        raise ClusterConfigError(f"{source}: available_node_types is missing or empty")
    head = config.get("head_node_type")
    cluster_max = _number(config.get("max_workers", 2), f"{source}: max_workers")  # Ray's default is 2
    gpus: dict[str, float] = {}
    for name, node_type in types.items():
        where = f"{source}: available_node_types.{name}"
        if not isinstance(node_type, Mapping):
            raise ClusterConfigError(f"{where}: expected a mapping")
        workers = min(_number(node_type.get("max_workers", cluster_max), f"{where}.max_workers"), cluster_max)
        if name != head and workers <= 0:
            continue
        resources = node_type.get("resources")
        if resources is not None and not isinstance(resources, Mapping):
            raise ClusterConfigError(f"{where}.resources: expected a mapping")
        if not resources:
            return None  # `resources: {}` asks `ray up` to detect them: this file cannot tell
        gpus[name] = _number(resources.get("GPU", 0), f"{where}.resources.GPU")
    return gpus


def resolve_use_gpu(choice: Any, *, env: Mapping[str, str], cluster_config: Mapping[str, Any] | None,
                    config_source: str = "cluster config", gcs_max_resources: Mapping[str, float] | None = None,
                    live_resources: Mapping[str, float] | None = None) -> GpuDecision:
    """The space's ``use_gpu`` (true, false or "auto") resolved from the sources above (pure)."""
    if choice != "auto":
        return GpuDecision(bool(choice), f"use_gpu: {bool(choice)} in the search space")
    override = env_override(env)
    if override is not None:
        return GpuDecision(override, f"{GPU_ENV}={env[GPU_ENV]}")
    if cluster_config is not None:
        gpus = launchable_gpus(cluster_config, config_source)
        if gpus is not None:
            with_gpu = {name: n for name, n in gpus.items() if n > 0}
            if with_gpu:
                listed = ", ".join(f"{name} has {n:g} GPUs" for name, n in sorted(with_gpu.items()))
                return GpuDecision(True, f"{config_source}: node type {listed} (the autoscaler can start it)")
            return GpuDecision(False, f"{config_source}: no node type has GPUs")
    if gcs_max_resources:
        gpus = float(gcs_max_resources.get("GPU", 0) or 0)
        return GpuDecision(gpus > 0, f"autoscaler cluster config in the GCS: up to {gpus:g} GPUs")
    if live_resources is None:
        return GpuDecision(False, "no cluster config and Ray is not running")
    gpus = float(live_resources.get("GPU", 0))
    return GpuDecision(gpus > 0, f"live cluster: {gpus:g} GPUs (no autoscaler config)")


def read_cluster_config(path: str | Path) -> dict[str, Any] | None:
    """The launcher config at ``path`` (YAML, or the JSON ``ray up`` writes); None when there is none."""
    path = Path(path).expanduser()
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ClusterConfigError(f"{path}: not YAML: {e}") from None
    if not isinstance(config, dict):
        raise ClusterConfigError(f"{path}: expected a mapping at the top level")
    return config


def gcs_max_resources() -> dict[str, float] | None:
    """Max resources from the autoscaler's cluster config in the GCS (a private Ray API, so any failure = none)."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - an internal API that moved or failed is the same as no config
        return None


def cluster_use_gpu(choice: Any, config_path: str | Path = BOOTSTRAP_CONFIG) -> GpuDecision:
    """``resolve_use_gpu`` with this process's environment, the head's launcher config and the running Ray."""
    import ray

    if choice != "auto" or env_override(os.environ) is not None:
        return resolve_use_gpu(choice, env=os.environ, cluster_config=None)
    path = Path(config_path).expanduser()
    live = ray.cluster_resources() if ray.is_initialized() else None
    return resolve_use_gpu(choice, env=os.environ, cluster_config=read_cluster_config(path), config_source=str(path),
                           gcs_max_resources=gcs_max_resources(), live_resources=live)
