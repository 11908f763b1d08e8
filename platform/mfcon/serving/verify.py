"""Using a model: verify recordings, embed audio files, and resolve which model version does it.

Scoring contract (shared with :func:`mfcon.promotion.registry.promote`): embeddings from
the registered pyfunc (:mod:`mfcon.serving.embedder`), cosine after subtracting
the mean embedding of the promotion's eval set (:func:`centered_cosine`), as
:func:`mfcon.evaluation.scoring.score_trials` scores a trial list. That mean is stored on
the registered version (tag ``score_mean``, JSON floats, exact float32 round
trip) together with the EER threshold of those scores (``eer_threshold``), so
a single pair is scored exactly as the trial list was. A version promoted with
AS-norm (tag ``score_norm=asnorm``) also carries its cohort: the training
speakers' embeddings as an ``.npy`` artifact (tags ``score_cohort``,
``score_cohort_sha256``, ``score_top_n``), applied by the same
:class:`mfcon.evaluation.score_norm.TrialScorer`.

A ``models:/name@alias`` or ``models:/name/N`` URI is pinned to its version
first (:func:`pin_model_uri`), so what scored is named exactly.

Example::

    verify("a.wav", "b.wav", tracking_uri="sqlite:////abs/runs/mlflow.db").accepted
    embed("wav/", "emb.parquet", tracking_uri="sqlite:////abs/runs/mlflow.db")
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mfcon.data.audio import load_audio
from mfcon.data.corpus.voxceleb import AUDIO_EXTENSIONS
from mfcon.files import atomic_path, file_sha256
from mfcon.names import DEFAULT_MODEL_URI, RegistryError
from mfcon.evaluation.score_norm import DEFAULT_TOP_N, TrialScorer, centered_cosine  # noqa: F401 - re-exported
from mfcon.serving.embedder import SpeakerEmbedder, embedder_of, load_embedder
from mfcon.tracking import TrackingUnavailable, check_tracking_uri, no_artifact_progress_bars

_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class VerifyResult:
    score: float
    threshold: float
    accepted: bool
    model_uri: str = ""  # the version that scored, pinned (models:/name/N)


@dataclass
class ServedModel:
    """A loaded embedder plus the scoring recipe stored on its registered version."""

    embedder: SpeakerEmbedder
    model_uri: str  # pinned: models:/name/<version> when it came from the registry
    version: str | None
    threshold: float | None
    mean: np.ndarray | None
    cohort: np.ndarray | None = None  # AS-norm cohort (S, E) when the version was promoted with one
    top_n: int = DEFAULT_TOP_N

    @property
    def scorer(self) -> TrialScorer:
        return TrialScorer(self.mean, self.cohort, self.top_n)


# ---------------------------------------------------------------- which model version

def open_registry(tracking_uri: str) -> MlflowClient:
    """A client for tracking + registry at ``tracking_uri``, after checking the store exists and answers."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        raise TrackingUnavailable(f"MLflow store {tracking_uri} does not exist; run a study first, "
                                  "or point --workdir/--tracking-uri at the one it used")
    if not tracking_uri.startswith(("sqlite:", "postgresql", "mysql", "mssql", "http:", "https:", "databricks")):
        raise TrackingUnavailable(f"{tracking_uri}: the model registry needs a database-backed store "
                                  "(e.g. sqlite:////abs/runs/mlflow.db) or a tracking server")
    check_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri, registry_uri=tracking_uri)


def pin_model_uri(model_uri: str, tracking_uri: str | None) -> tuple[str, str | None, dict[str, str]]:
    """``models:/name@alias`` or ``models:/name/N`` -> (``models:/name/N``, N, version tags); others unchanged."""
    match = _REGISTRY_URI.match(model_uri)
    if not match:
        return model_uri, None, {}
    client = open_registry(tracking_uri) if tracking_uri else MlflowClient()
    name, alias, version = match["name"], match["alias"], match["version"]
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException:
        raise RegistryError(f"{model_uri}: no such registered model version in {client.tracking_uri} "
                            "(promote a study first: mfcon promote --study NAME --data DIR)") from None
    return f"models:/{name}/{mv.version}", str(mv.version), dict(mv.tags)


def load_served_model(model_uri: str = DEFAULT_MODEL_URI, tracking_uri: str | None = None) -> ServedModel:
    pinned, version, tags = pin_model_uri(model_uri, tracking_uri)
    threshold = float(tags["eer_threshold"]) if "eer_threshold" in tags else None
    mean = np.asarray(json.loads(tags["score_mean"]), dtype=np.float32) if "score_mean" in tags else None
    cohort = load_cohort(tags, tracking_uri, pinned)
    return ServedModel(embedder_of(load_embedder(pinned, tracking_uri)), pinned, version, threshold, mean, cohort,
                       int(tags.get("score_top_n", DEFAULT_TOP_N)))


# ---------------------------------------------------------------- the AS-norm cohort of a version

COHORT_DIR = "scoring"


def store_cohort(client: MlflowClient, model_name: str, version: str, run_id: str, cohort: np.ndarray) -> str:
    """Log a version's AS-norm cohort beside its run (plain .npy, no pickle) and point the version at it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, f"cohort-{model_name}-v{version}.npy")
        np.save(path, np.asarray(cohort, dtype=np.float32), allow_pickle=False)
        digest = file_sha256(path)
        client.log_artifact(run_id, str(path), artifact_path=COHORT_DIR)
    uri = f"runs:/{run_id}/{COHORT_DIR}/{path.name}"
    client.set_model_version_tag(model_name, version, "score_cohort", uri)
    client.set_model_version_tag(model_name, version, "score_cohort_sha256", digest)
    return uri


def load_cohort(tags: dict[str, str], tracking_uri: str | None, model_uri: str) -> np.ndarray | None:
    """The version's cohort when it was promoted with AS-norm; its sha256 must match what promotion stored."""
    if tags.get("score_norm") != "asnorm":
        return None
    if "score_cohort" not in tags:
        raise RegistryError(f"{model_uri} was promoted with AS-norm but has no score_cohort tag; promote it again")
    import mlflow.artifacts

    with tempfile.TemporaryDirectory() as tmp, no_artifact_progress_bars():
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=tags["score_cohort"], dst_path=tmp,
                                                        tracking_uri=tracking_uri)
        except (MlflowException, OSError) as e:
            raise RegistryError(f"{model_uri}: AS-norm cohort {tags['score_cohort']} cannot be read ({e})") from None
        if file_sha256(local) != tags.get("score_cohort_sha256"):
            raise RegistryError(f"{model_uri}: AS-norm cohort {tags['score_cohort']} does not match its sha256 tag")
        return np.load(local, allow_pickle=False)


# ---------------------------------------------------------------- scoring and embedding

def list_audio_inputs(inputs: str | Path) -> list[tuple[str, Path]]:
    """A folder (every wav/flac below it, utt id = relative posix path) or a list file (one path per line,
    relative ones against the list's folder; the line is the utt id) -> sorted (utt_id, path)."""
    inputs = Path(inputs)
    if inputs.is_dir():
        files = [p for p in inputs.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()]
        items = sorted((p.relative_to(inputs).as_posix(), p) for p in files)
    elif inputs.is_file():
        items, first = [], {}
        for n, line in enumerate(inputs.read_text().splitlines(), 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            if text in first:
                raise ValueError(f"{inputs}:{n}: {text} is listed twice (first on line {first[text]})")
            first[text] = n
            items.append((text, Path(text) if Path(text).is_absolute() else inputs.parent / text))
    else:
        raise ValueError(f"{inputs}: no such folder or list file")
    if not items:
        raise ValueError(f"{inputs}: no {'/'.join(AUDIO_EXTENSIONS)} files to embed")
    return items


def embed(inputs: str | Path, out_parquet: str | Path, model_uri: str = DEFAULT_MODEL_URI,
          tracking_uri: str | None = None, chunk: int = 64, progress: bool = False) -> int:
    """Embed every file of ``inputs`` into ``out_parquet`` (utt_id: string, embedding: list<float32>).

    Written atomically (``<out>.tmp-<pid>`` then ``os.replace``); the model URI is
    kept in the Parquet metadata. Embeddings are the model's L2-normalised
    outputs (no mean subtracted). Returns the number of rows.
    """
    from tqdm.auto import tqdm

    items = list_audio_inputs(inputs)
    model = embedder_of(load_embedder(model_uri, tracking_uri))
    out = Path(out_parquet)
    out.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("utt_id", pa.string()), ("embedding", pa.list_(pa.float32()))],
                       metadata={"mfcon.model_uri": model_uri,
                                 "mfcon.embedding_dim": str(model.model_config.embed_dim)})
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer, \
            tqdm(total=len(items), unit="utt", disable=not progress) as bar:
        for start in range(0, len(items), chunk):
            part = items[start : start + chunk]
            wavs = [load_audio(path, target_sr=model.feature_config.sample_rate) for _, path in part]
            emb = model.embed_waveforms(wavs, [str(p) for _, p in part])  # (n, E)
            writer.write_table(pa.table({"utt_id": [u for u, _ in part],
                                         "embedding": pa.array(list(emb), type=pa.list_(pa.float32()))},
                                        schema=schema))
            bar.update(len(part))
    return len(items)


# ---------------------------------------------------------------- verifying pairs

def verify_pairs(pairs: Sequence[tuple[str | Path, str | Path]], model_uri: str = DEFAULT_MODEL_URI,
                 threshold: float | None = None, tracking_uri: str | None = None) -> list[VerifyResult]:
    """Score many (enroll, test) recordings with one model load; each distinct file is embedded once."""
    served = load_served_model(model_uri, tracking_uri)
    threshold = served.threshold if threshold is None else float(threshold)
    if threshold is None:
        raise RegistryError(f"{model_uri} carries no eer_threshold tag (not a promoted version); pass a threshold")
    files = sorted({str(p) for pair in pairs for p in pair})
    sr = served.embedder.feature_config.sample_rate
    emb = served.embedder.embed_waveforms([load_audio(f, target_sr=sr) for f in files], files)
    index = {f: i for i, f in enumerate(files)}
    a = emb[[index[str(x)] for x, _ in pairs]]
    b = emb[[index[str(y)] for _, y in pairs]]
    scores = served.scorer.score(a, b)
    return [VerifyResult(float(s), threshold, bool(s >= threshold), served.model_uri) for s in scores]


def verify(a_wav: str | Path, b_wav: str | Path, model_uri: str = DEFAULT_MODEL_URI, threshold: float | None = None,
           tracking_uri: str | None = None) -> VerifyResult:
    """Same speaker? Cosine of the two recordings' embeddings (minus the stored mean) >= threshold.

    The default threshold is the version's ``eer_threshold`` tag: the EER
    operating point of the trial list it was promoted on. A model URI outside
    the registry (``runs:/``, ``models:/m-...``) has no stored mean or
    threshold: it scores plain cosine and needs ``threshold``.
    """
    return verify_pairs([(a_wav, b_wav)], model_uri, threshold, tracking_uri)[0]
