"""Models and data for the registry tests whose ranking is known by construction: no training.

* :func:`make_tone_corpus`: every speaker has its own base waveform (a few
  sinusoids at speaker-specific frequencies plus speaker-specific low-passed
  noise); each of its utterances is that base plus small independent noise
  (~35 dB SNR). Same-speaker utterances are near-identical recordings, so any
  non-degenerate embedding scores them far above different-speaker pairs.
* :func:`write_test_trials`: all same-speaker pairs of the given speakers and
  as many different-speaker pairs, balanced per enrollment speaker.
* :func:`export_micro_model`: an untrained, seeded micro MFA-Conformer as an
  exported checkpoint (the keys of ``checkpoint/best.pt``). ``degenerate``
  zeroes the final embedding layer's weight: every utterance gets the same
  embedding, every centred-cosine score is equal, EER exactly 50%.
  ``perturb`` adds seeded noise of that scale to every weight (a "seed" model).

Everything is seeded: the same call gives the same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from mfcon.config import ModelConfig, TrainConfig
from mfcon.data.corpus.voxceleb import TrialPair, write_trials
from mfcon.models.mfa_conformer import build_model
from mfcon.train.checkpoint import EXPORT_KEYS, save_checkpoint

SAMPLE_RATE = 16000
MICRO = {"d_model": 32, "num_blocks": 2, "num_heads": 2, "ffn_dim": 64, "embed_dim": 32, "conv_kernel": 5}


def speaker_name(i: int) -> str:
    return f"id{10001 + i}"


def make_tone_corpus(root: Path, n_speakers: int = 10, utts_per_speaker: int = 4, seconds: float = 1.5,
                     snr_db: float = 35.0, seed: int = 0) -> dict[str, list[str]]:
    """VoxCeleb layout ``<root>/<spk>/<vid>/<utt>.wav`` (16 kHz PCM16); returns speaker -> utt ids."""
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    out: dict[str, list[str]] = {}
    for s in range(n_speakers):
        rng = np.random.default_rng([seed, s])
        freqs = rng.uniform(120.0, 3500.0, size=3)
        base = sum(rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) for f in freqs)
        pole = rng.uniform(0.5, 0.98)  # one-pole low-pass: speaker-specific noise colour
        white = rng.standard_normal(n)
        colored = np.empty(n)
        acc = 0.0
        for i in range(n):
            acc = pole * acc + (1 - pole) * white[i]
            colored[i] = acc
        base = base / np.abs(base).max() + 0.5 * colored / colored.std()
        base = 0.5 * base / np.abs(base).max()
        noise_sd = base.std() / 10 ** (snr_db / 20)
        spk, utts = speaker_name(s), []
        folder = root / spk / f"vid{s:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for u in range(utts_per_speaker):
            wav = base + noise_sd * rng.standard_normal(n)
            sf.write(folder / f"{u + 1:05d}.wav", wav.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
            utts.append(f"{spk}/vid{s:02d}/{u + 1:05d}.wav")
        out[spk] = utts
    return out


def write_test_trials(path: Path, utts: dict[str, list[str]], speakers: list[str], seed: int = 0) -> list[TrialPair]:
    """Every same-speaker pair of ``speakers`` and, per enrollment speaker, as many different-speaker pairs."""
    rng = np.random.default_rng(seed)
    trials = []
    for spk in speakers:
        own = utts[spk]
        targets = [TrialPair(1, a, b) for i, a in enumerate(own) for b in own[i + 1:]]
        others = [(a, b) for a in own for o in speakers if o != spk for b in utts[o]]
        picked = rng.choice(len(others), size=len(targets), replace=False)
        trials += targets + [TrialPair(0, *others[i]) for i in sorted(picked)]
    write_trials(path, trials)
    return trials


def micro_config() -> TrainConfig:
    return TrainConfig.model_validate({"model_preset": "tiny", "model": MICRO, "epochs": 1, "seed": 0})


def export_micro_model(path: Path, seed: int = 0, degenerate: bool = False, perturb: float = 0.0,
                       perturb_seed: int = 0) -> Path:
    """An untrained seeded micro model as an exported checkpoint file; see the module docstring."""
    cfg = micro_config()
    model_cfg: ModelConfig = cfg.model_config_resolved()
    torch.manual_seed(seed)
    model = build_model(model_cfg)
    with torch.no_grad():
        if perturb:
            gen = torch.Generator().manual_seed(perturb_seed)
            for p in model.parameters():
                p.add_(perturb * torch.randn(p.shape, generator=gen))
        if degenerate:
            model.fc.weight.zero_()  # embedding == fc.bias for every input
    state = {"model": model.state_dict(), "model_config": model_cfg.model_dump(mode="json"),
             "config": cfg.model_dump(mode="json"), "epoch": 1, "metrics": {}, "num_classes": 5}
    assert set(state) == set(EXPORT_KEYS)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state, path)
    return path
