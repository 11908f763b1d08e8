"""`mfcon replicate` end to end on 2 CPUs: a tiny study (with its own lambda = 0 baseline at 2 seeds and the
noise-floor line), then its best configuration and the baseline, each retrained with 2 fresh seeds as one Ray
Tune grid, scored on the held-out test list and tracked in MLflow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mfcon.data.local import read_eval_set
from mfcon.study.replicate import BASELINE, replicate_study
from mfcon.study.runner import run_study
from mfcon.tracking import default_tracking_uri, read_replication
from mlflow.tracking import MlflowClient
from test_study import write_space

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def studied(ray_local_2cpu, small_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("replicate")
    space = write_space(workdir, "rep", epochs=2, samples=2, concurrent=2, baseline=True)
    return workdir, run_study(space, small_data, workdir=workdir)


@pytest.fixture(scope="module")
def replicated(studied):
    workdir, _ = studied
    result = replicate_study("rep", workdir=workdir, top_k=1, seeds=2, n_boot=200)
    return workdir, result


def test_the_study_trains_its_baseline_at_two_seeds_and_says_how_it_compares(studied):
    """Every MFCon study has its lambda = 0 trials (tagged, never stopped by ASHA) and a line on the study run."""
    workdir, summary = studied
    client = MlflowClient(default_tracking_uri(workdir))
    runs = client.search_runs([client.get_experiment_by_name("rep").experiment_id], max_results=100)
    trials = [r for r in runs if r.data.tags.get("mfcon.role") == "trial"]
    baseline = [r for r in trials if r.data.tags.get("mfcon.baseline") == "true"]
    assert len(trials) == 4 and len(baseline) == 2  # 2 searched + 2 baseline seeds
    assert sorted(r.data.params["seed"] for r in baseline) == ["0", "1"]
    for run in baseline:
        assert float(run.data.params["loss.mfcon_weight"]) == 0.0 and run.data.params["loss.mfcon_blocks"] == "none"
        assert run.data.tags["mfcon.trial_state"] == "completed"  # trained to the end
        assert len(client.get_metric_history(run.info.run_id, "dev_eer")) == 2
    line = summary.baseline_line
    assert line.startswith("best vs baseline on dev: ") and "`mfcon replicate --study rep`" in line
    assert summary.baseline["verdict"] in ("better", "worse", "within noise")
    assert summary.baseline["seed_sd"] is not None and len(summary.baseline["baseline_values"]) == 2
    parent = next(r for r in runs if r.data.tags.get("mfcon.role") == "study")
    assert parent.data.tags["mfcon.baseline_line"] == line
    assert parent.data.tags["mfcon.metric"] == "dev_eer"
    assert parent.data.metrics["noise_floor"] == pytest.approx(summary.baseline["noise_floor"])


def test_replicas_train_fresh_seeds_never_a_study_trials_config_and_seed(studied, replicated):
    """Selection luck must not leak into the verdict: no replica repeats a (config, seed) the study trained."""
    workdir, result = replicated
    client = MlflowClient(default_tracking_uri(workdir))
    runs = client.search_runs([client.get_experiment_by_name("rep").experiment_id], max_results=100)
    study_seeds = {int(r.data.params.get("seed", 0)) for r in runs if r.data.tags.get("mfcon.role") == "trial"}
    replicas = [r for r in runs if r.data.tags.get("mfcon.role") == "replica"]
    seeds = {int(r.data.params["replica.seed"]) for r in replicas}
    assert study_seeds == {0, 1} and len(seeds) == 2 and not seeds & study_seeds
    by_label = {}
    for r in replicas:
        by_label.setdefault(r.data.params["replica.label"], set()).add(int(r.data.params["replica.seed"]))
    assert by_label == {BASELINE: seeds, "top1": seeds}  # one seed set for both arms: the verdict pairs them
    assert result.verdicts["top1"].delta.n_seeds == 2
    parent = next(r for r in runs if r.info.run_id == result.run_id)
    assert sorted(map(int, parent.data.tags["mfcon.replication_seeds"].split(","))) == sorted(seeds)


def test_a_rerun_with_other_flags_refuses_and_relabels_nothing(replicated):
    from mfcon.study.runner import StudyError

    workdir, result = replicated
    client = MlflowClient(default_tracking_uri(workdir))
    exp = client.get_experiment_by_name("rep").experiment_id
    before = sorted((r.info.run_id, tuple(sorted(r.data.params.items()))) for r in client.search_runs([exp]))
    with pytest.raises(StudyError, match=r"already has a replication planned with --top-k 1 --seeds 2 "
                                         r"--replication-seed 0 .*re-run with those flags"):
        replicate_study("rep", workdir=workdir, top_k=1, seeds=3, n_boot=200)
    after = sorted((r.info.run_id, tuple(sorted(r.data.params.items()))) for r in client.search_runs([exp]))
    assert after == before


def test_replicas_are_tracked_with_test_metrics(replicated, small_data):
    workdir, result = replicated
    client = MlflowClient(default_tracking_uri(workdir))
    exp = client.get_experiment_by_name("rep")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("mfcon.role") == "replication"]
    replicas = [r for r in runs if r.data.tags.get("mfcon.role") == "replica"]
    assert len(parents) == 1 and parents[0].info.run_id == result.run_id and parents[0].info.status == "FINISHED"
    assert len(replicas) == 4
    seeds = sorted({r.data.params["replica.seed"] for r in replicas})
    assert {(r.data.params["replica.label"], r.data.params["replica.seed"]) for r in replicas} == {
        (label, seed) for label in (BASELINE, "top1") for seed in seeds}
    for run in replicas:
        assert run.data.tags["mlflow.parentRunId"] == result.run_id
        assert run.data.tags["mfcon.trial_state"] == "completed"
        assert run.data.metrics["test_eer"] >= 0 and "dev_eer" in run.data.metrics
        assert len(client.get_metric_history(run.info.run_id, "dev_eer")) == 2  # equal epochs
        if run.data.params["replica.label"] == BASELINE:
            assert float(run.data.params["loss.mfcon_weight"]) == 0.0
    by_label = {}
    for run in replicas:
        by_label.setdefault(run.data.params["replica.label"], []).append(run.data.metrics["test_eer"])
    top = result.verdicts["top1"]
    assert sorted(top.test_eer) == pytest.approx(sorted(by_label["top1"]))
    assert top.delta.estimate == pytest.approx(np.mean(by_label["top1"]) - np.mean(by_label[BASELINE]))
    assert top.delta.low <= top.delta.estimate <= top.delta.high
    test = read_eval_set(small_data, "test")
    assert result.n_trials == len(test.trials)
    # Two named test lists (conftest's `half` beside `test`): each replica is scored on both, decided on `test`.
    half = read_eval_set(small_data, "test", list_name="half")
    assert result.decided_on == "test" and list(result.lists) == ["test", "half"]
    assert result.list_trials["half"] == (len(half.trials), 2) and result.lists["test"] == result.verdicts
    for run in replicas:
        assert run.data.metrics["test_test_eer"] == run.data.metrics["test_eer"]
        assert 0 <= run.data.metrics["test_half_eer"] <= 100 and "test_half_min_dcf" in run.data.metrics
    half_top = result.lists["half"]["top1"]
    assert sorted(half_top.test_eer) == pytest.approx(sorted(r.data.metrics["test_half_eer"] for r in replicas
                                                              if r.data.params["replica.label"] == "top1"))
    assert half_top.delta.low <= half_top.delta.estimate <= half_top.delta.high


def test_replication_table_verdict_and_plot_are_logged(replicated):
    workdir, result = replicated
    client = MlflowClient(default_tracking_uri(workdir))
    table = read_replication(client, "rep")
    assert table["run_id"] == result.run_id and table["best"] == "top1"
    assert set(table["configs"]) == {BASELINE, "top1"}
    assert table["configs"][BASELINE]["delta_eer"] is None
    assert table["configs"]["top1"]["delta_eer"]["estimate"] == pytest.approx(result.verdicts["top1"].delta.estimate)
    assert table["verdict"] == result.verdict()
    assert result.verdict().startswith("top1 vs baseline: ") and "over speakers and paired seeds" in result.verdict()
    significance = result.verdict().rsplit("-> ", 1)[1]
    assert significance in ("significantly better", "significantly worse", "not significant")
    delta = result.verdicts["top1"].delta
    assert (significance == "not significant") == (delta.low <= 0 <= delta.high)
    assert [a.path for a in client.list_artifacts(result.run_id, "plots")] == ["plots/replication.png"]
    assert "baseline" in result.summary() and "test list" in result.summary()
    assert table["decided_on"] == "test" and set(table["lists"]) == {"test", "half"}
    half = result.lists["half"]["top1"].delta
    assert table["lists"]["half"]["configs"]["top1"]["delta_eer"]["estimate"] == pytest.approx(half.estimate)
    run = client.get_run(result.run_id)
    assert run.data.tags["mfcon.decided_on"] == "test"
    assert run.data.metrics["delta_test_half_eer.top1"] == pytest.approx(half.estimate)
    assert "test list half (reported, not decided on: " in result.summary()


def test_report_shows_the_replication_table_and_plot(replicated, tmp_path):
    from mfcon.report import write_report

    workdir, result = replicated
    page = write_report(default_tracking_uri(workdir), "rep", tmp_path, fmt="html").read_text()
    assert "Replication: equal compute, held-out test list" in page
    assert result.verdict().replace(">", "&gt;") in page
    assert 'id="replication"' in page
    top = result.verdicts["top1"]
    assert f"{top.delta.estimate:+.2f} [{top.delta.low:+.2f}, {top.delta.high:+.2f}]" in page
    md = write_report(default_tracking_uri(workdir), "rep", tmp_path / "md", fmt="md").read_text()
    assert "## Replication: equal compute, held-out test list" in md and (tmp_path / "md" / "rep-replication.png").exists()


def test_plan_has_the_baseline_and_each_mfcon_configuration_per_seed():
    from mfcon.study.replicate import plan_replicas
    from mfcon.study.spaces import load_search_space, trial_config

    repo = Path(__file__).resolve().parent.parent
    space = load_search_space(repo / "search_spaces" / "demo.yaml")
    sampled = {"loss.mfcon_weight": 0.3, "loss.mfcon_temperature": 0.1, "loss.mfcon_blocks.b1": True,
               "loss.mfcon_blocks.b2": False, "loss.mfcon_blocks.b3": True}
    seeds = (7001, 7002, 7003)
    replicas = plan_replicas(space, [("top1", trial_config(space, sampled), sampled)], seeds)
    assert [(r.label, r.seed) for r in replicas] == [(BASELINE, s) for s in seeds] + [("top1", s) for s in seeds]
    for r in replicas:
        assert r.config["seed"] == r.seed and r.config["epochs"] == space.base_config().epochs  # equal epochs
        expected = 0.0 if r.label == BASELINE else 0.3
        assert r.config["loss"]["mfcon_weight"] == expected
        assert r.config["optim"] == replicas[0].config["optim"]  # otherwise identical settings


@pytest.mark.parametrize("replication_seed", [0, 1, 12345])
def test_replication_seeds_are_fresh_distinct_and_reproducible(replication_seed):
    from mfcon.study.replicate import replication_seeds

    used = set(range(0, 5000))  # every seed a (large) study could have used, and then some
    seeds = replication_seeds(used, 5, replication_seed)
    assert len(set(seeds)) == 5 and not set(seeds) & used
    assert replication_seeds(used, 5, replication_seed) == seeds  # a re-run draws the same plan
