"""`mfcon study`: a Ray Tune + Optuna (TPE) + ASHA study of Ray Train trials, tracked in MLflow."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from mfcon import storage
from mfcon.data.corpus.voxceleb import read_trials
from mfcon.data.shards import (
    manifest_hash,
    read_manifest,
    shard_paths,
    trials_path,
    verify_shards,
)
from mfcon.study.callbacks import MLflowStudyCallback
from mfcon.study.optuna_storage import study_storage
from mfcon.study.reaper import PlacementGroupReaper, remove_orphaned_placement_groups
from mfcon.study.search import StudySearch
from mfcon.evaluation.noise_floor import compare_with_baseline
from mfcon.evaluation.selection import best_value
from mfcon.names import BASELINE_KEY, SEED_KEY, check_study_name
from mfcon.study.spaces import (
    DefineByRun,
    SearchSpace,
    baseline_sample,
    check_fits_cluster,
    load_search_space,
    trial_params,
)
from mfcon.study.trial import StudyRuntime, run_trial, with_gpu_decision
from mfcon.study.trial_table import TrialRow
from mfcon.tracking import METRIC_TAG, StudyTracker, check_tracking_uri, resolve_tracking_uri

TRIAL_COLUMNS = {"epoch": "epoch", "train_loss": "loss", "dev_eer": "dev EER %", "dev_min_dcf": "dev minDCF",
                 "best_dev_eer": "best dev EER"}


class StudyError(RuntimeError):
    """A study cannot start or continue; the message says what to do."""


@dataclass
class StudySummary:
    study: str
    tracking_uri: str
    experiment_dir: str
    num_trials: int
    states: dict[str, int]
    best_trial: str | None
    best_metric: float | None
    best_params: dict[str, Any]
    metric: str
    baseline: dict[str, Any] | None = None  # the baseline comparison: values, noise floor, verdict and its line
    optuna_storage: str | None = None  # the database holding the study's Optuna study (None: a study from before)
    trials: list[TrialRow] = field(default_factory=list)  # every trial of this run, for the ranked table

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    @property
    def baseline_line(self) -> str | None:
        return (self.baseline or {}).get("line")


def study_paths(workdir: str | Path, name: str) -> dict[str, str]:
    """Where a study keeps its files: locations under ``workdir`` (a local folder or an object-store URI)."""
    root = storage.join(workdir, name)
    return {"root": root, "tune": storage.join(root, "tune"), "experiment": storage.join(root, "tune", name),
            "train": storage.join(root, "train"), "space": storage.join(root, "space.yaml"),
            "info": storage.join(root, "study.json")}


# On one machine there is no spot preemption to watch and no Prometheus to feed: two actors
# less per trial, which on 2 cores is a visible share of each trial's start-up. Starting a
# worker group on a busy 2-core machine was seen to take 45 s; 180 s still fails a trial
# whose resources never come, instead of hanging the study.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0",
                   "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "180"}


def local_cpus() -> float:
    """The CPUs ``ray.init(address="local")`` will detect (cgroup limits included), without starting Ray."""
    return float(ray._private.utils.get_num_cpus())  # internal, like the reaper's GCS accessor: Ray is pinned


def local_gpus() -> float:
    import torch

    return float(torch.cuda.device_count())


def init_ray(address: str | None) -> None:
    """Attach to a cluster when asked (``auto`` inside ``ray job submit``), else start a private local one."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
        return
    for name, value in LOCAL_TRAIN_ENV.items():
        os.environ.setdefault(name, value)  # inherited by the local raylet and every Train actor
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)


def build_runtime(space: SearchSpace, data_dir: str, train_storage: str) -> StudyRuntime:
    manifest = read_manifest(data_dir)
    per_batch = space.base_config().data.speakers_per_batch
    if per_batch > len(manifest.speakers):
        raise StudyError(f"{space.name}: base.data.speakers_per_batch = {per_batch}, but {data_dir} has only "
                         f"{len(manifest.speakers)} training speakers; lower it or prepare more speakers")
    return StudyRuntime(
        space=space,
        train_shards=tuple(shard_paths(data_dir, "train")),
        dev_shards=tuple(shard_paths(data_dir, "dev", manifest)),
        dev_trials=tuple(read_trials(trials_path(data_dir, "dev", manifest))),
        num_classes=len(manifest.speakers),
        train_rows=manifest.splits["train"].rows,
        frame_shift_ms=manifest.feature_config.frame_shift_ms,
        train_storage=train_storage,
        feature_config=manifest.feature_config.model_dump(),
    )


# What a trial's driver side holds resident, measured (ps, every 2 s, tests/test_cluster_rehearsal.py's smoke
# study, Linux x86_64, Python 3.11): the trial driver (ray::ImplicitFunc.train) peaks at 0.77 GB RSS, and the
# Train V2 controller it starts (ray::TrainController.run, no reservation of its own) at 0.77 GB; importing
# the trial module alone is 0.73 GB. 1.5 GiB covers both, so drivers cannot overfill a node.
DRIVER_MEMORY_BYTES = 1536 * 1024**2


def make_trainable(space: SearchSpace, runtime: StudyRuntime):
    """The trial driver only waits on its TorchTrainer: it reserves memory, not a CPU the workers need
    (Ray refuses an empty resource request, so a zero-CPU driver still has to ask for something)."""
    resources = {"CPU": space.resources.driver_cpus, "memory": DRIVER_MEMORY_BYTES}
    return tune.with_resources(tune.with_parameters(run_trial, runtime=runtime), resources)


def make_tuner(space: SearchSpace, runtime: StudyRuntime, paths: dict[str, str], tracking_uri: str,
               workdir: str, num_samples: int, optuna_storage=None) -> tune.Tuner:
    """``num_samples`` searched trials, plus the space's baseline trials (run first); ``optuna_storage``: the
    ``RDBStorage`` that holds TPE's trials (None: in memory, in Tune's searcher checkpoint)."""
    budget = space.budget
    # A space with nothing to search (the baseline) runs its fixed config num_samples times.
    search = study_search(space, budget.seed, storage=optuna_storage) if space.params else None
    scheduler = study_scheduler(space)
    stop = {"time_total_s": budget.trial_time_budget_s} if budget.trial_time_budget_s else None
    return tune.Tuner(
        make_trainable(space, runtime),
        tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, search_alg=search, scheduler=scheduler,
                                    num_samples=num_samples + (space.baseline_trials() if search else 0),
                                    max_concurrent_trials=budget.max_concurrent_trials,
                                    time_budget_s=budget.study_time_budget_s),
        run_config=tune.RunConfig(
            name=space.name, storage_path=paths["tune"], stop=stop,
            callbacks=[PlacementGroupReaper(),
                       MLflowStudyCallback(tracking_uri, str(workdir), space, runtime.feature_config,
                                           train_storage=runtime.train_storage)],
            progress_reporter=tune.CLIReporter(metric_columns=TRIAL_COLUMNS, max_report_frequency=15,
                                               parameter_columns=param_columns(space)),
            failure_config=tune.FailureConfig(max_failures=space.resources.max_failures),
        ),
    )


def param_columns(space: SearchSpace) -> dict[str, str] | None:
    """Short headers for the live table (per-block booleans as b1..bN)."""
    from mfcon.study.spaces import optuna_distributions

    names = list(optuna_distributions(space)) if space.params else []
    return {n: n.rsplit(".", 1)[-1] for n in names} or None


def tpe_sampler(seed: int):
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4, multivariate=True)


def baseline_seeds(space: SearchSpace) -> tuple[int, ...]:
    """The baseline trials' training seeds: the base seed (every searched trial's), then the next ones."""
    base = space.base_config().seed
    return tuple(base + i for i in range(space.baseline_trials()))


def study_search(space: SearchSpace, seed: int, with_baseline: bool = True, storage=None) -> StudySearch:
    """The study's searcher: the baseline trials first, then TPE over the space (ASHA-stopped trials told to
    Optuna as pruned), its Optuna study named after the study, in ``storage`` (an ``RDBStorage``) when given.
    ``with_baseline=False``: the search alone (benchmarks of the searcher)."""
    seeds = baseline_seeds(space) if with_baseline else ()
    return StudySearch(space=DefineByRun(space), metric=space.metric, mode="min", sampler=tpe_sampler(seed),
                       study_name=space.name, storage=storage,
                       max_epochs=space.base_config().epochs, baseline_seeds=seeds,
                       baseline=baseline_sample(space) if seeds else None)


class StudyScheduler(ASHAScheduler):
    """ASHA over epochs that never stops a baseline trial: the study's reference and noise floor must be
    trained to the end. Baseline results still count in ASHA's rungs, so trials worse than it are cut."""

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        epoch = result.get(self._time_attr, 0)
        if decision == self.STOP and (trial.config or {}).get(BASELINE_KEY) and epoch < self._max_t:
            return self.CONTINUE
        return decision


def study_scheduler(space: SearchSpace) -> ASHAScheduler:
    """ASHA over epochs, with the space's grace period and reduction factor."""
    max_epochs = space.base_config().epochs
    return StudyScheduler(time_attr="epoch", max_t=max_epochs,
                          grace_period=min(space.budget.grace_period, max_epochs),
                          reduction_factor=space.budget.reduction_factor)


def run_study(space_path: str | Path | None, data_dir: str | Path | None, workdir: str | Path = "runs",
              num_samples: int | None = None, address: str | None = None, tracking_uri: str | None = None,
              resume: bool = False, study_name: str | None = None,
              optuna_storage: str | None = None) -> StudySummary:
    """Start (or with ``resume`` continue) a study; returns its summary once every trial has ended.
    ``optuna_storage``: the database URL for its Optuna study (:mod:`mfcon.study.optuna_storage`)."""
    if study_name is not None:  # before it names any file: --name, and the study a resume reads
        check_study_name(study_name, "--name")
    workdir = storage.normalize(workdir)
    space_path, data_dir = _resolve_inputs(space_path, data_dir, workdir, study_name, resume)
    storage.check_cluster_locations(address, data=data_dir, workdir=workdir)  # before anything starts
    with storage.local_copy(space_path) as local_space:
        space = load_search_space(local_space)
        space_bytes = local_space.read_bytes()
    if study_name and study_name != space.name:
        space = space.model_copy(update={"name": study_name})
    check_study_name(space.name, f"{storage.describe(space_path)}: name")
    paths = study_paths(workdir, space.name)
    info = read_study_info(workdir, space.name) if resume and storage.exists(paths["info"]) else {}
    if resume and tracking_uri is None:
        tracking_uri = info.get("tracking_uri")  # the store its trials are in
    uri = study_tracking_uri(tracking_uri, workdir)
    verify_shards(data_dir)
    runtime = build_runtime(space, data_dir, paths["train"])  # input errors surface before anything is written
    if address is None and not ray.is_initialized():  # the private local Ray: its size is known before it starts
        check_fits_cluster(space, local_cpus(), local_gpus(), space_path, "this machine (the private local Ray)")
    can_restore = tune.Tuner.can_restore(paths["experiment"])
    if can_restore and not resume:
        raise StudyError(f"study {space.name!r} already exists in {paths['root']}; "
                         f"continue it with --resume or choose another --name")
    check_tracking_uri(uri)  # after every input check (an SQLite store is created here), before any training
    optuna_url, optuna_rdb = study_storage(optuna_storage, workdir, space.name, bool(space.params), info, can_restore)
    storage.makedirs(paths["root"])
    if not can_restore:
        storage.write_bytes(paths["space"], space_bytes)
        storage.write_text(paths["info"], json.dumps({"space": paths["space"], "data": data_dir, "tracking_uri": uri,
                                                      "optuna_storage": optuna_url}))
    # A failure from here on marks the study run FAILED (KILLED on Ctrl-C) without hiding the error; the end
    # waits a bounded time for the tracking spool to drain and says how to replay what is left (mfcon sync).
    with StudyTracker(uri, space.name, workdir) as tracker:
        with storage.local_copy(paths["space"]) as local_space:
            tracker.log_study_inputs(local_space, space.base, manifest_hash(data_dir))
        tracker.write("log", tracker.role, tags={METRIC_TAG: space.metric})  # what "best" means to every reader

        init_ray(address)
        runtime = with_gpu_decision(runtime)
        remove_orphaned_placement_groups()
        # Tune's newer console output ignores the reporter's columns: keep the table with eer and min_dcf.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        if can_restore:
            tuner = tune.Tuner.restore(paths["experiment"], trainable=make_trainable(space, runtime),
                                       resume_unfinished=True, resume_errored=True)
        else:
            tuner = make_tuner(space, runtime, paths, uri, workdir, num_samples or space.budget.num_samples,
                               optuna_rdb)
        grid = tuner.fit()
        summary = summarize(grid, space, uri, paths["experiment"])
        summary.optuna_storage = optuna_url
        if summary.best_trial is not None and summary.best_metric is not None:
            tracker.log_best(summary.best_trial, summary.best_metric, space.metric, mode="min")
        _log_baseline(tracker, summary)
        tracker.log_dict(json.loads(summary.to_json()), "study_summary.json")
        if tracker.flush():  # the plots read the study back from MLflow
            _log_study_plots(uri, space.name)
        tracker.finish("FINISHED")
    return summary


def _log_study_plots(uri: str, study: str) -> None:
    """Optuna history, importances and lambda/tau/block slices on the parent run."""
    from mfcon.study.plot_logging import log_study_plots

    try:
        log_study_plots(uri, study)
    except Exception as e:  # noqa: BLE001 - plots are a view; the study's results stand without them
        print(f"warning: study plots not logged: {e}", file=sys.stderr)


def read_study_info(workdir: str | Path, study_name: str) -> dict[str, str]:
    """What a study remembers (``study.json``): its space file, data folder and tracking URI."""
    saved = study_paths(workdir, study_name)["info"]
    try:
        return json.loads(storage.read_text(saved))
    except FileNotFoundError:
        raise StudyError(f"no study named {study_name!r} under {storage.normalize(workdir)} (no {saved})") from None


def study_tracking_uri(explicit: str | None, workdir: str) -> str:
    """The tracking store of a study; a study kept in an object store needs a tracking server."""
    if storage.is_remote(workdir) and explicit is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise StudyError(f"--workdir {workdir} is an object store, where an SQLite tracking database cannot live: "
                         "pass --tracking-uri http://<mlflow server>:5000 or set MLFLOW_TRACKING_URI")
    return resolve_tracking_uri(explicit, workdir)


def _resolve_inputs(space_path, data_dir, workdir: str, study_name, resume) -> tuple[str, str]:
    """``--resume --name X`` needs nothing else: the study remembers its space and data."""
    if resume and study_name and (space_path is None or data_dir is None):
        info = read_study_info(workdir, study_name)
        space_path, data_dir = space_path or info["space"], data_dir or info["data"]
    if space_path is None or data_dir is None:
        raise StudyError("--space and --data are required (or --resume --name NAME)")
    return storage.normalize(space_path), storage.normalize(data_dir)


def _log_baseline(tracker: StudyTracker, summary: StudySummary) -> None:
    """The baseline comparison on the study run: its line as a tag, its numbers as metrics."""
    b = summary.baseline
    if not b:
        return
    metrics = [[name, float(b[key]), int(time.time() * 1000), 0]
               for name, key in (("baseline_" + summary.metric, "baseline_mean"), ("seed_sd", "seed_sd"),
                                 ("noise_floor", "noise_floor"), ("best_minus_baseline", "difference"))
               if b.get(key) is not None]
    tracker.write("log", tracker.role, tags={"mfcon.baseline_verdict": b["verdict"], "mfcon.baseline_line": b["line"]},
                  metrics=metrics)


def trial_best_value(result, metric: str) -> float | None:
    """A finished Tune result's best value of ``metric`` over its epochs (the study's one rule for "best")."""
    df = result.metrics_dataframe
    if df is None or metric not in df or "epoch" not in df:
        return None
    return best_value(dict(zip(df["epoch"].astype(int), df[metric].astype(float))))


def summarize(grid, space: SearchSpace, uri: str, experiment_dir: str) -> StudySummary:
    states: dict[str, int] = {}
    max_epochs = space.base_config().epochs
    mfcon: dict[str, float | None] = {}
    baseline: list[float | None] = []
    best_trial, best_value_, best_params = None, None, {}
    rows: list[TrialRow] = []
    for result in grid:
        if result.error is not None:
            state = "failed"
        else:
            epoch = int((result.metrics or {}).get("epoch", 0))
            state = "completed" if epoch >= max_epochs else "pruned"
        states[state] = states.get(state, 0) + 1
        trial_id = (result.metrics or {}).get("trial_id") or result.path
        value = trial_best_value(result, space.metric) if state != "failed" else None
        config = result.config or {}
        params = trial_params(space, config)
        rows.append(TrialRow(str(trial_id), state, int((result.metrics or {}).get("epoch", 0)), value, params,
                             baseline=bool(config.get(BASELINE_KEY)),
                             seed=int(config[SEED_KEY]) if config.get(SEED_KEY) is not None else None))
        if value is not None and (best_value_ is None or value < best_value_):
            best_trial, best_value_, best_params = trial_id, value, params
        if state != "failed":
            if (result.config or {}).get(BASELINE_KEY):
                baseline.append(value)
            else:
                mfcon[trial_id] = value
    comparison = None
    if space.baseline_trials():
        c = compare_with_baseline(space.name, space.metric, mfcon, baseline)
        comparison = {"baseline_values": list(c.baseline_values), "baseline_mean": c.baseline_mean,
                      "seed_sd": c.seed_sd, "noise_floor": c.noise_floor, "best_trial": c.best_trial,
                      "best_value": c.best_value, "difference": c.difference, "verdict": c.verdict, "line": c.line()}
    return StudySummary(study=space.name, tracking_uri=uri, experiment_dir=experiment_dir, num_trials=len(grid),
                        states=states, best_trial=best_trial, best_metric=best_value_, best_params=best_params,
                        metric=space.metric, baseline=comparison, trials=rows)
