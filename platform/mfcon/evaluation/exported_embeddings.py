"""What ``mfcon embed`` writes beside the vectors, and how to score pairs from that file alone.

The Parquet metadata carries the version's serving settings (centring mean, threshold, and for AS-norm the
cohort and top_n), so :func:`score_pairs` on :func:`read_embeddings` gives exactly ``mfcon verify``'s scores
(docs/evaluation.md has the formula).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mfcon.evaluation.score_norm import DEFAULT_TOP_N, TrialScorer


SCORE_FORMULA = ("score = cos(e - m, t - m) with m = mfcon.score_mean (the L2-normalised embeddings e, t minus the "
                 "mean, each re-normalised); with mfcon.score_norm = asnorm: 0.5 * ((score - mu_e) / sd_e + "
                 "(score - mu_t) / sd_t), mu/sd = mean/std of the mfcon.score_top_n highest cos(x - m, c - m) "
                 "over the rows c of mfcon.score_cohort (std floored at 1e-6)")


class EmbeddingsError(ValueError):
    """An exported embeddings file cannot score the pairs asked for; the message says which."""


def scoring_metadata(tags: dict[str, str], cohort: np.ndarray | None) -> dict[str, str]:
    """Parquet metadata that makes exported embeddings score exactly as ``mfcon verify`` does with that version:
    ``mfcon.score_mean`` (JSON floats), ``mfcon.score_norm``, ``mfcon.score_top_n``, ``mfcon.score_cohort``
    (JSON rows, AS-norm only), ``mfcon.eer_threshold``, and the formula in words."""
    meta = {"mfcon.score_formula": SCORE_FORMULA,
            "mfcon.score_norm": "asnorm" if cohort is not None else "mean"}
    if "score_mean" in tags:
        meta["mfcon.score_mean"] = tags["score_mean"]
    if "eer_threshold" in tags:
        meta["mfcon.eer_threshold"] = tags["eer_threshold"]
    if cohort is not None:
        meta["mfcon.score_top_n"] = str(int(tags.get("score_top_n", DEFAULT_TOP_N)))
        meta["mfcon.score_cohort"] = json.dumps(np.asarray(cohort, dtype=np.float32).tolist())
    return meta


def add_parquet_metadata(path: str | Path, extra: dict[str, str]) -> None:
    """Rewrite a Parquet file with ``extra`` added to its schema metadata (atomically)."""
    import pyarrow.parquet as pq

    from mfcon.files import atomic_path

    table = pq.read_table(path)
    meta = {**(table.schema.metadata or {}), **{k.encode(): v.encode() for k, v in extra.items()}}
    with atomic_path(Path(path)) as tmp:
        pq.write_table(table.replace_schema_metadata(meta), tmp)


@dataclass
class Embeddings:
    utt_ids: list[str]
    vectors: np.ndarray  # (N, E) float32, L2-normalised
    scorer: TrialScorer
    threshold: float | None


def read_embeddings(path: str | Path) -> Embeddings:
    """An ``mfcon embed`` file and its scoring recipe; :func:`score_pairs` then scores as ``mfcon verify``."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    mean = np.asarray(json.loads(meta["mfcon.score_mean"]), dtype=np.float32) if "mfcon.score_mean" in meta else None
    cohort = (np.asarray(json.loads(meta["mfcon.score_cohort"]), dtype=np.float32)
              if meta.get("mfcon.score_norm") == "asnorm" else None)
    scorer = TrialScorer(mean, cohort, int(meta.get("mfcon.score_top_n", DEFAULT_TOP_N)))
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    threshold = float(meta["mfcon.eer_threshold"]) if "mfcon.eer_threshold" in meta else None
    return Embeddings(table.column("utt_id").to_pylist(), vectors, scorer, threshold)


def score_pairs(emb: Embeddings, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """Scores of (enroll utt_id, test utt_id) pairs from exported embeddings."""
    index = {u: i for i, u in enumerate(emb.utt_ids)}
    missing = [u for pair in pairs for u in pair if u not in index]
    if missing:
        raise EmbeddingsError(f"{len(missing)} utterances have no embedding, e.g. {missing[:3]}")
    a = emb.vectors[[index[x] for x, _ in pairs]]
    b = emb.vectors[[index[y] for _, y in pairs]]
    return emb.scorer.score(a, b)
