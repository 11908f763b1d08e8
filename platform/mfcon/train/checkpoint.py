"""The checkpoint format in one place: file names, the training-state schema, save/load and export.

Two kinds of file, both plain ``torch.save`` dicts of tensors and builtins, so
:func:`load_checkpoint` reads them with ``weights_only=True``: a checkpoint is
data, never code. A file that holds any other pickled object (whose
``__reduce__`` could run code on load), or that is truncated or not a torch
checkpoint at all, is a :class:`CheckpointError` naming the file; nothing in it
runs.

* training state (:func:`training_state`): everything a run needs to resume —
  ``epoch``, ``best_eer``, ``history``, ``metrics``, the ``model``,
  ``objective``, ``optimizer`` and ``scheduler`` state dicts, ``config``
  (TrainConfig), ``model_config`` (ModelConfig), ``num_classes``, and, after an
  evaluated epoch, ``eval_scores``/``eval_labels`` (float32/int64 tensors).
  Locally it is ``<out>/last.pt`` every epoch and ``<out>/best.pt`` on a new
  best EER; in a study, ``checkpoint.pt`` inside each Ray Train checkpoint.
* exported weights (:func:`export_weights`): the inference-only subset
  :data:`EXPORT_KEYS` of a trial's best epoch, logged to MLflow as
  ``checkpoint/best.pt`` and loaded by :mod:`mfcon.serving`. In a study, rank 0
  writes them (with the epoch's eval scores) to ``best_weights.pt`` beside the
  Train run's checkpoints on every new best (:func:`exported_state`), so the
  driver moves that file instead of downloading and exporting a full state.

What a study trial uploads each epoch is :class:`mfcon.config.CheckpointConfig`
(:func:`full_state_due`): the full state every ``full_every`` epochs and at the
last; docs/performance.md gives the bytes per trial-epoch of each preset.
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mfcon.files import atomic_path

RAY_CHECKPOINT_FILE = "checkpoint.pt"  # inside a Ray Train checkpoint directory
LAST_FILE = "last.pt"  # local training: every epoch
BEST_FILE = "best.pt"  # local training: the best EER so far
EXPORTED_FILE = "best.pt"  # a trial's exported weights (MLflow artifact checkpoint/best.pt)
EXPORTED_ARTIFACT = f"checkpoint/{EXPORTED_FILE}"
EXPORT_KEYS = ("model", "model_config", "config", "epoch", "metrics", "num_classes")
EVAL_KEYS = ("eval_scores", "eval_labels")  # the evaluated epoch's dev scores (the trial's DET plot)
BEST_WEIGHTS_FILE = "best_weights.pt"  # in a study: beside a Train run's checkpoints, rank 0's best epoch so far


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or holds pickled objects other than tensors and builtins."""


def training_state(*, epoch: int, best_eer: float, history: list[dict[str, float]], metrics: dict[str, float],
                   model: nn.Module, objective: nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, config: dict[str, Any],
                   model_config: dict[str, Any], num_classes: int,
                   eval_scores: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The resumable state of a run after ``epoch`` (key order as always written)."""
    return {"epoch": epoch, "best_eer": best_eer, "history": history, "metrics": metrics,
            "model": model.state_dict(), "objective": objective.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "config": config, "model_config": model_config, "num_classes": num_classes, **(eval_scores or {})}


def restore_training_state(state: dict[str, Any] | None, model: nn.Module, objective: nn.Module,
                           optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                           ) -> tuple[int, float, list[dict[str, float]]]:
    """Load ``state`` into the given objects; returns (first epoch to train, best EER so far, history)."""
    if state is None:
        return 1, math.inf, []
    model.load_state_dict(state["model"])
    objective.load_state_dict(state["objective"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]) + 1, float(state["best_eer"]), list(state.get("history", []))


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Atomic: a crash mid-save never replaces a good checkpoint with a torn one."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Any checkpoint of this module, on the CPU, without running pickled code.

    ``weights_only=True`` makes torch's unpickler refuse every global outside
    tensors and builtins before anything is constructed, so a crafted file
    cannot execute code here; the refusal becomes a CheckpointError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"{path}: refused: it holds pickled objects other than tensors and builtins{what}; "
                              "mfcon loads checkpoints with weights_only=True and never runs code from them") from None
    except (RuntimeError, EOFError, ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}: {_first_sentence(e)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a checkpoint dict")
    return state


def export_weights(checkpoint_dir: str | Path, out_file: str | Path) -> dict[str, Any]:
    """Inference-only checkpoint (weights + configs) from a Ray Train checkpoint directory.

    The optimizer state is not worth storing. Returns the full training state,
    whose eval scores feed the trial's DET plot."""
    return export_file(Path(checkpoint_dir) / RAY_CHECKPOINT_FILE, out_file)


def export_file(checkpoint_file: str | Path, out_file: str | Path) -> dict[str, Any]:
    """:func:`export_weights` from one file: a full training state or a trial's ``best_weights.pt``."""
    state = load_checkpoint(checkpoint_file)
    save_checkpoint(exported_state(state), out_file)
    return state


def exported_state(state: dict[str, Any], with_scores: bool = False) -> dict[str, Any]:
    """The inference-only subset of a training state (and its eval scores when ``with_scores``)."""
    keys = EXPORT_KEYS + (EVAL_KEYS if with_scores else ())
    return {k: state[k] for k in keys if k in state}


def full_state_due(epoch: int, epochs: int, full_every: int) -> bool:
    """Whether a study trial uploads its full training state after ``epoch``: every ``full_every`` epochs and
    always after the last (a trial restored after it trains nothing and needs its final state).

    >>> [e for e in range(1, 8) if full_state_due(e, 7, 3)]
    [3, 6, 7]
    """
    return epoch % full_every == 0 or epoch >= epochs


def _first_sentence(err: BaseException) -> str:
    """torch's corrupt-zip message runs to several sentences of advice; the first says what is wrong."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text.split(". ")[0]
