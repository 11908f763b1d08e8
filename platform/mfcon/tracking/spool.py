"""The durable tracking spool: every MLflow write of a study goes to a local file first, then to the server.

Why: Tune does not guard callbacks. A slow call in ``on_trial_result`` blocks its
event loop (the MLflow client retried a stopped server for 247 s, and no trial
made progress), and an exception stops every trial. So the study's writers never
talk to MLflow themselves: a write is appended to the spool (one JSON line,
fsynced) and the call returns; a background thread replays the spool in order
through :class:`mfcon.tracking.replay.Replayer`, retrying with backoff while the
server is away. Replay is idempotent, so a spool left behind by an outage or a
crash is replayed later, by the next session of the study or by
``mfcon sync``, and nothing arrives twice.

This module is the spool itself (appending, waiting, opening and closing, one
per file in a process); the file format is in ``spool_file``, the copies of
uploads in ``spool_uploads``, the writer thread in ``spool_writer``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mfcon.tracking.replay import Replayer
from mfcon.tracking.spool_file import (
    FORMAT_VERSION,
    START_OPS,
    public_uri,
    read_lines,
    spool_dir,
    store_name,
    take_lock,
    write_line,
)
from mfcon.tracking.spool_uploads import Uploads
from mfcon.tracking.spool_writer import SpoolWriter

log = logging.getLogger(__name__)

JOIN_S = 60.0  # how long close() lets a write in flight finish (the client's own timeout bounds it)


class TrackingWriteError(RuntimeError):
    """The tracking server refused a write (not an outage: it answered, and said no)."""


@dataclass(frozen=True)
class PendingWrites:
    """What a closed spool still holds: writes the tracking server has not taken yet."""

    count: int
    spool_file: Path
    tracking_uri: str
    sync_command: str

    def __bool__(self) -> bool:
        return self.count > 0

    def message(self) -> str:
        return (f"{self.count} tracking writes did not reach {self.tracking_uri}; they are kept in {self.spool_file}. "
                f"Replay them when it answers: {self.sync_command}")


class Spool(SpoolWriter):
    """One spool file and its writer thread; shared by every tracker of the study in this process."""

    def __init__(self, path: Path, tracking_uri: str, study: str, workdir: str):
        self.path, self.tracking_uri, self.study, self.workdir = path, tracking_uri, study, workdir
        self.public_uri = public_uri(tracking_uri)  # what the file and messages show
        self.files_dir = path.with_suffix(".files")
        self.uploads = Uploads(self.files_dir)
        self._lock_path = path.with_suffix(".lock")
        self._cond = threading.Condition(threading.Lock())  # not re-entrant: released around a join in _reopen
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._thread: threading.Thread | None = None
        self._generation = 0
        self._stopping = False
        self._size = 0
        self._next_seq = 1
        self._unacked: set[int] = set()
        self._refused: dict[int, str] = {}
        self._open_runs: dict[str, int] = {}  # run key -> seq of its start, for runs never terminated
        self._started: set[str] = set()  # run keys this spool ever started
        self._outage_since: float | None = None
        self.replayer: Replayer | None = None
        self.pending_at_open = 0  # counts since the spool was last opened (what `mfcon sync` reports)
        self.replayed = 0
        self.refused = 0

    # ------------------------------------------------------------------ opening and closing

    def ensure_open(self) -> None:
        with self._cond:
            self._reopen()

    def _reopen(self) -> None:
        """Open if closed (called holding the lock). A writer from before a close finishes its call in flight
        first, outside the lock (it needs the lock to record it): never two writers on one file."""
        while self._fd is None:
            old = self._thread
            if old is not None and old.is_alive() and old is not threading.current_thread():
                self._cond.release()
                try:
                    old.join()
                finally:
                    self._cond.acquire()
                continue
            self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = take_lock(self._lock_path)
        try:
            resolved = self._scan()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if self._size == 0:
                header = {"spool": FORMAT_VERSION, "tracking_uri": self.public_uri, "study": self.study,
                          "workdir": self.workdir}
                self._size = write_line(self._fd, header, self._size, sync=True)
            self.replayer = Replayer(self.tracking_uri, self.study, self.files_dir)
            self.replayer.remember(resolved)
            self.pending_at_open, self.replayed, self.refused = len(self._unacked), 0, 0
        except BaseException:
            self._release()
            raise
        self._stopping, self._generation = False, self._generation + 1
        self._thread = threading.Thread(target=self._writer, args=(self._generation,), daemon=True,
                                        name=f"mfcon-tracking-{self.study}")
        self._thread.start()

    def _scan(self) -> dict[str, tuple[str, str | None]]:
        """Read the file once: next seq, unacked entries, runs left open, runs already resolved."""
        entries: set[int] = set()
        acked: set[int] = set()
        resolved: dict[str, tuple[str, str | None]] = {}
        good = 0
        if self.path.exists():
            with open(self.path, "rb") as f:
                for raw in f:
                    if not raw.endswith(b"\n"):
                        break  # a line torn by a crash mid-write: never acknowledged to its writer
                    good += len(raw)
                    try:
                        rec = json.loads(raw)
                    except json.JSONDecodeError:
                        log.warning("%s: skipping an unreadable line at byte %d", self.path, good - len(raw))
                        continue
                    if "seq" in rec:
                        entries.add(rec["seq"])
                        if rec["op"] in START_OPS:
                            self._open_runs[rec["run"]] = rec["seq"]
                            self._started.add(rec["run"])
                        elif rec["op"] == "terminate":
                            self._open_runs.pop(rec["run"], None)
                    elif "ack" in rec:
                        acked.add(rec["ack"])
                        if "error" in rec:
                            self._refused[rec["ack"]] = rec["error"]
                        if "run_id" in rec:
                            resolved[rec["run"]] = (rec["run_id"], rec.get("experiment_id"))
            if good < self.path.stat().st_size:
                os.truncate(self.path, good)
        self._size = good
        self._next_seq = max(entries, default=0) + 1
        self._unacked = entries - acked
        self.uploads.drop_done(lambda seq: seq not in self._unacked)
        return resolved

    def close(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for the server to take what is pending, stop the writer, unlock the file.

        Returns how many writes are still pending (they stay in the file for the next session or ``mfcon sync``).
        A later write reopens the spool.
        """
        self.flush(timeout_s, give_up_in_outage=False)
        with self._cond:
            if self._fd is None:
                return len(self._unacked)
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_S)
        with self._cond:
            pending = len(self._unacked)
            self._release()
        return pending

    def _release(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)  # closing the lock file drops the flock
        self._fd = self._lock_fd = None

    def pending_writes(self) -> PendingWrites:
        return PendingWrites(self.pending(), self.path, self.public_uri,
                             f"mfcon sync --workdir {self.workdir} --name {self.study}")

    # ------------------------------------------------------------------ writing

    def append(self, op: str, run: str, file: Path | tuple[str, bytes] | None = None, **payload: Any) -> int:
        """Record one write durably and return its sequence number; the server sees it later, in order.

        ``file``: a file to upload (copied into the spool first, so it outlives its temporary folder), or
        ``(name, bytes)`` to upload as ``name``.
        """
        staged = self.uploads.stage(file) if file is not None else None
        with self._cond:
            self._reopen()
            seq = self._next_seq
            self._next_seq += 1
            entry = {"seq": seq, "op": op, "run": run, "t": int(time.time() * 1000), **payload}
            if staged is not None:
                entry["file"] = self.uploads.place(staged, seq, file)
            self._unacked.add(seq)  # before the line exists: the writer reads the file without this lock
            try:
                self._size = write_line(self._fd, entry, self._size, sync=True)
            except BaseException:
                self._unacked.discard(seq)
                raise
            if op in START_OPS:
                self._open_runs[run] = seq
                self._started.add(run)
            elif op == "terminate":
                self._open_runs.pop(run, None)
            self._cond.notify_all()
        return seq

    # ------------------------------------------------------------------ waiting

    def pending(self) -> int:
        with self._cond:
            return len(self._unacked)

    def wait(self, seq: int, timeout_s: float) -> str:
        """``done``, ``refused`` or ``pending`` (not yet: timed out, or the server is away and it would be long)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while seq in self._unacked:
                left = deadline - time.monotonic()
                if left <= 0 or self._outage_since is not None or self._fd is None:
                    return "pending"
                self._cond.wait(left)
            return "refused" if seq in self._refused else "done"

    def refusal(self, seq: int) -> str | None:
        return self._refused.get(seq)

    def flush(self, timeout_s: float, give_up_in_outage: bool = True) -> bool:
        """Wait until every write appended so far is in MLflow (or refused); False when time ran out."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            last = self._next_seq - 1
            while self._unacked and min(self._unacked) <= last:
                left = deadline - time.monotonic()
                if left <= 0 or self._fd is None or (give_up_in_outage and self._outage_since is not None):
                    return False
                self._cond.wait(min(left, 1.0))
            return True

    def run_id(self, key: str) -> str | None:
        return self.replayer.runs.get(key) if self.replayer else None

    def experiment_id(self) -> str | None:
        return self.replayer.experiments.get(self.study) if self.replayer else None

    def started(self, key: str) -> bool:
        """Whether this spool ever started the run ``key`` (in this process or an earlier one)."""
        with self._cond:
            return key in self._started

    def open_runs(self) -> list[str]:
        """Runs this spool started and never terminated (a crashed study leaves them RUNNING)."""
        with self._cond:
            return sorted(self._open_runs, key=self._open_runs.get)

    @property
    def in_outage(self) -> bool:
        return self._outage_since is not None


_SPOOLS: dict[Path, Spool] = {}
_SPOOLS_LOCK = threading.Lock()


def open_spool(workdir: str | Path, study: str, tracking_uri: str) -> Spool:
    """The study's spool for this tracking store, shared by every tracker in this process; opened and replaying."""
    path = spool_dir(workdir, study) / f"{store_name(tracking_uri)}.jsonl"
    with _SPOOLS_LOCK:
        spool = _SPOOLS.get(path)
        if spool is None:
            spool = _SPOOLS[path] = Spool(path, tracking_uri, study, str(workdir))
    spool.ensure_open()
    return spool


def spool_at(path: Path, tracking_uri: str | None = None) -> Spool:
    """The spool in an existing file (``mfcon sync``): its header says the study and store, unless overridden."""
    header = read_lines(path)[0] if path.exists() and path.stat().st_size else {}
    if "spool" not in header:
        raise ValueError(f"{path}: not a tracking spool (no header line)")
    uri = tracking_uri or header["tracking_uri"]
    with _SPOOLS_LOCK:
        spool = _SPOOLS.get(path)
        if spool is None or spool.tracking_uri != uri:
            spool = _SPOOLS[path] = Spool(path, uri, header["study"], header.get("workdir", "runs"))
    spool.ensure_open()
    return spool
