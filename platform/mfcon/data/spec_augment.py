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


def mask_in_place(crop: np.ndarray, spans: MaskSpans) -> np.ndarray:
    """Set the spans of ``crop`` (T, F) to its mean (see the module docstring), in place; returns ``crop``."""
    fill = crop.mean() if crop.size else 0.0
    for start, width in spans.time:
        crop[start:start + width, :] = fill
    for start, width in spans.freq:
        crop[:, start:start + width] = fill
    return crop


def apply_masks(crop: np.ndarray, spans: MaskSpans) -> np.ndarray:
    """A float32 copy of ``crop`` (T, F) with the spans set to the crop's mean."""
    return mask_in_place(np.array(crop, dtype=np.float32), spans)


def _chosen(cfg: SpecAugmentConfig, rng: np.random.Generator) -> bool:
    """Whether this crop is masked: ``prob`` 1 draws no decision, ``prob`` 0 is never asked."""
    return cfg.prob >= 1 or rng.random() < cfg.prob


def spec_augment(crop: np.ndarray, cfg: SpecAugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """A masked copy of ``crop`` (T, F) with probability ``cfg.prob``; else ``crop`` itself.

    ``prob`` 0 draws no random number, so turning SpecAugment off leaves every
    other draw from ``rng`` where it was.
    """
    if cfg.prob <= 0 or not _chosen(cfg, rng):
        return crop
    return apply_masks(crop, draw_masks(crop.shape, cfg, rng))


def spec_augment_batch(feats: np.ndarray, cfg: SpecAugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Mask the crops of ``feats`` (B, T, F) in place, each decided and masked independently (so a
    speaker's K views get different masks); the same draws, crop by crop, as :func:`spec_augment`.

    In place because the batcher's crops are fresh arrays: a copy of every
    masked crop was half the cost at 200 crops of 3 s.
    """
    if cfg.prob <= 0:
        return feats
    for crop in feats:  # (T, F) views into feats
        if _chosen(cfg, rng):
            mask_in_place(crop, draw_masks(crop.shape, cfg, rng))
    return feats
