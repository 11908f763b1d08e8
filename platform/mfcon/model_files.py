"""A speaker model's files: how mfcon logs one to MLflow, and how a copy of one is checked before use.

The one home of model logging: :mod:`mfcon.tracking` (a trial's model, written by the spool's
replayer) and :mod:`mfcon.serving` (loading, and promotion's fallback logging) both import this
module, and it imports neither of them, so there is no import cycle between the two.

What :func:`log_speaker_model` writes is a valid MLflow pyfunc logged "from code" (MLflow 3's
recommended form, for people who choose to load it with ``mlflow.pyfunc.load_model``): a
three-line entry file ``speaker_embedder.py`` that imports :class:`mfcon.serving.SpeakerEmbedder`,
and two artifacts, the weights-only checkpoint (``artifacts/best.pt``) and the
:class:`~mfcon.config.FeatureConfig` it was trained with (``artifacts/feature_config.json``). Right
after logging, the sha256 of every file of the model as stored is recorded on the logged model
(tag ``mfcon.model_files_sha256``).

mfcon itself never hands a model directory to MLflow's loader chain (which imports the entry file,
follows the flavor's ``data:`` key to a second ``MLmodel``, puts ``code`` folders on ``sys.path``,
may unpickle a ``python_model``, and opens artifact paths as given). :func:`check_model_dir`
holds a downloaded copy to exactly the layout above — one ``python_function`` flavor with the
models-from-code loader, mfcon's own entry file byte for byte, no ``data``/``code``/pickle keys,
artifact paths relative and inside the folder, no symlinks — and :func:`check_model_digests` holds
its bytes to the checksums recorded when it was logged. Serving then reads the two artifacts
itself (``torch.load(weights_only=True)`` and JSON), so loading executes nothing from the model.

Example::

    uri = log_speaker_model(client, run_id, "best.pt", manifest.feature_config)  # "models:/m-..."
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from mfcon.config import FeatureConfig, ModelConfig
from mfcon.train.checkpoint import load_checkpoint

MODEL_URI_TAG = "mfcon.model_uri"  # run tag: the pyfunc model logged for this run
FILES_TAG = "mfcon.model_files_sha256"  # logged-model tag: {relative path: sha256} of the model as logged
ENTRY_NAME = "speaker_embedder.py"
ENTRY = '"""MLflow models-from-code entry."""\nimport mlflow\nfrom mfcon.serving import SpeakerEmbedder\n\n' \
        "mlflow.models.set_model(SpeakerEmbedder())\n"
# Entry files a logged mfcon model may carry. Append when ENTRY changes, never edit: models logged by earlier
# versions keep their entry, and must still load.
KNOWN_ENTRIES = frozenset({ENTRY})
CODE_LOADER = "mlflow.pyfunc.loaders.code_model"  # pyfunc loader of models logged from code
ARTIFACTS = ("checkpoint", "feature_config")  # the python_function flavor's artifacts, exactly these
# Keys of the python_function flavor that MLflow writes for a model logged from code; any other key (``data``,
# ``python_model``, ``model_config``, ...) changes what MLflow's loader would do, so a model carrying one is refused.
FLAVOR_KEYS = frozenset({"artifacts", "cloudpickle_version", "code", "env", "loader_module", "model_code_path",
                         "python_version", "streamable"})
_REQUIREMENTS = ("mlflow", "torch", "torchaudio", "numpy", "pandas", "pydantic", "soundfile", "pyarrow", "pyyaml")
_QUIET = ("An input example was not provided",)  # an explicit signature is passed instead
_NOT_OURS = "mfcon loads only models written by log_speaker_model"
DOWNLOAD_NOTE = "registered_model_meta"  # written by MLflow into every download of a models:/ URI; never read


class UntrustedModelError(ValueError):
    """A model is not exactly what :func:`log_speaker_model` writes, or its files changed since it was logged."""


@dataclass(frozen=True)
class ModelFiles:
    """The two files of a checked model copy that serving reads (absolute paths inside the copy)."""

    checkpoint: Path
    feature_config: Path


# ---------------------------------------------------------------- MLflow plumbing (no mfcon.tracking import)

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
    import mlflow
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


@contextlib.contextmanager
def quiet_artifacts() -> Iterator[None]:
    """No tqdm bar per artifact upload/download (``mfcon.tracking.no_artifact_progress_bars`` is this)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def model_signature(embed_dim: int):
    """Variable-length inputs: one array per row (MLflow ``Array``), so neither T nor N is fixed.

    ``double`` rather than ``float``: MLflow refuses to cast Python float lists
    to float32, while float32 arrays widen to float64 exactly (and back).
    """
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import Array, ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec(Array(DataType.double), "waveform", required=False),
                     ColSpec(Array(Array(DataType.double)), "fbank", required=False)])
    return ModelSignature(inputs, Schema([TensorSpec(np.dtype(np.float32), (-1, embed_dim))]))


def _pip_requirements() -> list[str]:
    """Pinned to this environment; ``mfcon`` itself must be installed where the model loads."""
    return [f"{name}=={metadata.version(name)}" for name in _REQUIREMENTS]


# ---------------------------------------------------------------- logging

def log_speaker_model(client, run_id: str, checkpoint_file: str | Path,
                      feature_config: FeatureConfig | Mapping[str, Any], name: str = "model",
                      tracking_uri: str | None = None) -> str:
    """Log ``checkpoint_file`` as a pyfunc model of run ``run_id``; returns its ``models:/m-...`` URI.

    The store is ``tracking_uri``, else the client's, else MLflow's current one.
    Resuming the run marks it RUNNING then FINISHED, so its status and end
    time are put back afterwards (a pruned trial stays as it was); no run stays
    active. The model as stored is then read back, checked, and the sha256 of
    each of its files recorded on the logged model (tag ``mfcon.model_files_sha256``);
    the URI is recorded as the run tag ``mfcon.model_uri``.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or (client.tracking_uri if client is not None else mlflow.get_tracking_uri())
    client = MlflowClient(uri)
    before = client.get_run(run_id).info
    state = load_checkpoint(checkpoint_file)
    embed_dim = ModelConfig(**state["model_config"]).embed_dim
    fcfg = feature_config if isinstance(feature_config, FeatureConfig) else FeatureConfig(**feature_config)
    with tempfile.TemporaryDirectory(prefix="mfcon-model-") as tmp:
        entry, fjson = Path(tmp, ENTRY_NAME), Path(tmp, "feature_config.json")
        entry.write_text(ENTRY)
        fjson.write_text(fcfg.model_dump_json(indent=1))
        with use_tracking_uri(uri), quiet_artifacts(), warnings.catch_warnings():
            for text in _QUIET:
                warnings.filterwarnings("ignore", message=f".*{text}")
            with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
                info = mlflow.pyfunc.log_model(
                    name=name, python_model=str(entry),
                    artifacts={"checkpoint": str(checkpoint_file), "feature_config": str(fjson)},
                    signature=model_signature(embed_dim), pip_requirements=_pip_requirements())
            stored = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{info.model_id}",
                                                              dst_path=str(Path(tmp, "stored"))))
        check_model_dir(stored, info.model_uri)  # what was stored is what mfcon will load
        client.set_logged_model_tags(info.model_id, {FILES_TAG: json.dumps(file_digests(stored), sort_keys=True)})
    if before.status != "RUNNING":
        client.set_terminated(run_id, status=before.status, end_time=before.end_time)
    else:
        client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, MODEL_URI_TAG, info.model_uri)
    return info.model_uri


# ---------------------------------------------------------------- checking a copy

def _refuse(where: str, problem: str) -> UntrustedModelError:
    return UntrustedModelError(f"{where}: refused: not an mfcon speaker model ({problem}); {_NOT_OURS}")


def _walk(folder: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relative posix path, lstat) of everything below ``folder``, symlinks not followed."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for entry in sorted(dirnames + filenames):
            path = Path(dirpath, entry)
            yield path.relative_to(folder).as_posix(), path.lstat()


def check_no_symlinks(folder: Path, where: str) -> None:
    """Refuse a model folder holding a symlink (it would reach outside the model directory) or a special file."""
    for rel, st in _walk(folder):
        if stat.S_ISLNK(st.st_mode):
            raise _refuse(where, f"{rel} is a symlink; a model's files must lie inside its directory")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise _refuse(where, f"{rel} is not a regular file")


def _inside(folder: Path, rel: Any, what: str, where: str) -> Path:
    """``folder/rel`` for a relative path that stays inside ``folder`` and is a regular file (no symlink)."""
    if not isinstance(rel, str) or not rel:
        raise _refuse(where, f"{what} has no path")
    if rel.startswith(("/", "\\")) or os.path.isabs(rel) or PurePosixPath(rel).is_absolute() or ":" in rel:
        raise _refuse(where, f"{what} is an absolute path ({rel}); artifact paths are relative to the model")
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if ".." in parts:
        raise _refuse(where, f"{what} ({rel}) climbs outside the model directory")
    path = folder.joinpath(*parts)
    current = folder
    for part in parts:  # no symlink anywhere on the way, so the resolved path cannot leave the folder
        current = current / part
        if current.is_symlink():
            raise _refuse(where, f"{what} ({rel}) is a symlink; a model's files must lie inside its directory")
    if not path.resolve().is_relative_to(folder.resolve()):
        raise _refuse(where, f"{what} ({rel}) resolves outside the model directory")
    if not path.is_file():
        raise _refuse(where, f"{what} ({rel}) is not a file of the model")
    return path


def check_model_dir(folder: str | Path, where: str = "") -> ModelFiles:
    """Refuse a model folder unless it is exactly what :func:`log_speaker_model` writes; return its two files.

    Checked from the folder alone (no MLflow call, nothing imported or unpickled): no symlinks; an
    ``MLmodel`` (safe YAML) with only the ``python_function`` flavor, MLflow's models-from-code loader,
    no ``data`` key (MLflow would read a second ``MLmodel`` from there, naming any code), no ``code``
    folder, no pickled ``python_model`` nor any other key mfcon never writes; mfcon's own entry file
    byte for byte; exactly the ``checkpoint`` and ``feature_config`` artifacts, each a relative path
    inside the folder.
    """
    folder = Path(folder)
    where = where or str(folder)
    check_no_symlinks(folder, where)
    try:
        meta = yaml.safe_load((folder / "MLmodel").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UntrustedModelError(f"{where}: no readable MLmodel file ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("flavors"), dict):
        raise _refuse(where, "its MLmodel has no flavors mapping")
    flavor = meta["flavors"].get("python_function")
    if not isinstance(flavor, dict):
        raise _refuse(where, "it has no python_function flavor")
    loader = flavor.get("loader_module")
    if loader != CODE_LOADER:
        raise _refuse(where, f"its pyfunc loader {loader!r} is not MLflow's models-from-code loader; it would import "
                             "or unpickle what the model names")
    if "data" in flavor:
        raise _refuse(where, f"its python_function flavor has a 'data' key ({flavor['data']!r}): MLflow would read a "
                             "second MLmodel from there, which can name any code file")
    if flavor.get("code"):
        raise _refuse(where, f"it adds a code folder ({flavor['code']!r}), which MLflow puts on sys.path ahead of "
                             "mfcon")
    unknown = sorted(set(flavor) - FLAVOR_KEYS)
    if unknown:
        pickled = " (a pickled python_model)" if any(k.startswith("python_model") for k in unknown) else ""
        raise _refuse(where, f"its python_function flavor has keys mfcon never writes: {', '.join(unknown)}{pickled}")
    others = sorted(set(meta["flavors"]) - {"python_function"})
    if others:
        raise _refuse(where, f"it carries other flavors ({', '.join(others)}) whose loaders mfcon does not trust")
    entry = flavor.get("model_code_path")
    name = PurePosixPath(str(entry).replace("\\", "/")).name if entry else ""
    if name != ENTRY_NAME:
        raise _refuse(where, f"its entry file {name or entry!r} is not mfcon's SpeakerEmbedder entry")
    entry_file = folder / ENTRY_NAME
    try:
        entry_text = entry_file.read_text() if entry_file.is_file() else None
    except (OSError, UnicodeDecodeError):
        entry_text = None
    if entry_text not in KNOWN_ENTRIES:
        raise _refuse(where, f"its entry file {ENTRY_NAME} is not mfcon's SpeakerEmbedder entry")
    artifacts = flavor.get("artifacts")
    if not isinstance(artifacts, dict) or sorted(artifacts) != sorted(ARTIFACTS):
        names = sorted(artifacts) if isinstance(artifacts, dict) else artifacts
        raise _refuse(where, f"its artifacts are {names!r}, expected exactly {list(ARTIFACTS)}")
    paths = {}
    for key in ARTIFACTS:
        info = artifacts[key]
        rel = info.get("path") if isinstance(info, dict) else None
        paths[key] = _inside(folder, rel, f"artifact {key!r}", where)
    return ModelFiles(paths["checkpoint"], paths["feature_config"])


def file_digests(folder: str | Path) -> dict[str, str]:
    """{relative posix path: sha256} of every regular file below ``folder`` (MLflow's download note aside)."""
    folder = Path(folder)
    digests = {}
    for rel, st in _walk(folder):
        if stat.S_ISREG(st.st_mode) and rel != DOWNLOAD_NOTE:
            h = hashlib.sha256()
            with open(folder / rel, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            digests[rel] = h.hexdigest()
    return digests


def check_model_digests(folder: str | Path, recorded: str | None, where: str, model_id: str = "") -> None:
    """The folder's files are exactly those recorded when the model was logged, byte for byte (sha256)."""
    owner = f"logged model {model_id}" if model_id else "the model"
    if not recorded:
        raise UntrustedModelError(
            f"{where}: refused: no checksums recorded on {owner} (tag {FILES_TAG}); it was not logged by this "
            "mfcon's log_speaker_model (an older mfcon recorded none), or its tag was removed; log the run's "
            "checkpoint/best.pt again with mfcon.serving.log_speaker_model")
    try:
        expected = json.loads(recorded)
        if not isinstance(expected, dict) or not all(isinstance(v, str) for v in expected.values()):
            raise ValueError("not a mapping of path to sha256")
    except ValueError as e:
        raise UntrustedModelError(f"{where}: refused: the checksums recorded on {owner} (tag {FILES_TAG}) cannot be "
                                  f"read ({e})") from None
    actual = file_digests(folder)
    for rel in sorted(set(expected) | set(actual)):
        if rel not in actual:
            problem = "is missing"
        elif rel not in expected:
            problem = "was added after the model was logged"
        elif actual[rel] != expected[rel]:
            problem = "does not match the sha256 recorded when the model was logged"
        else:
            continue
        raise UntrustedModelError(f"{where}: refused: {rel} {problem} (tag {FILES_TAG} of {owner}); the model's "
                                  "files were changed in the artifact store")
