"""The ranked trial table a finished study prints: what a person reads before opening the MLflow UI.

One row per trial, best first by the study's metric (the rule of ``mfcon.evaluation.selection``: the
lowest value over a trial's epochs), failed trials last. Its columns are the questions a study
answers: the MFCon weight (lambda), its temperature (tau) and the blocks it is applied to; the
lambda = 0 baseline trials are marked, so the searched trials read against them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LAMBDA, TAU, BLOCKS = "loss.mfcon_weight", "loss.mfcon_temperature", "loss.mfcon_blocks"


@dataclass(frozen=True)
class TrialRow:
    trial: str
    state: str  # completed | pruned | failed
    epochs: int  # epochs it trained
    value: float | None  # its best value of the study's metric (None: failed, or no epoch)
    params: dict[str, Any]  # trial_params(): sampled and effective settings
    baseline: bool = False
    seed: int | None = None


def ranked(rows: list[TrialRow]) -> list[TrialRow]:
    """Best first; trials without a value (failed) last; ties by trial id, so the order is stable."""
    return sorted(rows, key=lambda r: (r.value is None, r.value if r.value is not None else 0.0, r.trial))


def _number(value: Any, fmt: str) -> str:
    try:
        return format(float(value), fmt)
    except (TypeError, ValueError):
        return "-"


def _name(trial: str) -> str:
    """A trial id as Tune prints it; a failed trial with no result is known by its folder: its last part."""
    name = trial.rstrip("/").rsplit("/", 1)[-1]
    return name if len(name) <= 24 else name[:21] + "..."


def trial_table(rows: list[TrialRow], metric: str, limit: int = 10) -> list[str]:
    """The table's lines: a header, the best ``limit`` rows, then one line saying how many are not shown.

    >>> rows = [TrialRow("a", "completed", 2, 7.5, {LAMBDA: 0.1, TAU: 0.2, BLOCKS: "1,2"}),
    ...         TrialRow("b", "completed", 2, 8.0, {LAMBDA: 0.0, BLOCKS: "none"}, baseline=True, seed=0)]
    >>> print("\\n".join(trial_table(rows, "dev_eer")))
    rank  trial  state      epochs  dev_eer    lambda    tau  blocks
       1  a      completed       2    7.50%    0.1000  0.200  1,2
       2  b      completed       2    8.00%    0.0000      -  none  (baseline, seed 0)
    """
    unit = "%" if metric.endswith("eer") else ""
    width = max([5, *(len(_name(r.trial)) for r in rows)])
    lines = [f"rank  {'trial':<{width}}  {'state':<9}  epochs  {metric:>7}  {'lambda':>8}  {'tau':>5}  blocks"]
    order = ranked(rows)
    for rank, r in enumerate(order[:limit], 1):
        value = f"{r.value:.2f}{unit}" if r.value is not None else "-"
        note = f"  (baseline, seed {r.seed})" if r.baseline and r.seed is not None else "  (baseline)" if r.baseline else ""
        lines.append(f"{rank:>4}  {_name(r.trial):<{width}}  {r.state:<9}  {r.epochs:>6}  {value:>7}  "
                     f"{_number(r.params.get(LAMBDA), '.4f'):>8}  {_number(r.params.get(TAU), '.3f'):>5}  "
                     f"{r.params.get(BLOCKS, '-')}{note}")
    if len(order) > limit:
        lines.append(f"      ... {len(order) - limit} more: mfcon report --study <name>, or the MLflow UI")
    return lines
