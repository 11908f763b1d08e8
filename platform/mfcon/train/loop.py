"""The per-worker training loop: the same function runs locally and in a Ray Train worker.

Everything environment-specific (where rows come from, how a checkpoint is
stored and metrics reported, which rank this is) comes in through ``TrainData``
and ``RunHooks``; the loop itself never imports Ray or MLflow.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from mfcon.config import ModelConfig, OptimConfig, TrainConfig
from mfcon.data.batching import CropBatch, SpeakerBalancedBatcher
from mfcon.losses.multiscale import LossParts, SpeakerObjective
from mfcon.models.mfa_conformer import build_model
from mfcon.evaluation.scoring import EvalSet, evaluate
from mfcon.train.checkpoint import restore_training_state, training_state
from mfcon.train.heap import keep_freed_memory


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite: training stops instead of stepping the weights into NaN.

    Names the epoch and the step (both 1-based) and the value, so the trial's failure
    reason says where it diverged. Pickles with its fields (Ray ships it to the driver).
    """

    def __init__(self, epoch: int, step: int, value: float, parts: dict[str, float] | None = None):
        self.epoch, self.step, self.value, self.parts = epoch, step, value, dict(parts or {})
        detail = ", ".join(f"{k} {v:.6g}" for k, v in self.parts.items())
        super().__init__(f"loss became {value} at epoch {epoch} step {step}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):
        return type(self), (self.epoch, self.step, self.value, self.parts)


class TrainData(Protocol):
    num_classes: int
    rows_per_worker: int
    frame_shift_ms: float

    def train_rows(self, epoch: int) -> Iterable[tuple[np.ndarray, int]]: ...

    def eval_set(self) -> EvalSet | None: ...


class RunHooks(Protocol):
    def load_checkpoint(self) -> dict[str, Any] | None: ...

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None: ...


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    started_at: float | None = None  # wall clock when the run was requested: start-up overhead is measured from it
    # Wall-clock marks of start-up stages after ``started_at`` (e.g. "workers": this worker began); the first
    # epoch reports the time between consecutive marks as startup_<mark>_seconds (see ``startup_metrics``).
    startup_marks: dict[str, float] = field(default_factory=dict)


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_amp_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs that have it, fp16 (+ grad scaling) on older ones, none on CPU."""
    if choice == "off" or device.type != "cuda":
        return None
    if choice == "fp16" or (choice == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


class TrainModule(nn.Module):
    """Model + objective as one module, so DDP syncs the classifier and MFCon heads too."""

    def __init__(self, model: nn.Module, objective: SpeakerObjective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor) -> LossParts:
        return self.objective(self.model(feats, lengths), labels)


def build_optimizer(cfg: OptimConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: OptimConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Linear warm-up, then cosine to zero or step decay every ``step_epochs`` epochs."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "step":
        return cfg.step_gamma ** ((step // steps_per_epoch) // cfg.step_epochs)
    return 1.0


def crop_frames(cfg: TrainConfig, frame_shift_ms: float) -> int:
    return max(1, round(cfg.data.crop_seconds * 1000.0 / frame_shift_ms))


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _mean_across_workers(values: torch.Tensor, ctx: WorkerContext) -> torch.Tensor:
    if ctx.world_size > 1 and torch.distributed.is_initialized():
        values = values.to(ctx.device)
        torch.distributed.all_reduce(values)
        values = values / ctx.world_size
    return values.cpu()


@dataclass
class Training:
    """What one run trains with: model + objective, optimizer, LR schedule and mixed-precision settings."""

    module: TrainModule
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    steps_per_epoch: int
    model_config: ModelConfig


def build_training(cfg: TrainConfig, data: TrainData, ctx: WorkerContext) -> Training:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model_cfg = cfg.model_config_resolved()
    module = TrainModule(build_model(model_cfg), SpeakerObjective(cfg.loss, model_cfg, data.num_classes))
    module.to(ctx.device)
    optimizer = build_optimizer(cfg.optim, module.parameters())
    batch_size = cfg.data.speakers_per_batch * cfg.data.utts_per_speaker
    steps_per_epoch = max(1, data.rows_per_worker // batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg.optim, s, steps_per_epoch, total_steps))
    amp_dtype = resolve_amp_dtype(cfg.amp, ctx.device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    return Training(module, optimizer, scheduler, scaler, amp_dtype, steps_per_epoch, model_cfg)


def distribute(module: nn.Module, ctx: WorkerContext) -> nn.Module:
    """DDP around ``module`` when this is one of several workers, else ``module`` itself."""
    if ctx.world_size > 1 and torch.distributed.is_initialized():
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
    return module


def train_epoch(cfg: TrainConfig, run: Training, runner: nn.Module, data: TrainData, epoch: int,
                ctx: WorkerContext, first: bool, on_step: Callable[[int, int, int], None] | None = None,
                ) -> dict[str, float]:
    """One epoch of steps; returns its metrics (losses averaged over steps and workers).

    ``on_step(epoch, step, steps_per_epoch)`` after each step (a progress bar; ``mfcon train``)."""
    started = time.perf_counter()
    run.module.objective.set_epoch(epoch - 1)  # warm-up counts epochs from 0
    torch.manual_seed(_seed(cfg.seed, epoch, ctx.rank))
    batcher = SpeakerBalancedBatcher(cfg.data.speakers_per_batch, cfg.data.utts_per_speaker,
                                     crop_frames(cfg, data.frame_shift_ms), run.steps_per_epoch,
                                     seed=_seed(cfg.seed, epoch, ctx.rank, 1),
                                     positives=cfg.data.positives, spec_augment=cfg.data.spec_augment)
    sums = torch.zeros(3, dtype=torch.float64)
    run.module.train()
    first_step_at = None
    for step, batch in enumerate(batcher.batches(data.train_rows(epoch)), start=1):
        first_step_at = first_step_at or time.time()
        parts = _train_step(runner, batch, run.optimizer, run.scaler, cfg, ctx, run.amp_dtype, (epoch, step))
        run.scheduler.step()
        sums += torch.tensor(parts, dtype=torch.float64)
        if on_step is not None:
            on_step(epoch, step, run.steps_per_epoch)
    sums = _mean_across_workers(sums / run.steps_per_epoch, ctx)
    metrics = {"epoch": float(epoch), "train_loss": float(sums[0]), "margin_loss": float(sums[1]),
               "mfcon_loss": float(sums[2]), "lr": float(run.scheduler.get_last_lr()[0]),
               "train_seconds": time.perf_counter() - started}
    if ctx.started_at is not None and first and first_step_at is not None:
        metrics.update(startup_metrics(ctx.started_at, {**ctx.startup_marks, "first_batch": first_step_at}))
    return metrics


def startup_metrics(started_at: float, marks: dict[str, float]) -> dict[str, float]:
    """``startup_seconds`` (last mark - ``started_at``), the stage durations between consecutive marks (in the
    order given) and ``startup_started_at`` (wall clock), so a driver that knows an earlier start can extend it."""
    out = {"startup_seconds": max(marks.values()) - started_at, "startup_started_at": started_at}
    previous = started_at
    for name, at in marks.items():
        out[f"startup_{name}_seconds"] = at - previous
        previous = at
    return out


def evaluate_epoch(cfg: TrainConfig, model: nn.Module, data: TrainData, epoch: int,
                   ctx: WorkerContext) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Rank 0, every ``eval_every`` epochs and the last: (dev_eer/dev_min_dcf..., dev scores for the checkpoint).

    Training only ever scores the dev list: the test list is for verdicts (replication, promotion)."""
    eval_set = data.eval_set() if ctx.rank == 0 else None
    if eval_set is None or not (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
        return {}, {}
    result = evaluate(model, eval_set, ctx.device, cfg.data.eval_max_seconds and
                      int(cfg.data.eval_max_seconds * 1000 / data.frame_shift_ms))
    return result.metrics("dev"), {"eval_scores": torch.from_numpy(result.scores.astype(np.float32)),
                              "eval_labels": torch.from_numpy(result.labels)}


def fit(cfg: TrainConfig, data: TrainData, hooks: RunHooks, ctx: WorkerContext | None = None) -> list[dict[str, float]]:
    """Train ``cfg.epochs`` epochs, evaluating and reporting (with a checkpoint) after each."""
    ctx = ctx or WorkerContext(device=resolve_device(cfg.device))
    if ctx.device.type == "cpu":
        keep_freed_memory()
    run = build_training(cfg, data, ctx)
    module = run.module
    start_epoch, best_eer, history = restore_training_state(
        hooks.load_checkpoint(), module.model, module.objective, run.optimizer, run.scheduler)
    runner = distribute(module, ctx)
    ctx.startup_marks.setdefault("setup", time.time())  # model, optimizer, checkpoint and process group ready
    for epoch in range(start_epoch, cfg.epochs + 1):
        metrics = train_epoch(cfg, run, runner, data, epoch, ctx, first=epoch == start_epoch,
                              on_step=getattr(hooks, "on_step", None))
        eval_metrics, eval_scores = evaluate_epoch(cfg, module.model, data, epoch, ctx)
        if eval_scores:
            metrics.update(eval_metrics)
            best_eer = min(best_eer, metrics["dev_eer"])
        metrics["best_dev_eer"] = best_eer
        history.append(metrics)
        state = None
        if ctx.rank == 0:
            state = training_state(
                epoch=epoch, best_eer=best_eer, history=history, metrics=metrics, model=module.model,
                objective=module.objective, optimizer=run.optimizer, scheduler=run.scheduler,
                config=cfg.model_dump(mode="json"), model_config=run.model_config.model_dump(mode="json"),
                num_classes=data.num_classes, eval_scores=eval_scores)
        hooks.report(metrics, state)
    return history


def _train_step(runner: nn.Module, batch: CropBatch, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                cfg: TrainConfig, ctx: WorkerContext, amp_dtype: torch.dtype | None,
                where: tuple[int, int] = (0, 0)) -> tuple[float, float, float]:
    """One optimizer step; raises ``NonFiniteLossError`` (at ``where`` = (epoch, step)) before a NaN/inf loss
    reaches the weights. The one host sync per step that logging needs happens before backward, for the check."""
    feats, lengths, labels = (t.to(ctx.device, non_blocking=True) for t in (batch.feats, batch.lengths, batch.labels))
    autocast = (torch.autocast(ctx.device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        parts = runner(feats, lengths, labels)
    values = tuple(float(torch.as_tensor(x).detach()) for x in (parts.total, parts.margin, parts.mfcon))
    if not math.isfinite(values[0]):
        raise NonFiniteLossError(*where, values[0], {"margin": values[1], "mfcon": values[2]})
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(parts.total).backward()
    if cfg.optim.grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(runner.parameters(), cfg.optim.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return values
