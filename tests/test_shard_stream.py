"""Workers' direct shard reading: every rank gets a disjoint, balanced share of the split, shuffled, reproducibly."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mfcon.data.shard_stream import RowGroup, ShardStream, WorkerShardData, deal, shuffled
from mfcon.data.shards import ROW_GROUP_ROWS, read_manifest, shard_paths, write_shard


def _write_split(folder, rows_per_shard: list[int]) -> list[str]:
    """Shards whose rows are numbered 0..N-1 (the number in every cell and in speaker_index)."""
    paths, n = [], 0
    for i, count in enumerate(rows_per_shard):
        rows = [{"utt_id": f"u{n + j}", "speaker": "s", "speaker_index": n + j,
                 "features": np.full((2, 80), n + j, np.float32)} for j in range(count)]
        path = folder / f"train-{i:05d}.parquet"
        write_shard(path, rows)
        paths.append(str(path))
        n += count
    return paths


def _labels(stream: ShardStream, epoch: int) -> list[int]:
    return [label for _, label in stream.rows(epoch)]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_ranks_share_every_row_once_and_evenly(tmp_path, world):
    paths = _write_split(tmp_path, [ROW_GROUP_ROWS * 3, 10, ROW_GROUP_ROWS + 5])  # 6 row groups, uneven sizes
    shares = [_labels(ShardStream(paths, rank=r, world_size=world, seed=7, buffer_rows=50), epoch=2)
              for r in range(world)]
    total = sum(len(s) for s in shares)
    assert sorted(x for s in shares for x in s) == list(range(total)) == list(range(ROW_GROUP_ROWS * 4 + 15))
    groups = [len(ShardStream(paths, rank=r, world_size=world, seed=7).units(2)) for r in range(world)]
    assert max(groups) - min(groups) <= 1  # balanced to one row group, even with fewer shards than ranks


def test_fewer_shards_than_workers_still_feeds_every_worker(tmp_path):
    paths = _write_split(tmp_path, [ROW_GROUP_ROWS * 4])  # one shard, four row groups
    assert all(_labels(ShardStream(paths, rank=r, world_size=4, seed=0), epoch=1) for r in range(4))


@pytest.mark.parametrize("world", [2, 3, 7])
def test_fewer_row_groups_than_workers_are_sliced_between_them(tmp_path, world):
    paths = _write_split(tmp_path, [20])  # one row group of 20 rows
    shares = [_labels(ShardStream(paths, rank=r, world_size=world, seed=0, buffer_rows=4), epoch=1)
              for r in range(world)]
    assert all(shares) and sorted(x for s in shares for x in s) == list(range(20))
    assert max(map(len, shares)) - min(map(len, shares)) <= -(-20 // world)


def test_rows_are_shuffled_reproducibly_and_differently_each_epoch(tmp_path):
    paths = _write_split(tmp_path, [ROW_GROUP_ROWS * 2, ROW_GROUP_ROWS * 2])
    stream = ShardStream(paths, seed=3, buffer_rows=100)
    first, again, other = _labels(stream, 1), _labels(ShardStream(paths, seed=3, buffer_rows=100), 1), _labels(stream, 2)
    assert first == again and first != other and sorted(first) == sorted(other)
    assert first != sorted(first)
    # rows move across row groups, not only within one: the buffer mixes groups
    assert any(abs(a - b) >= ROW_GROUP_ROWS for a, b in zip(first[:20], sorted(first)[:20]))


def test_features_come_with_their_labels(tmp_path):
    paths = _write_split(tmp_path, [ROW_GROUP_ROWS + 3])
    for feats, label in ShardStream(paths, seed=1, buffer_rows=8).rows(1):
        assert feats.dtype == np.float32 and feats.shape == (2, 80) and np.all(feats == label)


def test_deal_opens_each_shard_once_per_epoch():
    units = [RowGroup(s, g) for s in range(4) for g in range(3)]
    mine = deal(units, rank=0, world_size=2, seed=0, epoch=1)
    shards = [u.shard for u in mine]
    assert shards == sorted(shards, key=shards.index)  # each shard's groups are consecutive
    assert len(set(mine)) == len(mine) == 6


def test_shuffle_buffer_is_a_permutation():
    rng = np.random.default_rng(0)
    out = [x for x, _ in shuffled(((i, 0) for i in range(100)), 16, rng)]
    assert sorted(out) == list(range(100)) and out != list(range(100))
    assert Counter(out).most_common(1)[0][1] == 1


def test_worker_data_reads_the_dev_split_whole(demo_corpus_data):
    manifest = read_manifest(demo_corpus_data)
    data = WorkerShardData(shard_paths(demo_corpus_data, "train"), shard_paths(demo_corpus_data, "dev"),
                           trials=[("a", "b", 1)], num_classes=len(manifest.speakers),
                           train_rows_total=manifest.splits["train"].rows, frame_shift_ms=10.0, rank=0,
                           world_size=2, seed=0, buffer_rows=64)
    assert len(data.eval_set().utt_ids) == manifest.splits["dev"].rows
    assert data.rows_per_worker == manifest.splits["train"].rows // 2
    assert 0 < len(list(data.train_rows(1))) < manifest.splits["train"].rows
