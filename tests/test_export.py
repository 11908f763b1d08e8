"""``mfcon export``: a TorchScript file that gives the model's own embeddings, or nothing at all.

The model is the untrained seeded micro MFA-Conformer of :mod:`registry_fixtures` (a checkpoint
of ``mfcon train``'s format); the registered-model path is exercised in ``test_score_cli``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mfcon.cli import main
from mfcon.config import ModelConfig
from mfcon.evaluation.scoring import extract_embeddings
from mfcon.models.conformer import rel_shift, rel_shift_copy
from mfcon.models.mfa_conformer import build_model
from mfcon.serving import export
from mfcon.train.checkpoint import load_checkpoint
from registry_fixtures import export_micro_model

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return export_micro_model(tmp_path_factory.mktemp("ckpt") / "best.pt", seed=0)


def _model(path):
    state = load_checkpoint(path)
    model = build_model(ModelConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model.eval()


def test_rel_shift_copy_equals_the_strided_view():
    for t in (1, 2, 7, 30):
        x = torch.randn(2, 3, t, 2 * t - 1)
        assert torch.equal(rel_shift_copy(x), rel_shift(x))


def test_an_exported_checkpoint_gives_the_same_embeddings_after_a_fresh_load(checkpoint, tmp_path, capsys):
    out = tmp_path / "speaker.pt"
    assert main(["export", "--model", str(checkpoint.parent), "--format", "torchscript", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"to {out}" in printed and f'torch.jit.load("{out}")(feats)' in printed

    model = _model(checkpoint)
    rng = np.random.default_rng(7)  # other inputs than the export's own check
    feats = [rng.standard_normal((t, model.cfg.n_mels)).astype(np.float32) for t in (model.min_frames(), 64, 250)]
    expected = extract_embeddings(model, feats, "cpu")
    scripted = torch.jit.load(str(out))
    with torch.no_grad():
        got = np.concatenate([scripted(torch.from_numpy(f)[None]).numpy() for f in feats])
    np.testing.assert_allclose(got, expected, atol=export.ATOL, rtol=export.RTOL)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    meta = export.read_export_metadata(out)
    assert (meta["n_mels"], meta["min_frames"], meta["embed_dim"]) == (
        model.cfg.n_mels, model.min_frames(), model.cfg.embed_dim)
    assert meta["source"] == str(checkpoint) and meta["checked"] == {"atol": export.ATOL, "rtol": export.RTOL}


def test_an_export_that_disagrees_writes_nothing(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "ATOL", -1.0)  # no embedding can pass
    with pytest.raises(export.ExportError, match="differ from the model's .* nothing was written"):
        export.export_torchscript(_model(checkpoint), tmp_path / "bad.pt")
    assert list(tmp_path.iterdir()) == []


def test_export_mistakes_are_one_line_errors(checkpoint, tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path / "nowhere.pt"), "--out", str(tmp_path / "m.pt")]) == 2
    assert "nowhere.pt: no such checkpoint file or model URI" in capsys.readouterr().err
    assert main(["export", "--model", str(checkpoint), "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path}: is a folder" in capsys.readouterr().err
    assert export.model_uri_of("mfcon-speaker@champion") == "models:/mfcon-speaker@champion"
    assert export.model_uri_of("mfcon-speaker/3") == "models:/mfcon-speaker/3"
    assert export.model_uri_of(str(checkpoint)) == str(checkpoint)
