"""MFA-Conformer (Zhang et al., Interspeech 2022): multi-scale feature aggregation.

The outputs of *all* Conformer blocks are concatenated along channels
(B, T', N*D) -> LayerNorm -> attentive statistics pooling -> BatchNorm ->
Linear to the speaker embedding (paper sec. 2; the authors' ``conformer_cat``).
The per-block outputs are also returned, because MFCon puts a training-only
head on each of them (see ``losses/multiscale.py``).

Differences from the authors' code are listed in ``models/conformer.py``; in
addition our ``AttentiveStatsPool`` has no global-context input, while they use
SpeechBrain's ECAPA pooling (attention over [x, mean, std], 3x the input width,
plus a BatchNorm), which is ~0.39M of their ~19.8M parameters.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from mfcon.config import (
    MODEL_PRESETS,
    ModelConfig,
    paper_model_config,
    tiny_model_config,
)
from mfcon.models.conformer import ConformerEncoder
from mfcon.models.pooling import build_pool

_HALF = (torch.float16, torch.bfloat16)


class ModelOutput(NamedTuple):
    """What the model returns; a NamedTuple so DDP and torch.compile treat it as a tuple."""

    embedding: torch.Tensor  # (B, E)
    feature_maps: list[torch.Tensor]  # one (B, T', D) per block, zero on padded frames
    mask: torch.Tensor  # (B, T') bool, True on real frames


class MFAConformer(nn.Module):
    """Speaker embedding extractor.

    >>> model = mfa_conformer_tiny().eval()
    >>> out = model(torch.randn(2, 120, 80), torch.tensor([120, 90]))
    >>> tuple(out.embedding.shape), len(out.feature_maps), tuple(out.mask.shape)
    ((2, 64), 3, (2, 29))
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ConformerEncoder(cfg)
        cat_dim = cfg.d_model * cfg.num_blocks
        self.norm = nn.LayerNorm(cat_dim)
        self.pool = build_pool(cfg.pooling, cat_dim)
        self.bn = nn.BatchNorm1d(self.pool.out_dim)
        self.fc = nn.Linear(self.pool.out_dim, cfg.embed_dim)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> ModelOutput:
        """feats (B, T, n_mels) fp32 (autocast is fine); lengths (B,) real frames, None = all T."""
        lengths = self._padded_lengths(feats, lengths)  # None: no frame is padded, nothing to mask
        feature_maps, mask = self.encoder(feats, lengths)
        x = self.norm(torch.cat(feature_maps, dim=-1))  # (B, T', N*D)
        if x.dtype in _HALF:
            x = x.float()  # pooled std is E[x^2] - mean^2: cancellation would ruin it in 16 bits
        pooled = self.pool(x, None if lengths is None else mask)  # (B, 2*N*D)
        return ModelOutput(self.fc(self.bn(pooled)), feature_maps, mask)

    @torch.no_grad()
    def embed(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings only (B, E), without autograd; call ``.eval()`` first for inference."""
        return self.forward(feats, lengths).embedding

    def min_frames(self) -> int:
        """Fewest input frames that leave one real frame after subsampling."""
        n = 1
        for _ in range(self.encoder.subsampling.num_convs):
            n = 2 * n + 1
        return n

    def _padded_lengths(self, feats: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor | None:
        """Checked (B,) lengths, or None when every crop fills all T frames (training crops do).

        One host sync reads the shortest and longest length: it both validates them and lets
        unpadded batches skip every mask (no measurable time on CPU, but without a mask the
        absolute-PE attention may use SDPA's flash kernel on GPU).
        """
        if feats.dim() != 3 or feats.size(-1) != self.cfg.n_mels:
            raise ValueError(f"feats must be (B, T, {self.cfg.n_mels}), got {tuple(feats.shape)}")
        b, t, _ = feats.shape
        if lengths is None:
            return None
        if lengths.shape != (b,):
            raise ValueError(f"lengths must be ({b},), got {tuple(lengths.shape)}")
        lengths = lengths.to(device=feats.device, dtype=torch.long)
        if b == 0:
            return None
        shortest, longest = torch.stack([lengths.min(), lengths.max()]).tolist()
        if shortest < self.min_frames() or longest > t:
            bad = (lengths < self.min_frames()) | (lengths > t)
            raise ValueError(
                f"lengths must lie in [{self.min_frames()}, {t}] frames (1/{self.cfg.subsampling} "
                f"subsampling); got {lengths[bad].tolist()}")
        return None if shortest == t else lengths


def build_model(cfg: ModelConfig | str) -> MFAConformer:
    """A model from a ModelConfig or a preset name ("paper" | "tiny")."""
    if isinstance(cfg, str):
        if cfg not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {cfg!r}; choose one of {sorted(MODEL_PRESETS)}")
        cfg = MODEL_PRESETS[cfg]()
    return MFAConformer(cfg)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; ``count_parameters(mfa_conformer_paper())`` is about 19.4M."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def mfa_conformer_paper(**overrides) -> MFAConformer:
    """6 blocks x 256, 4 heads, FFN 2048, kernel 15, 1/2 subsampling, relative PE, 192-d embedding."""
    return MFAConformer(paper_model_config(**overrides))


def mfa_conformer_tiny(**overrides) -> MFAConformer:
    """3 blocks x 96, 1/4 subsampling, 64-d embedding: under 1M parameters, for CPU tests and demos."""
    return MFAConformer(tiny_model_config(**overrides))


MODEL_BUILDERS = {"paper": mfa_conformer_paper, "tiny": mfa_conformer_tiny}
