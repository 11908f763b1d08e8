"""The attention, dropout and depthwise-conv rewrites compute what the code before them computed.

``ReferenceRelAttention`` is the relative-position attention as it was before the CPU fast path
(batch-major heads, ESPnet's pad-and-reshape ``rel_shift``, SDPA with the position term as float
mask), kept here as the reference; the package's version must match it, values and gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from mfcon.models.conformer import (
    ConvolutionModule,
    FastDropout,
    RelPositionMultiHeadSelfAttention,
    attend_with_bias,
    rel_shift,
    sinusoids,
)
from mfcon.models.mfa_conformer import mfa_conformer_tiny


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_rel_shift(x: torch.Tensor) -> torch.Tensor:
    """ESPnet's pad-and-reshape Transformer-XL shift, (B, H, T, 2T-1) -> (B, H, T, T)."""
    b, h, t, p = x.shape
    padded = F.pad(x, (1, 0)).view(b, h, p + 1, t)[:, :, 1:]
    return padded.reshape(b, h, t, p)[..., :t]


def reference_rel_attention(attn: RelPositionMultiHeadSelfAttention, x: torch.Tensor, mask: torch.Tensor,
                            pos_emb: torch.Tensor) -> torch.Tensor:
    """The previous forward, with ``attn``'s parameters: (B, T, D), (B, T) bool, (2T-1, D) -> (B, T, D)."""
    b, t, _ = x.shape
    h, d_k = attn.h, attn.d_k
    q, k, v = (lin(x).view(b, t, h, d_k).transpose(1, 2) for lin in (attn.linear_q, attn.linear_k, attn.linear_v))
    p = attn.linear_pos(pos_emb).view(-1, h, d_k).transpose(0, 1)  # (H, 2T-1, d_k)
    bd = reference_rel_shift(torch.matmul(q + attn.pos_bias_v[:, None, :], p.transpose(-2, -1)))  # (B, H, T, T)
    bias = (bd / math.sqrt(d_k)).masked_fill(~mask[:, None, None, :], float("-inf"))
    out = F.scaled_dot_product_attention(q + attn.pos_bias_u[:, None, :], k, v, attn_mask=bias)
    return attn.linear_out(out.transpose(1, 2).reshape(b, t, h * d_k))


def random_case(seed: int, b: int, t: int, d: int, heads: int, lengths: list[int]):
    torch.manual_seed(seed)
    attn = RelPositionMultiHeadSelfAttention(d, heads)
    x = torch.randn(b, t, d, requires_grad=True)
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    pos = sinusoids(torch.arange(t - 1, -t, -1), d)
    return attn, x, mask, pos


CASES = [  # (batch, frames, d_model, heads, lengths)
    (3, 17, 32, 4, [17, 9, 1]),
    (2, 40, 64, 2, [40, 23]),
    (4, 8, 16, 1, [8, 8, 5, 2]),
]


@pytest.mark.parametrize("b,t,d,heads,lengths", CASES)
def test_rel_attention_equals_reference_with_padding(b, t, d, heads, lengths):
    attn, x, mask, pos = random_case(0, b, t, d, heads, lengths)
    got, want = attn(x, mask, pos), reference_rel_attention(attn, x, mask, pos)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    g = torch.randn_like(got)
    grads_got = torch.autograd.grad(got, [x, *attn.parameters()], g)
    grads_want = torch.autograd.grad(want, [x, *attn.parameters()], g)
    names = ["x"] + [n for n, _ in attn.named_parameters()]
    for name, a, w in zip(names, grads_got, grads_want):
        torch.testing.assert_close(a, w, atol=1e-5, rtol=1e-5, msg=f"gradient of {name}")


def test_no_mask_equals_all_true_mask():
    attn, x, mask, pos = random_case(1, 3, 21, 32, 4, [21, 21, 21])
    torch.testing.assert_close(attn(x, None, pos), reference_rel_attention(attn, x, mask, pos), atol=1e-5, rtol=1e-5)


def test_rel_shift_view_equals_pad_and_reshape():
    x = torch.randn(2, 3, 11, 21)
    assert torch.equal(rel_shift(x), reference_rel_shift(x))
    with pytest.raises(ValueError, match="2T-1"):
        rel_shift(torch.randn(2, 3, 11, 20))


def test_cpu_attention_equals_sdpa_branch():
    """The CPU branch of ``attend_with_bias`` is the math of the SDPA branch CUDA takes, strided bias included."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(3, 2, 13, 8) for _ in range(3))
    bias = rel_shift(torch.randn(3, 2, 13, 25))  # the strided view the attention passes
    bias = bias.masked_fill(torch.arange(13) >= 9, float("-inf"))  # padded keys
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.contiguous())
    torch.testing.assert_close(attend_with_bias(q, k, v, bias, sdpa=False), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend_with_bias(q, k, v, bias, sdpa=True), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend_with_bias(q, k, v, rel_shift(torch.zeros(3, 2, 13, 25)), sdpa=False),
                               F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_fast_dropout_keeps_the_bernoulli_law():
    drop = FastDropout(0.25).train()
    x = torch.ones(400_000)
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.005  # 0.75 +- 7 standard errors
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # seeded
    xg = torch.ones(1000, requires_grad=True)
    out = drop(xg)
    out.sum().backward()
    assert torch.equal(xg.grad, out.detach())  # d(x * m / 0.75)/dx = m / 0.75 = y for x = 1
    drop.eval()
    assert drop(x) is x
    assert FastDropout(0.0).train()(x) is x


def test_depthwise_as_channels_last_conv2d_equals_conv1d():
    torch.manual_seed(3)
    module = ConvolutionModule(16, 7)
    x = torch.randn(2, 30, 16)
    want = module.depthwise(x.transpose(1, 2)).transpose(1, 2)
    got = module._depthwise(x)
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_unpadded_batch_skips_masks_with_the_same_result():
    """lengths=None (no masking anywhere) and explicit full lengths (every mask applied) agree."""
    torch.manual_seed(4)
    model = mfa_conformer_tiny().eval()
    feats = torch.randn(3, 90, 80)
    with torch.no_grad():
        masked_maps, mask = model.encoder(feats, torch.full((3,), 90))
        free_maps, free_mask = model.encoder(feats, None)
    assert torch.equal(mask, free_mask) and bool(mask.all())
    for a, b in zip(masked_maps, free_maps):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_model_dropout_acts_in_training_only():
    """Every FastDropout of a model with dropout > 0 draws in train mode, from the seeded generator."""
    model = mfa_conformer_tiny(dropout=0.1)
    feats, lengths = torch.randn(2, 60, 80), torch.tensor([60, 45])
    model.train()
    torch.manual_seed(5)
    a = model(feats, lengths).embedding
    torch.manual_seed(5)
    b = model(feats, lengths).embedding
    c = model(feats, lengths).embedding
    assert torch.equal(a, b) and not torch.allclose(a, c)
    model.eval()
    torch.testing.assert_close(model(feats, lengths).embedding, model(feats, lengths).embedding, atol=0, rtol=0)
