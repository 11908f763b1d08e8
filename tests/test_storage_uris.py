"""Storage locations: a malformed URI is an error everywhere, and a study on a cluster refuses local paths.

``s3:/bucket/x`` (what ``Path("s3://bucket/x")`` prints) once became a local folder named ``s3:``; on a
cluster a local ``--workdir`` left every worker's checkpoints on its own disk. Both now fail before
anything starts, with the fix in the message.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mfcon import storage
from mfcon.storage import ClusterStorageError, StorageURIError, check_cluster_locations, is_cluster_address


@pytest.mark.parametrize("uri, expected", [("s3://bucket/x/", "s3://bucket/x"), ("S3://bucket", "s3://bucket"),
                                           ("gs://b/vox1", "gs://b/vox1"), ("file:///tmp/a", "/tmp/a")])
def test_well_formed_locations_normalize(uri, expected):
    assert storage.normalize(uri) == expected


@pytest.mark.parametrize("bad, hint", [("s3:/bucket/x", "did you mean s3://bucket/x"),
                                        (Path("s3://bucket/x"), "did you mean s3://bucket/x"),
                                        ("s3:bucket/x", "did you mean s3://bucket/x"),
                                        ("s3:///x", "needs a bucket"), ("s4://bucket/x", "unknown storage scheme"),
                                        ("http://host/x", "unknown storage scheme"), ("foo:/bar", "not a valid")])
def test_malformed_uris_are_errors_everywhere(bad, hint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for call in (storage.normalize, storage.is_remote, storage.resolve, storage.exists):
        with pytest.raises(StorageURIError, match=hint):
            call(bad)
    with pytest.raises(StorageURIError):
        storage.write_text(bad, "x")
    assert list(tmp_path.iterdir()) == [], "nothing may be written for a malformed URI"


def test_local_names_with_a_colon_stay_local(tmp_path):
    assert storage.normalize(tmp_path / "a:b") == str(tmp_path / "a:b")
    assert not storage.is_remote("runs")


def test_a_private_local_ray_takes_local_paths(tmp_path):
    for address in (None, "", "local"):
        check_cluster_locations(address, data=tmp_path, workdir=tmp_path)


def test_a_cluster_refuses_local_paths_before_anything_starts(tmp_path):
    with pytest.raises(ClusterStorageError, match=r"--workdir .*object-store URI.*MFCON_SHARED_FS"):
        check_cluster_locations("10.9.8.7:6379", env={}, data="s3://bucket/shards", workdir=tmp_path / "runs")
    with pytest.raises(ClusterStorageError, match="--data"):
        check_cluster_locations("ray://10.9.8.7:10001", env={}, data=tmp_path, workdir="s3://bucket/runs")
    check_cluster_locations("10.9.8.7:6379", env={}, data="s3://bucket/shards", workdir="gs://bucket/runs")
    with pytest.raises(StorageURIError):  # a typo is never taken for a local path, cluster or not
        check_cluster_locations("10.9.8.7:6379", env={}, data="s3:/bucket/shards", workdir="s3://bucket/runs")


def test_a_declared_shared_filesystem_is_accepted(tmp_path):
    shared = tmp_path / "nfs"
    env = {"MFCON_SHARED_FS": f"/elsewhere:{shared}"}
    check_cluster_locations("10.9.8.7:6379", env=env, data=shared / "shards", workdir=shared)
    with pytest.raises(ClusterStorageError, match="--workdir"):
        check_cluster_locations("10.9.8.7:6379", env=env, data=shared / "shards", workdir=tmp_path / "nfs2")


def test_auto_is_a_cluster_on_the_head_of_a_launcher_cluster(tmp_path):
    launcher = tmp_path / "ray_bootstrap_config.yaml"
    assert not is_cluster_address("auto", launcher_config=str(launcher))       # `ray start` on this machine
    assert not is_cluster_address("127.0.0.1:6379", launcher_config=str(launcher))
    launcher.write_text("cluster_name: x\n")                                    # `ray up` made this the head
    assert is_cluster_address("auto", launcher_config=str(launcher))
    assert is_cluster_address("127.0.0.1:6379", launcher_config=str(launcher))
    assert is_cluster_address("203.0.113.9:6379", launcher_config=str(tmp_path / "none"))


def test_run_study_checks_before_anything_starts(tmp_path, monkeypatch):
    from mfcon.study.runner import run_study

    space = Path(__file__).resolve().parent.parent / "search_spaces" / "demo.yaml"
    with pytest.raises(ClusterStorageError, match="--workdir"):
        run_study(space, "s3://bucket/shards", workdir=tmp_path / "runs", address="203.0.113.9:6379")
    assert not (tmp_path / "runs").exists()
