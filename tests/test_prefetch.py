"""Background batch prefetch: the same batches as the synchronous path, errors reach the training
thread unchanged, and no thread outlives its epoch."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from mfcon.config import DataConfig, SpecAugmentConfig, TrainConfig
from mfcon.data.batching import SpeakerBalancedBatcher
from mfcon.data.prefetch import THREAD_NAME, pin, prefetched
from mfcon.data.shard_stream import READER_THREAD_PREFIX, Rows, ShardStream
from mfcon.data.shards import write_shard
from mfcon.train.loop import fit


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME or t.name.startswith(READER_THREAD_PREFIX)]


def _no_prefetch_thread_left(timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while _prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    return not _prefetch_threads()


def _write_split(folder, shards: int = 4, rows: int = 150, speakers: int = 12) -> list[str]:
    rng = np.random.default_rng(0)
    paths, n = [], 0
    for i in range(shards):
        table = [{"utt_id": f"u{n + j}", "speaker": f"s{(n + j) % speakers}", "speaker_index": (n + j) % speakers,
                  "features": rng.standard_normal((int(rng.integers(20, 60)), 80)).astype(np.float32)}
                 for j in range(rows)]
        path = folder / f"train-{i:05d}.parquet"
        write_shard(path, table)
        paths.append(str(path))
        n += rows
    return paths


def _batches(paths, prefetch: int, epoch: int = 1, **batcher):
    stream = ShardStream(paths, seed=5, buffer_rows=64, prefetch_batches=prefetch)
    b = SpeakerBalancedBatcher(4, 2, 30, steps=60, seed=epoch, **batcher)
    return list(b.batches(stream.rows(epoch)))


@pytest.mark.parametrize("batcher", [{}, {"positives": "views", "spec_augment": SpecAugmentConfig(prob=1.0)}])
def test_prefetch_gives_the_same_batches_in_the_same_order(tmp_path, batcher):
    paths = _write_split(tmp_path)
    sync = _batches(paths, 0, **batcher)
    for depth in (1, 3):
        ahead = _batches(paths, depth, **batcher)
        assert len(ahead) == len(sync) == 60
        for a, b in zip(ahead, sync):
            assert torch.equal(a.feats, b.feats) and torch.equal(a.labels, b.labels)
            assert torch.equal(a.lengths, b.lengths)
    assert _no_prefetch_thread_left()


def test_reader_threads_give_the_same_rows(tmp_path):
    paths = _write_split(tmp_path, shards=5, rows=70)
    rows = {ahead: [(f.tobytes(), label) for f, label in ShardStream(paths, seed=2, buffer_rows=40,
                                                                         read_ahead=ahead).rows(3)]
            for ahead in (0, 1, 3)}
    assert rows[0] == rows[1] == rows[3] and len(rows[0]) == 350
    assert ShardStream(paths, prefetch_batches=2).read_ahead == 2 and ShardStream(paths).read_ahead == 0
    # a reader thread's error reaches the consumer as raised, and the readers stop when the consumer stops
    stream = ShardStream(paths, seed=2, buffer_rows=1, read_ahead=2)
    stream.units(3)  # footers read: the file breaks afterwards, under the reader threads
    (tmp_path / "train-00003.parquet").write_bytes(b"not parquet")
    with pytest.raises(Exception, match="(?i)parquet"):
        list(stream.rows(3))
    it = ShardStream(paths[:3], seed=2, buffer_rows=1, read_ahead=2).rows(3)
    next(it)
    it.close()
    assert _no_prefetch_thread_left()


def test_prefetch_zero_is_synchronous(tmp_path):
    paths = _write_split(tmp_path, shards=1)
    rows = ShardStream(paths, seed=0, prefetch_batches=0).rows(1)
    it = SpeakerBalancedBatcher(4, 2, 30, steps=3, seed=0).batches(rows)
    next(it)
    assert not _prefetch_threads()
    # the batcher's own setting holds over the rows' (and works for any row source)
    it = SpeakerBalancedBatcher(4, 2, 30, steps=3, seed=0, prefetch_batches=0).batches(
        ShardStream(paths, seed=0, prefetch_batches=2).rows(1))
    next(it)
    assert not _prefetch_threads()
    plain = iter(list(ShardStream(paths, seed=0).rows(1)))
    ahead = list(SpeakerBalancedBatcher(4, 2, 30, steps=3, seed=0, prefetch_batches=2).batches(plain))
    again = list(SpeakerBalancedBatcher(4, 2, 30, steps=3, seed=0).batches(ShardStream(paths, seed=0).rows(1)))
    assert all(torch.equal(a.feats, b.feats) for a, b in zip(ahead, again)) and len(ahead) == 3


def _failing_rows(after: int, error: BaseException):
    for i in range(after):
        yield np.full((40, 8), i % 6, np.float32), i % 6
    raise error


def test_an_error_in_the_thread_reaches_the_consumer_unchanged():
    error = OSError("shard s3://b/train-00003.parquet: connection reset by peer")
    rows = Rows(_failing_rows(50, error), prefetch_batches=2)
    got = []
    with pytest.raises(OSError) as caught:
        for batch in SpeakerBalancedBatcher(2, 2, 20, steps=1000, seed=0).batches(rows):
            got.append(batch)
    assert caught.value is error and str(caught.value) == str(error)
    assert len(got) > 0  # the batches before the error came through first
    assert _no_prefetch_thread_left()


def test_the_batchers_own_errors_come_through_too():
    rows = Rows(iter(()), prefetch_batches=2)
    with pytest.raises(ValueError, match="yielded no rows"):
        list(SpeakerBalancedBatcher(2, 2, 20, steps=5, seed=0).batches(rows))
    assert _no_prefetch_thread_left()


class _Source:
    """An endless row source that records whether it was closed (its thread stopped reading)."""

    def __init__(self):
        self.closed = threading.Event()

    def rows(self):
        try:
            i = 0
            while True:
                yield np.full((40, 8), i % 6, np.float32), i % 6
                i += 1
        finally:
            self.closed.set()


def test_an_epoch_ended_early_leaves_no_thread():
    source = _Source()
    it = SpeakerBalancedBatcher(2, 2, 20, steps=10**6, seed=0).batches(Rows(source.rows(), prefetch_batches=3))
    for i, _ in enumerate(it):
        if i == 4:
            break
    it.close()
    assert _no_prefetch_thread_left() and source.closed.is_set()


def test_a_consumer_that_raises_leaves_no_thread():
    source = _Source()

    def epoch():
        for i, _ in enumerate(SpeakerBalancedBatcher(2, 2, 20, steps=10**6, seed=0)
                              .batches(Rows(source.rows(), prefetch_batches=2))):
            if i == 2:
                raise FloatingPointError("loss became nan")

    with pytest.raises(FloatingPointError):
        epoch()
    assert _no_prefetch_thread_left() and source.closed.is_set()


def test_prefetch_runs_ahead_of_a_slow_consumer():
    produced = []

    def items():
        for i in range(6):
            produced.append(i)
            yield i

    it = prefetched(items(), depth=3)
    assert next(it) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 5 and time.monotonic() < deadline:  # 1 taken + 3 queued + 1 waiting to be put
        time.sleep(0.01)
    assert len(produced) >= 4
    assert list(it) == [1, 2, 3, 4, 5]
    assert _no_prefetch_thread_left()


def test_pin_is_a_no_op_off_cuda():
    t = torch.ones(3)
    assert pin(t, torch.device("cpu")) is t and pin(t, None) is t


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_are_pinned_for_a_cuda_device(tmp_path):
    paths = _write_split(tmp_path, shards=1)
    stream = ShardStream(paths, seed=0, prefetch_batches=2, pin_device=torch.device("cuda"))
    batch = next(iter(SpeakerBalancedBatcher(4, 2, 30, steps=2, seed=0).batches(stream.rows(1))))
    assert batch.feats.is_pinned() and batch.labels.is_pinned() and batch.lengths.is_pinned()


class _Data:
    """A small ``TrainData`` over the written shards, training only (no dev scoring)."""

    def __init__(self, paths, prefetch: int):
        self.stream = ShardStream(paths, seed=0, buffer_rows=32, prefetch_batches=prefetch)
        self.num_classes, self.rows_per_worker, self.frame_shift_ms = 6, 48, 10.0

    def train_rows(self, epoch):
        return self.stream.rows(epoch)

    def eval_set(self):
        return None


class _Hooks:
    def load_checkpoint(self):
        return None

    def report(self, metrics, state):
        pass


def test_fit_trains_identically_with_and_without_prefetch(tmp_path):
    assert DataConfig().prefetch_batches == 2
    paths = _write_split(tmp_path, shards=2, rows=24, speakers=6)
    losses, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # as a CPU study worker; on a loaded 2-core box more threads only wait on each other
    for depth in (0, 2):
        cfg = TrainConfig.model_validate({
            "model_preset": "tiny", "epochs": 2, "seed": 0, "device": "cpu",
            "loss": {"mfcon_weight": 0.1, "mfcon_temperature": 0.1, "mfcon_blocks": [1, 2]},
            "data": {"speakers_per_batch": 3, "utts_per_speaker": 2, "crop_seconds": 0.3, "prefetch_batches": depth}})
        history = fit(cfg, _Data(paths, depth), _Hooks())
        losses.append([(h["train_loss"], h["margin_loss"], h["mfcon_loss"]) for h in history])
    torch.set_num_threads(threads)
    assert losses[0] == losses[1] and len(losses[0]) == 2
    assert _no_prefetch_thread_left()
