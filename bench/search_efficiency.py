"""Search efficiency on the demo task: TPE + ASHA against random search at equal trial-epochs.

Three arms, each given the same budget of B trial-epochs (one trial-epoch = one epoch of one
trial, trained and scored on the dev list), with the demo study's search space
(search_spaces/demo.yaml: MFCon weight, temperature, per-block selection; its base config,
4 epochs) on the demo corpus (pipelines/demo.py defaults: 48 synthetic speakers x 10 utterances):

  random       Optuna RandomSampler, no early stopping (FIFO): every trial runs all its epochs.
  tpe_asha_ray TPE + ASHA, Ray's plain ``OptunaSearch``: an ASHA-stopped trial is told to Optuna as
               COMPLETE with its early-epoch EER (what the study did before ``StudySearch``).
  tpe_asha     TPE + ASHA, the study's ``StudySearch``: ASHA-stopped trials are PRUNED, with their
               per-epoch intermediate values.

The searcher and scheduler are built as ``mfcon.study.runner.make_tuner`` builds them:
``DefineByRun(space)``, ``runner.tpe_sampler(seed)`` (TPE, 4 start-up trials, multivariate),
``ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period, reduction_factor)`` from the
space's budget, ``max_concurrent_trials`` from the space (2). Trials are sampled until the arm has
spent B trial-epochs (``TrialEpochBudget``, a Tune stopper that counts reported epochs across
trials and ends the experiment at B); what counts is the first B epochs in the order they were
reported.

Each trial runs the project's training loop (``mfcon.train.loop.fit`` over ``LocalShardData``,
1 torch thread) inside the Tune trial process, reporting every epoch with ``tune.report``, not a
Ray Train TorchTrainer: the executor's start-up cost does not change how well a search spends
trial-epochs, and on 2 cores it would cost most of the bench's time.

Seed s sets both the sampler's seed and the training seed (``base.seed``) of every trial in
every arm: within a seed the arms are paired (one configuration trains to the same curve in
every arm), so a difference between arms is the search's, not the training noise's.

Per arm: the best dev EER reached (minimum over every reported epoch, as the study's summary
ranks trials), the best EER of a trial that ran all its epochs, and the trial-epochs needed to
get within 5% (relative) of the best EER reached by any arm in that seed.

    .venv/bin/python bench/search_efficiency.py [--budget 24] [--seeds 0 1 2] [--data SHARDS]
        [--workdir DIR] [--json bench/results/search_efficiency.json]
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray.tune.stopper import Stopper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "platform"))

SPACE = REPO / "search_spaces" / "demo.yaml"
ARMS = ("random", "tpe_asha_ray", "tpe_asha")
ARM_TITLES = {"random": "random, no early stopping", "tpe_asha_ray": "TPE + ASHA, Ray OptunaSearch (COMPLETE)",
              "tpe_asha": "TPE + ASHA, StudySearch (PRUNED)"}
WITHIN = 0.05


# ---------------------------------------------------------------- pure logic (tests/test_search_efficiency.py)


class TrialEpochBudget(Stopper):
    """Ends the whole experiment once ``budget`` trial-epochs have been reported.

    A trial-epoch is a distinct (trial, epoch) with ``metric``: Tune hands the stopper a finished
    function trial's last result a second time (its ``done`` copy), which must not count again."""

    def __init__(self, budget: int, metric: str = "dev_eer"):
        if budget < 1:
            raise ValueError(f"budget must be >= 1 trial-epoch, got {budget}")
        self.budget, self.metric, self.seen = budget, metric, set()

    @property
    def spent(self) -> int:
        return len(self.seen)

    def __call__(self, trial_id: str, result: dict) -> bool:
        if self.metric in result:
            self.seen.add((trial_id, result.get("epoch", result.get("training_iteration"))))
        return False  # single trials are ASHA's business

    def stop_all(self) -> bool:
        return self.spent >= self.budget


def first_epochs(rows: Sequence[dict], budget: int) -> list[dict]:
    """The first ``budget`` reported trial-epochs, in the order they were reported (``reported_at``)."""
    return sorted(rows, key=lambda r: r["reported_at"])[:budget]


def running_best(values: Sequence[float]) -> list[float]:
    best, out = float("inf"), []
    for v in values:
        best = min(best, v)
        out.append(best)
    return out


def epochs_to_within(values: Sequence[float], target: float, rel: float = WITHIN) -> int | None:
    """1-based count of trial-epochs until one reaches ``target * (1 + rel)`` or better (lower); None if never."""
    for i, v in enumerate(values, start=1):
        if v <= target * (1.0 + rel):
            return i
    return None


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# ---------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    from machine_facts import machine_facts

    return machine_facts("torch", "ray", "optuna")


# ---------------------------------------------------------------- data


def prepare_demo_data(work: Path, speakers: int, utts: int) -> Path:
    """The demo pipeline's corpus and shards (pipelines/demo.py steps 1-2, same split sizes)."""
    from mfcon.data.corpus.synthetic import CorpusSpec, make_corpus
    from mfcon.data.prepare import prepare_dataset

    shards = work / "shards"
    if (shards / "manifest.json").exists():
        return shards
    spec = CorpusSpec(n_speakers=speakers, utts_per_speaker=utts, n_test_speakers=max(4, speakers // 4))
    layout = make_corpus(work / "corpus", spec, progress=False)
    prepare_dataset(layout.root, layout.trials, shards, dev_speakers=max(2, speakers // 6), rows_per_shard=64,
                    num_workers=2, progress=False)
    return shards


# ---------------------------------------------------------------- one trial (runs in the Tune trial process)


class TuneEpochHooks:
    """``RunHooks`` for ``fit``: every epoch to Tune (no checkpoints: ASHA only ever stops a trial)."""

    def load_checkpoint(self):
        return None

    def report(self, metrics: dict[str, float], state) -> None:
        from ray import tune

        tune.report({**{k: float(v) for k, v in metrics.items()}, "reported_at": time.time()})


def bench_trial(config: dict[str, Any], space, data_dir: str) -> None:
    import torch
    from mfcon.data.local import LocalShardData
    from mfcon.study.spaces import trial_config
    from mfcon.train.loop import fit

    torch.set_num_threads(1)
    cfg = trial_config(space, config)
    fit(cfg, LocalShardData(data_dir, seed=cfg.seed), TuneEpochHooks())


# ---------------------------------------------------------------- one arm


def make_search(arm: str, space, seed: int):
    """The searcher and scheduler of ``arm``; the study's own are ``mfcon.study.runner``'s ``study_search`` and
    ``study_scheduler`` (what ``make_tuner`` uses)."""
    import optuna
    from mfcon.study.runner import study_scheduler, study_search, tpe_sampler
    from mfcon.study.spaces import DefineByRun
    from ray.tune.search.optuna import OptunaSearch

    if arm == "random":
        return (OptunaSearch(space=DefineByRun(space), metric=space.metric, mode=space.mode,
                             sampler=optuna.samplers.RandomSampler(seed=seed)), None)
    if arm == "tpe_asha_ray":
        search = OptunaSearch(space=DefineByRun(space), metric=space.metric, mode=space.mode, sampler=tpe_sampler(seed))
    elif arm == "tpe_asha":
        search = study_search(space, seed, with_baseline=False)  # the search alone: arms compare searchers
    else:
        raise ValueError(f"unknown arm {arm!r}; arms are {ARMS}")
    return search, study_scheduler(space)


def run_arm(arm: str, space, seed: int, data_dir: Path, budget: int, storage: Path) -> dict[str, Any]:
    from ray import tune

    space = space.model_copy(update={"base": {**space.base, "seed": seed}})
    search, scheduler = make_search(arm, space, seed)
    stopper = TrialEpochBudget(budget, space.metric)
    trainable = tune.with_resources(tune.with_parameters(bench_trial, space=space, data_dir=str(data_dir)),
                                    {"cpu": 1})
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, search_alg=search, scheduler=scheduler,
                                    num_samples=budget, max_concurrent_trials=space.budget.max_concurrent_trials),
        run_config=tune.RunConfig(name=f"{arm}-seed{seed}", storage_path=str(storage), stop=stopper, verbose=0),
    )
    started = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - started
    rows, errors = [], 0
    for result in grid:
        errors += result.error is not None
        df = result.metrics_dataframe
        if df is None or space.metric not in df:
            continue
        for rec in df.to_dict("records"):
            if rec.get(space.metric) is not None and rec.get("reported_at") is not None:
                rows.append({"trial": rec["trial_id"], "epoch": int(rec["epoch"]), "eer": float(rec[space.metric]),
                             "reported_at": float(rec["reported_at"])})
    return summarize_arm(rows, budget, space.base_config().epochs) | {
        "arm": arm, "seed": seed, "wall_s": round(wall, 1), "reported_epochs": len(rows), "errors": errors}


def summarize_arm(rows: Sequence[dict], budget: int, max_epochs: int) -> dict[str, Any]:
    """What one arm reached within its first ``budget`` trial-epochs."""
    used = first_epochs(rows, budget)
    eers = [r["eer"] for r in used]
    epochs_of: dict[str, int] = {}
    for r in used:
        epochs_of[r["trial"]] = max(epochs_of.get(r["trial"], 0), r["epoch"])
    finished = [r["eer"] for r in used if r["epoch"] == max_epochs]
    return {"trial_epochs": len(used), "eers": eers, "best_eer": min(eers) if eers else None,
            "best_full_eer": min(finished) if finished else None, "trials": len(epochs_of),
            "full_trials": sum(e == max_epochs for e in epochs_of.values())}


# ---------------------------------------------------------------- report


def score(runs: list[dict], budget: int) -> dict[str, Any]:
    """Per seed: target = best EER of any arm; per arm: trial-epochs to within 5% of it, and means over seeds."""
    seeds = sorted({r["seed"] for r in runs})
    for seed in seeds:
        mine = [r for r in runs if r["seed"] == seed and r["best_eer"] is not None]
        target = min(r["best_eer"] for r in mine)
        for r in mine:
            r["target_eer"] = target
            r["epochs_to_5pct"] = epochs_to_within(r["eers"], target)
    arms: dict[str, Any] = {}
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        if not mine:
            continue
        best = [r["best_eer"] for r in mine if r["best_eer"] is not None]
        full = [r["best_full_eer"] for r in mine if r["best_full_eer"] is not None]
        reached = [r["epochs_to_5pct"] for r in mine if r.get("epochs_to_5pct") is not None]
        censored = [r.get("epochs_to_5pct") or budget for r in mine]  # never reached: counted as the whole budget
        arms[arm] = {"best_eer": mean_spread(best) if best else None,
                     "best_full_eer": mean_spread(full) if full else None,
                     "epochs_to_5pct_reached": f"{len(reached)}/{len(mine)}",
                     "epochs_to_5pct_mean": statistics.fmean(censored),
                     "trials": statistics.fmean(r["trials"] for r in mine),
                     "full_trials": statistics.fmean(r["full_trials"] for r in mine),
                     "wall_s": statistics.fmean(r["wall_s"] for r in mine)}
    effect = None
    pairs = [(a, b) for a in runs if a["arm"] == "tpe_asha" for b in runs
             if b["arm"] == "tpe_asha_ray" and b["seed"] == a["seed"]]
    if pairs:
        effect = {"best_eer_diff": [round(a["best_eer"] - b["best_eer"], 3) for a, b in pairs],
                  "epochs_to_5pct_diff": [(a.get("epochs_to_5pct") or budget) - (b.get("epochs_to_5pct") or budget)
                                          for a, b in pairs]}
    return {"arms": arms, "pruned_vs_complete": effect}


def print_report(info: dict, runs: list[dict], summary: dict, budget: int) -> None:
    m = info["machine"]
    print(f"\nmachine: {m['cpu']}, {m['logical_cpus']} logical CPUs, load average {m['load_average_1m']}")
    print(f"python {m['python']}, torch {m['torch']}, ray {m['ray']}, optuna {m['optuna']}")
    print(f"task: {info['space']} ({info['epochs']} epochs/trial), data {info['data']}; "
          f"budget {budget} trial-epochs per arm; seeds {info['seeds']}; one trial-epoch {info['epoch_s']:.1f} s "
          "(1 thread, alone)")
    print("\nper run (target = best EER of any arm in that seed; 5% = trial-epochs until <= 1.05 x target):")
    print(f"{'seed':>4}  {'arm':<13} {'trials':>6} {'full':>4} {'best EER':>8} {'best full':>9} "
          f"{'target':>6} {'to 5%':>5} {'wall s':>6}")
    for r in sorted(runs, key=lambda r: (r["seed"], ARMS.index(r["arm"]))):
        f = lambda v: "-" if v is None else f"{v:.2f}"
        print(f"{r['seed']:>4}  {r['arm']:<13} {r['trials']:>6} {r['full_trials']:>4} {f(r['best_eer']):>8} "
              f"{f(r['best_full_eer']):>9} {f(r.get('target_eer')):>6} {r.get('epochs_to_5pct') or '-':>5} "
              f"{r['wall_s']:>6.0f}")
    print(f"\nper arm, over {len(info['seeds'])} seeds (mean ± sd; 'to 5%' counts a seed that never got there as "
          f"{budget}):")
    print(f"{'arm':<44} {'best dev EER %':>14} {'best full-trial EER %':>21} {'to 5%':>6} {'reached':>7} "
          f"{'trials':>6} {'full':>5}")
    for arm, s in summary["arms"].items():
        ms = lambda p: "-" if p is None else f"{p[0]:.2f} ± {p[1]:.2f}"
        print(f"{ARM_TITLES[arm]:<44} {ms(s['best_eer']):>14} {ms(s['best_full_eer']):>21} "
              f"{s['epochs_to_5pct_mean']:>6.1f} {s['epochs_to_5pct_reached']:>7} {s['trials']:>6.1f} "
              f"{s['full_trials']:>5.1f}")
    e = summary["pruned_vs_complete"]
    if e:
        print(f"\npruned reporting (StudySearch - Ray OptunaSearch), per seed: best EER {e['best_eer_diff']} points, "
              f"trial-epochs to 5% {e['epochs_to_5pct_diff']} (negative = StudySearch better)")


def time_one_epoch(space, data_dir: Path) -> float:
    """Seconds of one trial-epoch (train + dev scoring, 1 thread) in this process: sizes the run."""
    import torch
    from mfcon.data.local import LocalShardData
    from mfcon.study.spaces import optuna_distributions, trial_config
    from mfcon.train.loop import fit

    torch.set_num_threads(1)
    one = space.model_copy(update={"base": {**space.base, "epochs": 1}})
    sampled = {name: (dist.low if hasattr(dist, "low") else dist.choices[0])
               for name, dist in optuna_distributions(one).items()}

    class Quiet:
        def load_checkpoint(self):
            return None

        def report(self, metrics, state):
            pass

    started = time.perf_counter()
    fit(trial_config(one, sampled), LocalShardData(data_dir, seed=0), Quiet())
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=24,
                   help="trial-epochs per arm (24 = 6 full 4-epoch trials: about 35 min on the loaded 2-core box)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--data", help="prepared demo shards to reuse (default: make the demo corpus under --workdir)")
    p.add_argument("--workdir", help="corpus, shards and Tune results (default: a temporary folder)")
    p.add_argument("--speakers", type=int, default=48)
    p.add_argument("--utts", type=int, default=10)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    import ray
    from mfcon.study.spaces import load_search_space

    space = load_search_space(SPACE)
    with contextlib.ExitStack() as stack:
        work = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        data = Path(args.data) if args.data else prepare_demo_data(work, args.speakers, args.utts)
        info = {"machine": machine(), "space": str(SPACE.relative_to(REPO)), "epochs": space.base_config().epochs,
                "data": str(data), "budget": args.budget, "seeds": args.seeds, "arms": args.arms,
                "epoch_s": time_one_epoch(space, data)}
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "platform")}})
        runs = []
        done = work / f"runs-budget{args.budget}.jsonl"  # finished runs: a rerun with the same --workdir skips them
        cached = {(r["arm"], r["seed"]): r for r in map(json.loads, done.read_text().splitlines())
                  if r["trial_epochs"] >= args.budget} if done.exists() else {}
        started = time.perf_counter()
        try:
            for seed in args.seeds:  # arms interleaved per seed: drift in the machine's load hits all alike
                for arm in args.arms:
                    if (arm, seed) in cached:
                        runs.append(cached[(arm, seed)])
                        continue
                    run = run_arm(arm, space, seed, data, args.budget, work / "tune" / f"budget{args.budget}")
                    with open(done, "a") as f:
                        f.write(json.dumps(run) + "\n")
                    print(f"seed {seed} {arm}: {run['trials']} trials ({run['full_trials']} full), best EER "
                          f"{run['best_eer']}, {run['trial_epochs']} trial-epochs, {run['wall_s']:.0f} s", flush=True)
                    runs.append(run)
        finally:
            ray.shutdown()
        info["wall_s"] = round(time.perf_counter() - started, 1)
    summary = score(runs, args.budget)
    print_report(info, runs, summary, args.budget)
    print(f"\nbench wall time {info['wall_s'] / 60:.1f} min")
    out = {"info": info, "summary": summary, "runs": runs}
    print(json.dumps({"info": info, "summary": summary}, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
