"""One definition of "best": a trial's best epoch, and the score Ray Train keeps checkpoints by.

Every consumer of a study uses these: the searcher's feedback to TPE, ranking
(report, top-K replication, promotion), checkpoint retention and export, and
the rebuilt Optuna study. Every selectable metric is a dev-list error rate, so
lower is better, and ties go to the *later* epoch (the longer-trained model);
Ray Train's checkpoint retention is given :func:`checkpoint_rank`, which breaks
ties the same way, so the checkpoint an export looks for is the one kept.

>>> best_epoch({1: 5.0, 2: 4.0, 3: 4.0})
3
>>> best_value({1: 5.0, 2: float("nan")})
5.0
"""

from __future__ import annotations

import math
from typing import Mapping

TIE_STEP = 1e-9  # far below any difference of two EERs or minDCFs on a real trial list


def _finite(history: Mapping[int, float]) -> dict[int, float]:
    return {int(e): float(v) for e, v in history.items() if v is not None and math.isfinite(v)}


def best_epoch(history: Mapping[int, float]) -> int | None:
    """The epoch with the lowest finite value; ties go to the later epoch. None when nothing was evaluated."""
    finite = _finite(history)
    return min(finite, key=lambda e: (finite[e], -e)) if finite else None


def best_value(history: Mapping[int, float]) -> float | None:
    """The metric at :func:`best_epoch` (its lowest finite value), or None."""
    epoch = best_epoch(history)
    return None if epoch is None else float(history[epoch])


def checkpoint_rank(value: float, epoch: int) -> float:
    """What Ray Train keeps checkpoints by (lowest first): the metric, ties broken toward the later epoch."""
    return float(value) - TIE_STEP * int(epoch)
