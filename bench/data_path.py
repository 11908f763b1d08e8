"""Data path: what the shard readers deliver to a training worker, against what training consumes.

1. Delivered rate: P x K crop batches/s a single-threaded consumer gets from each reader through
   ``SpeakerBalancedBatcher`` (the worker's path), one epoch per repetition, median over repetitions:
   - ``files``: ``ShardStream(paths).rows(epoch)`` (``DataConfig.reader = "files"``, the default);
   - ``ray_data``: ``read_shards(paths)`` split as Ray Train splits it (``streaming_split(1, equal=True)``),
     iterated with the worker's ``iter_batches`` arguments, rows split with ``features_from_column``
     (a local ``ray.init(num_cpus=2)``);
   - ``on_the_fly``: what the usual toolkits do instead of shards: per row, decode the audio
     (``load_audio``) and compute the fbank (``compute_fbank``), in a shuffled order, no augmentation.
   Shapes: ``demo`` (search_spaces/demo.yaml: P=8, K=2, 1.5 s crops) over the demo corpus's train split, and
   ``paper`` (search_spaces/mfcon.yaml: P=100, K=2, 3 s crops) over ``--wide`` copies of that split with
   the speaker indices offset per copy (the demo corpus has fewer than P=100 training speakers).
2. Consumption rate: training steps/s of ``mfcon.train.loop._train_step`` (bench/train_efficiency.py's
   helpers) on 1 torch thread, as study workers run on CPU: the tiny preset at the demo shape, every
   repetition beside the readers; the paper preset once, on ``--paper-crops`` crops instead of P x K = 200
   (a full CPU step takes minutes), its step time scaled linearly to 200 crops.
   Ratios, each a median over repetitions of values measured side by side: delivered / consumed per reader
   and shape (goal >= 5: data is then at most 1/6 of a worker's time, since the worker reads and trains
   in one thread), files / ray_data, files / on_the_fly.
3. Peak RSS: a fresh process per case reads one epoch (reader -> batcher at the demo shape, as a worker)
   over the train shards (1x) and over 10 byte-for-byte copies of them under new names (10x), and prints
   its peak resident set (``VmHWM``; ``ru_maxrss`` is recorded too, but Linux carries it over ``execve``
   from the forking parent); the 10x / 1x ratio (goal <= 1.1) with the default shuffle buffer (2048 rows)
   and with ``--small-buffer`` rows (the files reader copies each row out of its Arrow row group, so a row
   waiting in the shuffle buffer does not keep its whole row group alive). For ``ray_data`` this is the
   consuming process only: Ray Data reads in Ray worker processes and hands blocks through the object store.

4. ``--gpu-rate`` (runs only this part): the paper shape read from an S3-protocol server (moto on
   127.0.0.1) through a TCP proxy that holds every client->server chunk (one per request) for ``--latency-ms``
   (20 ms), against a consumer that steps at a GPU-like ``--step-s`` (0.1 s: it sleeps, releasing the GIL as a
   thread waiting on CUDA does). Per case, epochs of ``ShardStream`` -> ``SpeakerBalancedBatcher`` as a worker:
   - capacity: batches/s with a consumer that does not step (what the data path can deliver), synchronous and
     with the prefetcher (a batch-building thread and ``READ_AHEAD_SHARDS`` reader threads);
   - steps/s of the 0.1 s consumer with ``prefetch_batches`` 0 (synchronous) and 2, and the time it waits;
   - the node-local shard cache: a cold epoch (copies made) against a warm one (local copies).
   Ratios: capacity / consumption (goal >= 2 with the prefetcher), prefetch / synchronous steps/s, warm / cold.

    .venv/bin/python bench/data_path.py [--data DIR] [--workdir DIR] [--reps 5]
        [--wide 6] [--paper-crops 16] [--feature-dtype float32] [--json bench/results/data_path.json]
    .venv/bin/python bench/data_path.py --gpu-rate [--latency-ms 20] [--step-s 0.1] [--gpu-reps 2] [--wide 12]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "platform"))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from machine_facts import machine_facts
from mfcon.data.batching import SpeakerBalancedBatcher
from mfcon.data.shard_cache import ShardCache
from mfcon.data.shard_stream import READ_AHEAD_SHARDS, ShardStream
from mfcon.data.shards import ROW_GROUP_ROWS, read_manifest, schema_feature_dtype, shard_paths, writer_options
from mfcon.study.spaces import load_search_space
from mfcon.train.heap import keep_freed_memory
from mfcon.train.loop import crop_frames

SPACES = {"demo": REPO / "search_spaces" / "demo.yaml", "paper": REPO / "search_spaces" / "mfcon.yaml"}
PRESETS = {"demo": "tiny", "paper": "paper"}
VOXCELEB1_DEV_SPEAKERS = 1211
DEFAULT_BUFFER = 2048  # DataConfig.shuffle_buffer_rows
Row = tuple[np.ndarray, int]


# ---------------------------------------------------------------- machine


def machine_info() -> dict:
    return {**machine_facts("torch", "pyarrow", "ray", "numpy"), "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class Shape:
    name: str  # demo | paper
    p: int
    k: int
    crop_frames: int

    @property
    def crops(self) -> int:
        return self.p * self.k


def space_shape(name: str, frame_shift_ms: float) -> Shape:
    cfg = load_search_space(SPACES[name]).base_config()
    return Shape(name, cfg.data.speakers_per_batch, cfg.data.utts_per_speaker, crop_frames(cfg, frame_shift_ms))


def make_data(workdir: Path, speakers: int, utts: int, feature_dtype: str) -> Path:
    """The demo corpus and shards (pipelines/demo.py's settings); reused when already there."""
    from mfcon.data.corpus.synthetic import CorpusSpec, make_corpus
    from mfcon.data.prepare import prepare_dataset

    layout = make_corpus(workdir / "corpus", CorpusSpec(n_speakers=speakers, utts_per_speaker=utts,
                                                        n_test_speakers=max(4, speakers // 4)), progress=False)
    data = workdir / f"shards-{feature_dtype}"
    prepare_dataset(layout.root, layout.trials, data, dev_speakers=max(2, speakers // 6), rows_per_shard=64,
                    num_workers=2, progress=False, feature_dtype=feature_dtype)
    return data


@dataclass
class Split:
    """A train split: its shard files, and (audio file, speaker index) per row for the on-the-fly baseline."""

    paths: list[str]
    audio: list[tuple[str, int]]
    num_speakers: int

    @property
    def rows(self) -> int:
        return len(self.audio)


def train_split(data: Path) -> Split:
    manifest = read_manifest(data)
    paths = shard_paths(data, "train", manifest)
    audio = []
    for path in paths:
        table = pq.read_table(path, columns=["utt_id", "speaker_index"])
        audio += [(str(Path(manifest.source) / u), int(s))
                  for u, s in zip(table.column("utt_id").to_pylist(), table.column("speaker_index").to_pylist())]
    return Split(paths, audio, manifest.splits["train"].num_speakers)


def widen(split: Split, out: Path, copies: int) -> Split:
    """``copies`` copies of the split, copy c's speaker indices offset by c x num_speakers (same row groups,
    same writer options): as many rows per speaker as the split, ``copies`` times the speakers."""
    out.mkdir(parents=True, exist_ok=True)
    paths, audio = [], []
    for c in range(copies):
        offset = c * split.num_speakers
        for path in split.paths:
            dest = out / f"wide{c:02d}-{Path(path).name}"
            source = pq.ParquetFile(path)
            with pq.ParquetWriter(dest, source.schema_arrow,
                                  **writer_options(schema_feature_dtype(source.schema_arrow))) as writer:
                for g in range(source.metadata.num_row_groups):
                    table = source.read_row_group(g)
                    index = table.schema.get_field_index("speaker_index")
                    shifted = pa.compute.add(table.column(index), pa.scalar(offset, pa.int32()))
                    writer.write_table(table.set_column(index, table.schema.field(index), shifted),
                                       row_group_size=ROW_GROUP_ROWS)
            paths.append(str(dest))
        audio += [(a, s + offset) for a, s in split.audio]
    return Split(paths, audio, split.num_speakers * copies)


def copy_shards(paths: Sequence[str], out: Path, times: int) -> list[str]:
    """``times`` byte-for-byte copies of every shard, under new names."""
    out.mkdir(parents=True, exist_ok=True)
    copies = []
    for t in range(times):
        for path in paths:
            dest = out / f"copy{t:02d}-{Path(path).name}"
            if not dest.exists():
                shutil.copyfile(path, dest)
            copies.append(str(dest))
    return copies


# ---------------------------------------------------------------- readers (epoch -> rows)


class FilesReader:
    name = "files"

    def __init__(self, split: Split, buffer_rows: int = DEFAULT_BUFFER):
        self.stream = ShardStream(split.paths, seed=0, buffer_rows=buffer_rows)

    def rows(self, epoch: int) -> Iterator[Row]:
        return self.stream.rows(epoch)


class RayDataReader:
    """``RayShardData.train_rows`` over the split Ray Train would hand a single worker."""

    name = "ray_data"

    def __init__(self, split: Split, buffer_rows: int = DEFAULT_BUFFER):
        from mfcon.data.ray_source import read_shards

        self.iterator = read_shards(tuple(split.paths)).streaming_split(1, equal=True)[0]
        self.buffer = buffer_rows

    def rows(self, epoch: int) -> Iterator[Row]:
        from mfcon.data.shards import features_from_column

        for batch in self.iterator.iter_batches(batch_size=64, batch_format="pyarrow",
                                                local_shuffle_buffer_size=self.buffer,
                                                local_shuffle_seed=epoch):
            feats = features_from_column(batch.column("features"))
            labels = batch.column("speaker_index").to_numpy()
            yield from zip(feats, labels.tolist())


class OnTheFlyReader:
    """Decode + fbank per row, in a shuffled order (a toolkit's data list, without augmentation)."""

    name = "on_the_fly"

    def __init__(self, split: Split, cfg):
        self.audio, self.cfg = split.audio, cfg

    def rows(self, epoch: int) -> Iterator[Row]:
        from mfcon.data.audio import load_audio
        from mfcon.data.features import compute_fbank

        for i in np.random.default_rng([0, epoch]).permutation(len(self.audio)):
            path, speaker = self.audio[i]
            yield compute_fbank(load_audio(path, target_sr=self.cfg.sample_rate), self.cfg).numpy(), speaker


@dataclass
class Epoch:
    batches: int
    seconds: float
    first_batch_s: float  # time to the first batch
    cpu_s: float  # CPU time of this process (all its threads; not Ray Data's reader processes)

    @property
    def rate(self) -> float:
        return self.batches / self.seconds

    @property
    def steady_rate(self) -> float:
        """batches/s after the first batch (without the epoch's start-up)."""
        return (self.batches - 1) / max(self.seconds - self.first_batch_s, 1e-9)


def run_epoch(reader, shape: Shape, rows: int, epoch: int) -> Epoch:
    """One epoch through the worker's batcher: ``rows // (P K)`` batches, as ``build_training`` counts steps."""
    batcher = SpeakerBalancedBatcher(shape.p, shape.k, shape.crop_frames, steps=max(1, rows // shape.crops),
                                     seed=epoch)
    started, cpu = time.perf_counter(), time.process_time()
    first, n = None, 0
    for batch in batcher.batches(reader.rows(epoch)):
        n += 1
        first = first or time.perf_counter()
        assert batch.feats.shape == (shape.crops, shape.crop_frames, batch.feats.shape[2])
    end = time.perf_counter()
    return Epoch(n, end - started, (first or end) - started, time.process_time() - cpu)


# ---------------------------------------------------------------- training steps


def bench_helpers():
    sys.path.insert(0, str(REPO / "bench"))
    import train_efficiency

    return train_efficiency


def make_step(preset_shape: str, crops: int | None, num_classes: int) -> tuple[Callable[[], object], tuple]:
    """``_train_step`` of the space's base recipe (MFCon as the space's base sets it), on a fixed batch."""
    te = bench_helpers()
    cfg = load_search_space(SPACES[preset_shape]).base_config()
    torch.manual_seed(0)
    model = te.build_model(cfg.model_config_resolved())
    device = torch.device("cpu")
    batch = te.synthetic_batch(cfg, crops, num_classes, device)
    step = te.build_step({"preset": cfg.model_preset}, cfg, model, batch, num_classes, device)
    step.run()  # warm-up: oneDNN builds its primitives on first use
    return step.run, tuple(batch.feats.shape)


def time_steps(run: Callable[[], object], n: int) -> tuple[float, float]:
    """Median (wall seconds, process CPU seconds) of ``n`` steps."""
    times = []
    for _ in range(n):
        started, cpu = time.perf_counter(), time.process_time()
        run()
        times.append((time.perf_counter() - started, time.process_time() - cpu))
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


# ---------------------------------------------------------------- peak RSS (fresh process per case)


def peak_rss_kib() -> int:
    """This process's peak resident set (KiB): ``VmHWM``, the high-water mark of its own address space.

    ``ru_maxrss`` (RUSAGE_SELF) is also recorded but is no measure here: Linux carries it across
    ``execve``, so a child started from this bench holds at least the parent's resident size at the fork.
    """
    with contextlib.suppress(OSError, StopIteration):
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rss_now_kib() -> dict[str, int]:
    """Resident memory now, by kind (anonymous, file-backed such as memory-mapped shards, shared memory)."""
    with contextlib.suppress(OSError):
        return {k: int(v.split()[0]) for k, v in (x.split(":", 1) for x in Path("/proc/self/status").read_text()
                                                   .splitlines()) if k in ("RssAnon", "RssFile", "RssShmem")}
    return {}


RSS_MARK = "RSS_RESULT "


def rss_child(reader_name: str, paths_file: str, buffer_rows: int, crop: int) -> None:
    """Child: one epoch of ``reader`` -> batcher (demo shape), then print its peak RSS (KiB) as JSON."""
    keep_freed_memory()  # as fit() does before a worker reads anything
    torch.set_num_threads(1)
    paths = json.loads(Path(paths_file).read_text())
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    split = Split(paths, [], 0)  # the readers below use its paths only
    after_imports = peak_rss_kib()
    if reader_name == "ray_data":
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        reader = RayDataReader(split, buffer_rows)
    else:
        reader = FilesReader(split, buffer_rows)
    before_epoch = peak_rss_kib()
    data_cfg = load_search_space(SPACES["demo"]).base_config().data
    epoch = run_epoch(reader, Shape("demo", data_cfg.speakers_per_batch, data_cfg.utts_per_speaker, crop), rows,
                      epoch=1)
    print(RSS_MARK + json.dumps({"rows": rows, "batches": epoch.batches, "peak_after_imports_kib": after_imports,
                                 "peak_before_epoch_kib": before_epoch, "peak_kib": peak_rss_kib(),
                                 "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                                 "end_of_epoch_kib": rss_now_kib()}), flush=True)


def measure_rss(reader: str, paths: Sequence[str], buffer_rows: int, crop: int, tmp: Path) -> dict:
    paths_file = tmp / f"paths-{reader}-{len(paths)}-{buffer_rows}.json"
    paths_file.write_text(json.dumps(list(paths)))
    out = subprocess.run([sys.executable, __file__, "--rss-child", reader, str(paths_file), str(buffer_rows),
                          str(crop)], check=False, capture_output=True, text=True)
    found = [line for line in out.stdout.splitlines() if line.startswith(RSS_MARK)]
    if out.returncode or not found:
        raise RuntimeError(f"RSS child ({reader}, {len(paths)} shards) failed, rc {out.returncode}:\n"
                           f"{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(found[-1][len(RSS_MARK):])


# ---------------------------------------------------------------- GPU rate: object store + latency


def latency_proxy(listen_port: int, target_port: int, delay_s: float) -> None:
    """A TCP proxy on 127.0.0.1 that holds each client->server chunk ``delay_s`` before passing it on."""
    import socket
    import threading

    def pipe(src, dst, delay):
        try:
            while data := src.recv(1 << 16):
                if delay:
                    time.sleep(delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", listen_port))
    server.listen(128)
    print("PROXY READY", flush=True)
    while True:
        client, _ = server.accept()
        upstream = socket.create_connection(("127.0.0.1", target_port))
        threading.Thread(target=pipe, args=(client, upstream, delay_s), daemon=True).start()
        threading.Thread(target=pipe, args=(upstream, client, 0.0), daemon=True).start()


@dataclass
class GpuEpoch:
    batches: int
    seconds: float
    wait_s: float  # time the consumer spent waiting for its next batch

    @property
    def rate(self) -> float:
        return self.batches / self.seconds


def consume_epoch(stream: ShardStream, shape: Shape, rows: int, epoch: int, step_s: float, prefetch: int) -> GpuEpoch:
    stream.prefetch_batches = prefetch
    stream.read_ahead = READ_AHEAD_SHARDS if prefetch else 0  # as ShardStream sets it from prefetch_batches
    batcher = SpeakerBalancedBatcher(shape.p, shape.k, shape.crop_frames, steps=max(1, rows // shape.crops),
                                     seed=epoch)
    started, wait, n = time.perf_counter(), 0.0, 0
    batches = batcher.batches(stream.rows(epoch))
    while True:
        t = time.perf_counter()
        batch = next(batches, None)
        wait += time.perf_counter() - t
        if batch is None:
            break
        n += 1
        if step_s:
            time.sleep(step_s)  # the training step: the thread waits on the GPU (GIL released)
    return GpuEpoch(n, time.perf_counter() - started, wait)


def gpu_rate_main(args) -> int:
    sys.path.insert(0, str(REPO / "tests"))
    from mlflow_fixtures import free_port, stop_process_group
    from object_store_fixtures import run_s3_server

    from mfcon import storage

    started = time.perf_counter()
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, load average {info['load_average_1m']}")
    print(f"python {info['python']}, torch {info['torch']}, pyarrow {info['pyarrow']}, numpy {info['numpy']}",
          flush=True)
    tmp_ctx = tempfile.TemporaryDirectory(prefix="mfcon-data-gpu-") if args.workdir is None else None
    work = Path(tmp_ctx.name) if tmp_ctx else args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": sys.argv[1:], "machine": info, "latency_ms": args.latency_ms, "step_s": args.step_s}
    try:
        data = args.data.resolve() if args.data else make_data(work, args.speakers, args.utts, args.feature_dtype)
        manifest = read_manifest(data)
        wide = widen(train_split(data), work / "wide", args.wide)
        shape = space_shape("paper", manifest.feature_config.frame_shift_ms)
        rows = wide.rows
        with run_s3_server(work) as s3:
            os.environ.update(s3.env)
            uris = []
            for path in wide.paths:
                uri = s3.uri("wide", Path(path).name)
                storage.write_bytes(uri, Path(path).read_bytes())  # straight to moto, not through the proxy
                uris.append(uri)
            shard_bytes = sum(Path(p).stat().st_size for p in wide.paths)
            port = free_port()
            proxy = subprocess.Popen([sys.executable, __file__, "--latency-proxy", str(port),
                                      s3.endpoint.rsplit(":", 1)[1], str(args.latency_ms / 1000)],
                                     stdout=subprocess.PIPE, text=True, start_new_session=True)
            try:
                assert proxy.stdout.readline().strip() == "PROXY READY"
                os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"  # reads go through the proxy
                print(f"paper shape P={shape.p} K={shape.k} crop {shape.crop_frames} frames; {rows} rows, "
                      f"{wide.num_speakers} speakers, {len(uris)} shards ({shard_bytes / 1e6:.0f} MB) in the bucket, "
                      f"{rows // shape.crops} batches/epoch; +{args.latency_ms:g} ms per request; "
                      f"consumer step {args.step_s} s", flush=True)
                results.update(gpu_cases(args, uris, shape, rows, work))
            finally:
                stop_process_group(proxy)
        results["data"] = {"rows": rows, "speakers": wide.num_speakers, "shards": len(uris),
                           "shard_bytes": shard_bytes, "batches_per_epoch": rows // shape.crops,
                           "shape": {"p": shape.p, "k": shape.k, "crop_frames": shape.crop_frames}}
    finally:
        if tmp_ctx:
            tmp_ctx.cleanup()
    results["load_average_end"] = os.getloadavg()[0]
    results["total_s"] = round(time.perf_counter() - started, 1)
    print_gpu_report(results)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def gpu_cases(args, uris: list[str], shape: Shape, rows: int, work: Path) -> dict:
    """Each case ``--gpu-reps`` times, in alternating order; epochs differ per repetition (other row orders)."""
    step = args.step_s
    plain = ShardStream(uris, seed=0, buffer_rows=DEFAULT_BUFFER)
    plain.units(1)  # footers read once, as a worker does before its first epoch
    cases: dict[str, list[GpuEpoch]] = {}
    cache_cases: dict[str, list[GpuEpoch]] = {"cold": [], "warm": [], "warm_step_prefetch": []}

    def run(name: str, stream: ShardStream, epoch: int, step_s: float, prefetch: int) -> GpuEpoch:
        e = consume_epoch(stream, shape, rows, epoch, step_s, prefetch)
        print(f"  {name:<28} epoch {epoch}: {e.batches} batches in {e.seconds:6.2f} s = {e.rate:6.2f}/s, "
              f"waited {e.wait_s:5.2f} s; load {os.getloadavg()[0]:.1f}", flush=True)
        return e

    order = [("capacity, no cache", 0.0, 0), ("capacity, no cache, prefetch", 0.0, 2),
             ("step, synchronous", step, 0), ("step, prefetch 2", step, 2)]
    for rep in range(args.gpu_reps):
        for name, step_s, prefetch in order if rep % 2 == 0 else order[::-1]:
            cases.setdefault(name, []).append(run(name, plain, rep + 1, step_s, prefetch))
        cache = ShardCache(work / f"cache-{rep}", 8 << 30)  # empty: the first epoch makes the copies
        cached = ShardStream(uris, seed=0, buffer_rows=DEFAULT_BUFFER, cache=cache)
        cached.units(1)
        cache_cases["cold"].append(run("cache cold (copies made)", cached, rep + 1, 0.0, 0))
        cache_cases["warm"].append(run("cache warm", cached, rep + 2, 0.0, 0))
        cache_cases["warm_step_prefetch"].append(run("cache warm, step, prefetch 2", cached, rep + 3, step, 2))
        print(f"  cache: {cache.stats}", flush=True)
    consumption = 1 / step
    rate = {k: med(e.rate for e in v) for k, v in {**cases, **{f"cache {k}": v for k, v in cache_cases.items()}}.items()}
    waits = {k: med(e.wait_s / e.batches for e in v) for k, v in cases.items()}
    ratios = {
        "capacity/consumption, from the bucket": rate["capacity, no cache"] / consumption,
        "capacity/consumption, from the bucket, prefetch": rate["capacity, no cache, prefetch"] / consumption,
        "capacity/consumption, warm cache": rate["cache warm"] / consumption,
        "steps/s prefetch 2 / synchronous": med(a.rate / b.rate for a, b in
                                               zip(cases["step, prefetch 2"], cases["step, synchronous"])),
        "steps/s prefetch 2 / ideal": rate["step, prefetch 2"] / consumption,
        "steps/s synchronous / ideal": rate["step, synchronous"] / consumption,
        "steps/s warm cache + prefetch 2 / ideal": rate["cache warm_step_prefetch"] / consumption,
        "cache warm / cold epoch rate": med(w.rate / c.rate for w, c in zip(cache_cases["warm"], cache_cases["cold"])),
        "cache warm / no cache epoch rate": rate["cache warm"] / rate["capacity, no cache"],
    }
    return {"rates": rate, "wait_s_per_step": waits, "ratios": ratios,
            "epochs": {k: [e.__dict__ for e in v] for k, v in {**cases, **cache_cases}.items()}}


def print_gpu_report(r: dict) -> None:
    print(f"\nload average: {r['machine']['load_average_1m']} at the start, {r['load_average_end']:.1f} at the end; "
          f"+{r['latency_ms']:g} ms per request, consumer step {r['step_s']} s (ideal {1 / r['step_s']:.1f} steps/s)")
    print(f"{'case':<34} {'batches/s':>9}")
    for k, v in r.get("rates", {}).items():
        print(f"{k:<34} {v:>9.2f}")
    for k, v in r.get("ratios", {}).items():
        print(f"ratio {k}: {v:.2f}")
    print(f"total {r['total_s']} s")


# ---------------------------------------------------------------- the run


@dataclass
class Series:
    epochs: list[Epoch] = field(default_factory=list)
    first: Epoch | None = None  # the untimed warm-up epoch


def med(values) -> float:
    return statistics.median(list(values))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="a prepared data folder (default: make the demo corpus + shards)")
    ap.add_argument("--workdir", type=Path, help="corpus, shards and copies go here (default: a temporary folder)")
    ap.add_argument("--speakers", type=int, default=48)
    ap.add_argument("--utts", type=int, default=10)
    ap.add_argument("--feature-dtype", choices=["float32", "float16"], default="float32")
    ap.add_argument("--reps", type=int, default=5, help="timed epochs per reader and shape (after one warm-up)")
    ap.add_argument("--wide", type=int, default=6, help="relabelled copies of the train split for the paper shape")
    ap.add_argument("--tiny-steps", type=int, default=5, help="tiny training steps timed per repetition")
    ap.add_argument("--paper-crops", type=int, default=16, help="crops of the timed paper steps (0: skip)")
    ap.add_argument("--paper-steps", type=int, default=2)
    ap.add_argument("--small-buffer", type=int, default=128, help="shuffle buffer rows of the second RSS series")
    ap.add_argument("--rss-readers", nargs="*", default=["files", "ray_data"], choices=["files", "ray_data"])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--rss-child", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--gpu-rate", action="store_true", help="only part 4: object store + latency, GPU-rate consumer")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="added to every request (--gpu-rate)")
    ap.add_argument("--step-s", type=float, default=0.1, help="the consumer's step time (--gpu-rate)")
    ap.add_argument("--gpu-reps", type=int, default=2, help="repetitions of every --gpu-rate case")
    ap.add_argument("--latency-proxy", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.latency_proxy:
        listen, target, delay = args.latency_proxy
        latency_proxy(int(listen), int(target), float(delay))
        return 0
    if args.gpu_rate:
        return gpu_rate_main(args)
    if args.rss_child:
        reader, paths_file, buffer_rows, crop = args.rss_child
        rss_child(reader, paths_file, int(buffer_rows), int(crop))
        return 0

    started = time.perf_counter()
    torch.set_num_threads(1)  # a study worker's CPU training thread; the consumer is single-threaded
    keep_freed_memory()  # as fit() does in a worker
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, load average {info['load_average_1m']}")
    print(f"python {info['python']}, torch {info['torch']} ({info['torch_threads']} thread), "
          f"pyarrow {info['pyarrow']}, ray {info['ray']}, numpy {info['numpy']}", flush=True)

    tmp_ctx = tempfile.TemporaryDirectory(prefix="mfcon-data-path-") if args.workdir is None else None
    work = Path(tmp_ctx.name) if tmp_ctx else args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    try:
        t = time.perf_counter()
        data = args.data.resolve() if args.data else make_data(work, args.speakers, args.utts, args.feature_dtype)
        timings["data_s"] = time.perf_counter() - t
        manifest = read_manifest(data)
        fcfg = manifest.feature_config
        base = train_split(data)
        wide = widen(base, work / "wide", args.wide)
        shapes = [space_shape("demo", fcfg.frame_shift_ms), space_shape("paper", fcfg.frame_shift_ms)]
        splits = {"demo": base, "paper": wide}
        print(f"data: {data} ({manifest.feature_dtype}), train {base.rows} rows / {base.num_speakers} speakers in "
              f"{len(base.paths)} shards; paper shape over {args.wide} relabelled copies: {wide.rows} rows / "
              f"{wide.num_speakers} speakers", flush=True)
        for s in shapes:
            print(f"  shape {s.name}: P={s.p} K={s.k} crop {s.crop_frames} frames, "
                  f"{splits[s.name].rows // s.crops} batches/epoch", flush=True)

        import ray

        t = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        timings["ray_init_s"] = time.perf_counter() - t
        readers = {s.name: [FilesReader(splits[s.name]), RayDataReader(splits[s.name]),
                            OnTheFlyReader(splits[s.name], fcfg)] for s in shapes}
        series = {(s.name, r.name): Series() for s in shapes for r in readers[s.name]}

        t = time.perf_counter()
        tiny_step, tiny_batch = make_step("demo", None, base.num_speakers)
        timings["tiny_setup_s"] = time.perf_counter() - t
        tiny_times: list[float] = []
        tiny_cpu: list[float] = []

        t = time.perf_counter()
        for s in shapes:  # warm-up epoch (page cache, Ray Data's first executor, lazy imports)
            for r in readers[s.name]:
                series[(s.name, r.name)].first = run_epoch(r, s, splits[s.name].rows, epoch=0)
        timings["warmup_s"] = time.perf_counter() - t
        t = time.perf_counter()
        for rep in range(args.reps):
            order = [(s, r) for s in shapes for r in readers[s.name]]
            for s, r in order if rep % 2 == 0 else order[::-1]:  # no reader always first
                series[(s.name, r.name)].epochs.append(run_epoch(r, s, splits[s.name].rows, epoch=rep + 1))
            wall, cpu = time_steps(tiny_step, args.tiny_steps)
            tiny_times.append(wall)
            tiny_cpu.append(cpu)
            print(f"  rep {rep + 1}/{args.reps}: " + ", ".join(
                f"{s.name}/{r.name} {series[(s.name, r.name)].epochs[-1].rate:.1f}" for s, r in order)
                + f" batches/s; tiny step {tiny_times[-1] * 1000:.0f} ms; load {os.getloadavg()[0]:.1f}", flush=True)
        timings["timed_reps_s"] = time.perf_counter() - t
        ray.shutdown()

        paper = None
        if args.paper_crops:
            t = time.perf_counter()
            paper_step, paper_batch = make_step("paper", args.paper_crops, VOXCELEB1_DEV_SPEAKERS)
            step_s, step_cpu_s = time_steps(paper_step, args.paper_steps)
            paper = {"batch": list(paper_batch), "step_s": step_s, "step_cpu_s": step_cpu_s,
                     "step_s_scaled_to_shape": step_s * shapes[1].crops / paper_batch[0]}
            del paper_step
            timings["paper_steps_s"] = time.perf_counter() - t
            print(f"  paper step on {paper_batch}: {step_s:.2f} s; scaled to {shapes[1].crops} crops: "
                  f"{paper['step_s_scaled_to_shape']:.1f} s", flush=True)

        t = time.perf_counter()
        ten = copy_shards(base.paths, work / "ten", 10)
        rss = []
        for reader in args.rss_readers:
            for buffer_rows in (DEFAULT_BUFFER, args.small_buffer):
                one = measure_rss(reader, base.paths, buffer_rows, shapes[0].crop_frames, work)
                tenx = measure_rss(reader, ten, buffer_rows, shapes[0].crop_frames, work)
                rss.append({"reader": reader, "buffer_rows": buffer_rows, "1x": one, "10x": tenx,
                            "ratio": tenx["peak_kib"] / one["peak_kib"],
                            "epoch_growth_ratio": (tenx["peak_kib"] - tenx["peak_before_epoch_kib"])
                            / max(1, one["peak_kib"] - one["peak_before_epoch_kib"])})
                print(f"  rss {reader} buffer {buffer_rows}: 1x {one['peak_kib'] / 1024:.0f} MiB, "
                      f"10x {tenx['peak_kib'] / 1024:.0f} MiB", flush=True)
        timings["rss_s"] = time.perf_counter() - t
    finally:
        if tmp_ctx:
            tmp_ctx.cleanup()
    timings["total_s"] = time.perf_counter() - started

    results = summarize(shapes, series, tiny_times, tiny_cpu, tiny_batch, paper, rss, splits)
    results.update({"machine": info, "load_average_end": os.getloadavg()[0], "args": sys.argv[1:],
                    "timings_s": {k: round(v, 1) for k, v in timings.items()},
                    "data": {"feature_dtype": manifest.feature_dtype, "train_rows": base.rows,
                             "train_speakers": base.num_speakers, "shards": len(base.paths),
                             "wide_rows": wide.rows, "wide_speakers": wide.num_speakers}})
    print_report(results)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def summarize(shapes, series, tiny_times, tiny_cpu, tiny_batch, paper, rss, splits) -> dict:
    delivered = {}
    for (shape, reader), s in series.items():
        delivered.setdefault(shape, {})[reader] = {
            "batches_per_s": med(e.rate for e in s.epochs),
            "steady_batches_per_s": med(e.steady_rate for e in s.epochs),
            "batches_per_epoch": s.epochs[0].batches,
            "first_batch_s": med(e.first_batch_s for e in s.epochs),
            "batches_per_cpu_s": med(e.batches / e.cpu_s for e in s.epochs),  # ray_data: the consumer's CPU only
            "warmup_epoch_s": s.first.seconds, "rates": [e.rate for e in s.epochs],
            "goal_needs_step_s": 5 / med(e.rate for e in s.epochs),  # delivered/consumed >= 5 iff step >= this
            "goal_needs_step_s_steady": 5 / med(e.steady_rate for e in s.epochs)}
    consumed = {"demo": {"preset": "tiny", "batch": list(tiny_batch), "step_s": med(tiny_times),
                         "steps_per_s": 1 / med(tiny_times), "step_s_reps": tiny_times, "step_cpu_s": med(tiny_cpu)}}
    if paper:
        consumed["paper"] = {"preset": "paper", **paper, "steps_per_s": 1 / paper["step_s_scaled_to_shape"]}
    ratios: dict[str, dict[str, float]] = {}
    for s in shapes:
        per = {r: series[(s.name, r)].epochs for r in ("files", "ray_data", "on_the_fly")}
        out = {"files/ray_data": med(a.rate / b.rate for a, b in zip(per["files"], per["ray_data"])),
               "files/on_the_fly": med(a.rate / b.rate for a, b in zip(per["files"], per["on_the_fly"])),
               "ray_data/on_the_fly": med(a.rate / b.rate for a, b in zip(per["ray_data"], per["on_the_fly"]))}
        for r, epochs in per.items():
            if s.name == "demo":  # paired with the tiny steps timed in the same repetition
                out[f"{r}/consumed"] = med(e.rate * t for e, t in zip(epochs, tiny_times))
                out[f"{r}/consumed, CPU time"] = med(e.batches / e.cpu_s * t for e, t in zip(epochs, tiny_cpu))
            elif paper:
                out[f"{r}/consumed"] = med(e.rate for e in epochs) * paper["step_s_scaled_to_shape"]
        ratios[s.name] = out
    return {"shapes": {s.name: {"p": s.p, "k": s.k, "crop_frames": s.crop_frames, "rows": splits[s.name].rows}
                       for s in shapes},
            "delivered": delivered, "consumed": consumed, "ratios": ratios, "peak_rss": rss}


def print_report(r: dict) -> None:
    print(f"\nload average: {r['machine']['load_average_1m']} at the start, {r['load_average_end']:.1f} at the end")
    print(f"\n{'shape':<6} {'reader':<11} {'batches/s':>9} {'steady':>8} {'1st batch s':>11} "
          f"{'/consumed':>9} {'files/this':>10} {'x5 if step >= s':>15} {'(steady)':>8} {'per CPU s':>9}")
    for shape, per in r["delivered"].items():
        for reader, d in per.items():
            ratio = r["ratios"][shape].get(f"{reader}/consumed")
            files_over = 1.0 if reader == "files" else r["ratios"][shape][f"files/{reader}"]
            print(f"{shape:<6} {reader:<11} {d['batches_per_s']:>9.2f} {d['steady_batches_per_s']:>8.2f} "
                  f"{d['first_batch_s']:>11.2f} {(f'{ratio:.1f}' if ratio else '-'):>9} {files_over:>10.1f} "
                  f"{d['goal_needs_step_s']:>15.3f} {d['goal_needs_step_s_steady']:>8.3f} "
                  f"{d['batches_per_cpu_s']:>9.1f}")
    for shape, c in r["consumed"].items():
        extra = (f" (timed on {c['batch'][0]} crops: {c['step_s']:.2f} s, scaled linearly)"
                 if "step_s_scaled_to_shape" in c else "")
        step = c.get("step_s_scaled_to_shape", c["step_s"])
        print(f"consumed {shape}: {c['preset']} preset, 1 thread: {step:.3f} s/step = {c['steps_per_s']:.3f} steps/s"
              + extra + f"; {c['step_cpu_s']:.3f} CPU s/step as timed")
    for shape, ratios in r["ratios"].items():
        print(f"ratios {shape}: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print(f"\n{'peak RSS':<9} {'buffer':>6} {'1x MiB':>7} {'10x MiB':>8} {'10x/1x':>7} {'growth 1x':>9} "
          f"{'growth 10x':>10} {'growth 10x/1x':>13}")
    for x in r["peak_rss"]:
        g1 = (x["1x"]["peak_kib"] - x["1x"]["peak_before_epoch_kib"]) / 1024
        g10 = (x["10x"]["peak_kib"] - x["10x"]["peak_before_epoch_kib"]) / 1024
        print(f"{x['reader']:<9} {x['buffer_rows']:>6} {x['1x']['peak_kib'] / 1024:>7.0f} "
              f"{x['10x']['peak_kib'] / 1024:>8.0f} {x['ratio']:>7.3f} {g1:>9.0f} {g10:>10.0f} "
              f"{x['epoch_growth_ratio']:>13.2f}")
    print("(peak = VmHWM of the consuming process; growth = peak after the epoch - peak before it, MiB)")
    print(f"\ntimings: {r['timings_s']}")


if __name__ == "__main__":
    sys.exit(main())
