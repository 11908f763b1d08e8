"""Training and eval rows for a Ray Train worker, from the datasets its TorchTrainer was given.

The same ``TrainData`` protocol as :class:`mfcon.data.local.LocalShardData`: the
"train" dataset is split across workers (Ray Data streams this worker's share
of the shards), "eval" is read whole by rank 0.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import ray.data
import ray.train

from mfcon.data.shards import features_from_column
from mfcon.evaluation.scoring import EvalSet


def read_shards(paths: tuple[str, ...]) -> ray.data.Dataset:
    """Parquet shards as a Dataset whose read tasks take no CPU slot.

    Train workers hold the node's CPUs; a read that asks for one waits for them
    forever. Ray Data's V2 Parquet path adds a ListFiles step that always asks
    for a CPU (Ray 2.60), so the V1 datasource is used, where ``num_cpus``
    applies to every read task.
    """
    ray.data.DataContext.get_current().use_datasource_v2 = False
    return ray.data.read_parquet(list(paths), num_cpus=0)


class RayShardData:
    """``TrainData`` over ``get_dataset_shard``: "train" is split across workers, "eval" is whole."""

    def __init__(self, num_classes: int, train_rows_total: int, frame_shift_ms: float, trials: list,
                 world_size: int, seed: int, shuffle_buffer_rows: int):
        self.num_classes = num_classes
        self.rows_per_worker = train_rows_total // world_size
        self.frame_shift_ms = frame_shift_ms
        self.trials, self.seed, self.buffer = trials, seed, shuffle_buffer_rows
        self._eval: EvalSet | None = None

    def train_rows(self, epoch: int) -> Iterator[tuple[np.ndarray, int]]:
        shard = ray.train.get_dataset_shard("train")
        for batch in shard.iter_batches(batch_size=64, batch_format="pyarrow",
                                        local_shuffle_buffer_size=self.buffer,
                                        local_shuffle_seed=self.seed * 1000 + epoch):
            feats = features_from_column(batch.column("features"))
            labels = batch.column("speaker_index").to_numpy()
            yield from zip(feats, labels.tolist())

    def eval_set(self) -> EvalSet | None:
        if self._eval is None:
            utt_ids: list[str] = []
            features: list[np.ndarray] = []
            for batch in ray.train.get_dataset_shard("eval").iter_batches(batch_size=256, batch_format="pyarrow"):
                utt_ids.extend(batch.column("utt_id").to_pylist())
                features.extend(np.array(f, copy=True) for f in features_from_column(batch.column("features")))
            self._eval = EvalSet(utt_ids=utt_ids, features=features, trials=self.trials)
        return self._eval
