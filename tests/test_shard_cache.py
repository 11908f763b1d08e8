"""Node-local cache of remote shards: the second epoch reads local copies, the cache stays within its
byte bound (least recently used out first), and a copy that does not match the manifest is fetched again.

Against a real S3-protocol server (moto on 127.0.0.1, tests/object_store_fixtures.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mfcon import storage
from mfcon.data.local import LocalShardData
from mfcon.data.shard_cache import ShardCache, ShardCacheError
from mfcon.data.shard_stream import ShardStream, make_cache
from mfcon.data.shards import write_shard
from mfcon.files import file_sha256
from object_store_fixtures import run_s3_server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    work = tmp_path_factory.mktemp("s3")
    with run_s3_server(work) as server:
        old = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        try:
            yield server
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _upload(s3, tmp_path, prefix: str, shards: int = 3, rows: int = 40) -> tuple[list[str], dict[str, str]]:
    """Shards written locally and copied to the bucket; (their URIs, {URI: sha256})."""
    uris, sums, n = [], {}, 0
    for i in range(shards):
        local = tmp_path / f"{prefix}-{i}.parquet"
        write_shard(local, [{"utt_id": f"u{n + j}", "speaker": f"s{(n + j) % 5}", "speaker_index": (n + j) % 5,
                             "features": np.full((3, 80), n + j, np.float32)} for j in range(rows)])
        uri = s3.uri(prefix, f"train-{i:05d}.parquet")
        storage.write_bytes(uri, local.read_bytes())
        uris.append(uri)
        sums[uri] = file_sha256(local)
        n += rows
    return uris, sums


def _labels(stream: ShardStream, epoch: int) -> list[int]:
    return [int(f[0, 0]) for f, _ in stream.rows(epoch)]


def test_second_epoch_reads_local_copies(s3, tmp_path):
    uris, sums = _upload(s3, tmp_path, "hit")
    cache = ShardCache(tmp_path / "cache", 1 << 30)
    stream = ShardStream(uris, seed=1, buffer_rows=16, cache=cache, checksums=sums)
    plain = ShardStream(uris, seed=1, buffer_rows=16)
    assert _labels(stream, 1) == _labels(plain, 1)  # the same rows in the same order as read from the bucket
    assert (cache.stats.fetches, cache.stats.hits) == (3, 0)
    assert _labels(stream, 2) == _labels(plain, 2)
    assert (cache.stats.fetches, cache.stats.hits) == (3, 3)  # epoch 2: every shard from the local copy
    assert sorted(file_sha256(p) for _, _, p in cache.entries()) == sorted(sums.values())
    # a second worker of the node (a new cache object on the same folder) finds the copies too
    other = ShardCache(tmp_path / "cache", 1 << 30)
    _labels(ShardStream(uris, seed=1, buffer_rows=16, cache=other, checksums=sums), 3)
    assert (other.stats.fetches, other.stats.hits) == (0, 3)


def test_without_manifest_checksums_size_and_mtime_decide(s3, tmp_path):
    uris, _ = _upload(s3, tmp_path, "nosum", shards=1)
    cache = ShardCache(tmp_path / "cache", 1 << 30)
    assert cache.local_copy(uris[0]) is not None and cache.local_copy(uris[0]) is not None
    assert (cache.stats.fetches, cache.stats.hits) == (1, 1)
    # the object is rewritten in the bucket (other bytes, other size): the copy is stale and fetched again
    local = tmp_path / "new.parquet"
    write_shard(local, [{"utt_id": "x", "speaker": "s0", "speaker_index": 0, "features": np.ones((9, 80), np.float32)}])
    storage.write_bytes(uris[0], local.read_bytes())
    path = cache.local_copy(uris[0])
    assert (cache.stats.fetches, cache.stats.refetches) == (2, 1)
    assert file_sha256(path) == file_sha256(local)


def test_eviction_keeps_the_cache_within_its_byte_bound(s3, tmp_path):
    uris, sums = _upload(s3, tmp_path, "evict", shards=4)
    size = max(storage.resolve(u)[0].get_file_info(storage.resolve(u)[1]).size for u in uris)
    cache = ShardCache(tmp_path / "cache", 2 * size + size // 2)  # room for two shards
    for u in uris[:2]:
        cache.local_copy(u, sums[u])
    cache.local_copy(uris[0], sums[uris[0]])  # shard 0 used again: shard 1 is now the least recently used
    os.utime(cache.data_path(uris[1]), (1, 1))  # (mtime resolution: make the order explicit)
    cache.local_copy(uris[2], sums[uris[2]])
    assert cache.cached_bytes() <= cache.max_bytes
    assert cache.lookup(uris[1], sums[uris[1]]) is None  # evicted
    assert cache.lookup(uris[0], sums[uris[0]]) and cache.lookup(uris[2], sums[uris[2]])
    assert cache.stats.evictions == 1
    # a shard bigger than the whole bound is streamed, never cached
    tiny = ShardCache(tmp_path / "tiny", size // 2)
    assert tiny.local_copy(uris[3], sums[uris[3]]) is None and tiny.stats.bypassed == 1
    assert _labels(ShardStream(uris, seed=0, cache=tiny, checksums=sums), 1)  # still reads, from the bucket


def test_a_copy_that_does_not_match_the_manifest_is_fetched_again(s3, tmp_path):
    uris, sums = _upload(s3, tmp_path, "mismatch", shards=1)
    uri = uris[0]
    cache = ShardCache(tmp_path / "cache", 1 << 30)
    first = cache.local_copy(uri, sums[uri])
    # the local copy is damaged (truncated) or its record no longer matches: both are fetched again
    with open(first, "r+b") as f:
        f.truncate(100)
    again = cache.local_copy(uri, sums[uri])
    assert file_sha256(again) == sums[uri] and cache.stats.refetches == 1
    meta = json.loads(cache.meta_path(uri).read_text())
    cache.meta_path(uri).write_text(json.dumps({**meta, "sha256": "0" * 64}))
    assert file_sha256(cache.local_copy(uri, sums[uri])) == sums[uri] and cache.stats.refetches == 2
    # bytes in the bucket that are not the manifest's: refused, naming the shard, and nothing cached
    with pytest.raises(ShardCacheError, match="train-00000.parquet.*manifest"):
        ShardCache(tmp_path / "other", 1 << 30).local_copy(uri, "f" * 64)
    assert not ShardCache(tmp_path / "other", 1 << 30).entries()


def test_local_shards_are_never_cached_and_remote_data_folders_use_the_manifest(s3, tmp_path, small_data):
    assert make_cache([str(tmp_path / "a.parquet")], str(tmp_path / "c"), 1 << 30) is None
    assert make_cache(["s3://b/a.parquet"], str(tmp_path / "c"), 0) is None
    remote = s3.uri("folder")
    for name in storage.list_names(str(small_data)):
        storage.write_bytes(storage.join(remote, name), (small_data / name).read_bytes())
    data = LocalShardData(remote, cache_dir=str(tmp_path / "c"), cache_bytes=1 << 30)
    assert len(list(data.train_rows(1))) == data.manifest.splits["train"].rows
    assert data.stream.cache.stats.fetches == len(data.manifest.splits["train"].shards)
    list(data.train_rows(2))
    assert data.stream.cache.stats.hits == len(data.manifest.splits["train"].shards)


def test_workers_of_one_node_copy_the_same_shard_at_once(s3, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    uris, sums = _upload(s3, tmp_path, "race", shards=2)
    caches = [ShardCache(tmp_path / "cache", 1 << 30) for _ in range(4)]  # four workers, one folder, no shared lock
    with ThreadPoolExecutor(4) as pool:
        shares = list(pool.map(lambda c: _labels(ShardStream(uris, seed=4, buffer_rows=8, cache=c, checksums=sums), 1),
                               caches))
    assert all(s == shares[0] for s in shares) and len(shares[0]) == 80
    assert sorted(file_sha256(p) for _, _, p in caches[0].entries()) == sorted(sums.values())
