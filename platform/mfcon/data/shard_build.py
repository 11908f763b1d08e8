"""Building shards: one planned shard from audio (``build_shard``, with its ``.done.json`` sidecar), and
running many of them in a process pool (forkserver: torch imported once) or as Ray tasks, stopping at the
first failure with an error that names the shard. :mod:`mfcon.data.prepare` plans, resumes and assembles.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mfcon import storage
from mfcon.data.audio import AudioError, load_audio
from mfcon.data.augment import CLEAN
from mfcon.data.augment_signal import apply_variant
from mfcon.data.features import compute_fbank
from mfcon.data.plan import ShardTask
from mfcon.data.shards import write_shard

DONE_SUFFIX = ".done.json"
PLAN_KEY = "mfcon.plan"


class PrepareError(RuntimeError):
    """Building a shard failed for a reason other than unreadable audio; the message names the shard."""


def build_shard(out_dir: str, task: ShardTask) -> dict[str, Any]:
    """Build one shard and its ``.done.json`` sidecar; return the sidecar record.

    Audio raising AudioError is skipped and reported (once per recording, whatever
    its number of augmented rows), never fatal. Runs in a pool process or a Ray
    worker: one torch thread, since parallelism comes from running several
    tasks. The dither RNG is seeded per shard and augmented rows carry their
    drawn recipes, so shards are reproducible whichever worker builds them.
    """
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(task.dither_seed)
    cfg = task.feature_config
    skipped: dict[str, str] = {}  # path -> reason

    def rows() -> Iterator[dict[str, Any]]:
        for row in task.utterances:
            if row.path in skipped:
                continue
            try:
                wav = load_audio(row.path, target_sr=cfg.sample_rate)
            except AudioError as e:
                skipped[row.path] = str(e)
                continue
            if row.variant != CLEAN:
                wav = apply_variant(torch.from_numpy(wav), row.variant, cfg.sample_rate)
            feats = compute_fbank(wav, cfg).numpy()  # (T, F)
            yield {"utt_id": row.utt_id, "speaker": row.speaker, "speaker_index": row.speaker_index, "features": feats}

    path = storage.join(out_dir, task.file)
    entry = write_shard(path, rows(), num_mel_bins=cfg.num_mel_bins, metadata={PLAN_KEY: task.plan},
                        feature_dtype=task.feature_dtype)
    record = {"plan": task.plan, "entry": entry.model_dump(), "rows": len(task.utterances),
              "skipped": [{"path": p, "reason": r} for p, r in skipped.items()]}
    storage.write_text(sidecar_path(out_dir, task.file), json.dumps(record, indent=1))
    return record


def sidecar_path(out_dir: str | Path, file: str) -> str:
    return storage.join(out_dir, f"{file}{DONE_SUFFIX}")


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_shard_tasks(out: str, tasks: list[ShardTask], num_workers: int, bar: tqdm) -> list[dict[str, Any]]:
    ray = sys.modules.get("ray")  # never imported -> never initialised; saves ~2 s of imports
    if not tasks:
        return []
    if ray is not None and ray.is_initialized():
        return _run_ray(out, tasks, bar)
    if num_workers <= 0:  # in-process: debugging, profiling
        return [_advance(bar, _call(out, t)) for t in tasks]
    return _run_pool(out, tasks, num_workers, bar)


def _call(out: str, task: ShardTask) -> dict[str, Any]:
    import torch

    threads = torch.get_num_threads()
    try:
        return build_shard(out, task)
    except Exception as e:
        raise _task_error(out, task, e) from e
    finally:
        torch.set_num_threads(threads)


def _task_error(out: str, task: ShardTask, e: BaseException) -> PrepareError:
    return PrepareError(f"{storage.join(out, task.file)}: building the shard failed: {type(e).__name__}: {e}")


def _advance(bar: tqdm, record: dict[str, Any]) -> dict[str, Any]:
    bar.update(record["rows"])
    return record


def _pool_context() -> multiprocessing.context.BaseContext:
    """forkserver (Linux): torch is imported once in the server, workers fork from it; else spawn.

    pandas is preloaded too: ``pa.array`` imports it lazily on first use, which
    cost each fresh worker ~1 s.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["mfcon.data.shard_build", "pandas"])
        return ctx
    return multiprocessing.get_context("spawn")


def _run_pool(out: str, tasks: list[ShardTask], num_workers: int, bar: tqdm) -> list[dict[str, Any]]:
    results = []
    with ProcessPoolExecutor(min(num_workers, len(tasks)), mp_context=_pool_context(),
                             initializer=_init_worker) as pool:
        pending = {pool.submit(build_shard, out, t): t for t in tasks}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    task = pending.pop(fut)
                    try:
                        results.append(_advance(bar, fut.result()))
                    except Exception as e:
                        raise _task_error(out, task, e) from e
        finally:
            for fut in pending:
                fut.cancel()
    return results


def _run_ray(out: str, tasks: list[ShardTask], bar: tqdm) -> list[dict[str, Any]]:
    import ray

    remote = ray.remote(num_cpus=1, max_retries=2)(build_shard)
    pending = {remote.remote(out, t): t for t in tasks}
    results = []
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(ready[0])
            try:
                results.append(_advance(bar, ray.get(ready[0])))
            except Exception as e:
                raise _task_error(out, task, e) from e
    finally:
        for ref in pending:
            ray.cancel(ref)
    return results
