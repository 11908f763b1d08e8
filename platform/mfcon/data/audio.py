"""Audio loading: one entry point that turns any wav/flac into float32 mono at 16 kHz.

Every failure is an :class:`AudioError` naming the file, so a bad file in a
corpus of thousands can be found from the message alone.

What is accepted, and how (docs/bad_input.md has the tested table):

* any container/encoding libsndfile decodes: WAV (8/16/24/32-bit PCM, 32/64-bit
  float), FLAC, ...; samples are read as float32 in [-1, 1] whatever the bit depth;
* any sample rate: resampled to ``target_sr`` (windowed sinc, torchaudio), so
  8 kHz telephone audio is upsampled (its band above 4 kHz stays empty) and
  48 kHz audio downsampled;
* any number of channels: averaged to mono.

Refused (``AudioError``; ``prepare`` lists the file and reason in the
manifest's ``skipped`` and goes on): missing, empty (0 bytes or 0 samples),
undecodable (corrupt header, not audio), NaN/infinite samples, shorter than
``min_seconds`` after resampling, and all-zero (silent) recordings.

Example::

    wav = load_audio("wav/id00001/vid01/00001.wav")  # np.float32, shape (N,), 16 kHz
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

SAMPLE_RATE = 16000


class AudioError(ValueError):
    """An audio file is missing, unreadable, empty, non-finite or too short; the message names it."""


@functools.lru_cache(maxsize=8)
def _resampler(orig_sr: int, target_sr: int) -> torchaudio.transforms.Resample:
    """Sinc kernel built once per rate pair: building it costs more than applying it."""
    return torchaudio.transforms.Resample(orig_sr, target_sr)


def load_audio(path: str | Path, target_sr: int = SAMPLE_RATE, min_seconds: float = 0.5) -> np.ndarray:
    """Read ``path`` as float32 mono at ``target_sr`` (stereo is averaged)."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: file is empty (0 bytes)")
    try:
        # always_2d: (frames, channels) for mono and multi-channel alike
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError) as err:  # LibsndfileError for corrupt/unknown formats
        raise AudioError(f"{path}: cannot decode audio ({_decoder_reason(err, path)})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: file is empty (0 samples)")
    wav = data.mean(axis=1, dtype=np.float32)  # (N,)
    if not np.isfinite(wav).all():
        raise AudioError(f"{path}: contains NaN or infinite samples")
    if sr != target_sr:
        with torch.no_grad():
            wav = _resampler(sr, target_sr)(torch.from_numpy(wav)).numpy()
    if wav.shape[0] < min_seconds * target_sr:
        raise AudioError(f"{path}: too short ({wav.shape[0] / target_sr:.3f} s < {min_seconds} s)")
    if not np.any(wav):
        raise AudioError(f"{path}: silent (every sample is 0): nothing to learn a speaker from")
    return np.ascontiguousarray(wav, dtype=np.float32)


def _decoder_reason(err: Exception, path: Path) -> str:
    """libsndfile's reason without its "Error opening '<path>': " prefix: the message names the file once."""
    return str(err).replace(f"Error opening {str(path)!r}: ", "").strip() or type(err).__name__
