"""A trial's start-up, stage by stage, counted from Tune's request."""

from __future__ import annotations

import pytest

from mfcon.study.callbacks import with_request_time
from mfcon.train.loop import startup_metrics


def test_stages_are_the_gaps_between_consecutive_marks():
    m = startup_metrics(100.0, {"workers": 104.0, "setup": 105.5, "first_batch": 106.0})
    assert m["startup_seconds"] == 6.0 and m["startup_started_at"] == 100.0
    assert (m["startup_workers_seconds"], m["startup_setup_seconds"], m["startup_first_batch_seconds"]) == (
        4.0, 1.5, 0.5)


def test_the_driver_adds_the_wait_from_tunes_request():
    result = {"epoch": 1, **startup_metrics(100.0, {"workers": 104.0, "first_batch": 106.0})}
    extended = with_request_time(result, requested_at=97.5)
    assert extended["startup_request_seconds"] == 2.5 and extended["startup_seconds"] == pytest.approx(8.5)
    assert result["startup_seconds"] == 6.0  # the result Tune holds is not changed


@pytest.mark.parametrize("result, requested_at", [
    ({"epoch": 2, "train_seconds": 1.0}, 97.5),  # later epochs carry no start-up
    ({"epoch": 1, "startup_seconds": 6.0, "startup_started_at": 100.0}, None),  # restored: no request seen
])
def test_results_without_both_ends_are_left_alone(result, requested_at):
    assert with_request_time(result, requested_at) is result
