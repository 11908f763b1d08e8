"""`mfcon train`: one process, checkpoints in a folder, resumable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mfcon.config import TrainConfig
from mfcon.data.local import LocalShardData
from mfcon.files import atomic_path
from mfcon.train.loop import fit


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Atomic: a crash mid-save never replaces a good checkpoint with a torn one."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


class LocalRunHooks:
    """Checkpoints ``last.pt`` every epoch and ``best.pt`` on a new best EER; metrics to metrics.jsonl."""

    def __init__(self, out_dir: str | Path, resume: bool = True, echo: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.resume, self.echo = resume, echo

    def load_checkpoint(self) -> dict[str, Any] | None:
        last = self.out_dir / "last.pt"
        return load_checkpoint(last) if self.resume and last.exists() else None

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        if state is not None:
            save_checkpoint(state, self.out_dir / "last.pt")
            if "eer" in metrics and metrics["eer"] <= metrics["best_eer"]:
                save_checkpoint(state, self.out_dir / "best.pt")
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.echo:
            print(format_epoch(metrics), flush=True)


def format_epoch(m: dict[str, float]) -> str:
    text = f"epoch {int(m['epoch']):3d}  loss {m['train_loss']:.4f}  (margin {m['margin_loss']:.4f}, mfcon {m['mfcon_loss']:.4f})"
    if "eer" in m:
        text += f"  EER {m['eer']:.2f}%  minDCF {m['min_dcf']:.3f}"
    return text + f"  {m['train_seconds']:.1f}s"


def train_local(cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path, resume: bool = True,
                echo: bool = True) -> list[dict[str, float]]:
    data = LocalShardData(data_dir, seed=cfg.seed)
    return fit(cfg, data, LocalRunHooks(out_dir, resume=resume, echo=echo))
