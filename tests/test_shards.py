"""Parquet shards and manifest: schema, round trip, atomic writes, integrity checks."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mfcon.config import FeatureConfig
from mfcon.data.shards import (
    ROW_GROUP_ROWS,
    DevProtocol,
    Manifest,
    ManifestError,
    ShardIntegrityError,
    SplitInfo,
    features_from_column,
    load_split,
    manifest_hash,
    read_manifest,
    shard_paths,
    verify_shards,
    write_manifest,
    write_shard,
)


def make_rows(n: int, seed: int = 0, bins: int = 80, speaker_index: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield {"utt_id": f"id{i % 3:05d}/v/{i:05d}.wav", "speaker": f"id{i % 3:05d}",
               "speaker_index": speaker_index if speaker_index < 0 else i % 3,
               "features": rng.standard_normal((int(rng.integers(1, 40)), bins)).astype(np.float32)}


def make_dataset(tmp_path: Path, bins: int = 80) -> tuple[Manifest, dict[str, list[dict]]]:
    """Two train shards, one dev and one test shard and their manifest, written with the public API."""
    rows = {"train-00000.parquet": list(make_rows(70, 1, bins)), "train-00001.parquet": list(make_rows(5, 2, bins)),
            "dev-00000.parquet": list(make_rows(3, 4, bins, speaker_index=-1)),
            "test-00000.parquet": list(make_rows(4, 3, bins, speaker_index=-1))}
    entries = {name: write_shard(tmp_path / name, r, num_mel_bins=bins) for name, r in rows.items()}
    splits = {
        split: SplitInfo(shards=[e for n, e in entries.items() if n.startswith(split)],
                         rows=sum(e.rows for n, e in entries.items() if n.startswith(split)), num_speakers=3)
        for split in ("train", "dev", "test")}
    manifest = Manifest(feature_config=FeatureConfig(num_mel_bins=bins), speakers={f"id{i:05d}": i for i in range(3)},
                        splits=splits, trials={"dev": "trials-dev.txt", "test": "trials-test.txt"},
                        dev_protocol=DevProtocol(source="held_out_speakers", speakers=3, trials_per_utt=3, seed=0),
                        skipped=[], created_at=datetime.now(timezone.utc).isoformat(),
                        source=str(tmp_path))
    write_manifest(tmp_path, manifest)
    return manifest, rows


def test_shard_schema(tmp_path):
    entry = write_shard(tmp_path / "train-00000.parquet", make_rows(3))
    schema = pq.read_schema(tmp_path / "train-00000.parquet")
    assert schema.field("features").type == pa.list_(pa.list_(pa.float32(), 80))
    assert schema.field("speaker_index").type == pa.int32() and schema.field("num_frames").type == pa.int32()
    assert [f.name for f in schema] == ["utt_id", "speaker", "speaker_index", "num_frames", "features"]
    assert entry.rows == 3 and entry.file == "train-00000.parquet" and len(entry.sha256) == 64


def test_round_trip_is_exact_and_zero_copy(tmp_path):
    manifest, rows = make_dataset(tmp_path, bins=40)
    assert read_manifest(tmp_path) == manifest
    train = load_split(tmp_path, "train")
    expected = rows["train-00000.parquet"] + rows["train-00001.parquet"]
    assert train.utt_ids == [r["utt_id"] for r in expected]
    assert train.speakers == [r["speaker"] for r in expected]
    assert train.speaker_index.dtype == np.int64 and train.speaker_index.tolist() == [r["speaker_index"] for r in expected]
    for got, row in zip(train.features, expected):
        assert got.dtype == np.float32 and got.shape == row["features"].shape
        np.testing.assert_array_equal(got, row["features"])
    # views into one Arrow buffer, not copies
    assert not train.features[0].flags.writeable
    assert np.shares_memory(train.features[0].base, train.features[1].base)
    test = load_split(tmp_path, "test")
    assert len(test) == 4 and set(test.speaker_index.tolist()) == {-1}
    table = pq.read_table(tmp_path / "train-00000.parquet")
    assert table.column("num_frames").to_pylist() == [r["features"].shape[0] for r in rows["train-00000.parquet"]]
    assert table.num_rows == 70 and pq.ParquetFile(tmp_path / "train-00000.parquet").num_row_groups == 2


def test_features_from_column_handles_slices_and_chunks(tmp_path):
    rows = list(make_rows(9, 5))
    write_shard(tmp_path / "x.parquet", rows)
    column = pq.read_table(tmp_path / "x.parquet").column("features")
    sliced = column.slice(2, 5)  # offset into the chunk
    got = features_from_column(sliced)
    assert len(got) == 5
    for g, r in zip(got, rows[2:7]):
        np.testing.assert_array_equal(g, r["features"])
    two_chunks = pa.chunked_array(column.chunks + column.chunks)
    assert len(features_from_column(two_chunks)) == 18
    batch = column.combine_chunks().slice(4)  # a single Array, as in a pyarrow record batch
    np.testing.assert_array_equal(features_from_column(batch)[0], rows[4]["features"])
    as_numpy = np.empty(2, dtype=object)  # Ray Data numpy batches: one object per row
    as_numpy[:] = [r["features"] for r in rows[:2]]
    np.testing.assert_array_equal(features_from_column(as_numpy)[1], rows[1]["features"])


def test_shard_paths_are_absolute_in_manifest_order(tmp_path, monkeypatch):
    make_dataset(tmp_path)
    monkeypatch.chdir(tmp_path.parent)
    paths = shard_paths(tmp_path.name, "train")
    assert paths == [str(tmp_path / "train-00000.parquet"), str(tmp_path / "train-00001.parquet")]
    with pytest.raises(ValueError, match="no split 'eval'"):
        shard_paths(tmp_path, "eval")


def test_failing_writer_leaves_no_file(tmp_path):
    def rows_then_crash():
        yield from make_rows(ROW_GROUP_ROWS + 3)  # one row group already flushed to the temp file
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_shard(tmp_path / "train-00000.parquet", rows_then_crash())
    assert list(tmp_path.iterdir()) == []


def test_failing_writer_keeps_previous_shard(tmp_path):
    path = tmp_path / "train-00000.parquet"
    entry = write_shard(path, make_rows(2))
    with pytest.raises(ValueError, match="features must be"):
        write_shard(path, [{"utt_id": "a", "speaker": "s", "speaker_index": 0, "features": np.zeros((3, 7))}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-00000.parquet"]
    verify_shards(tmp_path, Manifest(feature_config=FeatureConfig(), speakers={}, created_at="", source="",
                                     splits={"train": SplitInfo(shards=[entry], rows=2, num_speakers=1)},
                                     trials={}, dev_protocol=DevProtocol(source="file", speakers=0)))


def test_verify_names_flipped_byte_and_missing_shard(tmp_path):
    manifest, _ = make_dataset(tmp_path)
    verify_shards(tmp_path)
    shard = tmp_path / "train-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError, match="train-00001.parquet: corrupted") as err:
        verify_shards(tmp_path, manifest)
    assert err.value.paths == [str(shard)]
    (tmp_path / "test-00000.parquet").unlink()
    with pytest.raises(ShardIntegrityError, match="test-00000.parquet: missing") as err:
        verify_shards(tmp_path)
    assert len(err.value.paths) == 2


def test_read_manifest_errors_name_the_file(tmp_path):
    path = tmp_path / "manifest.json"
    with pytest.raises(ManifestError, match=f"{path}: no manifest"):
        read_manifest(tmp_path)
    path.write_text("{not json")
    with pytest.raises(ManifestError, match=f"{path}: not valid JSON"):
        read_manifest(tmp_path)
    make_dataset(tmp_path)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "schema_version": 1}))  # one eval split, no dev/test protocol
    with pytest.raises(ManifestError, match=f"{path}: schema_version 1, this mfcon reads version 2"):
        read_manifest(tmp_path)
    path.write_text(json.dumps({**data, "speakerz": {}}))
    with pytest.raises(ManifestError, match=f"(?s){path}: invalid.*speakerz"):
        read_manifest(tmp_path)


def test_manifest_hash_tracks_manifest_bytes(tmp_path):
    manifest, _ = make_dataset(tmp_path)
    first = manifest_hash(tmp_path)
    assert first == manifest_hash(tmp_path) and len(first) == 64
    write_manifest(tmp_path, manifest.model_copy(update={"source": "elsewhere"}))
    assert manifest_hash(tmp_path) != first
    assert sorted(p.name for p in tmp_path.iterdir() if "tmp" in p.name) == []
