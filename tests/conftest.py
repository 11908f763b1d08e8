"""Shared fixtures: a small real corpus prepared once per session, and a private 2-CPU Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Ray's token auth (2.59+) and usage stats are for clusters, not a test's private instance.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
from mfcon.study.runner import LOCAL_TRAIN_ENV  # noqa: E402

for _name, _value in LOCAL_TRAIN_ENV.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """16 synthetic espeak speakers x 6 utterances (4 held-out test speakers), VoxCeleb layout."""
    from mfcon.data.corpus.synthetic import CorpusSpec, make_corpus

    out = tmp_path_factory.mktemp("corpus")
    return make_corpus(out, CorpusSpec(n_speakers=16, utts_per_speaker=6, n_test_speakers=4, seed=3), progress=False)


@pytest.fixture(scope="session")
def small_data(small_corpus, tmp_path_factory) -> Path:
    """The small corpus as fbank Parquet shards (train: 8 speakers, dev: 4 held out, test: the trial list's 4).

    Four dev speakers keep dev EERs off a floor of exact 0, where every trial ties and ASHA can stop none.
    Beside the list named ``test``, a second named test list ``half`` (the trials of its first 2 enrollment
    speakers: no new utterances, the same shards) lets replication and promotion report two lists."""
    from mfcon.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("shards")
    half = out.parent / f"{out.name}-half.txt"
    lines = small_corpus.trials.read_text().splitlines()
    first = sorted({line.split()[1].split("/")[0] for line in lines})[:2]
    half.write_text("".join(f"{line}\n" for line in lines if line.split()[1].split("/")[0] in first))
    prepare_dataset(small_corpus.root, {"test": small_corpus.trials, "half": half}, out, dev_speakers=4,
                    rows_per_shard=16, num_workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def demo_corpus_data(tmp_path_factory) -> Path:
    """A corpus big enough for EER to mean something: 24 speakers x 8 utterances, 6 test and 4 dev speakers."""
    from mfcon.data.corpus.synthetic import CorpusSpec, make_corpus
    from mfcon.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("demo")
    layout = make_corpus(root / "corpus", CorpusSpec(n_speakers=24, utts_per_speaker=8, n_test_speakers=6, seed=1),
                         progress=False)
    prepare_dataset(layout.root, layout.trials, root / "shards", dev_speakers=4, rows_per_shard=32, num_workers=2,
                    progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def ray_local_2cpu():
    """A private local Ray with 2 CPUs (never attaches to another cluster on the machine)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
