"""`mfcon train`: one process, checkpoints in a folder, resumable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mfcon.config import TrainConfig
from mfcon.data.local import LocalShardData
from mfcon.train.checkpoint import (
    BEST_FILE,
    LAST_FILE,
    load_checkpoint,
    save_checkpoint,
)
from mfcon.train.loop import fit


class LocalRunHooks:
    """Checkpoints ``last.pt`` every epoch and ``best.pt`` on a new best EER; metrics to metrics.jsonl."""

    def __init__(self, out_dir: str | Path, resume: bool = True, echo: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.resume, self.echo = resume, echo

    def load_checkpoint(self) -> dict[str, Any] | None:
        last = self.out_dir / LAST_FILE
        return load_checkpoint(last) if self.resume and last.exists() else None

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        if state is not None:
            save_checkpoint(state, self.out_dir / LAST_FILE)
            if "dev_eer" in metrics and metrics["dev_eer"] <= metrics["best_dev_eer"]:
                save_checkpoint(state, self.out_dir / BEST_FILE)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.echo:
            print(format_epoch(metrics), flush=True)


def format_epoch(m: dict[str, float]) -> str:
    text = f"epoch {int(m['epoch']):3d}  loss {m['train_loss']:.4f}  (margin {m['margin_loss']:.4f}, mfcon {m['mfcon_loss']:.4f})"
    if "dev_eer" in m:
        text += f"  dev EER {m['dev_eer']:.2f}%  minDCF {m['dev_min_dcf']:.3f}"
    return text + f"  {m['train_seconds']:.1f}s"


def train_local(cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path, resume: bool = True,
                echo: bool = True) -> list[dict[str, float]]:
    data = LocalShardData(data_dir, seed=cfg.seed, buffer_rows=cfg.data.shuffle_buffer_rows)
    return fit(cfg, data, LocalRunHooks(out_dir, resume=resume, echo=echo))
