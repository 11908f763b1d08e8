"""Figures of a trial (DET curve, score histogram) and of a study (Optuna's history, importances, slices).

Pure functions: scores and labels, or an ``optuna.Study``, in; a ``matplotlib.figure.Figure``
drawn on an Agg canvas out. Nothing here reads or writes MLflow: the study is rebuilt
in ``mfcon.study.optuna_rebuild`` and the figures are logged by ``mfcon.study.plot_logging``.
Trial figures never touch ``pyplot``. Optuna's matplotlib plots do (``plt.subplots``
and a global ``plt.style.use("ggplot")``), so they run inside ``rc_context`` and their
figures are closed in pyplot before being returned: nothing is left open and no
rcParams change leaks to the caller.

>>> from mfcon.plots import det_plot
>>> fig = det_plot([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
import warnings
from statistics import NormalDist
from typing import Any, Callable, Iterator

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mfcon.evaluation.metrics import det_curve, equal_error_rate

TRIAL_PLOTS = ("det", "score_histogram")
STUDY_PLOTS = ("optimization_history", "param_importances", "slice")
METRIC_LABEL = "dev eer (%)"  # the study's objective, as its axes (and the rebuilt study's metric name) say it
SLICE_KEYS = ("loss.mfcon_weight", "loss.mfcon_temperature")  # lambda, tau; block selection added per study
BLOCKS_KEY = "loss.mfcon_blocks"
DET_TICKS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 0.9, 0.95, 0.99)
PROBIT_EPS = 1e-6  # rates 0 and 1 have infinite normal deviates; clipped to this

_NORMAL = NormalDist()


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


# ---------------------------------------------------------------- study plots (pure)

@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna's INFO lines (one per trial added or plotted) silenced; shared with the study rebuild."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


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

    with matplotlib.rc_context(), warnings.catch_warnings(), quiet_optuna():
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


def replication_plot(verdicts, baseline: str = "baseline") -> Figure:
    """Test EER of every replica (dots, one per seed) and each configuration's mean, with the CI of its
    difference to the baseline drawn around the baseline mean shifted by the estimate (gid ``"delta"``)."""
    fig = _new_figure(6.5, 4.0)
    ax = fig.add_subplot()
    labels = list(verdicts)
    base_mean = verdicts[baseline].eer_mean if baseline in verdicts else None
    for x, label in enumerate(labels):
        v = verdicts[label]
        ax.plot([x] * len(v.test_eer), v.test_eer, "o", color="0.55", ms=5, gid="seeds")
        ax.plot([x - 0.2, x + 0.2], [v.eer_mean] * 2, color="C0", lw=2.5, gid="mean")
        if v.delta is not None and base_mean is not None:
            ax.errorbar([x + 0.28], [base_mean + v.delta.estimate],
                        yerr=[[v.delta.estimate - v.delta.low], [v.delta.high - v.delta.estimate]],
                        fmt="s", color="C3", capsize=4, ms=4, gid="delta")
    if base_mean is not None:
        ax.axhline(base_mean, color="0.7", ls="--", lw=0.8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("test EER (%)")
    ax.set_title("Replication: test EER per seed, mean (blue), baseline + difference CI (red)", fontsize="medium")
    ax.grid(True, axis="y", color="0.92")
    return fig
