"""End-of-trial work off Tune's event loop (the finisher queue, the callback's resume-safe hand-off) and the
checkpoint policy a trial's rank 0 follows (what it uploads each epoch). Fast: no Ray cluster, no model."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import ray.train
import torch
from mfcon.config import CheckpointConfig, TrainConfig
from mfcon.study.callbacks import MLflowStudyCallback
from mfcon.study.finisher import TrialFinisher
from mfcon.study.spaces import load_search_space
from mfcon.study.worker import RayRunHooks
from mfcon.train.checkpoint import EXPORT_KEYS, full_state_due, load_checkpoint
from pydantic import ValidationError

REPO = Path(__file__).resolve().parent.parent


def test_submit_returns_while_the_work_runs_in_order_on_another_thread():
    release, seen = threading.Event(), []

    def work(job):
        release.wait(5)
        seen.append((job, threading.current_thread().name))

    finisher = TrialFinisher(work)
    started = time.monotonic()
    for job in ("a", "b", "c"):
        finisher.submit(job)
    assert time.monotonic() - started < 0.5 and finisher.pending() == 3
    assert finisher.drain(0.05) == 3  # still blocked: drain says what is left instead of waiting forever
    release.set()
    assert finisher.drain(5) == 0
    assert [job for job, _ in seen] == ["a", "b", "c"]
    assert {name for _, name in seen} == {"mfcon-trial-finisher"}


def test_a_failing_job_is_logged_and_the_next_one_still_runs(caplog):
    done = []

    def work(job):
        if job == "bad":
            raise RuntimeError("unreadable checkpoint")
        done.append(job)

    finisher = TrialFinisher(work)
    for job in ("bad", "good"):
        finisher.submit(job)
    assert finisher.drain(5) == 0
    assert done == ["good"] and (finisher.done, finisher.failed) == (1, 1)
    assert "finishing bad failed" in caplog.text


def test_the_queue_is_bounded_and_inline_mode_runs_in_the_caller():
    release = threading.Event()
    finisher = TrialFinisher(lambda job: release.wait(5), max_pending=1)
    finisher.submit(1)
    time.sleep(0.1)  # the thread took job 1 and waits; the queue has room for one more
    finisher.submit(2)
    blocked = threading.Thread(target=finisher.submit, args=(3,))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # a full queue holds the submitter back instead of growing
    release.set()
    blocked.join(5)
    assert finisher.drain(5) == 0
    inline = []
    TrialFinisher(lambda job: inline.append(threading.current_thread()), background=False).submit("x")
    assert inline == [threading.current_thread()]


class _Trial:
    def __init__(self, trial_id: str, epoch: int):
        self.trial_id, self.last_result, self.config = trial_id, {"epoch": epoch}, {}


def test_the_hook_only_queues_and_a_restored_callback_finishes_what_was_queued(tmp_path, monkeypatch):
    space = load_search_space(REPO / "search_spaces" / "demo.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    callback = MLflowStudyCallback(uri, str(tmp_path), space, {})
    release, finished = threading.Event(), []
    monkeypatch.setattr(MLflowStudyCallback, "_finish_job",
                        lambda self, trial_id: (release.wait(5), finished.append((trial_id, self._finishing))))
    callback.runs  # made at the first trial's start in a study  # noqa: B018
    started = time.monotonic()
    callback.on_trial_complete(0, [], _Trial("t1", epoch=1))
    assert time.monotonic() - started < 1.0  # Tune's loop goes on while the trial is being finished
    state = callback.get_state()
    assert state["finishing"] == {"t1": "pruned"}
    release.set()
    assert callback.drain(5) == 0

    restored = MLflowStudyCallback(uri, str(tmp_path), space, {})  # a new driver after Tuner.restore
    restored.set_state(state)
    restored.on_step_begin(0, [])
    assert restored.drain(5) == 0
    assert [trial for trial, _ in finished] == ["t1", "t1"]
    callback.runs.tracker.spool.close(5)


def test_the_checkpoint_policy_is_validated_and_keeps_the_last_epoch_full():
    assert TrainConfig().checkpoint == CheckpointConfig(full_every=1, best_weights=True)
    with pytest.raises(ValidationError):
        TrainConfig.model_validate({"checkpoint": {"full_every": 0}})
    with pytest.raises(ValidationError, match="extra"):
        TrainConfig.model_validate({"checkpoint": {"every": 2}})
    assert [e for e in range(1, 11) if full_state_due(e, 10, 4)] == [4, 8, 10]
    assert all(full_state_due(e, 5, 1) for e in range(1, 6))


def _state(epoch: int) -> dict:
    return {"epoch": epoch, "model": {"w": torch.full((3,), float(epoch))}, "optimizer": {"m": torch.zeros(6)},
            "model_config": {}, "config": {}, "metrics": {}, "num_classes": 2,
            "eval_scores": torch.zeros(4), "eval_labels": torch.zeros(4, dtype=torch.int64)}


def test_rank_0_uploads_full_states_by_policy_and_the_best_weights_on_each_improvement(tmp_path, monkeypatch):
    reports = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: reports.append(
        (metrics["epoch"], checkpoint is not None)))
    best = tmp_path / "run" / "best_weights.pt"
    hooks = RayRunHooks(0, "dev_eer", CheckpointConfig(full_every=2), epochs=5, best_weights=str(best))
    eers = {1: 9.0, 2: 7.0, 3: 8.0, 4: 7.0, 5: 7.5}  # 4 ties 2: the later epoch wins, as the export's rule
    written = []
    for epoch, eer in eers.items():
        hooks.report({"epoch": epoch, "dev_eer": eer}, _state(epoch))
        written.append(int(load_checkpoint(best)["epoch"]))
    assert reports == [(1, False), (2, True), (3, False), (4, True), (5, True)]
    assert written == [1, 2, 2, 4, 4]
    kept = load_checkpoint(best)
    assert set(kept) == {*EXPORT_KEYS, "eval_scores", "eval_labels"} and "optimizer" not in kept

    reports.clear()
    others = RayRunHooks(1, "dev_eer", CheckpointConfig(full_every=2), epochs=5, best_weights=str(tmp_path / "x"))
    others.report({"epoch": 2, "dev_eer": 1.0}, None)  # rank 1 has no state: it reports, writes nothing
    assert reports == [(2, False)] and not (tmp_path / "x").exists()
