"""Score normalisation: adaptive symmetric normalisation (AS-norm) against a cohort of training speakers.

A raw cosine score means different things for different speakers: some
embeddings sit close to many others. AS-norm (Matejka et al., Interspeech
2017; the form WeSpeaker reports) rescales each trial score by how the two
sides score against their own closest impostors::

    s_norm = 0.5 * ((s - mu_e) / sd_e + (s - mu_t) / sd_t)

where ``mu_e``/``sd_e`` are the mean and standard deviation of the ``top_n``
highest scores of the enrolment embedding against the cohort, and likewise
for the test side. The cohort is one embedding per training speaker (the
mean of its utterances' embeddings, L2-normalised), so no cohort speaker can
be an evaluation speaker. Every embedding is centred by the same mean before
cosine scoring, exactly as :func:`mfcon.evaluation.scoring.score_trials` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

DEFAULT_TOP_N = 300  # WeSpeaker's VoxCeleb recipes; capped at the cohort size
MIN_TOP_N = 10  # fewer top scores give a near-zero spread: top_n=1 has sd 0 (clipped) and scores of ~1e5
SCORE_NORMS = ("mean", "asnorm")
ScoreNormName = Literal["mean", "asnorm"]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(min=1e-12)


def speaker_cohort(embeddings: np.ndarray, speakers: Sequence[str]) -> np.ndarray:
    """(N, E) utterance embeddings + their speakers -> (S, E) unit mean embedding per speaker, sorted by name."""
    if len(embeddings) != len(speakers):
        raise ValueError(f"{len(embeddings)} embeddings but {len(speakers)} speaker labels")
    names = sorted(set(speakers))
    index = {s: i for i, s in enumerate(names)}
    sums = np.zeros((len(names), embeddings.shape[1]), dtype=np.float64)
    counts = np.zeros(len(names))
    for emb, spk in zip(_unit(embeddings.astype(np.float64)), speakers):
        sums[index[spk]] += emb
        counts[index[spk]] += 1
    return _unit(sums / counts[:, None]).astype(np.float32)


def _top_stats(side: np.ndarray, cohort: np.ndarray, top_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each row's ``top_n`` highest cosine scores against the cohort."""
    scores = _unit(side) @ _unit(cohort).T  # (M, S)
    n = min(top_n, cohort.shape[0])
    top = -np.partition(-scores, n - 1, axis=1)[:, :n]
    return top.mean(axis=1), top.std(axis=1).clip(min=1e-6)


def adaptive_snorm(scores: np.ndarray, enroll: np.ndarray, test: np.ndarray, cohort: np.ndarray,
                   top_n: int = DEFAULT_TOP_N) -> np.ndarray:
    """AS-norm of trial ``scores`` whose sides have (centred) embeddings ``enroll[i]`` and ``test[i]``.

    ``cohort`` must be centred by the same mean as the trial embeddings. ``top_n`` below
    :data:`MIN_TOP_N` is refused: the spread of so few cohort scores is close to 0
    (exactly 0 for one), so normalised scores explode. A cohort smaller than
    ``top_n`` is used whole; it needs at least 2 speakers.
    """
    if top_n < MIN_TOP_N:
        raise ValueError(f"AS-norm top_n must be >= {MIN_TOP_N}, got top_n={top_n}: the spread of fewer top cohort "
                         "scores is near 0 and the normalised scores explode")
    if len(cohort) == 0:
        raise ValueError("AS-norm needs a non-empty cohort")
    if len(cohort) < 2:
        raise ValueError(f"AS-norm needs a cohort of at least 2 speakers (a spread), got {len(cohort)}")
    if not (len(scores) == len(enroll) == len(test)):
        raise ValueError(f"{len(scores)} scores, {len(enroll)} enrolment and {len(test)} test embeddings")
    mu_e, sd_e = _top_stats(enroll, cohort, top_n)
    mu_t, sd_t = _top_stats(test, cohort, top_n)
    return (0.5 * ((scores - mu_e) / sd_e + (scores - mu_t) / sd_t)).astype(np.float32)


def centered_cosine(emb_a: np.ndarray, emb_b: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
    """Row-paired cosine after subtracting ``mean`` (float32), the arithmetic of every scorer in the package."""
    a, b = (np.asarray(e, dtype=np.float32) for e in (emb_a, emb_b))
    if mean is not None:
        a, b = a - mean, b - mean
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(min=1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(min=1e-12)
    return (a * b).sum(axis=1)


@dataclass(frozen=True)
class TrialScorer:
    """Two embeddings -> a score, the same way in evaluation, replication, promotion and serving.

    ``mean`` is subtracted from every embedding (the evaluation set's mean embedding, stored with a promoted
    model); with a ``cohort`` (unit speaker embeddings of training speakers) scores are AS-normalised too.
    """

    mean: np.ndarray | None
    cohort: np.ndarray | None = None
    top_n: int = DEFAULT_TOP_N

    @property
    def norm(self) -> ScoreNormName:
        return "asnorm" if self.cohort is not None else "mean"

    def score(self, emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
        raw = centered_cosine(emb_a, emb_b, self.mean)
        if self.cohort is None:
            return raw
        shift = 0.0 if self.mean is None else self.mean
        return adaptive_snorm(raw, np.asarray(emb_a) - shift, np.asarray(emb_b) - shift, self.cohort - shift,
                              self.top_n)
