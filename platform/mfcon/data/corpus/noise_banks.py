"""Synthetic noise banks in MUSAN and RIRS_NOISES layout, for demos, tests and benchmarks.

No MUSAN or RIR set can be downloaded everywhere this runs, so these make
stand-ins of the same layout: coloured noise, music-like tone sequences and
room impulse responses with a direct path and an exponentially decaying tail.
Babble is the caller's own speech files, copied into ``speech/``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16000


def write_wav(path: Path, wav: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.5 * wav / np.abs(wav).max()).astype(np.float32), SR, subtype="PCM_16")


def coloured_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """1/f^exponent power spectrum: 0 white, 1 pink, 2 brown."""
    freqs = np.fft.rfftfreq(n, 1 / SR)
    freqs[0] = freqs[1]
    return np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * freqs ** (-exponent / 2), n)


def tone_sequence(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Music-like: 250 ms notes of a harmonic tone with 20 ms fades."""
    t = np.arange(SR // 4) / SR
    envelope = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.02)
    notes = rng.choice([220, 247, 262, 294, 330, 349, 392, 440], int(seconds * 4))
    return np.concatenate([envelope * sum(np.sin(2 * np.pi * k * f0 * t) / k for k in (1, 2, 3)) for f0 in notes])


def decaying_rir(rng: np.random.Generator, rt60: float, delay: int, seconds: float = 0.5) -> np.ndarray:
    """Direct path (the peak) after ``delay`` samples, then a diffuse tail decaying 60 dB in ``rt60`` s."""
    t = np.arange(int(seconds * SR)) / SR
    rir = 0.3 * rng.standard_normal(t.size) * np.exp(-6.9 * t / rt60)
    rir[:delay] = 0.0
    rir[delay] = 1.0
    return rir
