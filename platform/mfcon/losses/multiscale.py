"""MFCon: supervised contrastive loss on every selected Conformer block (arXiv 2410.05037).

Each selected block's output gets its own training-only head
``LayerNorm -> masked pooling -> Linear -> L2-normalise`` and a SupCon loss on
the result; ``MFConLoss`` returns the mean over the selected blocks.
``SpeakerObjective`` adds it, weighted by lambda, to the margin softmax on the
final embedding::

    total = margin_loss(embedding) + lambda * mean_{b in blocks} SupCon(head_b(block_b))

The objective (classifier weights and heads) is a module of its own: the trainer
optimises it together with the model, and only the model is exported, so the
heads cost nothing at inference.

BatchNorm: the authors' heads have a BatchNorm between pooling and the Linear.
It is left out by default (``batch_norm=False``) because (1) the SupCon input is
L2-normalised right after the Linear, so the per-feature rescaling BN adds is
mostly redundant with the LayerNorm in front of the pooling, (2) with P x K
batches split over DDP workers each rank sees small batches (e.g. 8 x 2), whose
BN statistics are noisy and make one sample's projection depend on its batch
mates, and (3) BN fails outright for a batch of one. ``batch_norm=True``
restores the authors' head for comparison.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mfcon.config import LossConfig, ModelConfig, mfcon_blocks
from mfcon.losses.margin import MARGIN_LOSSES, margin_at_epoch
from mfcon.losses.supcon import supcon_loss
from mfcon.models.pooling import build_pool


class ModelOutputLike(Protocol):
    """What the objective reads from a model's forward (``mfcon.models.mfa_conformer.ModelOutput``)."""

    embedding: torch.Tensor  # (B, E)
    feature_maps: Sequence[torch.Tensor]  # num_blocks x (B, T, D)
    mask: torch.Tensor  # (B, T) bool, True on real frames


class ProjectionHead(nn.Module):
    """One block's head: (B, T, D) frames -> (B, proj_dim) unit vectors."""

    def __init__(self, d_model: int, proj_dim: int, pooling: str = "stats", batch_norm: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.pool = build_pool(pooling, d_model)
        self.bn = nn.BatchNorm1d(self.pool.out_dim) if batch_norm else nn.Identity()
        self.proj = nn.Linear(self.pool.out_dim, proj_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.norm(x), mask)  # (B, 2D)
        return F.normalize(self.proj(self.bn(pooled)).float(), dim=-1)  # (B, proj_dim)


class MFConLoss(nn.Module):
    """Mean SupCon loss over the selected blocks' projection heads.

    Heads exist only for ``selected_blocks`` (1-based, as in configs), stored in
    ``heads[str(block)]``; unselected blocks contribute neither parameters nor
    gradient.

    >>> loss = MFConLoss(d_model=8, selected_blocks=[1, 3])
    >>> maps = [torch.randn(4, 5, 8) for _ in range(3)]
    >>> loss(maps, torch.ones(4, 5, dtype=torch.bool), torch.tensor([0, 0, 1, 1])).shape
    torch.Size([])
    """

    def __init__(self, d_model: int, selected_blocks: Sequence[int], temperature: float = 0.07,
                 pooling: str = "stats", proj_dim: int = 128, batch_norm: bool = False):
        super().__init__()
        blocks = tuple(sorted(set(int(b) for b in selected_blocks)))
        if not blocks:
            raise ValueError("MFConLoss needs at least one selected block; "
                             "with none, leave it out (SpeakerObjective does)")
        if blocks[0] < 1:
            raise ValueError(f"block numbers are 1-based, got {list(blocks)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.selected_blocks = blocks
        self.temperature = float(temperature)
        self.heads = nn.ModuleDict(
            {str(b): ProjectionHead(d_model, proj_dim, pooling, batch_norm) for b in blocks})

    def per_block(self, feature_maps: Sequence[torch.Tensor], mask: torch.Tensor,
                  labels: torch.Tensor) -> dict[int, torch.Tensor]:
        """{block number: SupCon loss of that block's head} (for logging)."""
        if len(feature_maps) < self.selected_blocks[-1]:
            raise ValueError(f"got {len(feature_maps)} feature maps but block "
                             f"{self.selected_blocks[-1]} is selected")
        return {b: supcon_loss(self.heads[str(b)](feature_maps[b - 1], mask), labels, self.temperature)
                for b in self.selected_blocks}

    def forward(self, feature_maps: Sequence[torch.Tensor], mask: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        losses = self.per_block(feature_maps, mask, labels)
        return torch.stack(list(losses.values())).mean()


class LossParts(NamedTuple):
    """``total`` is what to backpropagate; ``margin`` and ``mfcon`` are for logging."""

    total: torch.Tensor
    margin: torch.Tensor
    mfcon: torch.Tensor


class SpeakerObjective(nn.Module):
    """Margin softmax on the embedding + ``mfcon_weight`` * MFCon over the selected blocks.

    With ``mfcon_weight == 0`` or no selected blocks no heads are created and
    ``total`` *is* the margin loss (the baseline MFA-Conformer objective), so a
    baseline run has exactly the baseline's parameters and arithmetic.

    >>> obj = SpeakerObjective(LossConfig(mfcon_weight=0.01, mfcon_blocks=[1]),
    ...                        ModelConfig(d_model=8, num_heads=2, num_blocks=2, embed_dim=8), num_classes=3)
    >>> sorted(obj.mfcon.heads)
    ['1']
    """

    def __init__(self, loss_cfg: LossConfig, model_cfg: ModelConfig, num_classes: int):
        super().__init__()
        self.loss_cfg = loss_cfg
        self.num_blocks = model_cfg.num_blocks
        self.margin_loss = MARGIN_LOSSES[loss_cfg.margin_loss](
            model_cfg.embed_dim, num_classes, margin=loss_cfg.margin, scale=loss_cfg.scale)
        blocks = mfcon_blocks(loss_cfg, model_cfg.num_blocks)
        self.selected_blocks: tuple[int, ...] = blocks
        self.mfcon: MFConLoss | None = None
        if blocks:
            self.mfcon = MFConLoss(model_cfg.d_model, blocks, temperature=loss_cfg.mfcon_temperature,
                                   pooling=loss_cfg.mfcon_pooling, proj_dim=loss_cfg.mfcon_proj_dim)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> float:
        """Apply the margin warm-up for this (0-based) epoch; returns the margin in use."""
        cfg = self.loss_cfg
        margin = margin_at_epoch(cfg.margin, epoch, cfg.margin_warmup_epochs)
        self.margin_loss.set_margin(margin)
        return margin

    def forward(self, output: ModelOutputLike, labels: torch.Tensor) -> LossParts:
        margin = self.margin_loss(output.embedding, labels)
        if self.mfcon is None:
            return LossParts(total=margin, margin=margin, mfcon=torch.zeros((), device=margin.device))
        if len(output.feature_maps) != self.num_blocks:
            raise ValueError(f"model returned {len(output.feature_maps)} feature maps, "
                             f"the config says num_blocks={self.num_blocks}")
        mfcon = self.mfcon(output.feature_maps, output.mask, labels)
        return LossParts(total=margin + self.loss_cfg.mfcon_weight * mfcon, margin=margin, mfcon=mfcon)
