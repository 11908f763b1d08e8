"""A trained checkpoint as a speaker embedder: :class:`SpeakerEmbedder`, and loading one safely.

Logging lives in :mod:`mfcon.model_files` (re-exported here): a model logged "from code", whose
files' sha256 are recorded on the logged model. It stays a valid MLflow pyfunc for anyone who
chooses ``mlflow.pyfunc.load_model`` (needs ``mfcon`` installed; the entry file imports
:class:`SpeakerEmbedder` from ``mfcon.serving``).

mfcon itself never calls MLflow's pyfunc loader chain: :func:`load_embedder` resolves the URI to
its logged model, downloads the files, holds them to the exact layout mfcon writes
(:func:`mfcon.model_files.check_model_dir`: refused with :class:`UntrustedModelError` otherwise)
and to the checksums recorded when it was logged, then builds the embedder from the checkpoint
(``weights_only=True``, :func:`mfcon.train.checkpoint.load_checkpoint`) and the feature config
(JSON) directly. Nothing from the model directory is imported, executed or unpickled.

Example::

    uri = log_speaker_model(client, run_id, "best.pt", manifest.feature_config)  # "models:/m-..."
    emb = load_embedder(uri, tracking_uri).embed_waveforms([wav1, wav2])  # (2, E)
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from mfcon.config import FeatureConfig, ModelConfig
from mfcon.data.features import compute_fbank
from mfcon.evaluation.scoring import extract_embeddings
from mfcon.model_files import (  # noqa: F401 - re-exported: serving's public names
    FILES_TAG,
    MODEL_URI_TAG,
    UntrustedModelError,
    check_model_digests,
    check_model_dir,
    check_no_symlinks,
    log_speaker_model,
    model_signature,
    quiet_artifacts,
    use_tracking_uri,
)
from mfcon.models.mfa_conformer import build_model
from mfcon.train.checkpoint import CheckpointError, load_checkpoint

INPUT_COLUMNS = ("waveform", "fbank")
_RUN_MODEL = re.compile(r"^runs:/(?P<run>[^/]+)/(?P<name>[^/]+)/?$")
_REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class SpeakerEmbedder(mlflow.pyfunc.PythonModel):
    """Batch of waveforms or fbank matrices -> (N, E) float32 L2-normalised embeddings.

    ``predict`` takes a DataFrame whose rows hold a ``waveform`` (float samples
    at the model's sample rate, any length) or an ``fbank`` ((T, n_mels)).
    Through ``PyFuncModel.predict`` MLflow enforces the signature: a DataFrame
    of any number of rows, or a dict holding one input. Device: ``cuda`` when
    available, else ``cpu``; ``load_model(uri, model_config={"device": "cpu"})``
    overrides it.
    """

    def load_context(self, context) -> None:
        """MLflow's entry point, for people who load the model with ``mlflow.pyfunc.load_model``."""
        self._build(context.artifacts["checkpoint"], context.artifacts["feature_config"],
                    (context.model_config or {}).get("device"))

    @classmethod
    def from_files(cls, checkpoint: str | Path, feature_config: str | Path, device: str | None = None,
                   where: str = "") -> SpeakerEmbedder:
        """The embedder of a weights-only checkpoint and its feature config (JSON); what mfcon's loader uses."""
        embedder = cls()
        embedder._build(checkpoint, feature_config, device, where)
        return embedder

    def _build(self, checkpoint: str | Path, feature_config: str | Path, device: str | None = None,
               where: str = "") -> None:
        state = load_checkpoint(checkpoint)
        try:
            self.feature_config = FeatureConfig(**json.loads(Path(feature_config).read_text()))
            self.model_config = ModelConfig(**state["model_config"])
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise UntrustedModelError(f"{where or feature_config}: not a readable mfcon model "
                                      f"({type(e).__name__}: {e})") from None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = build_model(self.model_config)
        self.model.load_state_dict(state["model"])
        self.model.eval().to(self.device)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        # The DataFrame hint turns off MLflow's type-hint validation: the explicit signature applies.
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(_rows_of(model_input))
        unknown = set(frame.columns) - set(INPUT_COLUMNS)
        if unknown:
            raise ValueError(f"unknown input columns {sorted(unknown)}; use 'waveform' or 'fbank'")
        feats = []
        for i in range(len(frame)):
            wav, fb = (frame[c].iloc[i] if c in frame.columns else None for c in INPUT_COLUMNS)
            if _present(wav) == _present(fb):
                raise ValueError(f"input row {i}: give exactly one of 'waveform' or 'fbank'")
            feats.append(self.fbank(wav, i) if _present(wav) else _as_fbank(fb, i, self.feature_config.num_mel_bins))
        return self.embed_features(feats)

    def fbank(self, waveform, row: int | str = 0) -> np.ndarray:
        wav = np.asarray(waveform, dtype=np.float32)
        if wav.ndim != 1:
            raise ValueError(f"input {row}: waveform must be 1-D samples, got shape {wav.shape}")
        return compute_fbank(wav, self.feature_config).numpy()  # (T, n_mels)

    def embed_features(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """List of (T, n_mels) -> (N, E); the code path of ``scoring.extract_embeddings``."""
        need = self.model.min_frames()
        short = [i for i, f in enumerate(features) if len(f) < need]
        if short:
            raise ValueError(f"inputs {short[:5]} are shorter than {need} frames "
                             f"({need * self.feature_config.frame_shift_ms / 1000:.2f} s), the model's minimum")
        if not len(features):
            return np.zeros((0, self.model_config.embed_dim), dtype=np.float32)
        return extract_embeddings(self.model, features, self.device)

    def embed_waveforms(self, waveforms: Sequence[np.ndarray], names: Sequence[str] | None = None) -> np.ndarray:
        names = names or range(len(waveforms))
        return self.embed_features([self.fbank(w, n) for w, n in zip(waveforms, names)])


def _present(value: Any) -> bool:
    return value is not None and not (np.isscalar(value) and pd.isna(value))


def _rows_of(data: Mapping[str, Any]) -> dict[str, list]:
    """{"waveform": one 1-D array | list of arrays} -> column lists (a dict of one input is one row)."""
    if not isinstance(data, Mapping):
        raise ValueError(  # noqa: TRY004 - mfcon's input errors are ValueErrors (the CLI prints them as one line)
            f"expected a DataFrame or a dict with 'waveform' or 'fbank', got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        single_dims = 1 if key == "waveform" else 2
        arr = value if isinstance(value, np.ndarray) else None
        one = arr is not None and arr.dtype != object and arr.ndim == single_dims
        out[key] = [value] if one else list(value)
    return out


def _as_fbank(cell: Any, row: int, n_mels: int) -> np.ndarray:
    """A (T, F) matrix from an array, or the list-of-rows form MLflow's schema enforcement yields."""
    if isinstance(cell, (list, tuple)) or (isinstance(cell, np.ndarray) and cell.dtype == object):
        cell = np.stack([np.asarray(r, dtype=np.float32) for r in cell]) if len(cell) else np.zeros((0, n_mels))
    x = np.asarray(cell, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != n_mels:
        raise ValueError(f"input row {row}: fbank must be (T, {n_mels}), got shape {x.shape}")
    return x


# ---------------------------------------------------------------- loading: nothing from the model runs

def logged_model_of(client, model_uri: str):
    """The MLflow logged model behind ``models:/m-<id>``, ``models:/<name>/<N>``, ``models:/<name>@<alias>``
    or ``runs:/<run>/<name>``; any other URI (a local folder, a bare artifact path) is refused."""
    from mlflow.exceptions import MlflowException

    from mfcon.names import RegistryError

    body = model_uri[len("models:/"):].rstrip("/") if model_uri.startswith("models:/") else None
    registered, run_model = _REGISTERED.match(model_uri), _RUN_MODEL.match(model_uri)
    try:
        if body is not None and body.startswith("m-") and "/" not in body and "@" not in body:
            model_id = body
        elif registered:
            name, alias, version = registered["name"], registered["alias"], registered["version"]
            mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
            source = re.match(r"^models:/(m-[^/@]+)/?$", mv.source or "")  # the SQL registry keeps no model_id
            model_id = getattr(mv, "model_id", None) or (source.group(1) if source else None)
            if not model_id:
                raise UntrustedModelError(f"{model_uri}: refused: version {mv.version} was registered from "
                                          f"{mv.source}, not from a model logged by log_speaker_model")
        elif run_model:
            run = client.get_run(run_model["run"])
            outputs = run.outputs.model_outputs if run.outputs else []
            found = [o.model_id for o in outputs if client.get_logged_model(o.model_id).name == run_model["name"]]
            if not found:
                raise RegistryError(f"{model_uri}: run {run_model['run']} logged no model named {run_model['name']!r}")
            model_id = found[-1]
        else:
            raise UntrustedModelError(
                f"{model_uri}: refused: mfcon loads only logged models (models:/m-<id>, models:/<name>/<version>, "
                "models:/<name>@<alias> or runs:/<run>/<name>), whose files it can check against the checksums "
                "recorded when they were logged")
        return client.get_logged_model(model_id)
    except MlflowException as e:
        raise RegistryError(f"{model_uri}: no such model in {client.tracking_uri} ({e.error_code}); promote a "
                            "study first (mfcon promote --study NAME --data DIR) or check the URI") from None


def _local_folder(location: str) -> Path | None:
    """The folder of a logged model kept on this machine's disk (file:// or a path), else None."""
    if location.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(location).path))
    if "://" not in location and ":/" not in location and Path(location).is_absolute():
        return Path(location)
    return None


def load_embedder(model_uri: str, tracking_uri: str | None = None, device: str | None = None) -> SpeakerEmbedder:
    """The :class:`SpeakerEmbedder` of a logged mfcon model, built without MLflow's pyfunc loader.

    The URI is resolved to its logged model (a registry version through its ``model_id``), the
    model's folder is downloaded to a private temporary folder, refused unless it is exactly what
    :func:`log_speaker_model` writes (:func:`check_model_dir`; a local artifact store is also
    checked for symlinks before the copy) and byte for byte what was logged (the sha256 of every
    file, recorded on the logged model); then the checkpoint is read with ``weights_only=True`` and
    the feature config as JSON. ``device`` overrides the default (cuda when available, else cpu).
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri) if tracking_uri else MlflowClient()
    where = model_uri.rstrip("/")
    logged = logged_model_of(client, model_uri)
    source = _local_folder(logged.artifact_location or "")
    if source is not None and source.is_dir():
        check_no_symlinks(source, where)
    with use_tracking_uri(tracking_uri), quiet_artifacts(), \
            tempfile.TemporaryDirectory(prefix="mfcon-model-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{logged.model_id}", dst_path=tmp))
        files = check_model_dir(local, where)
        check_model_digests(local, logged.tags.get(FILES_TAG), where, logged.model_id)
        try:
            return SpeakerEmbedder.from_files(files.checkpoint, files.feature_config, device, where)
        except CheckpointError as e:  # name the model, not the temporary copy
            raise CheckpointError(str(e).replace(str(local), where)) from None


def check_speaker_model(model_dir: Path, model_uri: str = "") -> None:
    """Refuse a model folder unless it is exactly what :func:`log_speaker_model` writes (see ``check_model_dir``)."""
    check_model_dir(model_dir, model_uri)


def embedder_of(model: SpeakerEmbedder | mlflow.pyfunc.PyFuncModel) -> SpeakerEmbedder:
    """The SpeakerEmbedder itself (what :func:`load_embedder` returns), or the one behind a loaded pyfunc."""
    if isinstance(model, SpeakerEmbedder):
        return model
    inner = model.unwrap_python_model()
    if not isinstance(inner, SpeakerEmbedder):
        raise UntrustedModelError(
            f"model {model.metadata.model_uuid} is not an mfcon speaker embedder ({type(inner).__name__})")
    return inner
