"""Losses: math against slow references written from the formulas, the MFCon block
selection, and one contract suite that every loss passes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from mfcon.config import LossConfig, ModelConfig
from mfcon.losses.margin import MARGIN_LOSSES, AAMSoftmax, AMSoftmax, margin_at_epoch
from mfcon.losses.multiscale import LossParts, MFConLoss, SpeakerObjective
from mfcon.losses.supcon import supcon_loss
from torch import nn

B, T, D, E, C = 12, 9, 16, 8, 6
# 3 x speaker 0, 3 x speaker 1, 2 x speaker 2, then four singletons (anchors without a positive).
LABELS = [0, 0, 0, 1, 1, 1, 2, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------- slow references


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def supcon_reference(z: torch.Tensor, labels: torch.Tensor, t: float) -> float:
    """Khosla et al. 2020 eq. 2, loop by loop in float64."""
    zs, ys, n = z.double().tolist(), labels.tolist(), len(labels)
    per_anchor = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and ys[p] == ys[i]]
        if not positives:
            continue
        denom = sum(math.exp(_dot(zs[i], zs[a]) / t) for a in range(n) if a != i)
        terms = [math.log(math.exp(_dot(zs[i], zs[p]) / t) / denom) for p in positives]
        per_anchor.append(-sum(terms) / len(positives))
    return sum(per_anchor) / len(per_anchor) if per_anchor else 0.0


def margin_reference(emb, weight, labels, kind: str, m: float, s: float) -> float:
    """ArcFace: s*cos(theta+m) (s*(cos - m sin m) once theta+m > pi); CosFace: s*(cos - m); then CE."""
    embs, ws, ys = emb.double().tolist(), weight.double().tolist(), labels.tolist()
    losses = []
    for e, y in zip(embs, ys):
        logits = []
        for j, w in enumerate(ws):
            c = _dot(e, w) / math.sqrt(_dot(e, e) * _dot(w, w))
            if j == y and kind == "aam":
                theta = math.acos(max(-1.0, min(1.0, c)))
                c = math.cos(theta + m) if theta + m <= math.pi else c - m * math.sin(m)
            elif j == y and kind == "am":
                c = c - m
            logits.append(s * c)
        top = max(logits)
        lse = top + math.log(sum(math.exp(v - top) for v in logits))
        losses.append(lse - logits[y])
    return sum(losses) / len(losses)


# ---------------------------------------------------------------- supcon


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_supcon_matches_reference(temperature):
    g = torch.Generator().manual_seed(1)
    z = F.normalize(torch.randn(B, D, generator=g), dim=1)
    labels = torch.tensor(LABELS)
    got = supcon_loss(z, labels, temperature)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(supcon_reference(z, labels, temperature), rel=1e-5, abs=1e-5)


def test_supcon_lower_when_speakers_aligned():
    g = torch.Generator().manual_seed(2)
    labels = torch.tensor(LABELS)
    centres = F.normalize(torch.randn(int(labels.max()) + 1, D, generator=g), dim=1)
    aligned = F.normalize(centres[labels] + 0.05 * torch.randn(B, D, generator=g), dim=1)
    scattered = F.normalize(torch.randn(B, D, generator=g), dim=1)
    assert supcon_loss(aligned, labels, 0.1) < supcon_loss(scattered, labels, 0.1) - 1.0


def test_supcon_invariant_to_rotation_and_label_renaming():
    g = torch.Generator().manual_seed(3)
    z = F.normalize(torch.randn(B, D, generator=g), dim=1)
    labels = torch.tensor(LABELS)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    renamed = torch.tensor([7, 3, 11, 0, 5, 2, 9, 1, 4, 8, 6, 10])[labels]
    base = supcon_loss(z, labels, 0.1)
    torch.testing.assert_close(supcon_loss(z @ q, labels, 0.1), base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(supcon_loss(z, renamed, 0.1), base)


@pytest.mark.parametrize("n", [1, 5])
def test_supcon_no_positive_is_zero_with_grad(n):
    z = F.normalize(torch.randn(n, D), dim=1).requires_grad_()
    loss = supcon_loss(z, torch.arange(n), 0.07)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert z.grad is not None and torch.count_nonzero(z.grad) == 0


def test_supcon_runs_in_fp32_under_autocast():
    z = F.normalize(torch.randn(B, D), dim=1)
    labels = torch.tensor(LABELS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = supcon_loss(z, labels, 0.07)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, supcon_loss(z, labels, 0.07))


# ---------------------------------------------------------------- margin softmax


@pytest.mark.parametrize("kind,margin", [("aam", 0.2), ("aam", 0.5), ("am", 0.2), ("am", 0.35)])
def test_margin_loss_matches_reference(kind, margin):
    torch.manual_seed(4)
    head = MARGIN_LOSSES[kind](E, C, margin=margin, scale=30.0)
    emb, labels = torch.randn(B, E), torch.randint(0, C, (B,))
    expected = margin_reference(emb, head.weight.detach(), labels, kind, margin, 30.0)
    assert head(emb, labels).item() == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_aam_fallback_past_pi_matches_reference_and_is_monotone():
    head = AAMSoftmax(2, 2, margin=0.5, scale=10.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    theta = torch.linspace(0, math.pi, 181)
    emb = torch.stack([theta.cos(), theta.sin()], dim=1)  # angle theta to class 0
    labels = torch.zeros(181, dtype=torch.long)
    target = head.logits(emb, labels)[:, 0]
    assert torch.all(target.diff() <= 1e-5), "target logit must not grow as the angle grows"
    expected = margin_reference(emb[-3:], head.weight.detach(), labels[-3:], "aam", 0.5, 10.0)
    assert head(emb[-3:], labels[-3:]).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("cls", [AAMSoftmax, AMSoftmax])
def test_zero_margin_is_normalised_softmax(cls):
    torch.manual_seed(5)
    head = cls(E, C, margin=0.0, scale=30.0)
    emb, labels = torch.randn(B, E), torch.randint(0, C, (B,))
    plain = F.cross_entropy(30.0 * F.normalize(emb, dim=1) @ F.normalize(head.weight, dim=1).T, labels)
    torch.testing.assert_close(head(emb, labels), plain, rtol=1e-6, atol=1e-6)


def test_aam_easy_margin_skips_obtuse_angles():
    head = AAMSoftmax(2, 2, margin=0.3, scale=1.0, easy_margin=True)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    emb = torch.tensor([[-1.0, 0.2], [1.0, 0.2]])
    logits = head.logits(emb, torch.tensor([0, 0]))
    cos = F.normalize(emb, dim=1)[:, 0]
    assert logits[0, 0].item() == pytest.approx(cos[0].item())  # cos <= 0: no margin
    assert logits[1, 0].item() == pytest.approx(math.cos(math.acos(cos[1].item()) + 0.3), rel=1e-5)


@pytest.mark.parametrize("cls", [AAMSoftmax, AMSoftmax])
def test_margin_loss_fp32_under_autocast(cls):
    torch.manual_seed(6)
    head = cls(E, C)
    emb, labels = torch.randn(B, E), torch.randint(0, C, (B,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head(emb, labels)
        from_bf16 = head(emb.bfloat16(), labels)
    assert got.dtype == from_bf16.dtype == torch.float32
    torch.testing.assert_close(got, head(emb, labels))


def test_set_margin_and_warmup():
    assert [margin_at_epoch(0.2, e, 4) for e in (0, 2, 4, 9)] == pytest.approx([0.0, 0.1, 0.2, 0.2])
    assert margin_at_epoch(0.2, 0, 0) == 0.2
    head = AMSoftmax(E, C, margin=0.2)
    torch.manual_seed(7)
    emb, labels = torch.randn(B, E), torch.randint(0, C, (B,))
    with_margin = head(emb, labels)
    head.set_margin(0.0)
    assert head(emb, labels) < with_margin
    with pytest.raises(ValueError):
        head.set_margin(-0.1)


def test_objective_applies_margin_warmup():
    cfg = LossConfig(margin_loss="aam", margin=0.2, margin_warmup_epochs=4)
    obj = SpeakerObjective(cfg, ModelConfig(d_model=D, num_heads=2, num_blocks=2, embed_dim=E), C)
    assert obj.margin_loss.margin == 0.0  # epoch 0 before any set_epoch call
    assert obj.set_epoch(2) == pytest.approx(0.1) and obj.margin_loss.margin == pytest.approx(0.1)
    obj.set_epoch(7)
    assert obj.margin_loss.margin == pytest.approx(0.2)


# ---------------------------------------------------------------- MFCon block selection


def _model_cfg(num_blocks=4):
    return ModelConfig(d_model=D, num_heads=2, num_blocks=num_blocks, embed_dim=E)


def _mask(lengths):
    return torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def _toy_model(num_blocks=4, seed=0):
    """A Linear per block, each reading the same input: block b's output depends only on its own Linear."""
    torch.manual_seed(seed)
    blocks = nn.ModuleList(nn.Linear(5, D) for _ in range(num_blocks))
    to_emb = nn.Linear(5, E)
    x = torch.randn(B, T, 5)
    mask = _mask([T, T - 1, T - 2, 4, T, 5, T, T - 3, 6, T, 7, T])

    def forward():
        maps = [torch.tanh(blk(x)) for blk in blocks]  # num_blocks x (B, T, D)
        emb = to_emb((x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True))  # (B, E)
        return SimpleNamespace(embedding=emb, feature_maps=maps, mask=mask)

    return blocks, to_emb, forward


@pytest.mark.parametrize("kind", ["aam", "am"])
@pytest.mark.parametrize("weight,blocks", [(0.0, "all"), (0.0, [1, 3]), (0.1, "none"), (0.1, [])])
def test_objective_without_mfcon_is_exactly_the_margin_loss(kind, weight, blocks):
    cfg = LossConfig(margin_loss=kind, mfcon_weight=weight, mfcon_blocks=blocks)
    torch.manual_seed(8)
    obj = SpeakerObjective(cfg, _model_cfg(), C)
    assert obj.mfcon is None and obj.selected_blocks == ()
    assert [name for name, _ in obj.named_parameters()] == ["margin_loss.weight"]
    baseline = MARGIN_LOSSES[kind](E, C, margin=cfg.margin, scale=cfg.scale)
    baseline.load_state_dict(obj.margin_loss.state_dict())
    _, _, forward = _toy_model()
    out = forward()
    labels = torch.tensor(LABELS) % C
    parts = obj(out, labels)
    assert isinstance(parts, LossParts)
    assert torch.equal(parts.total, baseline(out.embedding, labels))
    assert torch.equal(parts.total, parts.margin) and parts.mfcon.item() == 0.0


def test_only_selected_blocks_get_heads_and_gradient():
    cfg = LossConfig(margin_loss="am", mfcon_weight=0.5, mfcon_blocks=[1, 3])
    obj = SpeakerObjective(cfg, _model_cfg(4), C)
    assert obj.selected_blocks == (1, 3)
    assert sorted(obj.mfcon.heads) == ["1", "3"]
    one_head = sum(p.numel() for p in obj.mfcon.heads["1"].parameters())
    assert sum(p.numel() for p in obj.mfcon.parameters()) == 2 * one_head
    assert not any(".2." in n or ".4." in n for n, _ in obj.named_parameters())

    blocks, to_emb, forward = _toy_model(4)
    out = forward()
    labels = torch.tensor(LABELS) % C
    parts = obj(out, labels)
    torch.testing.assert_close(parts.total, parts.margin + 0.5 * parts.mfcon)

    map_grads = torch.autograd.grad(parts.mfcon, out.feature_maps, retain_graph=True, allow_unused=True)
    assert map_grads[1] is None and map_grads[3] is None
    assert map_grads[0].abs().sum() > 0 and map_grads[2].abs().sum() > 0

    parts.mfcon.backward()
    for b, blk in enumerate(blocks, start=1):
        grad = blk.weight.grad
        if b in (1, 3):
            assert grad is not None and grad.abs().sum() > 0, f"block {b} got no MFCon gradient"
        else:
            assert grad is None, f"unselected block {b} got MFCon gradient"
    assert to_emb.weight.grad is None  # MFCon does not touch the embedding path
    for p in obj.mfcon.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_mfcon_is_mean_over_blocks_and_ignores_padding():
    torch.manual_seed(9)
    loss = MFConLoss(D, [1, 3], temperature=0.1)
    maps = [torch.randn(B, T, D) for _ in range(4)]
    mask = _mask([T, 3, T, 4, 5, T, T, 6, T, 7, T, 8])
    labels = torch.tensor(LABELS)
    per_block = loss.per_block(maps, mask, labels)
    assert sorted(per_block) == [1, 3]
    torch.testing.assert_close(loss(maps, mask, labels), (per_block[1] + per_block[3]) / 2)
    junk = [m.masked_fill(~mask.unsqueeze(-1), 1e3) for m in maps]  # only padded frames change
    torch.testing.assert_close(loss(junk, mask, labels), loss(maps, mask, labels))


def test_mfcon_rejects_bad_selection_and_inputs():
    with pytest.raises(ValueError, match="at least one"):
        MFConLoss(D, [])
    with pytest.raises(ValueError, match="1-based"):
        MFConLoss(D, [0, 1])
    loss = MFConLoss(D, [3])
    with pytest.raises(ValueError, match="feature maps"):
        loss([torch.randn(B, T, D)] * 2, torch.ones(B, T, dtype=torch.bool), torch.tensor(LABELS))
    obj = SpeakerObjective(LossConfig(mfcon_weight=0.1, mfcon_blocks=[1]), _model_cfg(4), C)
    out = SimpleNamespace(embedding=torch.randn(B, E), feature_maps=[torch.randn(B, T, D)] * 3,
                          mask=torch.ones(B, T, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_blocks=4"):
        obj(out, torch.tensor(LABELS) % C)


def test_objective_overfits_a_tiny_batch():
    cfg = LossConfig(margin_loss="aam", mfcon_weight=0.1, mfcon_blocks="all")
    torch.manual_seed(10)
    obj = SpeakerObjective(cfg, _model_cfg(4), C)
    blocks, to_emb, forward = _toy_model(4, seed=10)
    params = [*obj.parameters(), *blocks.parameters(), *to_emb.parameters()]
    labels = torch.tensor(LABELS) % C
    first = None
    for _ in range(30):  # plain gradient descent: a torch.optim step costs ~2 s of lazy imports
        parts = obj(forward(), labels)
        first = first if first is not None else (parts.margin.item(), parts.mfcon.item())
        grads = torch.autograd.grad(parts.total, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(0.1 * g)
    assert parts.margin.item() < 0.5 * first[0] and parts.mfcon.item() < first[1]


# ---------------------------------------------------------------- shared contract suite


def _batch(seed=11):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        embedding=torch.randn(B, E, generator=g, requires_grad=True),
        feature_maps=[torch.randn(B, T, D, generator=g, requires_grad=True) for _ in range(4)],
        mask=_mask([T, T - 1, 3, T, 5, T, 4, T, T - 2, 6, T, 7]),
        labels=torch.tensor(LABELS) % C,
    )


def _permuted(batch, perm):
    return SimpleNamespace(embedding=batch.embedding[perm], feature_maps=[m[perm] for m in batch.feature_maps],
                           mask=batch.mask[perm], labels=batch.labels[perm])


def _objective(**loss_kw):
    obj = SpeakerObjective(LossConfig(**loss_kw), _model_cfg(4), C)
    return lambda b: obj(b, b.labels).total


def _mfcon(**kw):
    loss = MFConLoss(D, [1, 3], temperature=0.1, **kw)
    return lambda b: loss(b.feature_maps, b.mask, b.labels)


def _margin(cls, **kw):
    head = cls(E, C, **kw)
    return lambda b: head(b.embedding, b.labels)


LOSS_CASES = {
    "supcon": lambda: (lambda b: supcon_loss(F.normalize(b.embedding, dim=1), b.labels, 0.07)),
    "aam": lambda: _margin(AAMSoftmax),
    "aam_easy": lambda: _margin(AAMSoftmax, easy_margin=True),
    "am": lambda: _margin(AMSoftmax),
    "mfcon_stats": lambda: _mfcon(pooling="stats"),
    "mfcon_asp": lambda: _mfcon(pooling="asp"),
    "mfcon_batchnorm": lambda: _mfcon(batch_norm=True),
    "objective_baseline": lambda: _objective(mfcon_weight=0.0),
    "objective_mfcon": lambda: _objective(margin_loss="am", mfcon_weight=0.1, mfcon_blocks="shallow"),
}


@pytest.fixture(params=sorted(LOSS_CASES))
def loss_fn(request):
    torch.manual_seed(12)
    return LOSS_CASES[request.param]()


def test_contract_finite_scalar_and_backward(loss_fn):
    batch = _batch()
    loss = loss_fn(batch)
    assert loss.shape == () and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [t.grad for t in (batch.embedding, *batch.feature_maps) if t.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_contract_deterministic(loss_fn):
    batch = _batch()
    assert torch.equal(loss_fn(batch), loss_fn(batch))


def test_contract_invariant_to_batch_order(loss_fn):
    batch = _batch()
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(13))
    torch.testing.assert_close(loss_fn(_permuted(batch, perm)), loss_fn(batch), rtol=1e-5, atol=1e-5)
