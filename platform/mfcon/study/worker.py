"""What each Ray Train worker runs: the local training loop, fed from the Parquet shards.

The loop (``train.loop.fit``) is unchanged; only its data source and hooks
differ: rows come from this worker's share of the shards (read directly, or
through Ray Data when ``data.reader`` is ``ray_data``), and each epoch's
metrics (with a rank-0 checkpoint) go to ``ray.train.report``.

A restored run first reports its checkpoint's epoch again (marked ``replayed``):
Ray Train keeps a checkpoint before Tune's driver has seen its result, so a
driver killed in between would otherwise resume after an epoch that Tune and
MLflow never got. Consumers that see the epoch twice keep the first (the MLflow
writer skips epochs it has logged; ASHA and Optuna record a step once).

What rank 0 uploads follows the trial's ``checkpoint`` policy
(:class:`mfcon.config.CheckpointConfig`): the full state as a Ray Train
checkpoint every ``full_every`` epochs and after the last, and on each new best
of the selection metric the exported weights to ``best_weights.pt`` beside the
run's checkpoints, which is all the study driver reads when the trial ends.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from mfcon import storage
from mfcon.config import CheckpointConfig, TrainConfig
from mfcon.data.shard_stream import WorkerShardData
from mfcon.evaluation.selection import checkpoint_rank
from mfcon.train.checkpoint import (
    RAY_CHECKPOINT_FILE,
    exported_state,
    full_state_due,
    load_checkpoint,
    save_checkpoint,
)
from mfcon.train.loop import TrainData, WorkerContext, fit

REPLAYED = "replayed"  # result key: 1.0 on the restored epoch's repeated result, absent on trained epochs
CHECKPOINT_RANK = "checkpoint_rank"  # result key Ray Train keeps checkpoints by (mfcon.evaluation.selection)


class RayRunHooks:
    """Checkpoints through Ray Train's storage, so Tune restores and ASHA see every epoch."""

    def __init__(self, rank: int, metric: str = "dev_eer", policy: CheckpointConfig | None = None,
                 epochs: int | None = None, best_weights: str | None = None):
        """``best_weights``: where rank 0 publishes each new best epoch's exported weights (None: nowhere)."""
        self.rank, self.metric = rank, metric
        self.policy, self.epochs = policy or CheckpointConfig(), epochs
        self.best_weights = best_weights if self.policy.best_weights else None
        self._best = float("inf")

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The latest checkpoint of this Train run (after a worker, node or driver failure), replayed to Tune."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as path:
            state = load_checkpoint(Path(path) / RAY_CHECKPOINT_FILE)
        values = [h[self.metric] for h in state.get("history", []) if isinstance(h.get(self.metric), float)]
        self._best = min(values, default=self._best)
        self.replay(state)
        return state

    def replay(self, state: dict[str, Any]) -> None:
        """Report the restored epoch's metrics once more (every rank: a report is collective), no checkpoint."""
        metrics = state.get("metrics") or (state.get("history") or [None])[-1]
        if metrics:
            ray.train.report({**metrics, REPLAYED: 1.0})

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        if isinstance(metrics.get(self.metric), float) and "epoch" in metrics:
            metrics = {**metrics, CHECKPOINT_RANK: checkpoint_rank(metrics[self.metric], int(metrics["epoch"]))}
        if state is not None and self.best_weights and self._improved(metrics):
            self._publish_best(state)
        epoch = int(metrics.get("epoch", 0))
        if state is None or (self.epochs and not full_state_due(epoch, self.epochs, self.policy.full_every)):
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(state, Path(tmp) / RAY_CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


    def _improved(self, metrics: dict[str, float]) -> bool:
        """A new best of the selection metric (ties go to the later epoch, as the export's best epoch)."""
        value = metrics.get(self.metric)
        if not isinstance(value, float) or not value <= self._best:
            return False
        self._best = value
        return True

    def _publish_best(self, state: dict[str, Any]) -> None:
        """The epoch's exported weights (and dev scores) replace the run's ``best_weights.pt``, whole or not at all."""
        with storage.staged_file(self.best_weights) as staged:
            save_checkpoint(exported_state(state, with_scores=True), staged)


def train_worker(config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker (``TorchTrainer(train_worker, ...)``)."""
    entered_at = time.time()
    cfg = TrainConfig.model_validate(config["train_config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    # Every worker gets its cpus_per_worker threads: a GPU worker too (it inherits OMP_NUM_THREADS=1 from Ray's
    # launcher), for its host-side work (reading and cropping ahead of the step, the loss's CPU parts, scoring).
    torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    marks = dict(config.get("startup_marks") or {})
    marks["workers"] = entered_at
    # Restored after its last epoch (the driver died before Tune recorded the trial as done), the loop
    # trains nothing: the replayed result is the trial's final one.
    fit(cfg, worker_data(cfg, config, rank, world, device),
        RayRunHooks(rank, config.get("selection_metric", "dev_eer"), cfg.checkpoint, cfg.epochs,
                    config.get("best_weights_location")),
        WorkerContext(rank=rank, world_size=world, device=device, started_at=config.get("trial_started_at"),
                      startup_marks=marks))


def worker_data(cfg: TrainConfig, config: dict[str, Any], rank: int, world: int,
                device: torch.device | None = None) -> TrainData:
    """This worker's rows: its share of the shard files, or of the TorchTrainer's Ray Data datasets."""
    common = {"num_classes": config["num_classes"], "train_rows_total": config["train_rows"],
              "frame_shift_ms": config["frame_shift_ms"], "trials": config["trials"], "world_size": world}
    if cfg.data.reader == "ray_data":
        from mfcon.data.ray_source import RayShardData  # imports Ray Data: only when it is used

        return RayShardData(**common, seed=cfg.seed + rank, shuffle_buffer_rows=cfg.data.shuffle_buffer_rows)
    return WorkerShardData(config["train_shards"], config["dev_shards"], **common, rank=rank, seed=cfg.seed,
                           buffer_rows=cfg.data.shuffle_buffer_rows, prefetch_batches=cfg.data.prefetch_batches,
                           pin_device=device, cache_dir=cfg.data.cache_dir, cache_bytes=cfg.data.cache_bytes)
