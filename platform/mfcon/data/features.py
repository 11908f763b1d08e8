"""Waveform -> 80-dim log-Mel fbank, the MFA-Conformer front end (pure function)."""

from __future__ import annotations

import numpy as np
import torch
import torchaudio

from mfcon.config import FeatureConfig


def compute_fbank(waveform: np.ndarray | torch.Tensor, cfg: FeatureConfig = FeatureConfig()) -> torch.Tensor:
    """(N,) float waveform in [-1, 1] at ``cfg.sample_rate`` -> (T, num_mel_bins) float32.

    Kaldi fbank expects 16-bit sample magnitudes, so the waveform is scaled by
    2**15 first (as WeSpeaker and the MFA-Conformer code do). Per-utterance
    mean normalisation (CMN) removes channel offsets.

    >>> compute_fbank(np.zeros(16000, dtype=np.float32) + 0.01).shape
    torch.Size([98, 80])
    """
    wav = torch.as_tensor(waveform, dtype=torch.float32)
    if wav.ndim != 1:
        raise ValueError(f"expected a mono waveform of shape (N,), got {tuple(wav.shape)}")
    feats = torchaudio.compliance.kaldi.fbank(
        wav.unsqueeze(0) * (1 << 15),
        num_mel_bins=cfg.num_mel_bins,
        frame_length=cfg.frame_length_ms,
        frame_shift=cfg.frame_shift_ms,
        dither=cfg.dither,
        sample_frequency=cfg.sample_rate,
        energy_floor=0.0,
    )  # (T, F)
    if cfg.mean_norm:
        feats = feats - feats.mean(dim=0, keepdim=True)
    return feats.contiguous()


def num_frames(num_samples: int, cfg: FeatureConfig = FeatureConfig()) -> int:
    """Frame count Kaldi produces with snip_edges=True (its default)."""
    win = int(cfg.sample_rate * cfg.frame_length_ms / 1000)
    hop = int(cfg.sample_rate * cfg.frame_shift_ms / 1000)
    return 0 if num_samples < win else 1 + (num_samples - win) // hop
