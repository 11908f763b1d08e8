"""Trial and study plots, the Optuna rebuild from MLflow runs, and the study report.

One small real MLflow store (SQLite + artifacts, written through StudyTracker /
TrialRuns as a study writes it) holds three studies: the main one, a ``baseline``
study to compare against, and one with a single completed trial.
"""

from __future__ import annotations

import argparse
import base64
import re
from statistics import NormalDist

import matplotlib
import numpy as np
import pytest
from mfcon import plots
from mfcon.evaluation.metrics import det_curve, equal_error_rate
from mfcon.report import ReportError, write_report
from mfcon.study.optuna_rebuild import build_optuna_study, load_space
from mfcon.study.plot_logging import log_study_plots, log_trial_plots
from mfcon.tracking import StudyNotFound, load_study
from mlflow.tracking import MlflowClient
from mlflow_fixtures import DEMO_TRIALS, TrialSpec, gaussian_scores, write_study_store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASELINE_TRIALS = (
    TrialSpec("b0000_00000", {"loss.mfcon_weight": 0.01, "loss.mfcon_temperature": 0.1, "loss.mfcon_blocks.b1": False,
                              "loss.mfcon_blocks.b2": False, "loss.mfcon_blocks.b3": False}, (30.0, 24.0, 20.0, 19.5),
              "completed"),
    TrialSpec("b0000_00001", {"loss.mfcon_weight": 0.02, "loss.mfcon_temperature": 0.2, "loss.mfcon_blocks.b1": False,
                              "loss.mfcon_blocks.b2": False, "loss.mfcon_blocks.b3": False}, (33.0, 28.0), "pruned"),
)
ONE_COMPLETE = (DEMO_TRIALS[1], DEMO_TRIALS[2], DEMO_TRIALS[4])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Main study + ``baseline-mfcon`` + ``one-complete`` in one work dir; DET/histogram logged on the best trial."""
    workdir = tmp_path_factory.mktemp("runs")
    main = write_study_store(workdir, "plots-study")
    write_study_store(workdir, "baseline-mfcon", BASELINE_TRIALS)
    write_study_store(workdir, "one-complete", ONE_COMPLETE)
    scores, labels = gaussian_scores(600, seed=1)
    best_run = main.trial_runs[main.best_trial().trial_id]
    log_trial_plots(MlflowClient(main.tracking_uri), best_run, scores, labels)
    return main


@pytest.fixture(scope="module")
def client(store):
    return MlflowClient(store.tracking_uri)


def _no_new_pyplot_state(before_figs, before_rc):
    from matplotlib import pyplot as plt

    assert plt.get_fignums() == before_figs
    assert {k: matplotlib.rcParams[k] for k in before_rc} == before_rc


# ---------------------------------------------------------------- trial plots

def test_probit_is_the_normal_deviate():
    assert plots.probit([0.5])[0] == pytest.approx(0.0)
    assert plots.probit([NormalDist().cdf(-1.0)])[0] == pytest.approx(-1.0)
    assert np.isfinite(plots.probit([0.0, 1.0])).all()


def test_det_plot_points_are_det_curve_on_normal_deviate_axes():
    scores, labels = gaussian_scores(500, seed=2)
    p_fa, p_miss, _ = det_curve(scores, labels)
    fig = plots.det_plot(scores, labels)
    ax = fig.axes[0]
    line = next(line for line in ax.get_lines() if line.get_gid() == "det")
    x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
    assert x.shape == p_fa.shape
    clip = lambda p: np.clip(p, plots.PROBIT_EPS, 1 - plots.PROBIT_EPS)  # noqa: E731
    np.testing.assert_allclose([NormalDist().cdf(v) for v in x], clip(p_fa), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose([NormalDist().cdf(v) for v in y], clip(p_miss), rtol=1e-9, atol=1e-12)
    eer, _ = equal_error_rate(scores, labels)
    point = next(line for line in ax.get_lines() if line.get_gid() == "eer")
    assert point.get_xdata()[0] == pytest.approx(NormalDist().inv_cdf(eer))
    assert point.get_ydata()[0] == pytest.approx(NormalDist().inv_cdf(eer))
    assert f"EER {100 * eer:.2f}%" in [t.get_text() for t in ax.get_legend().get_texts()]
    ticks = {t.get_text(): v for t, v in zip(ax.get_xticklabels(), ax.get_xticks(), strict=True)}
    assert ticks["10"] == pytest.approx(NormalDist().inv_cdf(0.10))  # percent labels at probit positions


def test_score_histogram_counts_per_class():
    scores, labels = gaussian_scores(301, seed=3)
    fig = plots.score_histogram(scores, labels, bins=20)
    bars = {c.patches[0].get_label(): c for c in fig.axes[0].containers}  # hist labels the first bar
    edges = np.histogram_bin_edges(scores, bins=20)
    for name, mask in (("same speaker", labels == 1), ("different speaker", labels == 0)):
        heights = np.array([patch.get_height() for patch in bars[name]])
        np.testing.assert_array_equal(heights, np.histogram(scores[mask], bins=edges)[0])
        assert heights.sum() == mask.sum()


def test_figures_leave_no_pyplot_state(store, client):
    from matplotlib import pyplot as plt

    figs, rc = plt.get_fignums(), {k: matplotlib.rcParams[k] for k in ("axes.facecolor", "axes.grid", "font.size")}
    scores, labels = gaussian_scores(100)
    plots.det_plot(scores, labels)
    plots.score_histogram(scores, labels)
    record = load_study(client, store.study)
    figures = plots.study_figures(build_optuna_study(record, load_space(record)))
    assert all(plots.figure_png(f).startswith(PNG_MAGIC) for f in figures.values())
    _no_new_pyplot_state(figs, rc)


def test_log_trial_plots_puts_pngs_under_plots(store, client):
    run_id = store.trial_runs[store.best_trial().trial_id]
    names = sorted(f.path for f in client.list_artifacts(run_id, "plots"))
    assert names == ["plots/det.png", "plots/score_histogram.png"]


# ---------------------------------------------------------------- MLflow runs -> optuna.Study

def test_study_rebuilt_from_child_runs(store, client):
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState

    record = load_study(client, store.study)
    assert record.space_file == "demo.yaml" and record.space_yaml
    study = build_optuna_study(record, load_space(record))
    by_id = {t.user_attrs["trial_id"]: t for t in study.trials}
    assert set(by_id) == {t.trial_id for t in store.trials}
    expected_state = {"completed": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}
    for spec in store.trials:
        trial = by_id[spec.trial_id]
        assert trial.state == expected_state[spec.state]
        assert trial.intermediate_values == {i + 1: v for i, v in enumerate(spec.eers)}
        assert trial.value == (min(spec.eers) if spec.state == "completed" else None)
        # resolved loss.mfcon_blocks is derived, not a parameter; a draw with no block trained no MFCon loss, so
        # its sampled weight and temperature were never used (logged as weight 0) and are not in its params
        no_block = not any(v for k, v in spec.sampled.items() if k.startswith("loss.mfcon_blocks.b"))
        expected = {k: v for k, v in spec.sampled.items()
                    if not (no_block and k in ("loss.mfcon_weight", "loss.mfcon_temperature"))}
        assert trial.params == expected
        assert trial.user_attrs["run_id"] == store.trial_runs[spec.trial_id]
    dists = study.trials[0].distributions
    assert dists["loss.mfcon_weight"] == FloatDistribution(0.01, 1.0, log=True)  # from the space YAML
    assert dists["loss.mfcon_blocks.b2"] == CategoricalDistribution([True, False])
    assert study.best_trial.user_attrs["trial_id"] == store.best_trial().trial_id


def test_distributions_inferred_without_the_space(store, client):
    record = load_study(client, store.study)
    study = build_optuna_study(record, space=None)
    dists = study.trials[0].distributions
    assert set(dists) == set(DEMO_TRIALS[0].sampled)
    # a draw with no block trains no MFCon loss and is logged as weight 0: not a sampled weight
    weights = [t.sampled["loss.mfcon_weight"] for t in DEMO_TRIALS
               if any(v for k, v in t.sampled.items() if k.startswith("loss.mfcon_blocks.b"))]
    assert (dists["loss.mfcon_weight"].low, dists["loss.mfcon_weight"].high) == (min(weights), max(weights))
    assert dists["loss.mfcon_weight"].log  # spans more than 10x
    assert plots.slice_params(study) == ["loss.mfcon_weight", "loss.mfcon_temperature", "loss.mfcon_blocks.b1",
                                         "loss.mfcon_blocks.b2", "loss.mfcon_blocks.b3"]


# ---------------------------------------------------------------- study plots on the parent run

def test_log_study_plots_on_parent_run(store, client):
    logged = log_study_plots(store.tracking_uri, store.study)
    assert logged == {name: f"plots/{name}.png" for name in plots.STUDY_PLOTS}
    on_run = sorted(f.path for f in client.list_artifacts(store.parent_run_id, "plots"))
    assert on_run == sorted(logged.values())
    for path in on_run:
        local = client.download_artifacts(store.parent_run_id, path)
        with open(local, "rb") as f:
            assert f.read(8) == PNG_MAGIC


def test_importances_need_two_completed_trials(store, client):
    record = load_study(client, "one-complete")
    figures = plots.study_figures(build_optuna_study(record, load_space(record)))
    texts = [t.get_text() for t in figures["param_importances"].axes[0].texts]
    assert any("needs >= 2 completed trials (have 1)" in t for t in texts)
    assert figures["slice"].axes and figures["optimization_history"].axes[0].collections  # real plots


def test_unknown_study_names_the_store(client, store):
    with pytest.raises(StudyNotFound, match="no-such-study"):
        load_study(client, "no-such-study")


# ---------------------------------------------------------------- report

def test_html_report_is_self_contained(store, tmp_path):
    path = write_report(store.tracking_uri, store.study, tmp_path, fmt="html")
    text = path.read_text()
    assert path == tmp_path / f"{store.study}.html"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files, no images beside it
    for spec in store.trials:
        assert spec.trial_id in text
    best = store.best_trial().trial_id
    assert re.search(rf'<tr class="best"><td>1</td><td>{best}</td>', text)
    ranked = sorted(store.trials, key=lambda t: min(t.eers))
    assert [text.index(f"<td>{t.trial_id}</td>") for t in ranked] == sorted(
        text.index(f"<td>{t.trial_id}</td>") for t in ranked)  # table sorted by eer
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == 5  # 3 study plots + the best trial's DET and histogram
    assert all(base64.b64decode(i).startswith(PNG_MAGIC) for i in images)
    for needle in ("code version", "0" * 64, "demo.yaml", "loss.mfcon_temperature", "Other baseline studies (dev, selection)",
                   "a selection, not a verdict",
                   "baseline-mfcon", f"{16.75 - 19.5:+.2f}"):
        assert needle in text


def test_markdown_report_writes_pngs_beside_it(store, tmp_path):
    path = write_report(store.tracking_uri, store.study, tmp_path, fmt="md")
    text = path.read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(linked) == 5
    assert sorted(linked) == sorted(p.name for p in tmp_path.glob("*.png"))
    assert all((tmp_path / name).read_bytes().startswith(PNG_MAGIC) for name in linked)
    for spec in store.trials:
        assert spec.trial_id in text
    best = store.best_trial().trial_id
    assert f"| **1** | **{best}** |" in text
    assert not list(tmp_path.glob("*.tmp-*"))


def test_report_cli(store, tmp_path, capsys, monkeypatch):
    from mfcon.cli.study import add_commands

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    parser = argparse.ArgumentParser(prog="mfcon")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", "--study", store.study, "--workdir", str(store.workdir),
                              "--out", str(tmp_path), "--format", "md"])
    args.func(args)
    assert str(tmp_path / f"{store.study}.md") in capsys.readouterr().out
    missing = tmp_path / "nowhere"
    args = parser.parse_args(["report", "--study", store.study, "--workdir", str(missing)])
    with pytest.raises(ReportError, match="no MLflow store"):
        args.func(args)
    assert not missing.exists()  # no empty store created as a side effect
    with pytest.raises(ReportError, match="unknown report format"):
        write_report(store.tracking_uri, store.study, tmp_path, fmt="pdf")
