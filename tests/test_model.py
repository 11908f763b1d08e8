"""MFA-Conformer: shapes, masking, the relative-attention math, size, speed, trainability."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from mfcon.config import MODEL_PRESETS, ModelConfig
from mfcon.models.conformer import (
    RelPositionMultiHeadSelfAttention,
    rel_shift,
    sinusoids,
)
from mfcon.models.mfa_conformer import (
    MODEL_BUILDERS,
    MFAConformer,
    ModelOutput,
    build_model,
    count_parameters,
    mfa_conformer_paper,
    mfa_conformer_tiny,
)
from torch import nn

TINY = MODEL_PRESETS["tiny"]().model_dump()


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: OpenMP hand-offs cost more than they save, badly so on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(seed: int = 0, **overrides) -> MFAConformer:
    torch.manual_seed(seed)
    return mfa_conformer_tiny(**overrides)


# 100 and 70 input frames -> real frames after 1/2, 1/4, 1/8 conv subsampling (WeNet sizes: T' = (T-1)//2 per conv)
SUBSAMPLED = {2: (49, 34), 4: (24, 16), 8: (11, 7)}


@pytest.mark.parametrize("pos_enc", ["rel", "abs"])
@pytest.mark.parametrize("rate", [2, 4, 8])
def test_output_shapes(rate, pos_enc):
    model = tiny(subsampling=rate, pos_enc=pos_enc).eval()
    out = model(torch.randn(2, 100, 80), torch.tensor([100, 70]))
    assert isinstance(out, ModelOutput)
    t_full, t_short = SUBSAMPLED[rate]
    assert out.embedding.shape == (2, TINY["embed_dim"])
    assert len(out.feature_maps) == TINY["num_blocks"]
    for fmap in out.feature_maps:
        assert fmap.shape == (2, t_full, TINY["d_model"])
    assert out.mask.dtype == torch.bool and out.mask.shape == (2, t_full)
    assert out.mask.sum(1).tolist() == [t_full, t_short]
    assert torch.isfinite(out.embedding).all()


@pytest.mark.parametrize("pos_enc", ["rel", "abs"])
@pytest.mark.parametrize("rate", [2, 4])
def test_padded_in_batch_equals_alone(rate, pos_enc):
    model = tiny(subsampling=rate, pos_enc=pos_enc).eval()
    torch.manual_seed(1)
    short, long = torch.randn(1, 73, 80), torch.randn(1, 120, 80)
    batch = torch.cat([torch.cat([short, 5 * torch.randn(1, 47, 80)], dim=1), long])  # garbage padding
    with torch.no_grad():
        alone = model(short, torch.tensor([73]))
        both = model(batch, torch.tensor([73, 120]))
    torch.testing.assert_close(both.embedding[:1], alone.embedding, atol=1e-5, rtol=1e-5)
    n = alone.mask.sum().item()
    assert both.mask[0].sum().item() == n
    for a, b in zip(alone.feature_maps, both.feature_maps):
        torch.testing.assert_close(b[:1, :n], a, atol=1e-5, rtol=1e-5)


def test_frames_past_length_change_nothing():
    model = tiny().eval()
    feats = torch.randn(3, 90, 80)
    lengths = torch.tensor([90, 41, 60])
    junk = feats.clone()
    junk[1, 41:] = float("nan")
    junk[2, 60:] = 1e6
    with torch.no_grad():
        clean, dirty = model(feats, lengths), model(junk, lengths)
    assert torch.equal(clean.mask, dirty.mask)
    torch.testing.assert_close(dirty.embedding, clean.embedding, atol=0, rtol=0)
    for fmap in dirty.feature_maps:
        assert torch.isfinite(fmap).all()
        assert (fmap[~dirty.mask] == 0).all()  # padded frames are zero in every block output


def test_rel_shift_matches_gather():
    b, h, t = 2, 3, 7
    x = torch.randn(b, h, t, 2 * t - 1)  # column k holds offset T-1-k
    i, j = torch.meshgrid(torch.arange(t), torch.arange(t), indexing="ij")
    index = (t - 1 - i + j).expand(b, h, t, t)  # offset i - j
    assert torch.equal(rel_shift(x), x.gather(-1, index))


def test_relative_attention_matches_formula():
    """score(i,j) = [(q_i + u) . k_j + (q_i + v) . W_pos r(i-j)] / sqrt(d_k), padded keys excluded."""
    torch.manual_seed(0)
    d, heads, t = 16, 2, 6
    attn = RelPositionMultiHeadSelfAttention(d, heads).eval()
    x = torch.randn(2, t, d)
    mask = torch.tensor([[True] * t, [True] * 4 + [False] * 2])
    pos = sinusoids(torch.arange(t - 1, -t, -1), d)
    got = attn(x, mask, pos)

    dk = d // heads
    def split(y):
        return y.view(2, t, heads, dk)

    q, k, v = split(attn.linear_q(x)), split(attn.linear_k(x)), split(attn.linear_v(x))
    want = torch.zeros(2, t, heads, dk)
    for bi in range(2):
        for hi in range(heads):
            for qi in range(t):
                scores = torch.full((t,), float("-inf"))
                for kj in range(t):
                    if not mask[bi, kj]:
                        continue
                    r = attn.linear_pos(sinusoids(torch.tensor([qi - kj]), d)).view(heads, dk)[hi]
                    content = (q[bi, qi, hi] + attn.pos_bias_u[hi]) @ k[bi, kj, hi]
                    position = (q[bi, qi, hi] + attn.pos_bias_v[hi]) @ r
                    scores[kj] = (content + position) / math.sqrt(dk)
                want[bi, qi, hi] = torch.softmax(scores, 0) @ v[bi, :, hi]
    want = attn.linear_out(want.reshape(2, t, d))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_paper_parameter_count():
    model = mfa_conformer_paper()
    n = count_parameters(model)
    print(f"\nMFA-Conformer paper config (1/2 subsampling, no classifier): {n:,} parameters")
    # MFA-Conformer (Zhang et al. 2022, arXiv 2203.15249): ~19.8M in the authors' code, whose SpeechBrain ASP sees [x, mean, std] (+0.39M).
    assert 18_500_000 < n < 21_000_000
    assert n == count_parameters(build_model(ModelConfig()))


def test_tiny_is_small_and_fast():
    """Forward+backward of 32 x 200 frames needs well under one CPU-second.

    Timed on one thread (the autouse fixture) and as CPU time, not wall time:
    the test boxes are shared, and wall time there measures the neighbours.
    One thread's CPU time bounds the wall time on an idle machine.
    """
    model = tiny().train()
    n = count_parameters(model)
    assert n < 1_000_000
    feats, lengths = torch.randn(32, 200, 80), torch.full((32,), 200)

    def step() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        model.zero_grad(set_to_none=True)
        model(feats, lengths).embedding.square().mean().backward()
        return time.perf_counter() - wall, time.process_time() - cpu

    step()  # warm-up: oneDNN builds its conv primitives on first use
    walls, cpus = zip(*(step() for _ in range(2)))
    wall, cpu = min(walls), min(cpus)
    print(f"\ntiny: {n:,} parameters; forward+backward 32 x 200 frames on 1 thread: "
          f"{cpu:.3f} CPU-s ({wall:.3f} s wall)")
    assert cpu < 1.0


def test_gradient_reaches_every_block():
    model = tiny().train()
    out = model(torch.randn(4, 80, 80), torch.tensor([80, 61, 50, 80]))
    out.embedding.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    for i, block in enumerate(model.encoder.blocks, start=1):
        norm = sum(p.grad.norm() ** 2 for p in block.parameters()).sqrt()
        assert norm > 0, f"block {i} got no gradient"


def test_tiny_overfits_a_tiny_batch():
    model = tiny(seed=3).train()
    torch.manual_seed(3)
    n_speakers, per_speaker = 4, 3
    feats = torch.randn(n_speakers * per_speaker, 48, 80)
    lengths = torch.randint(30, 49, (n_speakers * per_speaker,))
    labels = torch.arange(n_speakers).repeat_interleave(per_speaker)
    head = nn.Linear(TINY["embed_dim"], n_speakers)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-3)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(head(model(feats, lengths).embedding), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], losses[::5]


def test_bf16_autocast_matches_fp32():
    model = tiny().eval()
    feats, lengths = torch.randn(3, 120, 80), torch.tensor([120, 100, 57])
    with torch.no_grad():
        ref = model(feats, lengths).embedding
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(feats, lengths).embedding
    assert torch.isfinite(low).all()
    assert F.cosine_similarity(low.float(), ref).min() > 0.98


def test_bad_inputs_raise_value_error():
    model = tiny()
    with pytest.raises(ValueError, match="feats must be"):
        model(torch.randn(2, 50, 40), torch.tensor([50, 50]))
    with pytest.raises(ValueError, match="lengths must lie"):
        model(torch.randn(2, 50, 80), torch.tensor([50, 3]))  # too short for 1/4 subsampling
    with pytest.raises(ValueError, match="lengths must lie"):
        model(torch.randn(2, 50, 80), torch.tensor([50, 51]))
    with pytest.raises(ValueError, match="lengths must be"):
        model(torch.randn(2, 50, 80), torch.tensor([50]))


def test_builders_and_embed():
    assert set(MODEL_BUILDERS) == set(MODEL_PRESETS)
    model = build_model("tiny").eval()
    assert model.cfg == ModelConfig(**TINY)
    feats = torch.randn(2, 60, 80)
    emb = model.embed(feats)  # lengths default to the full tensor
    assert emb.shape == (2, TINY["embed_dim"]) and not emb.requires_grad
    torch.testing.assert_close(emb, model(feats, torch.tensor([60, 60])).embedding)
    assert model.min_frames() == 7
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("huge")
