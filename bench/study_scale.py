"""The study driver at scale: N-trial studies of a stub trial, before and after end-of-trial work left Tune's loop.

Each study goes through the project's real driver pieces: the searcher (TPE behind
the baseline trials, ``study_search``), the ASHA scheduler (``study_scheduler``), the
placement-group reaper, the MLflow study callback and its durable spool (MLflow on
SQLite in a temp dir). Only the trial is a stub: no model; it "trains" ``--epoch-s``
per epoch, reports a dev EER drawn from its sampled parameters, and writes what a
trial of the tiny model (``--weights-mb`` of weights) uploads to an S3-protocol
server on 127.0.0.1 (moto): the full training state (weights, objective, AdamW's two
moments: ~3x the weights) and, after, the best epoch's exported weights.

* before: every epoch's full state; each ending trial finished inside Tune's hook
  (download the best full state, export it, spool it).
* after: the trial's checkpoint policy (``--full-every``, best weights on each new
  best); the hook queues the end of the trial to the finisher's thread.

Each (trials, mode) study runs in its own process (its driver's CPU time and peak RSS
alone) and prints: driver CPU seconds and peak-RSS growth per trial, the longest gap
between Tune's steps and the longest single hook of the mfcon callbacks (the event-loop
stall), tracking requests per second and their latency (the spool's writes to MLflow),
and bytes the trials wrote to the bucket per trial-epoch; then the after/before ratios
and the 64 -> 256 growth of driver cost per trial.

    .venv/bin/python bench/study_scale.py [--trials 64 256] [--epoch-s 0.2] [--weights-mb 2] [--full-every 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "platform"))

MODES = ("before", "after")


# ---------------------------------------------------------------- the stub trial (runs in Tune's trial actors)

def stub_trial(config: dict, bench: dict) -> None:
    """Epochs at a set rate, a dev EER from the sampled parameters, checkpoints of a set size to the bucket."""
    import math
    import random

    import ray.tune
    import torch

    from mfcon import storage
    from mfcon.study.trial import best_weights_location, train_run_name
    from mfcon.train.checkpoint import RAY_CHECKPOINT_FILE, exported_state, full_state_due, save_checkpoint

    trial_id = ray.tune.get_context().get_trial_id()
    weight = float(config.get("loss.mfcon_weight", 0.1))
    rng = random.Random(trial_id)
    floor = 5.0 + 4.0 * abs(math.log10(weight) + 1.0) + rng.random()  # the best weight: 0.1
    numel = bench["weights_bytes"] // 4
    best, uploaded, run = math.inf, 0, train_run_name(bench["study"], trial_id)
    for epoch in range(1, bench["epochs"] + 1):
        time.sleep(bench["epoch_s"])
        eer = floor + 10.0 / epoch
        model = {"w": torch.full((numel,), float(epoch))}
        state = {"epoch": epoch, "best_eer": min(best, eer), "history": [], "metrics": {"dev_eer": eer},
                 "model": model, "objective": {"w": torch.zeros(numel // 8)},
                 "optimizer": {"m": torch.zeros(numel), "v": torch.zeros(numel)}, "scheduler": {},
                 "config": {}, "model_config": {}, "num_classes": 2,
                 "eval_scores": torch.rand(2000), "eval_labels": torch.randint(0, 2, (2000,))}
        result = {"epoch": epoch, "dev_eer": eer, "train_loss": 1.0 / epoch, "best_dev_eer": min(best, eer)}
        with tempfile.TemporaryDirectory() as tmp:
            if bench["best_weights"] and eer <= best:
                file = Path(tmp, "best.pt")
                save_checkpoint(exported_state(state, with_scores=True), file)
                storage.publish(file, best_weights_location(bench["train"], bench["study"], trial_id))
                uploaded += file.stat().st_size
            if full_state_due(epoch, bench["epochs"], bench["full_every"]):
                folder = storage.join(bench["train"], run, f"checkpoint_{epoch:06d}")
                file = Path(tmp, RAY_CHECKPOINT_FILE)
                save_checkpoint(state, file)
                storage.publish(file, storage.join(folder, RAY_CHECKPOINT_FILE))
                uploaded += file.stat().st_size
                result["checkpoint_path"] = folder
        best = min(best, eer)
        ray.tune.report({**result, "uploaded_bytes": float(uploaded)})


# ---------------------------------------------------------------- measuring the driver

class StepProbe:
    """A Tune callback (first in the list): the longest gap between the starts of Tune's steps."""

    def __init__(self):
        from ray.tune import Callback

        class _Probe(Callback):
            def __init__(probe):
                probe.last, probe.gaps = None, []

            def on_step_begin(probe, iteration, trials, **info):
                now = time.monotonic()
                if probe.last is not None:
                    probe.gaps.append(now - probe.last)
                probe.last = now

        self.callback = _Probe()


def timed_hooks(callback, hooks: list[float]):
    """Wrap the callback's hooks: every call's duration into ``hooks``."""
    for name in ("on_step_begin", "on_step_end", "on_trial_start", "on_trial_result", "on_trial_complete",
                 "on_trial_error"):
        method = getattr(callback, name)

        def wrapper(*args, _method=method, **kwargs):
            started = time.monotonic()
            try:
                return _method(*args, **kwargs)
            finally:
                hooks.append(time.monotonic() - started)

        setattr(callback, name, wrapper)
    return callback


def timed_replayer(requests: list[tuple[float, float]]) -> None:
    """Every write the spool sends to MLflow: (when it ended, how long it took)."""
    from mfcon.tracking.replay import Replayer

    original = Replayer.apply

    def apply(self, entry):
        started = time.monotonic()
        try:
            return original(self, entry)
        finally:
            requests.append((time.monotonic(), time.monotonic() - started))

    Replayer.apply = apply


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def one_study(trials: int, mode: str, args, s3_uri: str, work: Path) -> dict:
    """One study in this process; the driver's measurements."""
    import ray
    from ray import tune

    from mfcon.study.callbacks import MLflowStudyCallback
    from mfcon.study.reaper import PlacementGroupReaper
    from mfcon.study.runner import study_scheduler, study_search
    from mfcon.study.spaces import load_search_space
    from mfcon.tracking import StudyTracker

    name = f"scale{trials}{mode}"
    space = load_search_space(REPO / "search_spaces" / "demo.yaml")
    space = space.model_copy(update={"name": name, "budget": space.budget.model_copy(
        update={"num_samples": trials, "max_concurrent_trials": args.concurrent})})
    after = mode == "after"
    train = f"{s3_uri}/{name}/train"
    bench = {"study": name, "train": train, "epochs": space.base_config().epochs, "epoch_s": args.epoch_s,
             "weights_bytes": int(args.weights_mb * 2**20), "full_every": args.full_every if after else 1,
             "best_weights": after}
    uri = f"sqlite:///{work / name / 'mlflow.db'}"
    (work / name).mkdir(parents=True)
    requests: list[tuple[float, float]] = []
    timed_replayer(requests)
    ray.init(address="local", num_cpus=args.concurrent, include_dashboard=False, log_to_driver=False)
    hooks: list[float] = []
    probe = StepProbe().callback
    callback = timed_hooks(MLflowStudyCallback(uri, str(work), space, {}, train_storage=train,
                                               finish_in_background=after), hooks)
    search = study_search(space, space.budget.seed)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(stub_trial, bench=bench), {"CPU": 1}),
        tune_config=tune.TuneConfig(metric=space.metric, mode="min", search_alg=search,
                                    scheduler=study_scheduler(space), reuse_actors=True,
                                    num_samples=trials + space.baseline_trials(),
                                    max_concurrent_trials=args.concurrent),
        run_config=tune.RunConfig(name=name, storage_path=str(work / name / "tune"), verbose=0,
                                  callbacks=[probe, timed_hooks(PlacementGroupReaper(), hooks), callback]))
    rss0, cpu0 = rss_kb(), time.process_time()
    started = time.monotonic()
    grid = tuner.fit()
    fit_s, fit_cpu = time.monotonic() - started, time.process_time() - cpu0
    with StudyTracker(uri, name, work, wait_s=0) as tracker:
        drained = tracker.flush(args.drain_s)  # the spool's backlog is the driver's work too
    total_s, cpu = time.monotonic() - started, time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ray.shutdown()
    results = [r.metrics or {} for r in grid]
    epochs = sum(int(m.get("epoch", 0)) for m in results)
    uploaded = sum(float(m.get("uploaded_bytes", 0.0)) for m in results)
    latencies = sorted(d for _, d in requests)
    span = (requests[-1][0] - requests[0][0]) if len(requests) > 1 else 0.0
    return {"trials": len(results), "mode": mode, "trial_epochs": epochs, "fit_s": round(fit_s, 1),
            "total_s": round(total_s, 1), "drained": drained, "fit_cpu_s_per_trial": fit_cpu / len(results),
            "driver_cpu_s_per_trial": cpu / len(results), "peak_rss_mb": peak / 1024,
            "rss_growth_kb_per_trial": max(0, peak - rss0) / len(results),
            "longest_step_gap_s": max(probe.gaps, default=0.0), "longest_hook_s": max(hooks, default=0.0),
            "tracking_requests": len(requests), "tracking_rps": len(requests) / span if span else 0.0,
            "tracking_p50_ms": 1000 * statistics.median(latencies) if latencies else 0.0,
            "tracking_p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))] if latencies else 0.0,
            "bucket_bytes_per_trial_epoch": uploaded / max(1, epochs)}


# ---------------------------------------------------------------- the parent: S3 server, one process per study

ROW = ("{trials:>6} {mode:>7} {trial_epochs:>6} {fit_s:>7.1f} {driver_cpu_s_per_trial:>9.3f} "
       "{rss_growth_kb_per_trial:>9.0f} {longest_step_gap_s:>8.2f} {longest_hook_s:>8.2f} {tracking_rps:>7.1f} "
       "{tracking_p50_ms:>7.1f} {tracking_p95_ms:>7.1f} {bucket_mb:>9.2f}")
HEADER = (f"{'trials':>6} {'mode':>7} {'epochs':>6} {'fit s':>7} {'cpu s/tr':>9} {'rss kB/tr':>9} "
          f"{'max gap':>8} {'max hook':>8} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'MB/tr-ep':>9}")


def report(rows: list[dict], trials: list[int]) -> dict:
    print(HEADER)
    for row in rows:
        print(ROW.format(**row, bucket_mb=row["bucket_bytes_per_trial_epoch"] / 2**20))
    by = {(r["trials"] - r.get("baseline_trials", 0), r["mode"]): r for r in rows}
    ratios: dict = {}
    for n in trials:
        b, a = by.get((n, "before")), by.get((n, "after"))
        if b and a:
            bytes_key = "bucket_bytes_per_trial_epoch"
            ratios[f"{n}: bucket bytes after/before"] = a[bytes_key] / b[bytes_key]
            ratios[f"{n}: driver cpu/trial after/before"] = a["driver_cpu_s_per_trial"] / b["driver_cpu_s_per_trial"]
            ratios[f"{n}: longest hook after/before"] = a["longest_hook_s"] / max(b["longest_hook_s"], 1e-9)
    if len(trials) > 1:
        lo, hi = min(trials), max(trials)
        for mode in MODES:
            if (lo, mode) in by and (hi, mode) in by:
                ratios[f"{mode}: driver cpu/trial {hi}/{lo}"] = (by[(hi, mode)]["driver_cpu_s_per_trial"]
                                                               / by[(lo, mode)]["driver_cpu_s_per_trial"])
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}")
    return ratios


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, nargs="+", default=[64, 256], help="searched trials per study (%(default)s)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--epoch-s", type=float, default=0.2, help="stub seconds per epoch (%(default)s)")
    ap.add_argument("--weights-mb", type=float, default=2.0, help="stub model weights, MiB (%(default)s)")
    ap.add_argument("--full-every", type=int, default=2, help="after: full state every N epochs (%(default)s)")
    ap.add_argument("--concurrent", type=int, default=8, help="concurrent trials (%(default)s)")
    ap.add_argument("--drain-s", type=float, default=900, help="longest wait for the spool after fit (%(default)s)")
    ap.add_argument("--json", type=Path, help="write the rows and ratios here")
    ap.add_argument("--one", nargs=2, metavar=("TRIALS", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--s3", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        row = one_study(int(args.one[0]), args.one[1], args, args.s3, args.work)
        print("ROW " + json.dumps(row), flush=True)
        os._exit(0)  # Ray's and the spool's daemon threads: the row is out
    sys.path.insert(0, str(REPO / "tests"))
    from object_store_fixtures import run_s3_server

    rows = []
    with tempfile.TemporaryDirectory(prefix="mfcon-scale-") as tmp, run_s3_server(Path(tmp)) as s3:
        env = {**os.environ, **s3.env, "RAY_AIR_NEW_OUTPUT": "0", "PYTHONPATH": str(REPO / "platform")}
        for n in args.trials:
            for mode in args.modes:
                work = Path(tmp, f"{n}-{mode}")
                cmd = [sys.executable, __file__, "--one", str(n), mode, "--s3", s3.uri(), "--work", str(work),
                       "--epoch-s", str(args.epoch_s), "--weights-mb", str(args.weights_mb),
                       "--full-every", str(args.full_every), "--concurrent", str(args.concurrent),
                       "--drain-s", str(args.drain_s)]
                started = time.monotonic()
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                line = next((l for l in out.stdout.splitlines() if l.startswith("ROW ")), None)
                if line is None:
                    print(out.stdout[-3000:], out.stderr[-5000:], file=sys.stderr)
                    return 1
                row = json.loads(line[4:])
                row["baseline_trials"] = row["trials"] - n
                rows.append(row)
                print(f"# {n} trials, {mode}: {time.monotonic() - started:.0f} s: {line[4:]}", flush=True)
    ratios = report(rows, args.trials)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows,
                                         "ratios": ratios}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
