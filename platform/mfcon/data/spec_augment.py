"""SpecAugment on fbank crops: time and frequency masking (Park et al. 2019, arXiv 1904.08779), pure numpy.

Speaker-verification toolkits (WeSpeaker's ``spec_aug``) mask the
mean-normalised fbank of each training crop: a few spans of frames and a few
bands of Mel bins. Time warping, the third SpecAugment policy, is left out
as WeSpeaker leaves it out. Training crops only: the batcher applies it, the
dev/test scoring path never calls it.

Masked cells take the crop's mean (one value over the whole crop, computed
before masking). With the default per-utterance mean normalisation
(``FeatureConfig.mean_norm``) that mean is close to 0, WeSpeaker's fill after
CMN; but shards may be prepared with ``mean_norm: false``, and there a literal
0 is a loud log-Mel value no real frame has, while the crop's mean stays in
the range of the features either way, and the batcher need not know which.

>>> rng = np.random.default_rng(0)
>>> crop = np.ones((200, 80), dtype=np.float32)
>>> spans = draw_masks(crop.shape, SpecAugmentConfig(prob=1.0), rng)
>>> len(spans.time), len(spans.freq)
(1, 1)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mfcon.config import SpecAugmentConfig


@dataclass(frozen=True)
class MaskSpans:
    """Where one crop is masked: ``(start, width)`` pairs along time (frames) and frequency (bins)."""

    time: tuple[tuple[int, int], ...]
    freq: tuple[tuple[int, int], ...]


def _spans(count: int, max_width: int, size: int, rng: np.random.Generator) -> tuple[tuple[int, int], ...]:
    """``count`` spans of width U[0, max_width] (clipped to ``size``), each lying wholly inside ``[0, size)``."""
    out = []
    for _ in range(count):
        width = int(rng.integers(0, min(max_width, size) + 1))
        start = int(rng.integers(0, size - width + 1))
        out.append((start, width))
    return tuple(out)


def draw_masks(shape: tuple[int, int], cfg: SpecAugmentConfig, rng: np.random.Generator) -> MaskSpans:
    """The spans to mask in one ``(T, F)`` crop; masks may overlap, as in Park et al."""
    frames, bins = shape
    return MaskSpans(time=_spans(cfg.num_time_masks, cfg.max_time_width, frames, rng),
                     freq=_spans(cfg.num_freq_masks, cfg.max_freq_width, bins, rng))


def apply_masks(crop: np.ndarray, spans: MaskSpans) -> np.ndarray:
    """A copy of ``crop`` (T, F) with the spans set to the crop's mean (see the module docstring)."""
    out = np.array(crop, dtype=np.float32)
    fill = np.float32(crop.mean()) if crop.size else np.float32(0)
    for start, width in spans.time:
        out[start:start + width, :] = fill
    for start, width in spans.freq:
        out[:, start:start + width] = fill
    return out


def spec_augment(crop: np.ndarray, cfg: SpecAugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Mask ``crop`` (T, F) with probability ``cfg.prob``; else return it unchanged.

    ``prob`` 0 draws no random number, so turning SpecAugment off leaves every
    other draw from ``rng`` where it was.
    """
    if cfg.prob <= 0 or (cfg.prob < 1 and rng.random() >= cfg.prob):
        return crop
    return apply_masks(crop, draw_masks(crop.shape, cfg, rng))


def spec_augment_batch(crops: list[np.ndarray], cfg: SpecAugmentConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Each crop decided and masked independently (so a speaker's K views get different masks)."""
    if cfg.prob <= 0:
        return crops
    return [spec_augment(c, cfg, rng) for c in crops]
