"""Applying an augmentation recipe to a waveform: torchaudio's add_noise, fftconvolve and resample.

The recipes (every random choice) come from :mod:`mfcon.data.augment`; this
module only does what a recipe says. Bank audio is read lazily by the worker
that needs it (:func:`bank_clip`): a window straight from a long file, or a
whole file cached per process when it must be looped or resampled, or is an
RIR (:func:`load_bank_audio`); no audio is pickled into a task.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict

import numpy as np
import torch
import torchaudio.functional as F

from mfcon.data.augment import AugmentError, Variant

BANK_CACHE_SAMPLES = 32 * 1024 * 1024  # per process: 128 MiB of float32 bank audio


def fit_length(noise: torch.Tensor, length: int, offset: float) -> torch.Tensor:
    """(M,) -> (length,): a window starting at ``offset`` (fraction of the spare length); looped if too short."""
    if noise.numel() >= length:
        start = int(offset * (noise.numel() - length + 1))
        return noise[start:start + length]
    start = int(offset * noise.numel())
    looped = noise.repeat(math.ceil((length + start) / noise.numel()))
    return looped[start:start + length]


def add_noise(wav: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    """(N,) + (N,) scaled so that 10 log10(|wav|^2 / |scaled noise|^2) = ``snr_db``.

    A silent noise window (all zeros) leaves the signal as it is: it has no
    scale that reaches the SNR.
    """

    if not torch.any(noise):
        return wav.clone()
    return F.add_noise(wav[None], noise[None], torch.tensor([snr_db], dtype=wav.dtype))[0]


def mix_babble(clips: list[torch.Tensor]) -> torch.Tensor:
    """Sum of speech clips (each (N,)), each at unit RMS so no single talker dominates."""

    total = torch.zeros_like(clips[0])
    for clip in clips:
        rms = clip.pow(2).mean().sqrt()
        if rms > 0:
            total += clip / rms
    return total


def reverberate(wav: torch.Tensor, rir: torch.Tensor) -> torch.Tensor:
    """(N,) convolved with the unit-energy RIR, aligned at its direct-path peak and cut to N samples.

    The unit-energy RIR keeps the output energy near the input's (Kaldi and
    WeSpeaker normalise it so); starting at the peak removes the propagation
    delay, as Kaldi's wav-reverberate does, so frames stay aligned with the clean copy.
    ``wav`` is zero-padded so the FFT length has no prime factor above 5: the
    bare N + M - 1 often has one (8 s + 0.5 s: 135999 samples, 107 ms vs 15 ms here).
    """

    rir = rir / torch.linalg.vector_norm(rir)
    peak = int(torch.argmax(rir.abs()))
    full = wav.numel() + rir.numel() - 1
    padded = torch.nn.functional.pad(wav, (0, _smooth_length(full) - full))
    return F.fftconvolve(padded, rir)[peak:peak + wav.numel()]


def _smooth_length(n: int) -> int:
    """The least m >= n whose prime factors are 2, 3 and 5 (fast FFT sizes)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def speed_perturb(wav: torch.Tensor, sample_rate: int, factor: float) -> torch.Tensor:
    """(N,) -> (~N / factor,): played ``factor`` times faster (tempo and pitch), as sox ``speed`` in WeSpeaker.

    Resamples from ``round(factor * sr)`` to ``sr`` (``torchaudio.functional.speed``
    truncates ``factor * sr``, which float rounding can put one hertz low).
    """

    source = round(factor * sample_rate)
    divisor = math.gcd(source, sample_rate)
    return F.resample(wav, source // divisor, sample_rate // divisor)


class _BankCache:
    """Bank audio loaded once per process and kept up to ``max_samples`` (least recently used goes first)."""

    def __init__(self, max_samples: int):
        self.max_samples = max_samples
        self._items: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._size = 0

    def get(self, path: str, sample_rate: int) -> torch.Tensor:
        key = (path, sample_rate)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        audio = _load_bank_file(path, sample_rate)
        self._items[key] = audio
        self._size += audio.numel()
        while self._size > self.max_samples and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._size -= old.numel()
        return audio


def _load_bank_file(path: str, sample_rate: int) -> torch.Tensor:

    from mfcon.data.audio import AudioError, load_audio

    try:
        return torch.from_numpy(load_audio(path, target_sr=sample_rate, min_seconds=0.0))
    except AudioError as e:
        raise AugmentError(f"{e} (an augmentation bank file)") from None


_CACHE = _BankCache(BANK_CACHE_SAMPLES)


def load_bank_audio(path: str, sample_rate: int) -> torch.Tensor:
    """(M,) float32 mono at ``sample_rate``, cached in this process; AugmentError names an unreadable file."""
    return _CACHE.get(path, sample_rate)


@functools.lru_cache(maxsize=8192)
def _bank_header(path: str) -> tuple[int, int]:
    """(frames, sample rate) from the file header."""
    import soundfile as sf

    try:
        info = sf.info(path)
    except (sf.SoundFileError, RuntimeError, OSError) as e:
        raise AugmentError(f"{path}: cannot read an augmentation bank file ({e})") from None
    return info.frames, info.samplerate


def bank_clip(path: str, length: int, offset: float, sample_rate: int) -> torch.Tensor:
    """(length,) samples of a bank file from ``offset``: the same as ``fit_length(load_bank_audio(...))``,
    but a file long enough at the right rate is read as just that window, never whole."""
    import soundfile as sf

    frames, rate = _bank_header(path)
    if rate != sample_rate or frames < length:
        return fit_length(load_bank_audio(path, sample_rate), length, offset)
    start = int(offset * (frames - length + 1))
    data, _ = sf.read(path, start=start, frames=length, dtype="float32", always_2d=True)
    clip = data.mean(axis=1, dtype=np.float32)  # (length,) mono, as load_audio averages
    if clip.shape[0] != length or not np.isfinite(clip).all():
        raise AugmentError(f"{path}: samples {start}..{start + length} are missing or not finite "
                           "(an augmentation bank file)")
    return torch.from_numpy(np.ascontiguousarray(clip))


def apply_variant(wav: torch.Tensor, variant: Variant, sample_rate: int) -> torch.Tensor:
    """The training row's waveform: ``wav`` (N,) sped up or down, then with the recipe's noise or room."""

    wav = torch.as_tensor(wav, dtype=torch.float32)
    if variant.speed != 1.0:
        wav = speed_perturb(wav, sample_rate, variant.speed)
    recipe = variant.recipe
    if recipe is None:
        return wav
    if recipe.kind == "reverb":
        return reverberate(wav, load_bank_audio(recipe.sources[0], sample_rate))
    clips = [bank_clip(s, wav.numel(), o, sample_rate) for s, o in zip(recipe.sources, recipe.offsets)]
    noise = mix_babble(clips) if recipe.kind == "babble" else clips[0]
    return add_noise(wav, noise, recipe.snr_db)
