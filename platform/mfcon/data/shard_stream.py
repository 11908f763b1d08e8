"""Training rows for one data-parallel worker, read straight from its share of the Parquet shards.

A study worker needs nothing from a data pipeline but its rows in a shuffled
order: starting Ray Data for that cost every trial several seconds and extra
actor processes (a split coordinator, a streaming executor) before the first
step. Here each worker opens the shard files itself (local, memory-mapped, or
streamed from an object store through :mod:`mfcon.storage`).

The unit of work is a Parquet row group (``ROW_GROUP_ROWS`` rows), or a slice of
one when the split has fewer row groups than ranks. Every epoch all ranks draw
the same permutation of all units and deal it round-robin, so the ranks' shares
are disjoint, cover the split, and differ in size by at most one unit (even
with fewer shards, or row groups, than workers). Each worker then reads its
units shard by shard (each file opened once per epoch) through a shuffle buffer
of ``buffer_rows`` rows, as Ray Data's local shuffle did.

Two things make the stream fit a GPU worker: ``prefetch_batches``
(``DataConfig.prefetch_batches``) asks the batcher to build that many batches
ahead in a background thread (:mod:`mfcon.data.prefetch`; pinned host memory
when ``pin_device`` is a CUDA device), and a :class:`~mfcon.data.shard_cache.ShardCache`
keeps a node-local copy of each remote shard once read, so later epochs read
local files (``DataConfig.cache_dir`` / ``cache_bytes``; never for local shards).
"""

from __future__ import annotations

import contextlib
import itertools
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mfcon import storage
from mfcon.data.shard_cache import ShardCache
from mfcon.data.shards import features_from_column, read_shard_table
from mfcon.evaluation.scoring import EvalSet

TRAIN_COLUMNS = ["features", "speaker_index"]
READER_THREAD_PREFIX = "mfcon-read"
READ_AHEAD_SHARDS = 2  # shards read at once when batches are prefetched (ShardStream.read_ahead)


@dataclass(frozen=True)
class RowGroup:
    shard: int  # index into the split's shard list
    group: int  # row group within that shard
    part: int = 0  # which of ``parts`` contiguous slices of the row group (a split with fewer groups than ranks)
    parts: int = 1

    def rows_of(self, table: pa.Table) -> pa.Table:
        if self.parts == 1:
            return table
        bounds = np.linspace(0, table.num_rows, self.parts + 1).astype(int)
        return table.slice(bounds[self.part], bounds[self.part + 1] - bounds[self.part])


def open_shard(location: str, cache: ShardCache | None = None, sha256: str | None = None,
               fetch: bool = True) -> pq.ParquetFile:
    """A shard for reading row groups: memory-mapped when local, streamed from the object store otherwise.

    With ``cache``, a remote shard is read from its node-local copy, made first when ``fetch`` (else only
    used when already there); ``sha256`` is the manifest's, when known."""
    fs, path = storage.resolve(location)
    if storage.is_remote(location):
        if cache is not None:
            local = cache.local_copy(location, sha256) if fetch else cache.lookup(location, sha256)
            if local is not None:
                with contextlib.suppress(FileNotFoundError):  # evicted by another worker of the node just now
                    return pq.ParquetFile(local, memory_map=True)
        return pq.ParquetFile(fs.open_input_file(path))
    return pq.ParquetFile(path, memory_map=True)


def row_groups(paths: Sequence[str], world_size: int = 1, cache: ShardCache | None = None,
               checksums: Mapping[str, str] | None = None) -> list[RowGroup]:
    """Every row group of the split, in shard order (one footer read per shard); when there are fewer groups
    than ranks, each group is cut into slices so that every rank still gets rows. Footers come from cached
    copies where there are any, but nothing is copied for them (a copy is made when rows are read)."""
    units = []
    sums = checksums or {}
    for shard, location in enumerate(paths):
        handle = open_shard(location, cache, sums.get(location), fetch=False)
        units.extend(RowGroup(shard, g) for g in range(handle.metadata.num_row_groups))
    if 0 < len(units) < world_size:
        parts = -(-world_size // len(units))
        units = [RowGroup(u.shard, u.group, p, parts) for u in units for p in range(parts)]
    return units


def deal(units: Sequence[RowGroup], rank: int, world_size: int, seed: int, epoch: int) -> list[RowGroup]:
    """This rank's units for ``epoch``: the same permutation on every rank, dealt round-robin, then grouped by
    shard (in the permuted order of first appearance) so a worker opens each file once."""
    order = np.random.default_rng([seed, epoch]).permutation(len(units))
    mine = [units[i] for i in order[rank::world_size]]
    first_seen: dict[int, int] = {}
    for position, unit in enumerate(mine):
        first_seen.setdefault(unit.shard, position)
    return sorted(mine, key=lambda u: (first_seen[u.shard], u.group))


def shuffled(rows: Iterator[tuple[np.ndarray, int]], buffer_rows: int,
             rng: np.random.Generator) -> Iterator[tuple[np.ndarray, int]]:
    """A shuffle buffer: once it holds ``buffer_rows`` rows, each new row replaces a random one, which goes out."""
    buffer: list[tuple[np.ndarray, int]] = []
    for row in rows:
        if len(buffer) < buffer_rows:
            buffer.append(row)
            continue
        i = int(rng.integers(len(buffer)))
        buffer[i], row = row, buffer[i]
        yield row
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


def _rows_of_table(table: pa.Table) -> Iterator[tuple[np.ndarray, int]]:
    feats = features_from_column(table.column("features"))
    labels = table.column("speaker_index").to_numpy()
    # A copy per row: a view would keep its whole row group alive while the row waits in the shuffle buffer.
    return ((np.array(f, dtype=np.float32, copy=True), label) for f, label in zip(feats, labels.tolist()))


def _runs(units: Sequence[RowGroup]) -> list[list[RowGroup]]:
    """``units`` cut into runs of consecutive units of one shard (``deal`` groups a shard's units together)."""
    runs: list[list[RowGroup]] = []
    for unit in units:
        if runs and runs[-1][0].shard == unit.shard:
            runs[-1].append(unit)
        else:
            runs.append([unit])
    return runs


def read_units(paths: Sequence[str], units: Sequence[RowGroup], cache: ShardCache | None = None,
               checksums: Mapping[str, str] | None = None, read_ahead: int = 0) -> Iterator[tuple[np.ndarray, int]]:
    """The rows of ``units`` in order, (frames (T, F) float32, speaker index); one open file at a time.

    ``read_ahead`` > 0: up to that many shards' runs of units are read at once by reader threads (their
    requests and Parquet decoding overlap), still yielded in order, so the rows are the same either way."""
    sums = checksums or {}

    def read_run(run: list[RowGroup]) -> list[pa.Table]:
        handle = open_shard(paths[run[0].shard], cache, sums.get(paths[run[0].shard]))
        return [u.rows_of(handle.read_row_group(u.group, columns=TRAIN_COLUMNS)) for u in run]

    if read_ahead <= 0:
        for run in _runs(units):
            handle = open_shard(paths[run[0].shard], cache, sums.get(paths[run[0].shard]))
            for unit in run:
                yield from _rows_of_table(unit.rows_of(handle.read_row_group(unit.group, columns=TRAIN_COLUMNS)))
        return
    pool = ThreadPoolExecutor(max_workers=read_ahead, thread_name_prefix=READER_THREAD_PREFIX)
    try:
        pending: deque[Future] = deque()
        runs = iter(_runs(units))
        for run in itertools.islice(runs, read_ahead):
            pending.append(pool.submit(read_run, run))
        while pending:
            tables = pending.popleft().result()  # re-raises a reader's exception as it was raised
            for run in itertools.islice(runs, 1):
                pending.append(pool.submit(read_run, run))
            for table in tables:
                yield from _rows_of_table(table)
            del tables
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Rows:
    """An epoch's rows (an iterator), carrying how its consumer should batch them: ``prefetch_batches`` batches
    built ahead in a background thread (0: synchronous), into pinned memory for ``pin_device`` when it is a CUDA
    device (``SpeakerBalancedBatcher.batches`` reads both)."""

    def __init__(self, rows: Iterator[tuple[np.ndarray, int]], prefetch_batches: int = 0,
                 pin_device: torch.device | None = None):
        self._rows, self.prefetch_batches, self.pin_device = rows, prefetch_batches, pin_device

    def __iter__(self) -> Rows:
        return self

    def __next__(self) -> tuple[np.ndarray, int]:
        return next(self._rows)

    def close(self) -> None:
        close = getattr(self._rows, "close", None)
        if close is not None:
            close()


def make_cache(paths: Sequence[str], cache_dir: str | None, cache_bytes: int) -> ShardCache | None:
    """The node-local cache for ``paths``: none when they are local files or ``cache_bytes`` is 0."""
    if cache_bytes <= 0 or not any(storage.is_remote(p) for p in paths):
        return None
    return ShardCache(cache_dir, cache_bytes)


class ShardStream:
    """One worker's training rows, epoch by epoch (``TrainData.train_rows``).

    ``prefetch_batches`` / ``pin_device``: passed on with each epoch's rows (:class:`Rows`); ``cache``: where
    remote shards are copied once read (:func:`make_cache`); ``checksums``: {shard location: the manifest's
    sha256}, when known, which cached copies must match; ``read_ahead``: shards read at once by reader threads
    (default: ``READ_AHEAD_SHARDS`` when ``prefetch_batches`` > 0, else 0; the rows are the same either way)."""

    def __init__(self, paths: Sequence[str], rank: int = 0, world_size: int = 1, seed: int = 0,
                 buffer_rows: int = 2048, *, prefetch_batches: int = 0, pin_device: torch.device | None = None,
                 cache: ShardCache | None = None, checksums: Mapping[str, str] | None = None,
                 read_ahead: int | None = None):
        self.paths = list(paths)
        self.rank, self.world_size, self.seed, self.buffer_rows = rank, world_size, seed, buffer_rows
        self.prefetch_batches, self.pin_device = prefetch_batches, pin_device
        self.cache, self.checksums = cache, dict(checksums or {})
        # Reader threads only where batches are built in the background anyway (not on the training thread).
        self.read_ahead = READ_AHEAD_SHARDS if read_ahead is None and prefetch_batches > 0 else (read_ahead or 0)
        self._units: list[RowGroup] | None = None

    def units(self, epoch: int) -> list[RowGroup]:
        if self._units is None:
            self._units = row_groups(self.paths, self.world_size, self.cache, self.checksums)
        return deal(self._units, self.rank, self.world_size, self.seed, epoch)

    def rows(self, epoch: int) -> Rows:
        rng = np.random.default_rng([self.seed, epoch, self.rank, 1])
        rows = shuffled(read_units(self.paths, self.units(epoch), self.cache, self.checksums, self.read_ahead),
                        self.buffer_rows, rng)
        return Rows(rows, self.prefetch_batches, self.pin_device)


def read_eval_shards(paths: Sequence[str], trials: Sequence) -> EvalSet:
    """A whole evaluation split (dev) and its trial list, read by the worker that scores it."""
    utt_ids: list[str] = []
    features: list[np.ndarray] = []
    for location in paths:
        table = read_shard_table(location, columns=["utt_id", "features"])
        utt_ids.extend(table.column("utt_id").to_pylist())
        features.extend(features_from_column(table.column("features")))
    return EvalSet(utt_ids=utt_ids, features=features, trials=list(trials))


class WorkerShardData:
    """``train.loop.TrainData`` of a study worker: its share of the train shards, and the dev split for rank 0."""

    def __init__(self, train_shards: Sequence[str], dev_shards: Sequence[str], trials: Sequence, *,
                 num_classes: int, train_rows_total: int, frame_shift_ms: float, rank: int, world_size: int,
                 seed: int, buffer_rows: int, prefetch_batches: int = 0, pin_device: torch.device | None = None,
                 cache_dir: str | None = None, cache_bytes: int = 0):
        self.num_classes = num_classes
        self.rows_per_worker = train_rows_total // world_size
        self.frame_shift_ms = frame_shift_ms
        self.stream = ShardStream(train_shards, rank=rank, world_size=world_size, seed=seed, buffer_rows=buffer_rows,
                                  prefetch_batches=prefetch_batches, pin_device=pin_device,
                                  cache=make_cache(train_shards, cache_dir, cache_bytes))
        self.dev_shards, self.trials = list(dev_shards), trials
        self._eval: EvalSet | None = None

    def train_rows(self, epoch: int) -> Rows:
        return self.stream.rows(epoch)

    def eval_set(self) -> EvalSet | None:
        if self._eval is None:
            self._eval = read_eval_shards(self.dev_shards, self.trials)
        return self._eval
