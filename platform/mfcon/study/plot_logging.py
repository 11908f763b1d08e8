"""A study's figures into MLflow: PNG artifacts under ``plots/`` on trial and study runs.

The MLflow edge of ``mfcon.plots``, which only draws. The study calls
``log_trial_plots`` when a trial ends (``study/callbacks.py``) and
``log_study_plots`` when the study ends (``study/runner.py``); see
docs/ARCHITECTURE.md, "Study outputs".
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from matplotlib.figure import Figure

from mfcon.plots import det_plot, figure_png, score_histogram, study_figures
from mfcon.study.optuna_rebuild import build_optuna_study, load_space
from mfcon.tracking.records import load_study
from mfcon.tracking.store import PLOTS_DIR


def log_figures(client, run_id: str, figures: dict[str, Figure]) -> dict[str, str]:
    """Each figure as ``plots/<name>.png`` on the run; returns name -> artifact path."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, fig in figures.items():
            (Path(tmp) / f"{name}.png").write_bytes(figure_png(fig))
        client.log_artifacts(run_id, tmp, artifact_path=PLOTS_DIR)
    return {name: f"{PLOTS_DIR}/{name}.png" for name in figures}


def log_trial_plots(client, run_id: str, scores, labels) -> dict[str, str]:
    """Hook the study calls when a trial ends: ``plots/det.png`` and ``plots/score_histogram.png``."""
    figures = {"det": det_plot(scores, labels), "score_histogram": score_histogram(scores, labels)}
    return log_figures(client, run_id, figures)


def log_study_plots(tracking_uri: str, study_name: str) -> dict[str, str]:
    """Optimization history, parameter importances and slices of a study, logged on its parent run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    record = load_study(client, study_name)
    study = build_optuna_study(record, load_space(record))
    return log_figures(client, record.parent_run_id, study_figures(study))
