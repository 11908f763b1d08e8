"""`mfcon replicate`: a finished study's top configurations and the lambda=0 baseline, at equal compute.

A study's best trial is the best of many on the dev list, trained once: its
margin over a single baseline run is partly luck of selection and of the seed.
Replication answers the user's question honestly: the top-K configurations (by
dev metric) and the baseline with otherwise identical settings (MFCon weight 0)
are each retrained with S seeds for the same epochs, as one Ray Tune grid of Ray
Train trials, and every model is scored on the held-out **test** list, which no
search has seen. The verdict (:mod:`mfcon.evaluation.verdicts`) pairs the arms seed by seed
(every configuration trains the same seed set) and gives the mean per-seed
difference with a t interval over enrollment speakers and seeds.

Fresh seeds: the replication's seeds are drawn from ``--replication-seed`` and
never coincide with a seed any study trial trained with, so no replica repeats
the run that won on dev (selection luck would leak into the test verdict).
Test scores are centred with the mean embedding of the **dev** split, as a
promoted model is served; the test list is only ever scored. The plan (which
configurations, which seeds) is written once; a re-run continues exactly that
plan, or refuses when asked for another.

Several named test lists (``prepare --test-trials O=... --test-trials E=...``):
every replica is scored on each of them (one embedding of the test split), the
table and the per-configuration differences are reported for each list, and the
verdict is decided on one (``decide_on``, ``--decide-on``; default ``test`` when
the folder has it, else its first list), recorded as tag ``mfcon.decided_on``.

MLflow: a ``replication`` parent run in the study's experiment, a ``replica``
child run per (configuration, seed) with its per-epoch dev metrics, its best
checkpoint and model, and its ``test_*`` metrics (the decided list; every list
``L`` also as ``test_L_*`` when there are several); the parent holds
``replication.json`` (the table, and under ``lists`` every list's), per-configuration
metrics and the verdict.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from ray import tune

from mfcon import storage
from mfcon.config import TrainConfig, apply_overrides
from mfcon.data.local import read_eval_set, read_test_sets
from mfcon.data.shards import read_manifest
from mfcon.evaluation.selection import best_value
from mfcon.models.mfa_conformer import build_model
from mfcon.evaluation.score_norm import DEFAULT_TOP_N, ScoreNormName
from mfcon.evaluation.scoring import (
    EvalResult,
    EvalSet,
    embed_cohort,
    evaluate_scores,
    extract_embeddings,
    score_trials,
)
from mfcon.study.callbacks import MLflowStudyCallback
from mfcon.study.optuna_rebuild import parse_param
from mfcon.study.replication_log import BASELINE, log_replication
from mfcon.study.reaper import PlacementGroupReaper, remove_orphaned_placement_groups
from mfcon.study.runner import (
    DRIVER_MEMORY_BYTES,
    StudyError,
    build_runtime,
    init_ray,
    read_study_info,
    study_paths,
    study_tracking_uri,
)
from mfcon.study.spaces import (
    SearchSpace,
    load_search_space,
    optuna_distributions,
    trial_config,
)
from mfcon.study.trial import StudyRuntime, fit_trainer, with_gpu_decision
from mfcon.tracking import (
    STATE_TAG,
    StudyTracker,
    check_tracking_uri,
    find_runs,
    load_study,
    no_artifact_progress_bars,
)
from mfcon.train.checkpoint import EXPORTED_ARTIFACT, load_checkpoint
from mfcon.evaluation.verdicts import ConfigVerdict, format_table, replicate_verdicts, verdict_line

PLAN_FILE = "plan.json"  # in the replication folder: its configurations and fresh seeds, fixed on the first run
REPLICA_KEYS = ("replica.index", "replica.label", "replica.seed")


@dataclass(frozen=True)
class Replica:
    """One training run of the grid: a configuration (labelled) with one seed."""

    label: str
    seed: int
    config: dict[str, Any]  # TrainConfig as JSON
    params: dict[str, Any]  # logged on its MLflow run


class ReplicaParams:
    """Picklable ``params_of`` for the MLflow callback: a grid point -> the params of its replica."""

    def __init__(self, replicas: tuple[Replica, ...]):
        self.replicas = replicas

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        return self.replicas[int(config["replica"])].params


def run_replica(config: dict[str, Any], runtime: StudyRuntime, replicas: tuple[Replica, ...]) -> None:
    """Tune function trainable: one replica, trained exactly as a study trial is."""
    fit_trainer(TrainConfig.model_validate(replicas[int(config["replica"])].config), runtime)


def top_configurations(space: SearchSpace, tracking_uri: str, top_k: int
                       ) -> tuple[list[tuple[str, TrainConfig, dict]], set[int]]:
    """((label, config, sampled params) of the study's ``top_k`` finished MFCon trials by the space's metric, best
    first; every training seed the study used)."""
    record = load_study(MlflowClient(tracking_uri), space.name)
    base_seed = space.base_config().seed
    used = {base_seed} | {t.seed for t in record.trials if t.seed is not None}
    finished = [t for t in record.ranked() if t.state in ("completed", "pruned") and t.best_value is not None
                and not t.baseline]
    dists = optuna_distributions(space) if space.params else {}
    out = []
    for trial in finished:
        try:
            sampled = {key: parse_param(trial.params[key], dist) for key, dist in dists.items()}
        except (KeyError, ValueError):
            continue  # a no-block draw: logged as weight 0, it trained no MFCon loss
        config = trial_config(space, sampled)
        if config.selected_blocks():
            out.append((f"top{len(out) + 1}", config, {**sampled, "source_trial": trial.trial_id}))
        if len(out) == top_k:
            break
    if not out:
        raise StudyError(f"study {space.name!r} has no finished trial that trains the MFCon loss (by "
                         f"{record.metric}): there is nothing to compare with the baseline; replicate a study that "
                         "searches MFCon")
    return out, used


def replication_seeds(used: set[int], n: int, replication_seed: int = 0) -> tuple[int, ...]:
    """``n`` training seeds drawn from ``replication_seed``, none of them a seed in ``used`` (the study's)."""
    rng = np.random.default_rng([replication_seed, 0x5EED])
    seeds: list[int] = []
    while len(seeds) < n:
        seed = int(rng.integers(1_000, 2**31 - 1))
        if seed not in used and seed not in seeds:
            seeds.append(seed)
    return tuple(seeds)


def plan_replicas(space: SearchSpace, tops: list[tuple[str, TrainConfig, dict]],
                  seeds: tuple[int, ...]) -> tuple[Replica, ...]:
    """Baseline (the best configuration with MFCon weight 0) and each top configuration, each with every seed."""
    baseline = apply_overrides(tops[0][1], {"loss.mfcon_weight": 0.0}, f"replication of {space.name}")
    configs = [(BASELINE, baseline, {"loss.mfcon_weight": 0.0}), *tops]
    replicas = []
    for label, cfg, params in configs:
        for seed in seeds:
            config = apply_overrides(cfg, {"seed": seed}).model_dump(mode="json")
            replicas.append(Replica(label, seed, config, {**params, "replica.index": len(replicas),
                                                          "replica.label": label, "replica.seed": seed}))
    return tuple(replicas)


def planned_replicas(space: SearchSpace, uri: str, root: str, top_k: int, seeds: int,
                     replication_seed: int) -> tuple[Replica, ...]:
    """The replication's plan: written on the first run, read back (and only continued) on every later one."""
    path = storage.join(root, PLAN_FILE)
    asked = {"top_k": top_k, "seeds": seeds, "replication_seed": replication_seed}
    if storage.exists(path):
        plan = json.loads(storage.read_text(path))
        if {k: plan.get(k) for k in asked} != asked:
            had = f"--top-k {plan.get('top_k')} --seeds {plan.get('seeds')} --replication-seed {plan.get('replication_seed')}"
            raise StudyError(f"{space.name} already has a replication planned with {had} ({path}); re-run with those "
                             f"flags to continue it, or remove {storage.describe(root)} to plan a new one")
        return tuple(Replica(r["label"], int(r["seed"]), r["config"], r["params"]) for r in plan["replicas"])
    tops, used = top_configurations(space, uri, top_k)
    replicas = plan_replicas(space, tops, replication_seeds(used, seeds, replication_seed))
    plan = {**asked, "study_seeds": sorted(used), "replication_seeds": sorted({r.seed for r in replicas}),
            "replicas": [{"label": r.label, "seed": r.seed, "config": r.config, "params": r.params} for r in replicas]}
    storage.makedirs(root)
    storage.write_text(path, json.dumps(plan, indent=2, default=str))
    return replicas


@dataclass
class ReplicationResult:
    study: str
    run_id: str  # the replication parent run
    verdicts: dict[str, ConfigVerdict]
    best: str | None  # the MFCon configuration with the best mean dev EER (chosen on dev, never on test)
    replica_runs: dict[str, list[tuple[int, str]]]  # label -> [(seed, run id)]
    n_trials: int
    n_speakers: int
    epochs: int
    metric: str = "dev_eer"  # the dev metric that chose ``best``
    decided_on: str = "test"  # the test list the verdict is decided on
    lists: dict[str, dict[str, ConfigVerdict]] = dataclasses.field(default_factory=dict)  # every list's verdicts
    list_trials: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # list -> (trials, speakers)

    def verdict(self) -> str:
        if self.best is None:
            return "no MFCon configuration among the top trials (they all had weight 0 or no blocks)"
        return verdict_line(self.verdicts[self.best], BASELINE)

    def summary(self) -> str:
        on = "the test list" if len(self.lists) <= 1 else f"test list {self.decided_on} (decided on)"
        text = (f"replication of {self.study}: {len(next(iter(self.replica_runs.values())))} seeds x "
                f"{len(self.replica_runs)} configurations, {self.epochs} epochs each, scored on {on} "
                f"({self.n_trials} trials, {self.n_speakers} enrollment speakers)\n"
                f"{format_table(self.verdicts)}\n{self.verdict()}")
        for name, verdicts in self.lists.items():
            if name == self.decided_on:
                continue
            trials, speakers = self.list_trials[name]
            line = verdict_line(verdicts[self.best], BASELINE) if self.best else ""
            text += (f"\n\ntest list {name} (reported, not decided on: {trials} trials, {speakers} enrollment "
                     f"speakers)\n{format_table(verdicts)}" + (f"\n{line}" if line else ""))
        return text


def replicate_study(study: str, workdir: str | Path = "runs", top_k: int = 1, seeds: int = 3,
                    tracking_uri: str | None = None, address: str | None = None, n_boot: int = 1000,
                    confidence: float = 0.95, score_norm: ScoreNormName = "mean",
                    top_n: int = DEFAULT_TOP_N, replication_seed: int = 0,
                    decide_on: str | None = None) -> ReplicationResult:
    """Retrain and score; re-running with the same flags continues an interrupted replication (finished
    replicas are kept); ``replication_seed`` draws its training seeds, disjoint from the study's. Every named
    test list of the data folder is scored; the verdict is decided on ``decide_on`` (default: ``test`` when there
    is one, else the first list)."""
    if top_k < 1 or seeds < 2:
        raise StudyError(f"replication needs --top-k >= 1 and --seeds >= 2 (got {top_k}, {seeds}): "
                         "one seed cannot show seed-to-seed spread")
    workdir = storage.normalize(workdir)
    info = read_study_info(workdir, study)
    storage.check_cluster_locations(address, data=info["data"], workdir=workdir)  # before anything starts
    uri = study_tracking_uri(tracking_uri or info.get("tracking_uri"), workdir)
    check_tracking_uri(uri)
    with storage.local_copy(info["space"]) as local_space:
        space = load_search_space(local_space).model_copy(update={"name": study})
    data_dir = info["data"]
    decide_on = read_manifest(data_dir).decided_list(decide_on)  # a wrong name fails before anything trains
    root = storage.join(study_paths(workdir, study)["root"], "replication")
    runtime = build_runtime(space, data_dir, storage.join(root, "train"))  # input errors before anything runs
    replicas = planned_replicas(space, uri, root, top_k, seeds, replication_seed)
    # An error marks the replication run FAILED without hiding it; the end drains the tracking spool.
    with StudyTracker(uri, study, workdir, role="replication") as tracker:
        init_ray(address)
        remove_orphaned_placement_groups()
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        grid = _tuner(space, with_gpu_decision(runtime), replicas, root, uri, workdir).fit()
        failed = [r for r in grid if r.error is not None]
        if failed:
            print(f"warning: {len(failed)} replicas failed; the verdict uses the others")
        _, tests = read_test_sets(data_dir, score_norm, top_n, decide_on)  # the decided list first
        dev = read_eval_set(data_dir, "dev", "mean")  # centres the test scores, as a served model is centred
        result = score_replicas(tracker, replicas, tests, n_boot, confidence, dev=dev, metric=space.metric)
        tracker.finish("FINISHED")
    return result


def _tuner(space: SearchSpace, runtime: StudyRuntime, replicas: tuple[Replica, ...], root: str, uri: str,
           workdir: str) -> tune.Tuner:
    trainable = tune.with_resources(tune.with_parameters(run_replica, runtime=runtime, replicas=replicas),
                                    {"CPU": space.resources.driver_cpus, "memory": DRIVER_MEMORY_BYTES})
    name = f"{space.name}-replication"
    experiment = storage.join(root, "tune", name)
    if tune.Tuner.can_restore(experiment):
        return tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable, param_space={"replica": tune.grid_search(list(range(len(replicas))))},
        tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode,
                                    max_concurrent_trials=space.budget.max_concurrent_trials),
        run_config=tune.RunConfig(
            name=name, storage_path=storage.join(root, "tune"),
            callbacks=[PlacementGroupReaper(),
                       MLflowStudyCallback(uri, workdir, space, runtime.feature_config, role="replication",
                                           params_of=ReplicaParams(replicas))],
            progress_reporter=tune.CLIReporter(metric_columns={"epoch": "epoch", "dev_eer": "dev EER %"},
                                               parameter_columns={"replica": "replica"}, max_report_frequency=30),
            failure_config=tune.FailureConfig(max_failures=space.resources.max_failures)))


def score_replicas(tracker: StudyTracker, replicas: tuple[Replica, ...], tests: EvalSet | dict[str, EvalSet],
                   n_boot: int, confidence: float, dev: EvalSet | None = None,
                   metric: str = "dev_eer") -> ReplicationResult:
    """Every finished replica's best checkpoint on each test list (centred with its ``dev`` embeddings' mean);
    seed-paired verdicts per list logged on the replication run, decided on the first list of ``tests`` (one
    EvalSet: the list named ``test``); the best configuration is chosen by ``metric`` on dev."""
    tests = {"test": tests} if isinstance(tests, EvalSet) else tests
    decided = next(iter(tests))
    client = tracker.client
    runs = find_runs(client, tracker.experiment_id, **{"mlflow.parentRunId": tracker.parent_run_id})
    by_index = {int(r.data.params["replica.index"]): r for r in runs if "replica.index" in r.data.params}
    scores: dict[str, dict[str, dict[int, np.ndarray]]] = {name: {} for name in tests}  # list -> label -> seed
    dev_values: dict[str, list[float]] = {}
    replica_runs: dict[str, list[tuple[int, str]]] = {}
    for index, replica in enumerate(replicas):
        run = by_index.get(index)
        if run is None or run.data.tags.get(STATE_TAG) != "completed":
            continue
        result = _score_on_test(client, run.info.run_id, tests, dev)
        if result is None:
            continue
        for name, list_scores in result.items():
            scores[name].setdefault(replica.label, {})[replica.seed] = list_scores
        history = {int(m.step): m.value for m in client.get_metric_history(run.info.run_id, metric)}
        value = best_value(history)
        dev_values.setdefault(replica.label, []).append(math.nan if value is None else value)
        replica_runs.setdefault(replica.label, []).append((replica.seed, run.info.run_id))
    if BASELINE not in scores[decided] or len(scores[decided]) < 2:
        raise StudyError(f"too few finished replicas to compare (have {sorted(scores[decided])}); see the replica "
                         "runs' states in MLflow and re-run to continue")
    lists, list_trials = {}, {}
    for name, test in tests.items():
        labels = np.array([t.label for t in test.trials])
        groups = np.array([t.enroll.split("/")[0] for t in test.trials])
        verdicts = replicate_verdicts(scores[name], labels, groups, BASELINE, n_boot=n_boot, confidence=confidence)
        lists[name] = {label: dataclasses.replace(
            v, params={k: str(val) for k, val in _config_params(replicas, label).items()})
            for label, v in verdicts.items()}
        list_trials[name] = (len(test.trials), len(set(groups)))
    mfcon = [label for label in lists[decided] if label != BASELINE]
    best = min(mfcon, key=lambda label: np.nanmean(dev_values[label])) if mfcon else None
    out = ReplicationResult(tracker.study, tracker.parent_run_id, lists[decided], best, replica_runs,
                            *list_trials[decided], int(replicas[0].config["epochs"]), metric, decided,
                            lists if len(lists) > 1 else {}, list_trials)
    log_replication(client, out)
    client.set_tag(out.run_id, "mfcon.evaluation.score_norm", tests[decided].score_norm)
    client.set_tag(out.run_id, "mfcon.decided_on", decided)
    return out


def _score_on_test(client: MlflowClient, run_id: str, tests: dict[str, EvalSet],
                   dev: EvalSet | None) -> dict[str, np.ndarray] | None:
    """The replica's exported best-dev-epoch weights scored on every test list (one embedding of the test split,
    whose lists share it), centred with the mean of its dev embeddings (when given); ``test_*`` metrics of the
    first (decided) list on its run, and ``test_<list>_*`` of each list when there are several."""
    with tempfile.TemporaryDirectory() as tmp, no_artifact_progress_bars():
        try:
            state = load_checkpoint(client.download_artifacts(run_id, EXPORTED_ARTIFACT, tmp))
        except Exception:  # noqa: BLE001 - a replica stopped before its first checkpoint has none
            return None
    from mfcon.config import ModelConfig

    model = build_model(ModelConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    results = _evaluate_lists(model, tests, dev, device)
    now, step = int(time.time() * 1000), int(state["epoch"])
    named = list(results.items())
    values = dict(named[0][1].metrics("test"))
    if len(named) > 1:
        for name, result in named:
            values.update(result.metrics(f"test_{name}"))
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])
    return {name: result.scores for name, result in named}


def _evaluate_lists(model: torch.nn.Module, tests: dict[str, EvalSet], dev: EvalSet | None,
                    device: torch.device) -> dict[str, EvalResult]:
    """:func:`mfcon.evaluation.scoring.evaluate` of each list, embedding the shared test split and cohort once."""
    first = next(iter(tests.values()))
    centre = extract_embeddings(model, dev.features, device).mean(axis=0) if dev is not None else None
    emb = extract_embeddings(model, first.features, device)
    cohort = embed_cohort(model, first.cohort, device) if first.cohort is not None else None
    return {name: evaluate_scores(*score_trials(test.utt_ids, emb, test.trials, cohort=cohort, top_n=test.top_n,
                                                centre=centre))
            for name, test in tests.items()}


def _config_params(replicas: tuple[Replica, ...], label: str) -> dict[str, Any]:
    params = next(r.params for r in replicas if r.label == label)
    return {k: v for k, v in params.items() if k not in REPLICA_KEYS}
