"""Plots of a trial (DET curve, score histogram) and of a study (Optuna's history, importances, slices).

Pure functions return ``matplotlib.figure.Figure`` objects drawn on an Agg canvas; the
``log_*`` functions at the bottom are the MLflow edge (PNG artifacts under ``plots/``).
Trial figures never touch ``pyplot``. Optuna's matplotlib plots do (``plt.subplots``
and a global ``plt.style.use("ggplot")``), so they run inside ``rc_context`` and their
figures are closed in pyplot before being returned: nothing is left open and no
rcParams change leaks to the caller.

A study's ``optuna.Study`` is rebuilt from its MLflow child runs (see
docs/ARCHITECTURE.md, "Study outputs"): each run's best ``eer`` is the trial value,
per-epoch ``eer`` the intermediate values, ``mfcon.trial_state`` the state.

>>> from mfcon.plots import det_plot
>>> fig = det_plot([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Callable, Iterator

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mfcon.metrics import det_curve, equal_error_rate

PLOTS_DIR = "plots"  # artifact folder on trial and study runs
TRIAL_PLOTS = ("det", "score_histogram")
STUDY_PLOTS = ("optimization_history", "param_importances", "slice")
SLICE_KEYS = ("loss.mfcon_weight", "loss.mfcon_temperature")  # lambda, tau; block selection added per study
BLOCKS_KEY = "loss.mfcon_blocks"
DET_TICKS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 0.9, 0.95, 0.99)
PROBIT_EPS = 1e-6  # rates 0 and 1 have infinite normal deviates; clipped to this

_NORMAL = NormalDist()
logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- trial plots (pure)

def probit(p) -> np.ndarray:
    """Normal deviate of each rate, the DET axis transform (Martin et al. 1997), rates clipped to (0, 1)."""
    p = np.clip(np.asarray(p, dtype=np.float64), PROBIT_EPS, 1.0 - PROBIT_EPS)
    return np.array([_NORMAL.inv_cdf(float(x)) for x in p.ravel()]).reshape(p.shape)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _det_range(p_fa: np.ndarray, p_miss: np.ndarray, eer: float) -> tuple[float, float]:
    """Axis range in rates: down to the smallest non-zero rate (>= 0.1%), up to 50% or more for bad systems."""
    positive = np.concatenate([p_fa[p_fa > 0], p_miss[p_miss > 0]])
    smallest = float(np.clip(positive.min() if positive.size else 0.001, 0.001, 0.05))
    lo = max(t for t in DET_TICKS if t <= smallest)
    hi = 0.5 if eer < 0.3 else (0.8 if eer < 0.45 else 0.99)
    return lo, hi


def det_plot(scores, labels, title: str = "DET curve") -> Figure:
    """DET curve (miss vs false-alarm rate on normal-deviate axes) with the EER point marked.

    The line (gid ``"det"``) holds ``probit`` of every operating point of ``metrics.det_curve``.
    """
    p_fa, p_miss, _ = det_curve(scores, labels)
    eer, _ = equal_error_rate(scores, labels)
    fig = _new_figure(5.5, 5.0)
    ax = fig.add_subplot()
    ax.plot(probit(p_fa), probit(p_miss), color="C0", lw=1.8, label="DET", gid="det")
    lo, hi = _det_range(p_fa, p_miss, eer)
    ends = probit([lo, hi])
    ax.plot(ends, ends, color="0.6", lw=0.8, ls="--", label="P_fa = P_miss")
    ax.plot([probit(eer)], [probit(eer)], "o", color="C3", ms=7, gid="eer",
            label=f"EER {100 * eer:.2f}%")
    ticks = [t for t in DET_TICKS if lo <= t <= hi]
    labels_ = [f"{100 * t:g}" for t in ticks]
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_ticks(probit(ticks), labels_)
    ax.set_xlim(*ends)
    ax.set_ylim(*ends)
    ax.set_xlabel("false-alarm rate (%)")
    ax.set_ylabel("miss rate (%)")
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.grid(True, color="0.9")
    ax.legend(loc="upper right", fontsize="small")
    return fig


def score_histogram(scores, labels, bins: int | None = None, title: str = "Trial scores") -> Figure:
    """Counts of same-speaker (label 1) and different-speaker (label 0) scores on shared bins, EER threshold marked.

    The first bar of each of the two bar containers is labelled ``"same speaker"`` or ``"different speaker"``.
    """
    s = np.asarray(scores, dtype=np.float64)
    lab = np.asarray(labels).astype(bool)
    eer, threshold = equal_error_rate(s, lab)
    edges = np.histogram_bin_edges(s, bins=bins or min(60, max(10, int(math.sqrt(s.size)))))
    fig = _new_figure(6.5, 4.0)
    ax = fig.add_subplot()
    ax.hist(s[~lab], bins=edges, color="C3", alpha=0.55, label="different speaker")
    ax.hist(s[lab], bins=edges, color="C2", alpha=0.55, label="same speaker")
    ax.axvline(threshold, color="0.2", ls="--", lw=1, label=f"EER threshold {threshold:.3f}")
    ax.set_xlabel("score")
    ax.set_ylabel("trials")
    ax.set_title(f"{title} ({int(lab.sum())} same, {int((~lab).sum())} different; EER {100 * eer:.2f}%)",
                 fontsize="medium")
    ax.legend(fontsize="small")
    return fig


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


# ---------------------------------------------------------------- MLflow runs -> records

@dataclass(frozen=True)
class TrialRecord:
    """One child run of a study, as the report and the Optuna rebuild need it."""

    trial_id: str
    run_id: str
    run_name: str
    state: str  # completed | pruned | failed | running
    params: dict[str, str]
    eer: dict[int, float]  # epoch -> eer (percent)
    min_dcf: dict[int, float]  # epoch -> min_dcf
    epochs_run: int
    start_time: int  # ms

    @property
    def best_epoch(self) -> int | None:
        return min(self.eer, key=lambda e: (self.eer[e], e)) if self.eer else None

    @property
    def best_eer(self) -> float | None:
        return self.eer[self.best_epoch] if self.eer else None

    @property
    def best_min_dcf(self) -> float | None:
        """min_dcf at the epoch of the best eer (the epoch whose checkpoint the trial keeps)."""
        return self.min_dcf.get(self.best_epoch) if self.eer else None


@dataclass(frozen=True)
class StudyRecord:
    name: str
    experiment_id: str
    parent_run_id: str
    tags: dict[str, str]
    space_yaml: str | None
    space_file: str | None
    trials: list[TrialRecord] = field(default_factory=list)

    def ranked(self) -> list[TrialRecord]:
        """Trials by best eer (those without one last), ties by trial id."""
        return sorted(self.trials, key=lambda t: (t.best_eer is None, t.best_eer or 0.0, t.trial_id))

    @property
    def best(self) -> TrialRecord | None:
        ranked = [t for t in self.ranked() if t.best_eer is not None and t.state != "failed"]
        return ranked[0] if ranked else None

    def states(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.state] = out.get(t.state, 0) + 1
        return out


class StudyNotFound(ValueError):
    """No MLflow experiment (or no study run) of that name in the tracking store."""


def _history(client, run_id: str, key: str) -> dict[int, float]:
    return {int(m.step): float(m.value) for m in client.get_metric_history(run_id, key) if math.isfinite(m.value)}


def _trial_record(client, run) -> TrialRecord:
    from mfcon.tracking import STATE_TAG, TRIAL_TAG

    run_id = run.info.run_id
    eer, dcf = _history(client, run_id, "eer"), _history(client, run_id, "min_dcf")
    epochs = max([*eer, *_history(client, run_id, "train_loss"), 0])
    return TrialRecord(trial_id=run.data.tags.get(TRIAL_TAG, run.info.run_name or run_id),
                       run_id=run_id, run_name=run.info.run_name or "", state=run.data.tags.get(STATE_TAG, "running"),
                       params=dict(run.data.params), eer=eer, min_dcf=dcf, epochs_run=epochs,
                       start_time=int(run.info.start_time or 0))


def _space_artifact(client, run_id: str) -> tuple[str | None, str | None]:
    """(YAML text, file name) of the study's ``search_space/`` artifact, if it has one."""
    try:
        files = [f.path for f in client.list_artifacts(run_id, "search_space") if f.path.endswith((".yaml", ".yml"))]
        if not files:
            return None, None
        from mfcon.tracking import no_artifact_progress_bars

        with tempfile.TemporaryDirectory() as tmp, no_artifact_progress_bars():
            local = client.download_artifacts(run_id, files[0], tmp)
            return Path(local).read_text(), Path(files[0]).name
    except Exception as e:  # an unreadable artifact store must not stop a report
        logger.warning("cannot read search_space/ of run %s: %s", run_id, e)
        return None, None


def load_study(client, study_name: str) -> StudyRecord:
    """The parent run and every trial run of a study, trials in start order."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from mfcon.tracking import ROLE_TAG, STUDY_TAG, find_runs

    exp = client.get_experiment_by_name(study_name)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments(max_results=50))
        raise StudyNotFound(f"no study {study_name!r} in the tracking store; experiments there: {names}")
    parents = find_runs(client, exp.experiment_id, **{STUDY_TAG: study_name, ROLE_TAG: "study"})
    if not parents:
        raise StudyNotFound(f"experiment {study_name!r} has no study run (tag {ROLE_TAG}=study): not an mfcon study")
    parent = parents[0]
    children = find_runs(client, exp.experiment_id, **{MLFLOW_PARENT_RUN_ID: parent.info.run_id})
    trials = sorted((_trial_record(client, r) for r in children), key=lambda t: (t.start_time, t.trial_id))
    space_yaml, space_file = _space_artifact(client, parent.info.run_id)
    return StudyRecord(study_name, exp.experiment_id, parent.info.run_id, dict(parent.data.tags),
                       space_yaml, space_file, trials)


# ---------------------------------------------------------------- records -> optuna.Study

def _derived_keys(keys) -> set[str]:
    """Resolved ``loss.mfcon_blocks`` is derived when per-block booleans ``loss.mfcon_blocks.bN`` exist."""
    keys = set(keys)
    return {k for k in keys if any(o.startswith(k + ".b") and o[len(k) + 2:].isdigit() for o in keys)}


def _parse(value: str, dist) -> Any:
    """MLflow param string -> value of ``dist``; ValueError if it does not belong to it."""
    import optuna.distributions as od

    if isinstance(dist, od.CategoricalDistribution):
        for choice in dist.choices:
            if str(choice) == value:
                return choice
        raise ValueError(value)
    parsed = int(value) if isinstance(dist, od.IntDistribution) else float(value)
    if not dist._contains(dist.to_internal_repr(parsed)):
        raise ValueError(value)
    return parsed


def infer_distribution(values: list[str]):
    """A distribution covering logged param strings: bool, int, float (log when it spans >= 10x) or categorical."""
    import optuna.distributions as od

    if set(values) <= {"True", "False"}:
        return od.CategoricalDistribution([True, False])
    for kind in (int, float):
        try:
            nums = [kind(v) for v in values]
        except ValueError:
            continue
        lo, hi = min(nums), max(nums)
        if kind is int:
            return od.IntDistribution(lo, hi)
        return od.FloatDistribution(lo, hi, log=bool(lo > 0 and hi >= 10 * lo))
    return od.CategoricalDistribution(sorted(set(values)))


def study_distributions(record: StudyRecord, space=None) -> dict[str, Any]:
    """Distributions of the sampled params: the space's where every logged value fits, inferred otherwise."""
    from mfcon.study.spaces import optuna_distributions

    logged: dict[str, list[str]] = {}
    for trial in record.trials:
        for key, value in trial.params.items():
            logged.setdefault(key, []).append(value)
    declared = optuna_distributions(space) if space is not None else {}
    keys = [k for k in declared if k in logged] if declared else [k for k in logged if k not in _derived_keys(logged)]
    dists = {}
    for key in sorted(keys):
        dist = declared.get(key)
        try:
            for value in logged[key] if dist is not None else ():
                _parse(value, dist)
        except ValueError:
            dist = None  # the space changed since these trials ran
        dists[key] = dist if dist is not None else infer_distribution(logged[key])
    return dists


def load_space(record: StudyRecord):
    """The study's SearchSpace from its ``search_space/`` artifact, or None when missing or invalid."""
    if record.space_yaml is None:
        return None
    from mfcon.study.spaces import SearchSpaceError, load_search_space

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / (record.space_file or "space.yaml")
        path.write_text(record.space_yaml)
        try:
            return load_search_space(path)
        except SearchSpaceError as e:
            logger.warning("search space of study %s does not load (%s); inferring distributions", record.name, e)
            return None


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


METRIC_LABEL = "eer (%)"


def build_optuna_study(record: StudyRecord, space=None, metric_name: str = METRIC_LABEL):
    """An in-memory ``optuna.Study`` with one trial per run: COMPLETE (best eer), PRUNED, FAIL or RUNNING."""
    import optuna
    from optuna.trial import TrialState, create_trial

    dists = study_distributions(record, space)
    states = {"completed": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}
    with _quiet_optuna():
        study = optuna.create_study(study_name=record.name, direction="minimize")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([metric_name])
        for t in record.trials:
            state = states.get(t.state, TrialState.RUNNING)
            if state == TrialState.COMPLETE and t.best_eer is None:
                state = TrialState.FAIL  # finished without ever being evaluated
            params = {k: _parse(t.params[k], d) for k, d in dists.items() if k in t.params}
            study.add_trial(create_trial(
                state=state, value=t.best_eer if state == TrialState.COMPLETE else None, params=params,
                distributions={k: dists[k] for k in params}, intermediate_values=dict(t.eer),
                user_attrs={"trial_id": t.trial_id, "run_id": t.run_id}))
    return study


# ---------------------------------------------------------------- study plots (pure)

def _placeholder(title: str, message: str) -> Figure:
    fig = _new_figure(6.4, 3.0)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title, loc="left")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize="large", color="0.35", transform=ax.transAxes)
    return fig


def _optuna_mpl():
    """``optuna.visualization.matplotlib``, which imports pyplot: pick Agg first unless the host already chose."""
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # pyplot not loaded yet, so no figure is open to be closed by the switch
    import optuna.visualization.matplotlib as mpl

    return mpl


def _from_optuna(plot: Callable[..., Any], study, **kwargs) -> Figure:
    """Run an ``optuna.visualization.matplotlib`` function without leaking pyplot state; return its Figure."""
    import optuna
    from matplotlib import pyplot as plt

    with matplotlib.rc_context(), warnings.catch_warnings(), _quiet_optuna():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)  # singular xlims of one-valued params, empty legends
        out = plot(study, **kwargs)
        fig = np.ravel(out)[0].figure if isinstance(out, np.ndarray) else out.figure
        plt.close(fig)
    FigureCanvasAgg(fig)  # detach from pyplot's canvas
    return fig


def _completed(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def optimization_history(study) -> Figure:
    if _completed(study) == 0:
        return _placeholder("Optimization History Plot", "no completed trials yet")
    return _from_optuna(_optuna_mpl().plot_optimization_history, study, target_name=METRIC_LABEL)


def param_importances(study) -> Figure:
    """Importances need >= 2 completed trials and a parameter that varies; a placeholder says so otherwise."""
    n = _completed(study)
    if n < 2:
        return _placeholder("Hyperparameter Importances", f"needs >= 2 completed trials (have {n})")
    try:
        return _from_optuna(_optuna_mpl().plot_param_importances, study, target_name=METRIC_LABEL)
    except (RuntimeError, ValueError) as e:
        return _placeholder("Hyperparameter Importances", f"not computable: {e}")


def slice_params(study) -> list[str]:
    """lambda (``loss.mfcon_weight``), tau (``loss.mfcon_temperature``) and the block selection, where sampled."""
    names = {k for t in study.get_trials(deepcopy=False) for k in t.distributions}
    blocks = sorted((k for k in names if k.startswith(BLOCKS_KEY + ".b") and k[len(BLOCKS_KEY) + 2:].isdigit()),
                    key=lambda k: int(k[len(BLOCKS_KEY) + 2:]))
    chosen = [k for k in SLICE_KEYS if k in names] + (blocks or ([BLOCKS_KEY] if BLOCKS_KEY in names else []))
    return chosen or sorted(names)


def slice_plot(study, params: list[str] | None = None) -> Figure:
    params = params or slice_params(study)
    if _completed(study) == 0 or not params:
        return _placeholder("Slice Plot", "no completed trials yet" if params else "no sampled parameters")
    return _from_optuna(_optuna_mpl().plot_slice, study, params=params, target_name=METRIC_LABEL)


def study_figures(study) -> dict[str, Figure]:
    return {"optimization_history": optimization_history(study), "param_importances": param_importances(study),
            "slice": slice_plot(study)}


# ---------------------------------------------------------------- MLflow edge

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
