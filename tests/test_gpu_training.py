"""The training loop on a CUDA device with bf16 and fp16 autocast (skipped where no GPU exists).

Needs only torch, numpy, pydantic and PyYAML (no Ray, MLflow or audio), so it also runs on a bare
GPU machine: ``python -m pytest --noconftest tests/test_gpu_training.py``.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from mfcon.config import TrainConfig
from mfcon.data.corpus.voxceleb import TrialPair
from mfcon.evaluation.scoring import EvalSet
from mfcon.train.checkpoint import restore_training_state
from mfcon.train.loop import WorkerContext, build_training, fit, resolve_amp_dtype

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SPEAKERS, UTTS, FRAMES, BINS = 8, 6, 160, 80


class SyntheticData:
    """Speaker = a fixed spectral pattern; utterances = that pattern plus noise (a learnable task)."""

    num_classes = SPEAKERS
    rows_per_worker = SPEAKERS * UTTS
    frame_shift_ms = 10.0

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        patterns = rng.normal(0, 1, (SPEAKERS * 2, BINS)).astype(np.float32)
        self.rows = [(patterns[s] + rng.normal(0, 0.7, (FRAMES, BINS)).astype(np.float32), s)
                     for s in range(SPEAKERS) for _ in range(UTTS)]
        held_out = {f"h{s}/{u}": patterns[SPEAKERS + s] + rng.normal(0, 0.7, (FRAMES, BINS)).astype(np.float32)
                    for s in range(SPEAKERS) for u in range(3)}
        ids = sorted(held_out)
        trials = [TrialPair(int(a.split("/")[0] == b.split("/")[0]), a, b) for i, a in enumerate(ids) for b in ids[i + 1:]]
        self.eval = EvalSet(ids, [held_out[i] for i in ids], trials)

    def train_rows(self, epoch: int):
        order = np.random.default_rng(epoch).permutation(len(self.rows))
        return (self.rows[i] for i in order)

    def eval_set(self) -> EvalSet:
        return self.eval


class Hooks:
    def __init__(self):
        self.reports: list[tuple[dict, dict | None]] = []

    def load_checkpoint(self):
        return None

    def report(self, metrics, state):
        self.reports.append((metrics, state))


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_fit_on_cuda_with_autocast_and_mfcon(amp):
    cfg = TrainConfig.model_validate({
        "model_preset": "tiny", "epochs": 3, "seed": 0, "device": "cuda", "amp": amp,
        "loss": {"mfcon_weight": 0.1, "mfcon_blocks": "all"},
        "data": {"speakers_per_batch": 4, "utts_per_speaker": 2, "crop_seconds": 1.0},
        "optim": {"lr": 0.002, "warmup_steps": 2}})
    device = torch.device("cuda")
    assert resolve_amp_dtype(amp, device) == (torch.bfloat16 if amp == "bf16" else torch.float16)
    hooks = Hooks()
    history = fit(cfg, SyntheticData(), hooks, WorkerContext(device=device))
    assert len(history) == 3
    for metrics in history:
        assert all(math.isfinite(metrics[k]) for k in ("train_loss", "margin_loss", "mfcon_loss", "dev_eer"))
        assert metrics["mfcon_loss"] > 0  # the MFCon heads ran under autocast
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["dev_eer"] < 40.0  # chance is 50%; the speakers are spectral patterns
    buffer = io.BytesIO()
    torch.save(hooks.reports[-1][1], buffer)  # a CUDA run's checkpoint resumes on a CPU-only machine
    buffer.seek(0)
    state = torch.load(buffer, map_location="cpu", weights_only=True)
    run = build_training(cfg, SyntheticData(), WorkerContext(device=torch.device("cpu")))
    epoch, best, _ = restore_training_state(state, run.module.model, run.module.objective, run.optimizer,
                                            run.scheduler)
    assert epoch == 4 and best == min(h["dev_eer"] for h in history)
