"""Compact shards (``prepare --feature-dtype float16``): float32 to readers, fewer bytes, never mixed with float32."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mfcon.cli import main as cli_main
from mfcon.config import FeatureConfig, TrainConfig
from mfcon.data.corpus.voxceleb import list_utterances, read_trials
from mfcon.data.local import LocalShardData
from mfcon.data.plan import hold_out_dev, plan_shards, split_corpus
from mfcon.data.prepare import prepare_dataset
from mfcon.data.shards import (
    ManifestError,
    ShardIntegrityError,
    check_shard_schemas,
    features_from_column,
    load_split,
    manifest_hash,
    read_manifest,
    verify_shards,
    write_shard,
)
from mfcon.train.local import train_local

F16_EPS = 2.0**-11  # float16 round-to-nearest: relative error at most half an ulp (10-bit mantissa)
F16_TINY = 2.0**-25  # half the smallest subnormal float16: the absolute error floor near zero


def random_rows(n: int, seed: int, bins: int = 80):
    rng = np.random.default_rng(seed)
    return [{"utt_id": f"id{i % 3:05d}/v/{i:05d}.wav", "speaker": f"id{i % 3:05d}", "speaker_index": i % 3,
             "features": (rng.standard_normal((int(rng.integers(1, 60)), bins)) * 4).astype(np.float32)}
            for i in range(n)]


def shard_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.parquet"))


def features_dtype_of(path: Path) -> pa.DataType:
    return pq.read_schema(path).field("features").type.value_type.value_type


@pytest.fixture(scope="module")
def compact(small_corpus, small_data, tmp_path_factory) -> Path:
    """``small_data`` (float32, from conftest) prepared again through the CLI with --feature-dtype float16."""
    out = tmp_path_factory.mktemp("compact") / "data"
    assert cli_main(["prepare", "--corpus", str(small_corpus.root), "--test-trials", str(small_corpus.trials),
                     "--dev-speakers", "4", "--rows-per-shard", "16", "--workers", "1", "--out", str(out),
                     "--feature-dtype", "float16"]) in (0, None)
    return out


def test_float16_shard_round_trips_to_float32_within_float16_precision(tmp_path):
    rows = random_rows(70, seed=1)  # two row groups
    entry = write_shard(tmp_path / "train-00000.parquet", rows, feature_dtype="float16")
    assert entry.rows == 70
    assert features_dtype_of(tmp_path / "train-00000.parquet") == pa.float16()
    column = pq.read_table(tmp_path / "train-00000.parquet").column("features")
    got = features_from_column(column)
    assert len(got) == 70
    for g, r in zip(got, rows):
        x = r["features"]
        assert g.dtype == np.float32 and g.shape == x.shape and not g.flags.writeable
        np.testing.assert_array_equal(g, x.astype(np.float16).astype(np.float32))  # exactly float16 rounding
        assert np.all(np.abs(g - x) <= np.abs(x) * F16_EPS + F16_TINY)
    # slices and single Arrow arrays (Ray Data's pyarrow batches) convert the same way
    sliced = features_from_column(column.combine_chunks().slice(5, 3))
    np.testing.assert_array_equal(sliced[1], got[6])


def test_float16_out_of_range_features_are_refused(tmp_path):
    row = {"utt_id": "a/v/1.wav", "speaker": "a", "speaker_index": 0, "features": np.full((2, 80), 7e4, np.float32)}
    with pytest.raises(ValueError, match="a/v/1.wav: features exceed the float16 range"):
        write_shard(tmp_path / "train-00000.parquet", [row], feature_dtype="float16")
    assert list(tmp_path.iterdir()) == []


def test_compact_folder_matches_float32_and_is_smaller(small_data, compact):
    verify_shards(small_data)
    verify_shards(compact)
    f32, f16 = read_manifest(small_data), read_manifest(compact)
    assert f32.feature_dtype == "float32" and f16.feature_dtype == "float16"
    assert json.loads((compact / "manifest.json").read_text())["feature_dtype"] == "float16"
    for split in ("train", "dev", "test"):
        a, b = load_split(small_data, split), load_split(compact, split)
        assert a.utt_ids == b.utt_ids and a.speakers == b.speakers
        np.testing.assert_array_equal(a.speaker_index, b.speaker_index)
        for x, y in zip(a.features, b.features):
            assert y.dtype == np.float32 and y.shape == x.shape
            np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))
    for split in ("dev", "test"):
        assert read_trials(compact / f"trials-{split}.txt") == read_trials(small_data / f"trials-{split}.txt")
    # the feature column: float16, BYTE_STREAM_SPLIT (no dictionary), zstd
    column = pq.ParquetFile(next(compact.glob("train-*.parquet"))).metadata.row_group(0).column(4)
    assert column.compression == "ZSTD" and "BYTE_STREAM_SPLIT" in column.encodings
    assert column.path_in_schema == "features.list.element.list.element"
    # measured 0.27 here and 0.35 on the demo corpus (docs/performance_shards.md); the goal is <= 0.5
    ratio = shard_bytes(compact) / shard_bytes(small_data)
    assert ratio < 0.45, ratio


def test_float32_manifest_has_no_dtype_key_and_old_manifests_read_as_float32(small_data, tmp_path):
    text = (small_data / "manifest.json").read_text()
    assert "feature_dtype" not in text  # float32 manifests are byte-identical to those before the option
    out = tmp_path / "data"
    shutil.copytree(small_data, out)
    manifest = read_manifest(out)
    assert manifest.feature_dtype == "float32"
    check_shard_schemas(out, manifest)
    assert load_split(out, "dev").features[0].dtype == np.float32


def test_float16_shard_in_float32_manifest_is_an_error_naming_the_file(compact, small_data, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(compact, out)
    data = json.loads((out / "manifest.json").read_text())
    del data["feature_dtype"]  # now claims float32, as an old manifest would
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ShardIntegrityError, match=r"train-00000\.parquet: features are stored as float16 but "
                                                  r"manifest\.json says feature_dtype float32") as err:
        check_shard_schemas(out)
    assert str(out / "train-00000.parquet") in err.value.paths
    with pytest.raises(ShardIntegrityError, match="stored as float16"):
        LocalShardData(out)
    with pytest.raises(ValueError, match=r"dev-00000\.parquet: features are stored as float16"):
        load_split(out, "dev")
    # and the other way round: one float32 shard among float16 ones
    mixed = tmp_path / "mixed"
    shutil.copytree(compact, mixed)
    shutil.copy(small_data / "test-00000.parquet", mixed / "test-00000.parquet")
    with pytest.raises(ShardIntegrityError, match=r"test-00000\.parquet: features are stored as float32 but "
                                                  r"manifest\.json says feature_dtype float16") as err:
        check_shard_schemas(mixed)
    assert err.value.paths == [str(mixed / "test-00000.parquet")]


def test_dtype_is_in_the_plan_fingerprint(small_corpus):
    utterances = list_utterances(small_corpus.root)
    test = read_trials(small_corpus.trials, root=small_corpus.root)
    named = {u for t in test for u in (t.enroll, t.test)}
    dev = hold_out_dev(utterances, {u.speaker for u in utterances if u.utt_id in named}, 4, 3, 0)
    splits = split_corpus(utterances, {"dev": (dev, "dev"), "test": (test, "test")})
    _, default = plan_shards(splits, FeatureConfig(), 16, 0)
    _, f32 = plan_shards(splits, FeatureConfig(), 16, 0, None, "float32")
    _, f16 = plan_shards(splits, FeatureConfig(), 16, 0, None, "float16")
    assert [t.plan for t in default] == [t.plan for t in f32]  # float32 fingerprints are as before the option
    assert all(a.plan != b.plan for a, b in zip(f32, f16)) and {t.feature_dtype for t in f16} == {"float16"}


def test_resume_with_another_dtype_is_refused_or_rebuilt_never_mixed(small_corpus, small_data, compact, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(small_data, out)
    digest = manifest_hash(out)
    kwargs = {"dev_speakers": 4, "rows_per_shard": 16, "num_workers": 0, "progress": False}
    with pytest.raises(ManifestError, match=f"{out / 'manifest.json'}: prepared with feature_dtype float32, this "
                                            "run asks for float16"):
        prepare_dataset(small_corpus.root, small_corpus.trials, out, feature_dtype="float16", **kwargs)
    assert manifest_hash(out) == digest  # refused before anything changed
    manifest = prepare_dataset(small_corpus.root, small_corpus.trials, out, feature_dtype="float16", overwrite=True,
                               **kwargs)
    assert manifest.feature_dtype == "float16"
    shards = sorted(out.glob("*.parquet"))
    assert shards and {features_dtype_of(p) for p in shards} == {pa.float16()}  # every shard rebuilt
    check_shard_schemas(out)
    assert [(s.file, s.sha256) for i in manifest.splits.values() for s in i.shards] == \
        [(s.file, s.sha256) for i in read_manifest(compact).splits.values() for s in i.shards]  # deterministic
    # a float16 re-run resumes: every shard kept untouched
    stats = {p.name: p.stat().st_mtime_ns for p in shards}
    prepare_dataset(small_corpus.root, small_corpus.trials, out, feature_dtype="float16", **kwargs)
    assert {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("*.parquet"))} == stats
    with pytest.raises(ValueError, match="feature_dtype must be one of"):
        prepare_dataset(small_corpus.root, small_corpus.trials, tmp_path / "x", feature_dtype="bfloat16", **kwargs)


def test_local_training_runs_on_a_float16_folder(compact, tmp_path):
    data = LocalShardData(compact)
    feats, label = next(iter(data.train_rows(0)))
    assert feats.dtype == np.float32 and feats.shape[1] == 80 and 0 <= label < data.num_classes
    assert data.eval_set().features[0].dtype == np.float32
    cfg = TrainConfig.model_validate({
        "model_preset": "tiny", "epochs": 1, "seed": 0, "device": "cpu",
        "data": {"speakers_per_batch": 4, "utts_per_speaker": 2, "crop_seconds": 1.0},
        "optim": {"lr": 0.003, "warmup_steps": 2}})
    (history,) = train_local(cfg, compact, tmp_path / "run", echo=False)
    assert np.isfinite(history["train_loss"]) and 0.0 <= history["dev_eer"] <= 100.0
