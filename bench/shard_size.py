"""Shard size: bytes of shards per hour of audio, float32 (today) vs compact float16, and the EER of the same training.

Shard size. One synthetic corpus (the demo's: 48 speakers x 10 utterances) is prepared twice, with
``feature_dtype="float32"`` (pyarrow defaults: snappy, dictionary pages) and ``"float16"`` (BYTE_STREAM_SPLIT +
zstd). For each folder it reports the shard bytes per hour of audio (hours = the shards' ``num_frames`` x the
manifest's frame shift), the ratio compact / today, the extrapolation to VoxCeleb2-dev (about 2,400 h), and how
fast the folder reads (every shard -> float32 (T, F) arrays, as ``LocalShardData`` reads them). Then it trains the
demo's tiny configuration (``search_spaces/demo.yaml`` base) with ``train_local`` on both folders with the same
seeds and reports, per seed, the last-epoch dev EER and the test EER of the best-on-dev checkpoint, their mean and
seed-to-seed spread, and a speaker-and-seed bootstrap CI of the test-EER difference (float16 - float32).

    .venv/bin/python bench/shard_size.py [--speakers 48 --utts 10 --epochs 4 --seeds 3] [--json out.json]

About 5 min on a quiet 2-core box (a 4-epoch training run takes ~40 s); results: docs/performance_shards.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "platform"))

import numpy as np
import pyarrow.parquet as pq
import torch
from machine_facts import machine_facts
from mfcon.data.corpus.synthetic import CorpusSpec, make_corpus
from mfcon.data.local import read_eval_set
from mfcon.data.prepare import prepare_dataset
from mfcon.data.shards import features_from_column, read_manifest, read_shard_table, shard_paths
from mfcon.evaluation.metrics import bootstrap_seeded_eer_difference
from mfcon.models.mfa_conformer import build_model
from mfcon.evaluation.scoring import evaluate
from mfcon.study.spaces import load_search_space
from mfcon.train.checkpoint import BEST_FILE, load_checkpoint
from mfcon.train.local import train_local

DTYPES = ("float32", "float16")
VOXCELEB2_DEV_HOURS = 2400.0
SPLITS = ("train", "dev", "test")


def machine() -> dict:
    return {**machine_facts("torch", "pyarrow", "numpy"), "torch_threads": torch.get_num_threads()}


def folder_size(data: Path) -> dict:
    """Shard bytes and audio hours per split and in all."""
    manifest = read_manifest(data)
    shift_s = manifest.feature_config.frame_shift_ms / 1000.0
    out, total_bytes, total_hours = {}, 0, 0.0
    for split in SPLITS:
        paths = shard_paths(data, split, manifest)
        nbytes = sum(Path(p).stat().st_size for p in paths)
        frames = sum(int(pq.read_table(p, columns=["num_frames"]).column(0).to_numpy().sum()) for p in paths)
        hours = frames * shift_s / 3600.0
        out[split] = {"rows": manifest.splits[split].rows, "bytes": nbytes, "audio_hours": round(hours, 4)}
        total_bytes, total_hours = total_bytes + nbytes, total_hours + hours
    raw = total_hours * 3600.0 / shift_s * manifest.feature_config.num_mel_bins * 4  # float32 frames, uncompressed
    return {"feature_dtype": manifest.feature_dtype, "splits": out, "bytes": total_bytes,
            "audio_hours": round(total_hours, 4), "mb_per_audio_hour": round(total_bytes / total_hours / 1e6, 2),
            "raw_float32_mb_per_audio_hour": round(raw / total_hours / 1e6, 2),
            "voxceleb2_dev_gb": round(total_bytes / total_hours * VOXCELEB2_DEV_HOURS / 1e9, 1)}


def read_speed(data: Path, repeats: int) -> dict:
    """Median seconds to read every shard into float32 (T, F) arrays (memory-mapped, page cache warm)."""
    paths = [p for split in SPLITS for p in shard_paths(data, split)]
    times, values = [], 0
    for _ in range(repeats + 1):  # the first pass warms the page cache and is dropped
        started = time.perf_counter()
        values = 0
        for path in paths:
            feats = features_from_column(read_shard_table(path, columns=["features"]).column("features"))
            values += sum(f.size for f in feats)
        times.append(time.perf_counter() - started)
    median = statistics.median(times[1:])
    return {"seconds": round(median, 4), "float32_mb_per_s": round(values * 4 / median / 1e6, 1)}


def train_once(cfg, data: Path, out: Path) -> dict:
    started = time.perf_counter()
    history = train_local(cfg, data, out, resume=False, echo=False)
    model = build_model(cfg.model_config_resolved())
    model.load_state_dict(load_checkpoint(out / BEST_FILE)["model"])
    test = read_eval_set(data, "test")
    result = evaluate(model, test)
    return {"dev_eer_last": round(history[-1]["dev_eer"], 3), "dev_eer_best": round(min(h["dev_eer"] for h in history), 3),
            "test_eer_best_ckpt": round(100 * result.eer, 3), "seconds": round(time.perf_counter() - started, 1),
            "_scores": result.scores, "_labels": result.labels,
            "_groups": np.array([t.enroll.split("/")[0] for t in test.trials])}


def summary(values: list[float]) -> dict:
    return {"mean": round(statistics.mean(values), 3),
            "std": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
            "min": round(min(values), 3), "max": round(max(values), 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speakers", type=int, default=48, help="synthetic speakers (the demo's 48)")
    p.add_argument("--utts", type=int, default=10, help="utterances per speaker (the demo's 10)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the demo space's, 4)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per dtype (0: sizes only)")
    p.add_argument("--read-repeats", type=int, default=5)
    p.add_argument("--space", default=str(REPO / "search_spaces" / "demo.yaml"))
    p.add_argument("--workdir", help="keep corpus, shards and runs here (default: a temporary folder)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    started = time.perf_counter()
    results: dict = {"machine": machine(), "args": vars(args)}
    with contextlib.ExitStack() as stack:
        work = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        spec = CorpusSpec(n_speakers=args.speakers, utts_per_speaker=args.utts,
                          n_test_speakers=max(4, args.speakers // 4))  # as pipelines/demo.py
        layout = make_corpus(work / "corpus", spec, progress=False)
        folders, sizes, prepare_s = {}, {}, {}
        for dtype in DTYPES:
            folders[dtype] = work / f"shards-{dtype}"
            t0 = time.perf_counter()
            prepare_dataset(layout.root, layout.trials, folders[dtype], dev_speakers=max(2, args.speakers // 6),
                            rows_per_shard=64, num_workers=2, progress=False, feature_dtype=dtype)
            prepare_s[dtype] = round(time.perf_counter() - t0, 1)
            sizes[dtype] = {**folder_size(folders[dtype]), "prepare_seconds": prepare_s[dtype],
                            "read": read_speed(folders[dtype], args.read_repeats)}
        ratio = sizes["float16"]["bytes"] / sizes["float32"]["bytes"]
        results["size"] = {**sizes, "ratio_float16_vs_float32": round(ratio, 4),
                           "read_time_ratio_float16_vs_float32": round(
                               sizes["float16"]["read"]["seconds"] / sizes["float32"]["read"]["seconds"], 2),
                           "voxceleb2_dev_hours": VOXCELEB2_DEV_HOURS}

        if args.seeds > 0:
            base = load_search_space(args.space).base_config()
            epochs = args.epochs or base.epochs
            runs: dict[str, list[dict]] = {d: [] for d in DTYPES}
            for seed in range(args.seeds):
                for dtype in DTYPES:
                    cfg = base.model_copy(update={"seed": seed, "epochs": epochs, "device": "cpu"})
                    run = train_once(cfg, folders[dtype], work / "runs" / f"{dtype}-seed{seed}")
                    runs[dtype].append(run)
                    print(f"seed {seed} {dtype}: dev EER {run['dev_eer_last']:.2f}%  test EER "
                          f"{run['test_eer_best_ckpt']:.2f}%  ({run['seconds']:.0f} s)", file=sys.stderr, flush=True)
            labels, groups = runs["float32"][0]["_labels"], runs["float32"][0]["_groups"]
            rows = {d: np.stack([r["_scores"] for r in runs[d]]) for d in DTYPES}
            assert all(np.array_equal(r["_labels"], labels) for d in DTYPES for r in runs[d])  # same trials
            delta = bootstrap_seeded_eer_difference(rows["float16"], rows["float32"], labels, groups, n_boot=1000)
            training = {"space": Path(args.space).name, "epochs": epochs, "seeds": args.seeds,
                        "eval": "dev EER = last epoch on the dev list (what a study sees); test EER = the "
                                "best-on-dev checkpoint on the held-out test list"}
            for dtype in DTYPES:
                clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs[dtype]]
                training[dtype] = {"per_seed": clean,
                                   "dev_eer_last": summary([r["dev_eer_last"] for r in clean]),
                                   "test_eer": summary([r["test_eer_best_ckpt"] for r in clean])}
            for metric, key in (("dev_eer_last", "dev_eer_last"), ("test_eer", "test_eer_best_ckpt")):
                diffs = [b[key] - a[key] for a, b in zip(runs["float32"], runs["float16"])]
                training[f"paired_{metric}_diff_float16_minus_float32"] = summary(diffs)
            training["test_eer_diff_bootstrap_95ci"] = {
                "estimate": round(100 * delta.estimate, 3), "low": round(100 * delta.low, 3),
                "high": round(100 * delta.high, 3), "n_boot": delta.n_boot,
                "resamples": "test speakers (enrolment) and seeds"}
            noise = max(training["float32"]["test_eer"]["std"], training["float16"]["test_eer"]["std"])
            mean_diff = training["float16"]["test_eer"]["mean"] - training["float32"]["test_eer"]["mean"]
            within = abs(mean_diff) <= noise and delta.low <= 0 <= delta.high
            results["training"] = training
            results["verdict"] = {
                "bytes_goal_met": ratio <= 0.5,
                "eer_within_noise": within,
                "rule": "|mean test EER diff| <= the larger seed-to-seed std, and the bootstrap CI holds 0"}
        else:
            results["verdict"] = {"bytes_goal_met": ratio <= 0.5}
    results["machine"]["load_average_1m_end"] = round(os.getloadavg()[0], 1)
    results["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
