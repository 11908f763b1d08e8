"""Trial start-up: Tune's request -> a trial's first training step, by stage, for each worker data reader.

Runs the demo study (search_spaces/demo.yaml, its own budget unless --trials) on the demo corpus, once per
reader and round, alternating (files, ray_data, files, ...), each as its own `mfcon study` process with its
own private local Ray, and reads every trial's start-up metrics back from MLflow:

    startup_seconds                Tune's request -> first training step (the goal: <= 10 s median)
      startup_request_seconds      request -> the trial function running (placement, the trial's actor
                                   process, its imports, unpickling the study's runtime)
      startup_workers_seconds      trial function -> Train worker running (TorchTrainer, its controller
                                   actor, the worker group's actors, the process group)
      startup_setup_seconds        worker -> model, optimizer, checkpoint, process group ready
      startup_first_batch_seconds  -> the first batch is ready (the data path's start)

and each trial's share of its time that start-up takes: startup / (startup + train_seconds of its epochs).

    .venv/bin/python bench/trial_startup.py [--rounds 2] [--trials N] [--workdir bench/results/trial_startup]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "platform"))

from machine_facts import machine_facts
from mfcon.data.corpus.synthetic import CorpusSpec, make_corpus
from mfcon.data.prepare import prepare_dataset

STAGES = ("request", "workers", "setup", "first_batch")
READERS = ("files", "ray_data")


def demo_data(work: Path) -> Path:
    """The demo's corpus and shards (pipelines/demo.py defaults), made once and reused."""
    data = work / "shards"
    if not (data / "manifest.json").exists():
        layout = make_corpus(work / "corpus", CorpusSpec(n_speakers=48, utts_per_speaker=10, n_test_speakers=12),
                             progress=False)
        prepare_dataset(layout.root, layout.trials, data, dev_speakers=8, rows_per_shard=64, num_workers=2,
                        progress=False)
    return data


def space_for(reader: str, work: Path) -> Path:
    space = yaml.safe_load((REPO / "search_spaces" / "demo.yaml").read_text())
    space.setdefault("base", {}).setdefault("data", {})["reader"] = reader
    path = work / f"demo-{reader}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def run_study(space: Path, data: Path, runs: Path, name: str, trials: int | None) -> float:
    cmd = [sys.executable, "-m", "mfcon.cli", "study", "--space", str(space), "--data", str(data),
           "--workdir", str(runs), "--name", name] + (["--num-samples", str(trials)] if trials else [])
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    started = time.perf_counter()
    with open(runs / f"{name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    return time.perf_counter() - started


def trial_startups(runs: Path, name: str) -> list[dict[str, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{(runs / 'mlflow.db').resolve()}")
    exp = client.get_experiment_by_name(name)
    out = []
    for run in client.search_runs([exp.experiment_id], "tags.`mfcon.role` = 'trial'"):
        m = run.data.metrics
        if "startup_seconds" not in m:
            continue
        train = sum(x.value for x in client.get_metric_history(run.info.run_id, "train_seconds"))
        out.append({"startup": m["startup_seconds"], "train": train,
                    **{s: m.get(f"startup_{s}_seconds", float("nan")) for s in STAGES}})
    return out


def summarize(trials: list[dict[str, float]]) -> dict:
    med = lambda key: round(statistics.median(t[key] for t in trials), 2)
    total_start, total_train = sum(t["startup"] for t in trials), sum(t["train"] for t in trials)
    return {"trials": len(trials), "median_startup_s": med("startup"), "median_train_s": med("train"),
            "startup_share": round(total_start / (total_start + total_train), 3),
            "median_share": round(statistics.median(t["startup"] / (t["startup"] + t["train"]) for t in trials), 3),
            "median_stage_s": {s: med(s) for s in STAGES}}


def machine() -> dict:
    return machine_facts("torch", "ray")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="studies per reader, alternating readers")
    p.add_argument("--trials", type=int, help="trials per study (default: the demo space's budget)")
    p.add_argument("--readers", nargs="+", default=list(READERS), choices=READERS)
    p.add_argument("--workdir", default=str(REPO / "bench" / "results" / "trial_startup"))
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = demo_data(work)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = work / f"runs-{stamp}"
    runs.mkdir()
    per_reader: dict[str, list[dict[str, float]]] = {r: [] for r in args.readers}
    walls: dict[str, list[float]] = {r: [] for r in args.readers}
    for round_ in range(args.rounds):
        for reader in (args.readers if round_ % 2 == 0 else list(reversed(args.readers))):
            name = f"startup-{reader}-{round_}"
            walls[reader].append(run_study(space_for(reader, work), data, runs, name, args.trials))
            per_reader[reader].extend(trial_startups(runs, name))
            print(f"{name}: {len(per_reader[reader])} trials so far, study {walls[reader][-1]:.0f} s", flush=True)
    results = {"machine": machine(), "command": " ".join(sys.argv),
               "readers": {r: {**summarize(t), "median_study_wall_s": round(statistics.median(walls[r]), 1)}
                           for r, t in per_reader.items() if t}}
    if {"files", "ray_data"} <= results["readers"].keys():
        files, ray_data = results["readers"]["files"], results["readers"]["ray_data"]
        results["ratio_startup_files_vs_ray_data"] = round(files["median_startup_s"] / ray_data["median_startup_s"], 2)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
