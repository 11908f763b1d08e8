"""Supervised contrastive loss (SupCon, Khosla et al. 2020, eq. 2 "L_out").

For each anchor ``i`` with positives ``P(i)`` (other samples of the same
speaker) and ``A(i)`` = every other sample in the batch::

    l_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a in A(i)} exp(z_i.z_a / t) )

The batch loss is the mean of ``l_i`` over anchors that have at least one
positive, as in the MFCon authors' code; anchors without one are excluded
rather than counted as zero (counting them would shrink the loss by the fraction
of singleton speakers in the batch, i.e. silently change lambda).

Computed vectorised in fp32 with ``logsumexp``: at t = 0.07 the logits reach
1/0.07 ~ 14, where a plain ``exp`` in fp16 overflows.
"""

from __future__ import annotations

import torch


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon L_out over a batch of L2-normalised vectors.

    z: (B, D), each row L2-normalised by the caller; labels: (B,) integer class ids.
    Returns an fp32 scalar. If no anchor has a positive it returns 0 that is
    still connected to ``z`` (zero gradient), so ``backward()`` and DDP's
    "every parameter gets a gradient" bookkeeping keep working.

    >>> z = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    >>> supcon_loss(z, torch.tensor([0, 0, 1, 1]), temperature=0.07).shape
    torch.Size([])
    """
    if z.dim() != 2:
        raise ValueError(f"expected z of shape (B, D), got {tuple(z.shape)}")
    if labels.shape != z.shape[:1]:
        raise ValueError(f"expected labels of shape ({z.shape[0]},), got {tuple(labels.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch = z.shape[0]
    with torch.autocast(device_type=z.device.type, enabled=False):
        zf = z.float()
        if batch < 2:  # no pair at all; an empty sum is 0 and keeps the graph
            return zf.flatten()[:0].sum()
        eye = torch.eye(batch, dtype=torch.bool, device=z.device)  # (B, B)
        logits = (zf @ zf.T / temperature).masked_fill(eye, float("-inf"))  # (B, B), a != i
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # (B, B)
        positive = (labels.unsqueeze(0) == labels.unsqueeze(1)) & ~eye  # (B, B)
        n_pos = positive.sum(dim=1)  # (B,)
        # where() rather than multiply: the diagonal of log_prob is -inf and -inf * 0 = nan.
        pos_sum = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(dim=1)  # (B,)
        per_anchor = -pos_sum / n_pos.clamp(min=1)  # (B,), 0 for anchors without positives
        has_pos = n_pos > 0
        # Sum / count instead of per_anchor[has_pos].mean(): no host sync, and a
        # batch without positives gives 0 / 1 = 0 still attached to z.
        return per_anchor.sum() / has_pos.sum().clamp(min=1)
