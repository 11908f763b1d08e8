"""What each Ray Train worker runs: the local training loop, fed by Ray Data.

The loop (``train.loop.fit``) is unchanged; only its data source and hooks
differ: rows stream from this worker's split of the Parquet shards, and each
epoch's metrics (with a rank-0 checkpoint) go to ``ray.train.report``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from mfcon.config import TrainConfig
from mfcon.data.ray_source import RayShardData
from mfcon.train.checkpoint import RAY_CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from mfcon.train.loop import WorkerContext, fit


class RayRunHooks:
    """Checkpoints through Ray Train's storage, so Tune restores and ASHA see every epoch."""

    def __init__(self, rank: int):
        self.rank = rank
        self.reported = False

    def load_checkpoint(self) -> dict[str, Any] | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as path:
            return load_checkpoint(Path(path) / RAY_CHECKPOINT_FILE)

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        self.reported = True
        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(state, Path(tmp) / RAY_CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train_worker(config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker (``TorchTrainer(train_worker, ...)``)."""
    cfg = TrainConfig.model_validate(config["train_config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    data = RayShardData(num_classes=config["num_classes"], train_rows_total=config["train_rows"],
                        frame_shift_ms=config["frame_shift_ms"], trials=config["trials"], world_size=world,
                        seed=cfg.seed + rank, shuffle_buffer_rows=cfg.data.shuffle_buffer_rows)
    hooks = RayRunHooks(rank)
    history = fit(cfg, data, hooks, WorkerContext(rank=rank, world_size=world, device=device,
                                                  started_at=config.get("trial_started_at")))
    if not hooks.reported and history:
        # Restored after its last epoch (the driver died before Tune recorded the trial as done):
        # nothing to train, but Tune still needs the trial's final result.
        ray.train.report(history[-1])
