"""Training rows straight from the Parquet shards, local or in an object store (no Ray): `mfcon train`, tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mfcon.data.corpus.voxceleb import read_trials
from mfcon.data.shard_stream import Rows, ShardStream, make_cache
from mfcon.data.shards import (
    EVAL_SPLITS,
    check_shard_schemas,
    features_from_column,
    list_split,
    load_split,
    read_manifest,
    read_shard_table,
    shard_paths,
    verified_trials_path,
)
from mfcon.evaluation.score_norm import DEFAULT_TOP_N, SCORE_NORMS
from mfcon.evaluation.scoring import CohortSet, EvalSet


def read_eval_set(data_dir: str | Path, split: str, score_norm: str = "mean", top_n: int = DEFAULT_TOP_N,
                  list_name: str | None = None) -> EvalSet:
    """The ``dev`` or ``test`` split and one of its trial lists (``list_name``, default: the list named like the
    split), as stored beside the manifest and checked against its sha256; ``score_norm="asnorm"`` attaches the
    AS-norm cohort (:func:`read_cohort`), so every scorer of this set normalises alike."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"no trial list for split {split!r}; evaluation splits are {EVAL_SPLITS}")
    if score_norm not in SCORE_NORMS:
        raise ValueError(f"score_norm must be one of {SCORE_NORMS}, got {score_norm!r}")
    manifest = read_manifest(data_dir)
    name = list_name or split
    if list_split(name) != split:
        raise ValueError(f"trial list {name!r} is not a list of the {split} split")
    arrays = load_split(data_dir, split, manifest)
    return EvalSet(utt_ids=list(arrays.utt_ids), features=list(arrays.features),
                   trials=read_trials(verified_trials_path(data_dir, name, manifest)),
                   cohort=read_cohort(data_dir) if score_norm == "asnorm" else None, top_n=top_n)


def read_test_sets(data_dir: str | Path, score_norm: str = "mean", top_n: int = DEFAULT_TOP_N,
                   decide_on: str | None = None) -> tuple[str, dict[str, EvalSet]]:
    """(the list to decide on, {name: EvalSet} of every named test list, that one first). The sets share one
    reading of the test split's features and of the cohort; ``decide_on`` defaults to
    :meth:`Manifest.default_test_list` and an unknown name is a ValueError listing the names."""
    manifest = read_manifest(data_dir)
    names = manifest.test_lists()
    decide_on = manifest.decided_list(decide_on)
    first = read_eval_set(data_dir, "test", score_norm, top_n, list_name=decide_on)
    sets = {decide_on: first}
    for name in names:
        if name != decide_on:
            trials = read_trials(verified_trials_path(data_dir, name, manifest))
            sets[name] = EvalSet(first.utt_ids, first.features, trials, first.cohort, first.top_n)
    return decide_on, sets


def read_cohort(data_dir: str | Path, utts_per_speaker: int = 3, max_speakers: int | None = None,
                seed: int = 0) -> CohortSet:
    """The AS-norm cohort's utterances: up to ``utts_per_speaker`` clean training utterances per training speaker.

    Training speakers only, so no cohort speaker is a dev or test speaker; augmented copies (``#`` in the utt id)
    are left out. Two passes, so memory holds the chosen rows, not the training set: ids first, then the
    features of the chosen rows shard by shard. ``max_speakers`` takes a seeded sample of speakers.
    """
    if utts_per_speaker < 1:
        raise ValueError(f"utts_per_speaker must be >= 1, got {utts_per_speaker}")
    paths = shard_paths(data_dir, "train")
    by_speaker: dict[str, list[str]] = {}
    for path in paths:
        ids = read_shard_table(path, columns=["utt_id", "speaker"])
        for utt, spk in zip(ids.column("utt_id").to_pylist(), ids.column("speaker").to_pylist()):
            if "#" not in utt:
                by_speaker.setdefault(spk, []).append(utt)
    speakers = sorted(by_speaker)
    if max_speakers is not None and max_speakers < len(speakers):
        rng = np.random.default_rng(seed)
        speakers = sorted(rng.choice(speakers, size=max_speakers, replace=False).tolist())
    chosen = {u: spk for spk in speakers for u in sorted(by_speaker[spk])[:utts_per_speaker]}
    if not chosen:
        raise ValueError(f"{data_dir}: the train split has no clean utterances for an AS-norm cohort")
    rows: dict[str, np.ndarray] = {}
    for path in paths:
        table = read_shard_table(path, columns=["utt_id", "features"])
        for utt, feats in zip(table.column("utt_id").to_pylist(), features_from_column(table.column("features"))):
            if utt in chosen:
                rows[utt] = np.array(feats, copy=True)
    order = sorted(rows)
    return CohortSet(features=[rows[u] for u in order], speakers=[chosen[u] for u in order])


class LocalShardData:
    """Implements ``train.loop.TrainData`` over a shard folder (row groups dealt to ranks: ``ShardStream``)."""

    def __init__(self, data_dir: str | Path, seed: int = 0, rank: int = 0, world_size: int = 1,
                 buffer_rows: int = 2048, *, prefetch_batches: int = 0, pin_device: torch.device | None = None,
                 cache_dir: str | None = None, cache_bytes: int = 0):
        self.data_dir = data_dir
        self.manifest = read_manifest(self.data_dir)
        check_shard_schemas(self.data_dir, self.manifest)  # a foreign shard is an input error, not a crash mid-epoch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_classes = len(self.manifest.speakers)
        self.rows_per_worker = self.manifest.splits["train"].rows // world_size
        self.frame_shift_ms = self.manifest.feature_config.frame_shift_ms
        paths = shard_paths(self.data_dir, "train", self.manifest)
        # A remote folder's shards are cached on this node, checked against the manifest's sha256.
        checksums = {p: entry.sha256 for p, entry in zip(paths, self.manifest.splits["train"].shards)}
        self.stream = ShardStream(paths, rank=rank, world_size=world_size, seed=seed, buffer_rows=buffer_rows,
                                  prefetch_batches=prefetch_batches, pin_device=pin_device,
                                  cache=make_cache(paths, cache_dir, cache_bytes), checksums=checksums)
        self._eval: EvalSet | None = None

    def train_rows(self, epoch: int) -> Rows:
        return self.stream.rows(epoch)

    def eval_set(self) -> EvalSet | None:
        if self._eval is None:
            self._eval = read_eval_set(self.data_dir, "dev")  # training only ever sees dev
        return self._eval
