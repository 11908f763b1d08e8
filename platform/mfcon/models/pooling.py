"""Length-aware pooling of frame sequences to utterance vectors.

Both the main MFA path and the per-block MFCon heads pool with these, so padded
frames must never leak into a statistic: every pool takes a boolean ``mask``
(B, T) that is True on real frames, or None when no frame is padded.
"""

from __future__ import annotations

import torch
from torch import nn

_EPS = 1e-5


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) frame counts -> (B, T) bool mask, True where a frame is real."""
    steps = torch.arange(max_len, device=lengths.device)
    return steps.unsqueeze(0) < lengths.unsqueeze(1)


def masked_mean_std(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean and std over time.

    x: (B, T, D); weights: (B, T, 1) or (B, T, D), summing to 1 over T.
    Returns (B, 2D) = concat(mean, std). E[x^2] is taken as sum((x w) x): the weighted frames
    are reused, one pass over (B, T, D) fewer than x^2 * w.
    """
    xw = x * weights  # (B, T, D)
    mean = xw.sum(dim=1)  # (B, D)
    var = (xw * x).sum(dim=1) - mean.pow(2)
    std = var.clamp(min=_EPS).sqrt()
    return torch.cat([mean, std], dim=-1)


class StatsPool(nn.Module):
    """Plain mean+std statistics pooling (x-vector style), parameter free."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.out_dim = 2 * in_dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return masked_mean_std(x, x.new_full((1, 1, 1), 1.0 / x.size(1)))
        w = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
        w = w / w.sum(dim=1, keepdim=True).clamp(min=1.0)
        return masked_mean_std(x, w)


class AttentiveStatsPool(nn.Module):
    """Attentive statistics pooling (Okabe et al. 2018), channel-wise attention.

    The MFA-Conformer code scores every channel of every frame (a 1x1 conv
    bottleneck then softmax over time), then takes the weighted mean and std.
    """

    def __init__(self, in_dim: int, bottleneck: int = 128):
        super().__init__()
        self.out_dim = 2 * in_dim
        self.attention = nn.Sequential(
            nn.Linear(in_dim, bottleneck),
            nn.Tanh(),
            nn.Linear(bottleneck, in_dim),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        scores = self.attention(x)  # (B, T, D)
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(-1), torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores.float(), dim=1).to(x.dtype)  # (B, T, D)
        return masked_mean_std(x, weights)


POOLS = {"asp": AttentiveStatsPool, "stats": StatsPool}


def build_pool(kind: str, in_dim: int) -> nn.Module:
    """Pool by name ("asp" | "stats"); unknown names list the known ones."""
    try:
        return POOLS[kind](in_dim)
    except KeyError:
        raise ValueError(f"unknown pooling {kind!r}; choose one of {sorted(POOLS)}") from None
