"""Storage by URI: the same code reads and writes a local folder and an S3 bucket (moto on 127.0.0.1)."""

from __future__ import annotations

import pytest
from mfcon import storage
from mfcon.data.local import LocalShardData, read_eval_set
from mfcon.data.prepare import prepare_dataset
from mfcon.data.shards import ShardIntegrityError, read_manifest, shard_paths, verify_shards
from mfcon.study.runner import StudyError, study_tracking_uri
from object_store_fixtures import run_s3_server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    with run_s3_server(tmp_path_factory.mktemp("s3")) as server:
        for key, value in server.env.items():
            mp.setenv(key, value)
        yield server
    mp.undo()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_read_list_delete_are_the_same_on_disk_and_in_a_bucket(where, s3, tmp_path):
    base = str(tmp_path / "store") if where == "local" else s3.uri("unit")
    target = storage.join(base, "sub", "a.txt")
    assert not storage.exists(target)
    storage.write_text(target, "hello")
    assert storage.read_text(target) == "hello" and storage.is_file(target)
    assert storage.list_names(storage.join(base, "sub")) == ["a.txt"]
    assert storage.sha256(target) == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    storage.delete(target)
    storage.delete(target)  # deleting twice is fine
    with pytest.raises(FileNotFoundError, match="a.txt"):
        storage.read_text(target)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_failed_write_leaves_neither_a_partial_file_nor_a_temp_file(where, s3, tmp_path):
    base = str(tmp_path / "store") if where == "local" else s3.uri("atomic")
    target = storage.join(base, "shard.parquet")
    storage.write_text(target, "old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with storage.staged_file(target) as staged:
            staged.write_text("half of the new")
            raise RuntimeError("disk on fire")
    assert storage.read_text(target) == "old"
    assert storage.list_names(base) == ["shard.parquet"]


def test_uri_joins_keep_the_scheme_and_local_paths_become_absolute(tmp_path, monkeypatch):
    assert storage.join("s3://b/data/", "train-00000.parquet") == "s3://b/data/train-00000.parquet"
    assert storage.join("gs://b", "x", "y") == "gs://b/x/y"
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("rel/dir") == str(tmp_path / "rel" / "dir")
    assert storage.is_remote("s3://b/x") and not storage.is_remote("/tmp/x") and not storage.is_remote("file:///x")
    with pytest.raises(ValueError, match="needs a bucket"):
        storage.resolve("s3:///nobucket")


def test_prepare_writes_shards_to_the_bucket_and_training_reads_them_back(small_corpus, s3, tmp_path, monkeypatch):
    """prepare --out s3://..., resumable there; readers get the same rows as from a local folder."""
    monkeypatch.chdir(tmp_path)  # a stray local write would land here
    out = s3.uri("data")
    manifest = prepare_dataset(small_corpus.root, small_corpus.trials, out, dev_speakers=4, num_workers=0,
                               rows_per_shard=16, progress=False)
    keys = s3.keys("data/")
    assert "data/manifest.json" in keys and "data/trials-dev.txt" in keys and "data/trials-test.txt" in keys
    assert not [k for k in keys if ".tmp-" in k or k.endswith(".done.json")], keys
    assert list(tmp_path.iterdir()) == []
    assert all(p.startswith(out + "/") for p in shard_paths(out, "train"))
    verify_shards(out)

    local = tmp_path / "local"
    prepare_dataset(small_corpus.root, small_corpus.trials, local, dev_speakers=4, num_workers=0, rows_per_shard=16,
                    progress=False)
    assert read_manifest(out).splits == read_manifest(local).splits  # same shards, same sha256
    remote_dev, local_dev = read_eval_set(out, "dev"), read_eval_set(local, "dev")
    assert remote_dev.utt_ids == local_dev.utt_ids and remote_dev.trials == local_dev.trials
    assert next(iter(LocalShardData(out).train_rows(0)))[0].shape == next(iter(LocalShardData(local).train_rows(0)))[0].shape

    # resumable in the bucket: a second run keeps every shard (same bytes, same manifest entries)
    before = {k: storage.sha256(s3.uri(k)) for k in s3.keys("data/") if k.endswith(".parquet")}
    prepare_dataset(small_corpus.root, small_corpus.trials, out, dev_speakers=4, num_workers=0, rows_per_shard=16,
                    progress=False)
    assert {k: storage.sha256(s3.uri(k)) for k in s3.keys("data/") if k.endswith(".parquet")} == before
    assert manifest.splits == read_manifest(out).splits

    # a shard changed in the bucket is caught by its checksum, named by its URI
    victim = shard_paths(out, "dev")[0]
    storage.write_bytes(victim, storage.read_bytes(victim)[:-10])
    with pytest.raises(ShardIntegrityError, match=victim.replace(".", r"\.")):
        verify_shards(out)


def test_a_study_kept_in_an_object_store_needs_a_tracking_server(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(StudyError, match="--tracking-uri"):
        study_tracking_uri(None, "s3://bucket/runs")
    assert study_tracking_uri("http://10.0.0.5:5000", "s3://bucket/runs") == "http://10.0.0.5:5000"
