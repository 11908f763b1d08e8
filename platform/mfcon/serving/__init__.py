"""Serving owns using a model: the pyfunc speaker embedder (log, load), verification, batch embedding.

* :mod:`mfcon.serving.embedder`: :class:`SpeakerEmbedder` (an MLflow pyfunc
  over a weights-only checkpoint) and :func:`load_embedder`, which builds it from
  the checkpoint and feature config directly after checking the model's files
  (layout and recorded sha256; :class:`UntrustedModelError`), never through
  MLflow's pyfunc loader. :func:`log_speaker_model` and :func:`use_tracking_uri`
  live in :mod:`mfcon.model_files` (shared with :mod:`mfcon.tracking`) and are
  re-exported here.
* :mod:`mfcon.serving.verify`: :func:`verify` / :func:`verify_pairs` (the
  scoring contract of a promoted version), :func:`embed` (files to Parquet),
  and model-URI pinning (:func:`pin_model_uri`, :func:`load_served_model`).

Embeddings are L2-normalised model outputs. Scores are cosine similarities
after subtracting a mean embedding (:func:`centered_cosine`), as
:func:`mfcon.evaluation.scoring.score_trials` scores a trial list; the registry
(:mod:`mfcon.promotion.registry`, which imports this package, never the reverse) stores
that mean with each registered version.

Logged models import ``from mfcon.serving import SpeakerEmbedder``: keep that
name here.
"""

from mfcon.serving.embedder import (
    INPUT_COLUMNS,
    MODEL_URI_TAG,
    SpeakerEmbedder,
    UntrustedModelError,
    embedder_of,
    load_embedder,
    log_speaker_model,
    model_signature,
    use_tracking_uri,
)
from mfcon.serving.verify import (
    ServedModel,
    VerifyResult,
    centered_cosine,
    embed,
    list_audio_inputs,
    load_served_model,
    open_registry,
    pin_model_uri,
    verify,
    verify_pairs,
)

__all__ = [
    "INPUT_COLUMNS", "MODEL_URI_TAG", "ServedModel", "SpeakerEmbedder", "UntrustedModelError", "VerifyResult", "centered_cosine", "embed",
    "embedder_of", "list_audio_inputs", "load_embedder", "load_served_model", "log_speaker_model",
    "model_signature", "open_registry", "pin_model_uri", "use_tracking_uri", "verify", "verify_pairs",
]
