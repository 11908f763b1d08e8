"""A trained checkpoint as an MLflow pyfunc speaker embedder: log it, load it.

The model is logged "from code" (MLflow 3's recommended form): a three-line
entry file that imports :class:`SpeakerEmbedder` (``from mfcon.serving import
SpeakerEmbedder``) is stored with it instead of a cloudpickle, so loading runs
no pickled code and needs ``mfcon`` installed (``pip install -e .``).
:func:`load_embedder` holds every model to that before MLflow loads it: a
model with a pickled ``python_model``, extra code on its path, or an entry file
other than mfcon's is refused (:class:`UntrustedModelError`), since loading it
would run whatever its author wrote. Its
artifacts are the weights-only checkpoint (``checkpoint/best.pt`` of a trial
run, see :mod:`mfcon.train.checkpoint`) and the :class:`FeatureConfig` the
model was trained with, so serving computes exactly the training features
(:func:`mfcon.data.features.compute_fbank`).

Example::

    uri = log_speaker_model(client, run_id, "best.pt", manifest.feature_config)  # "models:/m-..."
    emb = load_embedder(uri, tracking_uri).predict(pd.DataFrame({"waveform": [wav1, wav2]}))  # (2, E)
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import DataType
from mlflow.types.schema import Array, ColSpec, Schema, TensorSpec

from mfcon.config import FeatureConfig, ModelConfig
from mfcon.data.features import compute_fbank
from mfcon.models.mfa_conformer import build_model
from mfcon.evaluation.scoring import extract_embeddings
from mfcon.tracking import no_artifact_progress_bars
from mfcon.train.checkpoint import CheckpointError, load_checkpoint

MODEL_URI_TAG = "mfcon.model_uri"  # run tag: the pyfunc model logged for this run
INPUT_COLUMNS = ("waveform", "fbank")
_REQUIREMENTS = ("mlflow", "torch", "torchaudio", "numpy", "pandas", "pydantic", "soundfile", "pyarrow", "pyyaml")
_ENTRY = '"""MLflow models-from-code entry."""\nimport mlflow\nfrom mfcon.serving import SpeakerEmbedder\n\n' \
         "mlflow.models.set_model(SpeakerEmbedder())\n"
_QUIET = ("An input example was not provided",)  # we pass an explicit signature instead
_CODE_LOADER = "mlflow.pyfunc.loaders.code_model"  # pyfunc loader of models logged from code
# Entry files a registered mfcon model may carry. Append when _ENTRY changes, never edit: models logged by
# earlier versions keep their entry, and must still load.
_KNOWN_ENTRIES = frozenset({_ENTRY})


class UntrustedModelError(ValueError):
    """A model is not an mfcon speaker model logged from code; loading it could run foreign or pickled code."""


@contextlib.contextmanager
def use_tracking_uri(uri: str | None) -> Iterator[None]:
    """Point MLflow's process-global tracking and registry URIs at ``uri``, then restore them exactly.

    ``mlflow.set_tracking_uri(None)`` also deletes ``MLFLOW_TRACKING_URI`` from
    the environment, so the previous globals *and* environment variables are
    saved and put back. Not thread-safe (the URIs are process globals).
    """
    if uri is None:
        yield
        return
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri,
             {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")})
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry_utils._registry_uri = saved[1]
        for key, value in saved[2].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
        state = load_checkpoint(context.artifacts["checkpoint"])
        self.feature_config = FeatureConfig(**json.loads(Path(context.artifacts["feature_config"]).read_text()))
        self.model_config = ModelConfig(**state["model_config"])
        device = (context.model_config or {}).get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
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


def model_signature(embed_dim: int) -> ModelSignature:
    """Variable-length inputs: one array per row (MLflow ``Array``), so neither T nor N is fixed.

    ``double`` rather than ``float``: MLflow refuses to cast Python float lists
    to float32, while float32 arrays widen to float64 exactly (and back).
    """
    inputs = Schema([ColSpec(Array(DataType.double), "waveform", required=False),
                     ColSpec(Array(Array(DataType.double)), "fbank", required=False)])
    return ModelSignature(inputs, Schema([TensorSpec(np.dtype(np.float32), (-1, embed_dim))]))


def _pip_requirements() -> list[str]:
    """Pinned to this environment; ``mfcon`` itself must be installed where the model loads."""
    return [f"{name}=={metadata.version(name)}" for name in _REQUIREMENTS]


def log_speaker_model(client: MlflowClient | None, run_id: str, checkpoint_file: str | Path,
                      feature_config: FeatureConfig | Mapping[str, Any], name: str = "model",
                      tracking_uri: str | None = None) -> str:
    """Log ``checkpoint_file`` as a pyfunc model of run ``run_id``; returns its ``models:/m-...`` URI.

    The store is ``tracking_uri``, else the client's, else MLflow's current one.
    Resuming the run marks it RUNNING then FINISHED, so its status and end
    time are put back afterwards (a pruned trial stays as it was); no run stays
    active. The URI is also recorded as the run tag ``mfcon.model_uri``.
    """
    uri = tracking_uri or (client.tracking_uri if client is not None else mlflow.get_tracking_uri())
    client = MlflowClient(uri)
    before = client.get_run(run_id).info
    state = load_checkpoint(checkpoint_file)
    embed_dim = ModelConfig(**state["model_config"]).embed_dim
    fcfg = feature_config if isinstance(feature_config, FeatureConfig) else FeatureConfig(**feature_config)
    with tempfile.TemporaryDirectory() as tmp:
        entry, fjson = Path(tmp, "speaker_embedder.py"), Path(tmp, "feature_config.json")
        entry.write_text(_ENTRY)
        fjson.write_text(fcfg.model_dump_json(indent=1))
        with use_tracking_uri(uri), no_artifact_progress_bars(), warnings.catch_warnings():
            for text in _QUIET:
                warnings.filterwarnings("ignore", message=f".*{text}")
            with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
                info = mlflow.pyfunc.log_model(
                    name=name, python_model=str(entry),
                    artifacts={"checkpoint": str(checkpoint_file), "feature_config": str(fjson)},
                    signature=model_signature(embed_dim), pip_requirements=_pip_requirements())
    if before.status != "RUNNING":
        client.set_terminated(run_id, status=before.status, end_time=before.end_time)
    else:
        client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, MODEL_URI_TAG, info.model_uri)
    return info.model_uri


def load_embedder(model_uri: str, tracking_uri: str | None = None,
                  device: str | None = None) -> mlflow.pyfunc.PyFuncModel:
    """``mlflow.pyfunc.load_model`` against ``tracking_uri`` (registry too); ``device`` overrides cuda/cpu.

    The model is downloaded and checked (:func:`check_speaker_model`) before
    MLflow imports or unpickles anything from it; its checkpoint is then read
    with ``weights_only=True`` (:func:`mfcon.train.checkpoint.load_checkpoint`).
    """
    with use_tracking_uri(tracking_uri), no_artifact_progress_bars(), \
            tempfile.TemporaryDirectory(prefix="mfcon-model-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        check_speaker_model(local, model_uri)
        try:
            return mlflow.pyfunc.load_model(str(local), model_config={"device": device} if device else None)
        except Exception as e:
            cause = _mfcon_cause(e)
            if isinstance(cause, CheckpointError):  # raised in load_context, wrapped by MLflow: name the model
                raise CheckpointError(str(cause).replace(str(local), model_uri.rstrip("/"))) from None
            if cause is not None:
                raise cause from None
            raise


def check_speaker_model(model_dir: Path, model_uri: str = "") -> None:
    """Refuse a downloaded model unless it is exactly what :func:`log_speaker_model` writes.

    Its pyfunc flavor must use MLflow's models-from-code loader, carry no
    ``code`` folder (it would go on ``sys.path`` ahead of mfcon) and no pickled
    ``python_model``, and its entry file must be mfcon's own, byte for byte.
    """
    where = model_uri or str(model_dir)
    try:
        meta = yaml.safe_load((model_dir / "MLmodel").read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UntrustedModelError(f"{where}: no readable MLmodel file ({e})") from None
    flavor = (meta.get("flavors") or {}).get("python_function") or {}
    loader, entry = flavor.get("loader_module"), flavor.get("model_code_path")
    problem = None
    if loader != _CODE_LOADER or not entry:
        problem = f"its pyfunc loader {loader!r} would unpickle a python_model; mfcon models are logged from code"
    elif flavor.get("code") or "python_model" in flavor:
        problem = "it adds a code folder or a pickled python_model"
    else:
        code_file = model_dir / Path(str(entry)).name
        if not code_file.is_file() or code_file.read_text() not in _KNOWN_ENTRIES:
            problem = f"its entry file {Path(str(entry)).name} is not mfcon's SpeakerEmbedder entry"
    if problem:
        raise UntrustedModelError(f"{where}: refused: not an mfcon speaker model ({problem}); "
                                  "mfcon loads only models written by log_speaker_model")


def _mfcon_cause(err: BaseException) -> BaseException | None:
    """The first mfcon input error (a ValueError from an mfcon module) in an exception's cause chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ValueError) and type(err).__module__.startswith("mfcon"):
            return err
        err = err.__cause__ or err.__context__
    return None


def embedder_of(model: mlflow.pyfunc.PyFuncModel) -> SpeakerEmbedder:
    """The SpeakerEmbedder behind a loaded pyfunc: lists of arrays in, no DataFrame or float64 copies."""
    inner = model.unwrap_python_model()
    if not isinstance(inner, SpeakerEmbedder):
        raise UntrustedModelError(
            f"model {model.metadata.model_uuid} is not an mfcon speaker embedder ({type(inner).__name__})")
    return inner
