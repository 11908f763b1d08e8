"""``mfcon export``: a model as a TorchScript file, checked on export to give the same embeddings.

What is exported is the embedder without its feature front end: fbank features in,
L2-normalised embedding out (:class:`FeatureEmbedder`)::

    feats   (B, T, n_mels) float32   log-Mel fbank as mfcon computes it (the model's FeatureConfig,
                                     kept in the file as extra file ``mfcon.json``); every frame real
                                     (no padding), T >= min_frames (also in ``mfcon.json``)
    output  (B, E) float32           L2-normalised embedding, as ``mfcon embed`` / ``verify`` use it

so ``torch.jit.load("model.pt")(feats)`` needs neither mfcon nor MLflow. Utterances of
different lengths are embedded one at a time (B = 1), or batched with equal lengths: the
exported module takes no lengths, so a padded frame would count as speech.

The model is built the safe way serving builds it (:func:`mfcon.serving.load_embedder`:
the logged model's files held to the layout and checksums recorded when it was logged, the
checkpoint read with ``weights_only=True``), or from a checkpoint of ``mfcon train`` read
the same way. It is traced on CPU (``torch.jit.trace``; the relative-position shift uses
its traceable copy, :func:`mfcon.models.conformer.rel_shift_copy`, so the trace holds for
every T), saved with ``torch.jit.save``, loaded back with ``torch.jit.load`` and compared
with the model itself (mfcon's embedding path, :func:`mfcon.evaluation.scoring.
extract_embeddings`) on seeded random features of several lengths: every embedding must
agree within ``atol=1e-5, rtol=1e-4`` (:data:`ATOL`, :data:`RTOL`), else nothing is
written. The trace records the CPU attention path; only CPU is checked.

ONNX is not offered: neither ``onnx`` nor ``onnxruntime`` is a dependency of mfcon, so an
ONNX export could not be checked to give the same embeddings here (docs/evaluation.md).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mfcon.config import FeatureConfig, ModelConfig

FORMATS = ("torchscript",)
ATOL, RTOL = 1e-5, 1e-4  # TorchScript vs eager embeddings (unit vectors): float32 reordering only
CHECK_FRAMES = (0, 157, 301, 613)  # lengths of the check inputs; 0 stands for the model's minimum
TRACE_FRAMES = 200
EXTRA_FILE = "mfcon.json"
_SHORTHAND = re.compile(r"^[A-Za-z0-9][\w.-]*(@[\w-]+|/\d+)$")  # NAME@ALIAS or NAME/VERSION of the registry


class ExportError(ValueError):
    """A model that cannot be exported, or an export that does not give the model's embeddings."""


class FeatureEmbedder(nn.Module):
    """fbank (B, T, n_mels) float32, every frame real -> (B, E) float32 L2-normalised embeddings."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model(feats).embedding.float(), dim=-1)  # (B, E)


@dataclass
class ExportedModel:
    path: Path
    source: str  # the model as resolved: a registry URI, a logged model, or the checkpoint file
    n_mels: int
    embed_dim: int
    min_frames: int
    checked_frames: tuple[int, ...]
    max_abs_diff: float  # largest |TorchScript - model| over the check embeddings


def model_uri_of(spec: str) -> str:
    """``NAME@ALIAS`` / ``NAME/N`` (a registered model) -> ``models:/...``; anything else is returned as is."""
    from mfcon.evaluation.score_lists import is_mlflow_uri

    if not is_mlflow_uri(spec) and not Path(spec).exists() and _SHORTHAND.match(spec):
        return f"models:/{spec}"
    return spec


def load_for_export(spec: str, tracking_uri: str) -> tuple[nn.Module, FeatureConfig | None, str]:
    """(the model on CPU in eval mode, its feature config when the model says, where it came from)."""
    from mfcon.evaluation.score_lists import check_model_spec, is_mlflow_uri

    source, _ = check_model_spec(spec, tracking_uri)
    if is_mlflow_uri(source):
        from mfcon.serving import embedder_of, load_embedder

        embedder = embedder_of(load_embedder(source, tracking_uri, device="cpu"))
        return embedder.model.eval(), embedder.feature_config, source
    from mfcon.models.mfa_conformer import build_model
    from mfcon.train.checkpoint import load_checkpoint

    state = load_checkpoint(source)  # weights_only=True
    if not {"model", "model_config"} <= set(state):
        raise ExportError(f"{source}: a torch file, but not an mfcon model checkpoint (no 'model'/'model_config' "
                          "entries); give best.pt or last.pt of mfcon train")
    model = build_model(ModelConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model.eval(), None, source


def check_features(model: nn.Module, seed: int = 0) -> list[np.ndarray]:
    """Seeded random (T, n_mels) inputs, one per :data:`CHECK_FRAMES` length (the model's minimum included)."""
    rng = np.random.default_rng(seed)
    n_mels = model.cfg.n_mels
    return [rng.standard_normal((t or model.min_frames(), n_mels)).astype(np.float32) for t in CHECK_FRAMES]


def compare(scripted: torch.jit.ScriptModule, model: nn.Module, feats: list[np.ndarray]) -> float:
    """Largest |difference| between the TorchScript module (one utterance at a time, and one batch of two equal
    lengths) and the model's own embeddings; ExportError when any is beyond ``ATOL + RTOL * |expected|``."""
    from mfcon.evaluation.scoring import extract_embeddings

    expected = extract_embeddings(model, feats, "cpu")  # (N, E): what embed / verify / score compute
    with torch.no_grad():
        got = np.concatenate([scripted(torch.from_numpy(f)[None]).numpy() for f in feats])
        pair = scripted(torch.from_numpy(np.stack([feats[-1], feats[-1][::-1].copy()]))).numpy()
    expected = np.concatenate([expected, extract_embeddings(model, [feats[-1], feats[-1][::-1].copy()], "cpu")])
    got = np.concatenate([got, pair])
    diff = float(np.abs(got - expected).max())
    if not np.allclose(got, expected, atol=ATOL, rtol=RTOL):
        raise ExportError(f"the TorchScript module's embeddings differ from the model's by up to {diff:.2e} "
                          f"(allowed: atol {ATOL:g} + rtol {RTOL:g}); nothing was written")
    return diff


def export_torchscript(model: nn.Module, out: str | Path, feature_config: FeatureConfig | None = None,
                       source: str = "", seed: int = 0) -> ExportedModel:
    """Trace ``model`` (an MFAConformer) to ``out``, load it back and check it (module docstring).

    >>> from mfcon.models.mfa_conformer import mfa_conformer_tiny
    >>> r = export_torchscript(mfa_conformer_tiny().eval(), "/tmp/tiny.pt")  # doctest: +SKIP
    >>> torch.jit.load(r.path)(torch.randn(1, 300, 80)).shape  # doctest: +SKIP
    torch.Size([1, 64])
    """
    from mfcon.files import atomic_path

    model = model.eval().to("cpu")
    wrapper = FeatureEmbedder(model).eval()
    example = torch.randn(1, max(TRACE_FRAMES, model.min_frames()), model.cfg.n_mels,
                          generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation, and the trace's notes on the models' input checks
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    meta = {"input": f"fbank (B, T, {model.cfg.n_mels}) float32, every frame real, T >= {model.min_frames()}",
            "output": f"(B, {model.cfg.embed_dim}) float32, L2-normalised", "n_mels": model.cfg.n_mels,
            "min_frames": model.min_frames(), "embed_dim": model.cfg.embed_dim, "source": source,
            "feature_config": feature_config.model_dump(mode="json") if feature_config is not None else None,
            "model_config": model.cfg.model_dump(mode="json"), "checked": {"atol": ATOL, "rtol": RTOL}}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    feats = check_features(model, seed)
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.9+ deprecates torch.jit for torch.export
        torch.jit.save(traced, str(tmp), _extra_files={EXTRA_FILE: json.dumps(meta, indent=1)})
        diff = compare(torch.jit.load(str(tmp), map_location="cpu"), model, feats)
    return ExportedModel(out, source, model.cfg.n_mels, model.cfg.embed_dim, model.min_frames(),
                         tuple(len(f) for f in feats), diff)


def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """The ``mfcon.json`` an export carries: input/output shapes, feature and model config, the tolerance.

    Read from the archive as a zip member, never by ``torch.jit.load``: reading what a file says it is
    must not deserialise a program from it."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            (member,) = [n for n in archive.namelist() if n.endswith(f"/extra/{EXTRA_FILE}")]
            return json.loads(archive.read(member))
    except (zipfile.BadZipFile, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not an mfcon TorchScript export (no extra/{EXTRA_FILE} inside)") from e