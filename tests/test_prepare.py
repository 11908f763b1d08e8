"""prepare_dataset on a tiny real VoxCeleb-layout corpus: train/dev/test splits, resume, bad audio, Ray vs pool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from mfcon.config import FeatureConfig
from mfcon.data.audio import load_audio
from mfcon.data.augment import AugmentConfig
from mfcon.data.corpus.voxceleb import list_utterances, read_trials
from mfcon.data.features import compute_fbank
from mfcon.data.plan import plan_shards, split_corpus
from mfcon.data.prepare import PrepareError, prepare_dataset
from mfcon.data.shards import (
    ManifestError,
    file_sha256,
    load_split,
    manifest_hash,
    read_manifest,
    verify_shards,
)

SR = 16000
N_SPEAKERS, UTTS_PER_SPEAKER, ROWS_PER_SHARD = 6, 4, 4
TEST_SPEAKERS = ("id00004", "id00005")
DEV_SPEAKERS = ("id00002", "id00003")
TRAIN_SPEAKERS = ("id00000", "id00001")


def pair_list(path: Path, speakers: tuple[str, str]) -> Path:
    a, b = speakers
    path.write_text("".join(f"{int(x == y)} {x}/vid0/00000.wav {y}/vid1/{u:05d}.wav\n"
                            for x in (a, b) for y in (a, b) for u in (1, 3)))
    return path


def write_tiny_corpus(base: Path, seed: int = 0, n_speakers: int = N_SPEAKERS) -> tuple[Path, Path, Path]:
    """6 speakers x 4 utterances (1-2 s tone + noise, 16 kHz); test list over the last 2 speakers, dev over 2 more."""
    rng = np.random.default_rng(seed)
    root = base / "wav"
    for s in range(n_speakers):
        for u in range(UTTS_PER_SPEAKER):
            path = root / f"id{s:05d}" / f"vid{u % 2}" / f"{u:05d}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            t = np.arange(int(rng.uniform(1.0, 2.0) * SR)) / SR
            wav = 0.3 * np.sin(2 * np.pi * (150 + 40 * s) * t) + 0.05 * rng.standard_normal(t.size)
            sf.write(path, wav.astype(np.float32), SR, subtype="PCM_16")
    return root, pair_list(base / "trials.txt", TEST_SPEAKERS), pair_list(base / "dev_trials.txt", DEV_SPEAKERS)


def prepare(corpus: tuple[Path, Path, Path], out: Path, **kwargs):
    kwargs = {"rows_per_shard": ROWS_PER_SHARD, "num_workers": 0, "progress": False, "dev_trials": corpus[2], **kwargs}
    return prepare_dataset(corpus[0], corpus[1], out, **kwargs)


def content(manifest) -> dict:
    return manifest.model_dump(exclude={"created_at"})


def shard_stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.glob("*.parquet"))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, Path]:
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def pooled(corpus, tmp_path_factory):
    """The corpus prepared once on a 2-process pool: (out_dir, manifest)."""
    out = tmp_path_factory.mktemp("pooled") / "data"
    return out, prepare(corpus, out, num_workers=2)


@pytest.fixture
def ray_local_2cpu():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_round_trip_equals_compute_fbank(corpus, pooled):
    out, manifest = pooled
    assert read_manifest(out) == manifest
    verify_shards(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "trials-dev.txt", "trials-test.txt"]
        + [s.file for i in manifest.splits.values() for s in i.shards])
    for split in ("train", "dev", "test"):
        arrays = load_split(out, split)
        assert len(arrays) == manifest.splits[split].rows > 0
        for utt_id, feats in zip(arrays.utt_ids, arrays.features):
            expected = compute_fbank(load_audio(corpus[0] / utt_id)).numpy()
            np.testing.assert_array_equal(feats, expected)
    assert read_trials(out / "trials-test.txt") == read_trials(corpus[1])
    assert read_trials(out / "trials-dev.txt") == read_trials(corpus[2])
    assert manifest.dev_protocol.source == "file" and manifest.dev_protocol.speakers == 2
    assert manifest.skipped == [] and manifest.source == str(corpus[0].resolve())


def test_splits_are_speaker_disjoint(corpus, pooled):
    out, manifest = pooled
    train, dev, test = (load_split(out, s) for s in ("train", "dev", "test"))
    assert manifest.speakers == {s: i for i, s in enumerate(TRAIN_SPEAKERS)}
    assert set(train.speakers) == set(TRAIN_SPEAKERS)
    assert set(dev.speakers) == set(DEV_SPEAKERS) and set(test.speakers) == set(TEST_SPEAKERS)
    assert train.speaker_index.tolist() == [manifest.speakers[s] for s in train.speakers]
    assert set(dev.speaker_index.tolist()) == set(test.speaker_index.tolist()) == {-1}
    for arrays, trials in ((test, corpus[1]), (dev, corpus[2])):
        assert set(arrays.utt_ids) == {u for t in read_trials(trials) for u in (t.enroll, t.test)}
    assert len(train) == len(TRAIN_SPEAKERS) * UTTS_PER_SPEAKER
    assert [manifest.splits[s].num_speakers for s in ("train", "dev", "test")] == [2, 2, 2]


def test_train_shards_mix_speakers(corpus, pooled):
    out, manifest = pooled
    for entry in manifest.splits["train"].shards:
        speakers = pq.read_table(out / entry.file, columns=["speaker"]).column("speaker").to_pylist()
        assert len(set(speakers)) >= 2, f"{entry.file} holds one speaker: {speakers}"
    order = load_split(out, "train").utt_ids
    assert order != sorted(order)
    splits = split_corpus(list_utterances(corpus[0]), {"dev": (read_trials(corpus[2]), corpus[2]),
                                                       "test": (read_trials(corpus[1]), corpus[1])})
    _, same = plan_shards(splits, FeatureConfig(), ROWS_PER_SHARD, seed=0)
    _, other = plan_shards(splits, FeatureConfig(), ROWS_PER_SHARD, seed=1)
    assert [u[0] for t in same if t.split == "train" for u in t.utterances] == order
    assert [t.plan for t in same] != [t.plan for t in other]


def test_rerun_rebuilds_only_the_missing_shard(corpus, pooled, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(pooled[0], out)
    before = shard_stats(out)
    assert content(prepare(corpus, out)) == content(pooled[1])
    assert shard_stats(out) == before  # nothing rebuilt
    (out / "train-00001.parquet").unlink()
    again = prepare(corpus, out)
    after = shard_stats(out)
    assert [n for n in before if after[n] != before[n]] == ["train-00001.parquet"]
    assert content(again) == content(pooled[1])
    verify_shards(out)


def test_failed_shard_leaves_no_manifest_and_resumes(corpus, pooled, tmp_path):
    out = tmp_path / "data"
    (out / "dev-00000.parquet").mkdir(parents=True)  # its final rename will fail
    with pytest.raises(PrepareError, match="dev-00000.parquet: building the shard failed"):
        prepare(corpus, out)
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("*tmp*")) == []
    finished = sorted(p.name for p in out.glob("*.parquet") if p.is_file())
    assert finished == ["train-00000.parquet", "train-00001.parquet"]
    for name in finished:  # complete, and recorded in a sidecar
        record = json.loads((out / f"{name}.done.json").read_text())
        assert record["entry"]["sha256"] == file_sha256(out / name)
    before = {n: s for n, s in shard_stats(out).items() if n in finished}
    (out / "dev-00000.parquet").rmdir()
    manifest = prepare(corpus, out)
    assert {n: shard_stats(out)[n] for n in finished} == before
    assert content(manifest) == content(pooled[1])
    assert sorted(out.glob("*.done.json")) == []


def test_killed_prepare_is_resumable(corpus, tmp_path):
    out = tmp_path / "data"
    code = ("from mfcon.data.prepare import prepare_dataset\n"
            f"prepare_dataset({str(corpus[0])!r}, {str(corpus[1])!r}, {str(out)!r}, rows_per_shard=1, "
            f"dev_trials={str(corpus[2])!r}, "
            "num_workers=0, progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and not any(out.glob("*.done.json")):
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    if (out / "manifest.json").exists():
        pytest.skip("prepare finished before it could be killed")
    final = [p for p in out.glob("*.parquet")]
    assert final, "killed before any shard was finished"
    for path in final:  # a final name never holds a partial shard
        assert pq.read_table(path).num_rows == 1
    kept = {p.name[:-len(".done.json")] for p in out.glob("*.done.json")}
    before = {n: s for n, s in shard_stats(out).items() if n in kept}
    manifest = prepare(corpus, out, rows_per_shard=1)
    assert {n: shard_stats(out)[n] for n in before} == before
    assert manifest.splits["train"].rows == 8 and len(manifest.splits["train"].shards) == 8
    verify_shards(out)


def test_bad_audio_is_skipped_and_reported(corpus, tmp_path):
    root, trials, dev_trials = write_tiny_corpus(tmp_path)
    corrupt = root / "id00001" / "vid0" / "00099.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio" * 10)
    short = root / "id00005" / "vid0" / "00099.wav"
    sf.write(short, np.zeros(int(0.2 * SR), np.float32), SR)
    with trials.open("a") as f:
        f.write("0 id00004/vid0/00000.wav id00005/vid0/00099.wav\n")
    out = tmp_path / "data"
    manifest = prepare((root, trials, dev_trials), out, num_workers=0)
    reasons = {s.path: s.reason for s in manifest.skipped}
    assert list(reasons) == sorted([str(corrupt), str(short)])
    assert reasons[str(corrupt)].startswith(f"{corrupt}: cannot decode audio")
    assert reasons[str(short)] == f"{short}: too short (0.200 s < 0.5 s)"
    assert manifest.splits["train"].rows == 8 and manifest.splits["test"].rows == 6
    assert "id00001/vid0/00099.wav" not in load_split(out, "train").utt_ids
    kept_trials = read_trials(out / "trials-test.txt")
    assert len(kept_trials) == 8 and all("00099" not in t.test for t in kept_trials)


def test_bad_audio_behind_speed_perturbed_rows_is_skipped_once(tmp_path):
    root, trials, dev_trials = write_tiny_corpus(tmp_path)
    corrupt = root / "id00001" / "vid0" / "00099.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio" * 10)
    manifest = prepare((root, trials, dev_trials), tmp_path / "data", augment=AugmentConfig(speed_factors=[0.9, 1.1]))
    assert [s.path for s in manifest.skipped] == [str(corrupt)]  # once, not once per speed
    assert manifest.splits["train"].rows == 3 * len(TRAIN_SPEAKERS) * UTTS_PER_SPEAKER
    assert manifest.splits["train"].num_speakers == 3 * len(TRAIN_SPEAKERS) == len(manifest.speakers)
    assert not [u for u in load_split(tmp_path / "data", "train").utt_ids if u.startswith("id00001/vid0/00099.wav")]


def test_other_feature_config_is_refused(corpus, pooled, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(pooled[0], out)
    digest = manifest_hash(out)
    with pytest.raises(ManifestError, match=f"{out / 'manifest.json'}: prepared with a different feature config"):
        prepare(corpus, out, feature_cfg=FeatureConfig(num_mel_bins=40))
    assert manifest_hash(out) == digest
    manifest = prepare(corpus, out, feature_cfg=FeatureConfig(num_mel_bins=40), overwrite=True)
    assert manifest.feature_config.num_mel_bins == 40
    assert load_split(out, "test").features[0].shape[1] == 40
    assert not set(shard_stats(out)) - {s.file for i in manifest.splits.values() for s in i.shards}


def test_ray_tasks_match_process_pool(corpus, pooled, ray_local_2cpu, tmp_path):
    manifest = prepare(corpus, tmp_path / "data", num_workers=2)
    assert content(manifest) == content(pooled[1])  # same shards, byte for byte
    verify_shards(tmp_path / "data")


def test_held_out_dev_speakers_are_seeded_and_disjoint(corpus, tmp_path):
    a = prepare(corpus, tmp_path / "a", dev_trials=None, dev_speakers=2, seed=5)
    b = prepare(corpus, tmp_path / "b", dev_trials=None, dev_speakers=2, seed=5)
    assert b.dev_protocol == a.dev_protocol and b.speakers == a.speakers
    assert a.dev_protocol.model_dump() == {"source": "held_out_speakers", "speakers": 2, "file": None,
                                           "trials_per_utt": 3, "seed": 5}
    dev_trials = read_trials(tmp_path / "a" / "trials-dev.txt")
    assert dev_trials == read_trials(tmp_path / "b" / "trials-dev.txt")  # same seed, same list
    dev_speakers = {u.split("/")[0] for t in dev_trials for u in (t.enroll, t.test)}
    assert len(dev_speakers) == 2 and not dev_speakers & set(TEST_SPEAKERS)
    assert not dev_speakers & set(a.speakers)  # held out of training
    labels = [t.label for t in dev_trials]
    assert labels.count(1) == 2 * 6  # every same-speaker pair of 4 utterances (cap 3 per enrolment not reached)
    assert labels.count(1) <= labels.count(0) <= labels.count(1) + 2 * UTTS_PER_SPEAKER  # >= 1 per enrolment
    pairs = [frozenset((t.enroll, t.test)) for t in dev_trials]
    assert len(pairs) == len(set(pairs))


@pytest.mark.parametrize("kwargs, message", [
    ({"dev_trials": None}, "give exactly one of dev_trials"),
    ({"dev_speakers": 2}, "give exactly one of dev_trials"),
    ({"dev_trials": None, "dev_speakers": 3}, "--dev-speakers 3: need 2..2"),
])
def test_dev_set_must_be_given_once_and_fit(corpus, tmp_path, kwargs, message):
    from mfcon.data.plan import SplitError

    with pytest.raises(SplitError, match=message):
        prepare(corpus, tmp_path / "data", **kwargs)
    assert not (tmp_path / "data").exists()


def test_dev_list_sharing_test_speakers_is_refused(corpus, tmp_path):
    from mfcon.data.plan import SplitError

    overlapping = pair_list(tmp_path / "dev.txt", ("id00003", "id00004"))
    with pytest.raises(SplitError, match=f"{overlapping} and {corpus[1]} share 1 speakers, e.g. id00004"):
        prepare(corpus, tmp_path / "data", dev_trials=overlapping)
    assert not (tmp_path / "data").exists()


def test_named_test_lists_are_each_kept_checksummed_and_all_held_out(tmp_path):
    """VoxCeleb1-O and -E side by side: both lists beside the manifest, the test split holds both lists' speakers
    (they may share some), and none of them trains or sits in dev."""
    from mfcon.data.local import read_eval_set, read_test_sets

    root, o_list, dev_list = write_tiny_corpus(tmp_path, n_speakers=8)  # O: id4, id5; dev: id2, id3
    e_list = pair_list(tmp_path / "e.txt", ("id00005", "id00006"))
    m = prepare_dataset(root, {"O": o_list, "E": e_list}, tmp_path / "data", dev_trials=dev_list,
                        rows_per_shard=ROWS_PER_SHARD, num_workers=0, progress=False)
    assert m.trials == {"dev": "trials-dev.txt", "O": "trials-test-O.txt", "E": "trials-test-E.txt"}
    assert m.test_lists() == ["O", "E"] and m.default_test_list() == "O"
    for name, file in m.trials.items():
        assert m.trials_sha256[name] == file_sha256(tmp_path / "data" / file)
    assert read_trials(tmp_path / "data" / "trials-test-E.txt") == read_trials(e_list, root=root)
    test = load_split(tmp_path / "data", "test")
    assert sorted(set(test.speakers)) == ["id00004", "id00005", "id00006"]
    assert sorted(m.speakers) == ["id00000", "id00001", "id00007"]
    decide, sets = read_test_sets(tmp_path / "data", decide_on="E")
    assert decide == "E" and list(sets) == ["E", "O"] and sets["O"].features is sets["E"].features
    assert sets["O"].trials == read_trials(o_list, root=root)
    with pytest.raises(ValueError, match="--decide-on H: the data folder has no test list of that name .*O, E"):
        read_test_sets(tmp_path / "data", decide_on="H")
    (tmp_path / "data" / "trials-test-E.txt").write_text("0 id00005/vid0/00000.wav id00006/vid1/00001.wav\n")
    with pytest.raises(ManifestError, match="trials-test-E.txt: changed since prepare"):
        read_eval_set(tmp_path / "data", "test", list_name="E")


def test_a_single_test_list_keeps_its_old_name_and_file(corpus, pooled):
    out, manifest = pooled
    assert manifest.trials == {"dev": "trials-dev.txt", "test": "trials-test.txt"}
    assert manifest.test_lists() == ["test"] and manifest.default_test_list() == "test"


@pytest.mark.parametrize("flags, message", [
    (["--test-trials", "=x.txt"], r"argument --test-trials.*'=x\.txt': test list name ''"),
    (["--test-trials", "O="], r"argument --test-trials.*'O=': NAME=PATH with no PATH"),
    (["--test-trials", "dev=t.txt"], r"argument --test-trials.*'dev' is a split name"),
    (["--test-trials", "O=t.txt", "--test-trials", "O=e.txt"], r"--test-trials: the name 'O' is given twice"),
    (["--test-trials", "t.txt", "--test-trials", "test=e.txt"], r"--test-trials: the name 'test' is given twice"),
    (["--test-trials", "O=t.txt", "--test-trials", "E=missing.txt"], r"missing\.txt: no such file .*--test-trials"),
])
def test_test_list_flags_are_one_line_errors_naming_the_flag(corpus, tmp_path, flags, message, capsys):
    from mfcon.cli import main

    shutil.copy(corpus[1], tmp_path / "t.txt")
    shutil.copy(corpus[1], tmp_path / "e.txt")
    flags = [f.replace("t.txt", str(tmp_path / "t.txt")).replace("e.txt", str(tmp_path / "e.txt"))
             .replace("missing.txt", str(tmp_path / "missing.txt")) for f in flags]
    try:
        code = main(["prepare", "--corpus", str(corpus[0]), *flags, "--dev-trials", str(corpus[2]),
                     "--out", str(tmp_path / "data")])
    except SystemExit as e:  # argparse's own errors (the flag's type)
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "data").exists()
