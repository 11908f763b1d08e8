"""`mfcon train`: one process, checkpoints in a folder, resumable."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from mfcon.config import ConfigError, TrainConfig

if TYPE_CHECKING:
    from mfcon.data.shards import Manifest

# torch loads on first use (train_local, checkpoints), so `mfcon train` checks its inputs first
BEST_FILE, LAST_FILE = "best.pt", "last.pt"  # == mfcon.train.checkpoint.BEST_FILE / LAST_FILE (checked by a test)

PROGRESS_ENV = "MFCON_PROGRESS"  # 0: never show progress bars; 1: show them even when stderr is not a terminal


def progress_enabled(stream=None) -> bool:
    """Progress bars go to stderr when it is a terminal, unless ``MFCON_PROGRESS=0`` (``1`` forces them on)."""
    choice = os.environ.get(PROGRESS_ENV, "").strip()
    if choice in ("0", "1"):
        return choice == "1"
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class LocalRunHooks:
    """Checkpoints ``last.pt`` every epoch and ``best.pt`` on a new best EER; metrics to metrics.jsonl;
    a per-epoch progress bar with ETA on stderr (:func:`progress_enabled`)."""

    def __init__(self, out_dir: str | Path, resume: bool = True, echo: bool = True, progress: bool | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.resume, self.echo = resume, echo
        self.progress = (echo and progress_enabled()) if progress is None else progress
        self._bar = None

    def load_checkpoint(self) -> dict[str, Any] | None:
        from mfcon.train.checkpoint import load_checkpoint

        last = self.out_dir / LAST_FILE
        return load_checkpoint(last) if self.resume and last.exists() else None

    def on_step(self, epoch: int, step: int, steps: int) -> None:
        if not self.progress:
            return
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=steps, desc=f"epoch {epoch}", unit="step", file=sys.stderr, leave=False,
                             dynamic_ncols=True)
        self._bar.update(1)
        if step >= steps:
            self._bar.set_description(f"epoch {epoch}: scoring dev")

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        self._close_bar()
        if state is not None:
            from mfcon.train.checkpoint import save_checkpoint

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


def best_dev_epoch(history: list[dict[str, float]]) -> tuple[float, int] | None:
    """(lowest dev EER %, its epoch) over a run's history; None when no epoch scored the dev list."""
    scored = [(h["dev_eer"], int(h["epoch"])) for h in history if "dev_eer" in h and math.isfinite(h["dev_eer"])]
    return min(scored, key=lambda x: (x[0], x[1])) if scored else None


def check_training_inputs(cfg: TrainConfig, manifest: Manifest, data_dir: str | Path,
                          config_name: str = "the training config") -> None:
    """What would otherwise fail mid-epoch, said before anything is written: enough speakers for a batch."""
    speakers = manifest.splits["train"].num_speakers
    if manifest.splits["train"].rows < 1:
        raise ConfigError(f"{data_dir}: the train split is empty; prepare the data again")
    if speakers < cfg.data.speakers_per_batch:
        raise ConfigError(f"{config_name}: data.speakers_per_batch is {cfg.data.speakers_per_batch}, but the train "
                          f"split of {data_dir} has {speakers} speakers; lower data.speakers_per_batch to at most "
                          f"{speakers}, or prepare a corpus with more training speakers")


def train_local(cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path, resume: bool = True,
                echo: bool = True, config_name: str = "the training config",
                progress: bool | None = None) -> list[dict[str, float]]:
    from mfcon.data.local import LocalShardData
    from mfcon.train.loop import fit, resolve_device

    data = LocalShardData(data_dir, seed=cfg.seed, buffer_rows=cfg.data.shuffle_buffer_rows,
                          prefetch_batches=cfg.data.prefetch_batches, pin_device=resolve_device(cfg.device),
                          cache_dir=cfg.data.cache_dir, cache_bytes=cfg.data.cache_bytes)
    check_training_inputs(cfg, data.manifest, data_dir, config_name)
    return fit(cfg, data, LocalRunHooks(out_dir, resume=resume, echo=echo, progress=progress))
