"""Margin-based softmax heads for the speaker embedding (the main MFA-Conformer loss).

Both heads L2-normalise the class weights and the embeddings, so a logit is the
cosine between an embedding and a class centre, then push the target cosine down
by a margin before scaling and cross-entropy:

- ``AAMSoftmax`` (ArcFace, Deng et al. 2019): target logit ``s * cos(theta + m)``.
- ``AMSoftmax`` (CosFace / AM-softmax, Wang et al. 2018): target logit
  ``s * (cos(theta) - m)``; the MFCon authors' choice (margin 0.2, scale 30).

The cosine and margin math always runs in fp32, even inside ``torch.autocast``:
with fp16/bf16 a cosine near 1 loses most of its mantissa, and ``sqrt(1 - cos^2)``
(and hence ``cos(theta + m)``) becomes noisy exactly where training ends up.

The classifier weights are trained together with the model and dropped at
inference (verification scores embeddings, not classes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Floor for sin^2(theta): keeps d sqrt(x)/dx finite when an embedding is exactly
# parallel to its class centre (sqrt'(0) = inf would turn the gradient into NaN).
_SIN2_FLOOR = 1e-12


def margin_at_epoch(target: float, epoch: int, warmup_epochs: int) -> float:
    """Linear margin warm-up from 0 to ``target`` over ``warmup_epochs`` (0-based epochs).

    A large margin on a randomly initialised network can stall training, so
    WeSpeaker-style recipes ramp it up. Epoch 0 trains with margin 0; from epoch
    ``warmup_epochs`` on the full margin is used. ``warmup_epochs=0`` disables it.

    >>> margin_at_epoch(0.2, 0, 4), margin_at_epoch(0.2, 2, 4), margin_at_epoch(0.2, 9, 4)
    (0.0, 0.1, 0.2)
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if warmup_epochs == 0 or epoch >= warmup_epochs:
        return float(target)
    return float(target) * epoch / warmup_epochs


class _MarginSoftmax(nn.Module):
    """Shared part: normalised cosine logits, margin on the target column, scaled CE.

    Subclasses implement ``_target_logit(cos_target) -> cos'`` (unscaled).
    """

    def __init__(self, embed_dim: int, num_classes: int, margin: float = 0.2, scale: float = 30.0):
        super().__init__()
        if embed_dim < 1 or num_classes < 1:
            raise ValueError(f"embed_dim and num_classes must be >= 1, got {embed_dim}, {num_classes}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.xavier_normal_(self.weight)
        self.margin = 0.0
        self.set_margin(margin)

    def set_margin(self, m: float) -> None:
        """Change the margin in place (margin warm-up); the weights are untouched."""
        if not m >= 0:
            raise ValueError(f"margin must be >= 0, got {m}")
        self.margin = float(m)

    def _target_logit(self, cos_t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, E) embeddings -> (B, C) fp32 cosines to every class centre."""
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return F.linear(F.normalize(emb.float(), dim=1), F.normalize(self.weight.float(), dim=1))

    def logits(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, E), (B,) -> (B, C) fp32 scaled logits with the margin on each target column."""
        if emb.dim() != 2 or emb.shape[1] != self.embed_dim:
            raise ValueError(f"expected embeddings (B, {self.embed_dim}), got {tuple(emb.shape)}")
        if labels.shape != emb.shape[:1]:
            raise ValueError(f"expected labels ({emb.shape[0]},), got {tuple(labels.shape)}")
        cos = self.cosine(emb)  # (B, C)
        with torch.autocast(device_type=emb.device.type, enabled=False):
            index = labels.long().unsqueeze(1)  # (B, 1)
            cos_t = cos.gather(1, index).clamp(-1.0, 1.0)  # (B, 1)
            return self.scale * cos.scatter(1, index, self._target_logit(cos_t))

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the batch (fp32 scalar)."""
        logits = self.logits(emb, labels)
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return F.cross_entropy(logits, labels.long())

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_classes={self.num_classes}, margin={self.margin}, scale={self.scale}"


class AAMSoftmax(_MarginSoftmax):
    """Additive angular margin (ArcFace): target logit ``s * cos(theta + m)``.

    ``cos(theta + m)`` stops decreasing once ``theta + m > pi``, which would
    reward moving further away from the class. The standard fix (insightface,
    WeSpeaker): where ``theta > pi - m`` use ``cos(theta) - m * sin(m)`` instead,
    a CosFace-like penalty that stays monotone. ``easy_margin=True`` instead
    applies the margin only where ``cos(theta) > 0``.

    >>> head = AAMSoftmax(embed_dim=4, num_classes=3)
    >>> head(torch.randn(2, 4), torch.tensor([0, 2])).shape
    torch.Size([])
    """

    def __init__(self, embed_dim: int, num_classes: int, margin: float = 0.2, scale: float = 30.0,
                 easy_margin: bool = False):
        self.easy_margin = easy_margin
        super().__init__(embed_dim, num_classes, margin=margin, scale=scale)

    def set_margin(self, m: float) -> None:
        super().set_margin(m)
        self.cos_m = math.cos(self.margin)
        self.sin_m = math.sin(self.margin)
        self.th = math.cos(math.pi - self.margin)  # cos(theta) below this <=> theta + m > pi
        self.mm = math.sin(math.pi - self.margin) * self.margin  # = m * sin(m)

    def _target_logit(self, cos_t: torch.Tensor) -> torch.Tensor:
        sin_t = (1.0 - cos_t * cos_t).clamp(min=_SIN2_FLOOR).sqrt()
        phi = cos_t * self.cos_m - sin_t * self.sin_m  # cos(theta + m)
        if self.easy_margin:
            return torch.where(cos_t > 0, phi, cos_t)
        return torch.where(cos_t > self.th, phi, cos_t - self.mm)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", easy_margin={self.easy_margin}"


class AMSoftmax(_MarginSoftmax):
    """Additive cosine margin (AM-softmax / CosFace): target logit ``s * (cos(theta) - m)``.

    The main loss in the MFCon authors' code (margin 0.2, scale 30).

    >>> head = AMSoftmax(embed_dim=4, num_classes=3)
    >>> head(torch.randn(2, 4), torch.tensor([0, 2])).shape
    torch.Size([])
    """

    def _target_logit(self, cos_t: torch.Tensor) -> torch.Tensor:
        return cos_t - self.margin


MARGIN_LOSSES: dict[str, type[_MarginSoftmax]] = {"aam": AAMSoftmax, "am": AMSoftmax}
