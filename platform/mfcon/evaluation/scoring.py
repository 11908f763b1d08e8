"""Full-utterance embeddings and cosine scoring of a trial list.

Evaluation embeds whole utterances (no crops), sorted by length and padded in
small buckets so masks matter little and batches stay dense. Scores are
cosine similarities after subtracting the mean evaluation embedding, as the
MFA-Conformer / MFCon code scores VoxCeleb1-O, optionally AS-normalised against
a cohort of training speakers (:mod:`mfcon.evaluation.score_norm`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mfcon.data.corpus.voxceleb import TrialPair
from mfcon.evaluation.metrics import equal_error_rate, min_dcf
from mfcon.evaluation.score_norm import DEFAULT_TOP_N, TrialScorer, speaker_cohort


@dataclass
class CohortSet:
    """Training-speaker utterances whose embeddings make the AS-norm cohort (never dev or test speakers)."""

    features: list[np.ndarray]
    speakers: list[str]


@dataclass
class EvalSet:
    """A trial list, its utterances' features, and how its trials are scored (AS-norm when it has a cohort)."""

    utt_ids: list[str]
    features: list[np.ndarray]  # each (T, F)
    trials: list[TrialPair]
    cohort: CohortSet | None = None
    top_n: int = DEFAULT_TOP_N

    @property
    def score_norm(self) -> str:
        return f"asnorm(top_n={self.top_n})" if self.cohort is not None else "mean"


@dataclass
class EvalResult:
    eer: float  # fraction
    eer_threshold: float
    min_dcf_01: float
    min_dcf_05: float
    scores: np.ndarray
    labels: np.ndarray

    def metrics(self, split: str) -> dict[str, float]:
        """Names logged everywhere, prefixed by the trial list's split (``dev_eer``, ``test_eer``) so a search's
        numbers are never mistaken for held-out ones: eer in percent (WeSpeaker convention), minDCF absolute."""
        values = {"eer": 100.0 * self.eer, "min_dcf": self.min_dcf_01, "min_dcf_005": self.min_dcf_05,
                  "eer_threshold": self.eer_threshold}
        return {f"{split}_{name}": value for name, value in values.items()}


@torch.no_grad()
def extract_embeddings(model: torch.nn.Module, features: Sequence[np.ndarray], device: torch.device | str = "cpu",
                       max_batch_frames: int = 40_000, max_frames: int | None = None) -> np.ndarray:
    """List of (T, F) arrays -> (N, E) float32 L2-normalised embeddings, input order kept."""
    was_training = model.training
    model.eval()
    lengths = np.array([min(len(f), max_frames or len(f)) for f in features])
    order = np.argsort(-lengths, kind="stable")
    out: list[np.ndarray | None] = [None] * len(features)
    start = 0
    while start < len(order):
        longest = int(lengths[order[start]])
        size = max(1, max_batch_frames // max(longest, 1))
        idx = order[start : start + size]
        batch = torch.zeros(len(idx), longest, features[idx[0]].shape[1])
        for row, i in enumerate(idx):
            batch[row, : lengths[i]] = torch.as_tensor(np.array(features[i][: lengths[i]], dtype=np.float32))
        lens = torch.from_numpy(lengths[idx].astype(np.int64))
        emb = model(batch.to(device), lens.to(device)).embedding
        emb = torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy()
        for row, i in enumerate(idx):
            out[i] = emb[row]
        start += size
    model.train(was_training)
    return np.stack(out).astype(np.float32)


def score_trials(utt_ids: Sequence[str], embeddings: np.ndarray, trials: Sequence[TrialPair],
                 subtract_mean: bool = True, cohort: np.ndarray | None = None,
                 top_n: int = DEFAULT_TOP_N, centre: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cosine score of each trial -> (scores, labels); with a ``cohort`` (unit speaker embeddings) AS-normalised.

    Scores are centred with ``centre`` when given (a mean fitted elsewhere, e.g. on the dev list, so a held-out
    list is only scored), else with these embeddings' own mean (``subtract_mean``)."""
    index = {u: i for i, u in enumerate(utt_ids)}
    missing = sorted({u for t in trials for u in (t.enroll, t.test) if u not in index})
    if missing:
        raise KeyError(f"{len(missing)} trial utterances have no embedding, e.g. {missing[:3]}")
    mean = centre if centre is not None else (embeddings.mean(axis=0) if subtract_mean else None)
    scorer = TrialScorer(mean, cohort, top_n)
    a = embeddings[[index[t.enroll] for t in trials]]
    b = embeddings[[index[t.test] for t in trials]]
    return scorer.score(a, b), np.array([t.label for t in trials], dtype=np.int64)


def embed_cohort(model: torch.nn.Module, cohort: CohortSet, device: torch.device | str = "cpu",
                 max_frames: int | None = None) -> np.ndarray:
    """(S, E) unit mean embedding per cohort speaker."""
    return speaker_cohort(extract_embeddings(model, cohort.features, device, max_frames=max_frames), cohort.speakers)


def evaluate(model: torch.nn.Module, eval_set: EvalSet, device: torch.device | str = "cpu",
             max_frames: int | None = None, centre: np.ndarray | None = None) -> EvalResult:
    """EER and minDCF of ``eval_set``'s trials; mean-subtracted cosine (``centre``, or the set's own mean),
    AS-normalised when it has a cohort."""
    emb = extract_embeddings(model, eval_set.features, device, max_frames=max_frames)
    cohort = embed_cohort(model, eval_set.cohort, device, max_frames) if eval_set.cohort is not None else None
    scores, labels = score_trials(eval_set.utt_ids, emb, eval_set.trials, cohort=cohort, top_n=eval_set.top_n,
                                  centre=centre)
    return evaluate_scores(scores, labels)


def evaluate_scores(scores: np.ndarray, labels: np.ndarray) -> EvalResult:
    """EER, its threshold and minDCF (p_target 0.01, 0.05) of scored trials."""
    eer, threshold = equal_error_rate(scores, labels)
    return EvalResult(eer=float(eer), eer_threshold=float(threshold),
                      min_dcf_01=float(min_dcf(scores, labels, p_target=0.01)[0]),
                      min_dcf_05=float(min_dcf(scores, labels, p_target=0.05)[0]),
                      scores=scores, labels=labels)
