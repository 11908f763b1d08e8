"""One Tune trial = one Ray Train run (Train V2: Tune cannot wrap a trainer directly)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import ray
import ray.train
import ray.tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from mfcon import storage
from mfcon.config import TrainConfig
from mfcon.data.corpus.voxceleb import TrialPair
from mfcon.study.resources import cluster_use_gpu
from mfcon.study.spaces import SearchSpace, trial_config
from mfcon.study.worker import CHECKPOINT_RANK, train_worker
from mfcon.train.checkpoint import BEST_WEIGHTS_FILE


@dataclass(frozen=True)
class StudyRuntime:
    """Static facts every trial needs; pickled once into the trainable with ``tune.with_parameters``."""

    space: SearchSpace
    train_shards: tuple[str, ...]
    dev_shards: tuple[str, ...]  # what trials are scored on; the test split never reaches a search
    dev_trials: tuple[TrialPair, ...]
    num_classes: int
    train_rows: int
    frame_shift_ms: float
    train_storage: str
    feature_config: dict[str, Any]
    use_gpu: bool | None = None  # resolved once on the driver (see with_gpu_decision); None: each trial decides


def use_gpu(choice: Any) -> bool:
    """``auto`` asks for GPUs whenever the cluster can provide them, even before a GPU node is up
    (the autoscaler starts one only for a request); see :mod:`mfcon.study.resources`."""
    return cluster_use_gpu(choice).use_gpu


def with_gpu_decision(runtime: StudyRuntime) -> StudyRuntime:
    """Decide ``use_gpu: auto`` once, on the driver: it runs where the launcher's config is (the head), while a
    trial may land on a CPU-only node that cannot see what the cluster could start."""
    decision = cluster_use_gpu(runtime.space.resources.use_gpu)
    print(f"use_gpu: {decision.use_gpu} ({decision.reason})", flush=True)
    return replace(runtime, use_gpu=decision.use_gpu)


def train_run_name(study: str, trial_id: str) -> str:
    """A trial's Ray Train run name, deterministic: a restored trial finds its own checkpoints again."""
    return f"{study}-{trial_id}"


def best_weights_location(train_storage: str, study: str, trial_id: str) -> str:
    """Where a trial's rank 0 keeps its best epoch's exported weights: beside its Train run's checkpoints."""
    return storage.join(train_storage, train_run_name(study, trial_id), BEST_WEIGHTS_FILE)


def run_trial(config: dict[str, Any], runtime: StudyRuntime) -> None:
    """Tune function trainable of a search: the sampled parameters applied to the space's base config."""
    fit_trainer(trial_config(runtime.space, config), runtime)


def fit_trainer(cfg: TrainConfig, runtime: StudyRuntime) -> None:
    """Build and fit this Tune trial's TorchTrainer (Train V2: the trial function owns the trainer)."""
    # Start-up is counted from here; the driver adds the time from Tune's request to this function's start.
    started_at = time.time()
    res = runtime.space.resources
    trial_id = ray.tune.get_context().get_trial_id()
    gpu = runtime.use_gpu if runtime.use_gpu is not None else use_gpu(res.use_gpu)
    datasets = None
    if cfg.data.reader == "ray_data":
        from mfcon.data.ray_source import read_shards  # Ray Data starts only for a trial that uses it

        datasets = {"train": read_shards(runtime.train_shards), "eval": read_shards(runtime.dev_shards)}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "train_config": cfg.model_dump(mode="json"),
            "num_classes": runtime.num_classes,
            "train_rows": runtime.train_rows,
            "frame_shift_ms": runtime.frame_shift_ms,
            "trials": list(runtime.dev_trials),
            "train_shards": list(runtime.train_shards),
            "dev_shards": list(runtime.dev_shards),
            "threads_per_worker": max(1, int(res.cpus_per_worker)),
            "trial_started_at": started_at,  # start-up overhead = first training step - this
            "selection_metric": runtime.space.metric,  # ranks the checkpoints Train keeps (checkpoint_rank)
            "best_weights_location": best_weights_location(runtime.train_storage, runtime.space.name, trial_id),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.num_workers, use_gpu=gpu,
            resources_per_worker={"CPU": res.cpus_per_worker, **({"GPU": 1} if gpu else {})}),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]) if datasets else None,
        run_config=ray.train.RunConfig(
            name=train_run_name(runtime.space.name, trial_id),
            storage_path=runtime.train_storage,
            callbacks=[TuneReportCallback()],
            # Kept by the space's metric with ties to the later epoch, as the export picks its best epoch.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=CHECKPOINT_RANK, checkpoint_score_order="min"),
            # A trial that cannot start its workers fails (and is logged) instead of retrying forever.
            failure_config=ray.train.FailureConfig(max_failures=res.max_failures, controller_failure_limit=3),
        ),
    )
    trainer.fit()
    let_tune_take_the_last_result()


def let_tune_take_the_last_result(settle_s: float = 1.0, poll_s: float = 0.1, timeout_s: float = 600.0) -> None:
    """Return from the trial function only once Tune has taken Train's last result.

    Ray 2.60's Tune/Train glue (``ray/train/_internal/session.py``, ``_get_result_from_queues``) moves each
    Train result from the inter-actor queue into the trial's one-slot result queue with a blocking put, in
    the thread that empties that queue. When the trial function returns, Tune puts its end marker
    (RESULT_DUPLICATE) into the same slot; if the last epoch's result is still waiting in the inter-actor
    queue (the driver was slower than the last epoch), the move blocks forever and the trial hangs.
    Waiting here until both queues have stayed empty for ``settle_s`` lets the move happen first.
    """
    from ray.train._internal.session import get_session

    session = get_session()
    inter_actor = getattr(session, "_inter_actor_queue", None)
    if inter_actor is None:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if inter_actor.empty() and session.result_queue.empty():
            time.sleep(settle_s)
            if inter_actor.empty() and session.result_queue.empty():
                return
        time.sleep(poll_s)
