"""End-of-trial work off Tune's event loop: a bounded queue drained by one background thread.

Tune calls its callbacks on the thread that schedules every trial, and ASHA
stops many trials at once (a rung fills, then most of it is cut). Finishing a
trial means reading its best weights from the bucket (a full training state of
~0.25 GB for the paper preset when the trial wrote no exported weights), loading
them with torch and spooling the run's last writes: seconds per trial, so done
inline a burst of stopped trials stalls scheduling for as long as all of them
take. The study callback's hooks only :meth:`TrialFinisher.submit` the work.

The queue is bounded (``max_pending``): should finishing fall that far behind,
a submit waits for a free slot instead of letting the backlog (and the driver's
memory) grow without end. :meth:`drain` waits for everything submitted; the
study callback drains at the end of the experiment, so every trial's run is
spooled before ``Tuner.fit`` returns. What was submitted but not finished when
the driver died is callback state, submitted again after ``Tuner.restore``.

>>> done = []
>>> finisher = TrialFinisher(done.append)
>>> finisher.submit("trial_1")
>>> finisher.drain(5.0)
0
>>> done
['trial_1']
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

MAX_PENDING = 256  # trials waiting to be finished; more than a study's concurrent trials ever end at once


class TrialFinisher:
    """Runs ``work(job)`` for every submitted job, in order, on one daemon thread; ``background=False`` runs
    it inline in :meth:`submit` (what the study did before: the benchmark's "before")."""

    def __init__(self, work: Callable[[Any], None], max_pending: int = MAX_PENDING, background: bool = True):
        self.work, self.background = work, background
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.done = 0
        self.failed = 0

    def submit(self, job: Any) -> None:
        """Queue ``job``; returns at once unless ``max_pending`` jobs are already waiting."""
        if not self.background:
            self._run(job)
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, daemon=True, name="mfcon-trial-finisher")
                self._thread.start()
        self._queue.put(job)

    def pending(self) -> int:
        """Jobs submitted and not yet finished (the one in progress included)."""
        return self._queue.unfinished_tasks

    def drain(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for every submitted job; returns how many are left."""
        deadline = time.monotonic() + timeout_s
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks and time.monotonic() < deadline:
                self._queue.all_tasks_done.wait(min(1.0, max(0.0, deadline - time.monotonic())))
            return self._queue.unfinished_tasks

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                self._run(job)
            finally:
                self._queue.task_done()

    def _run(self, job: Any) -> None:
        try:
            self.work(job)
            self.done += 1
        except Exception:  # noqa: BLE001 - one trial's failure must not stop the others' finishing
            self.failed += 1
            log.exception("tracking: finishing %s failed; the study goes on", job)
