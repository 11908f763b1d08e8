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

File: ``<workdir>/<study>/tracking-spool/<store>.jsonl`` (one per study and
tracking store; a study kept in an object store spools under
``$MFCON_SPOOL_DIR`` or ``~/.cache/mfcon/tracking-spool``, since fsync needs a
local disk). Lines: a header ``{"spool": 1, "tracking_uri", "study",
"workdir"}``; entries ``{"seq", "op", "run", "t", ...}``; acks ``{"ack": seq}``
(with ``run_id`` for a run the entry created or found, ``error`` for an entry
the server refused). Files an entry uploads are copied to ``<store>.files/<seq>/``
and removed once acked. The writer holds at most ``MAX_IN_MEMORY`` entries; the
rest wait on disk, so memory stays bounded however long an outage lasts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mfcon import storage
from mfcon.tracking.replay import Replayer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPOOL_DIR_ENV = "MFCON_SPOOL_DIR"
MAX_IN_MEMORY = 256  # entries the writer holds at once
FIRST_PAUSE_S, LONGEST_PAUSE_S = 0.5, 5.0  # backoff between retries
MAX_ATTEMPTS = 5  # tries of one entry while the server answers; then it is recorded as refused
JOIN_S = 60.0  # how long close() lets a write in flight finish (the client's own timeout bounds it)
START_OPS = ("start_parent", "start_child")
STALE_STAGED_S = 3600.0


class SpoolBusy(RuntimeError):
    """Another process (a running study, another ``mfcon sync``) is replaying this spool."""


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


def spool_dir(workdir: str | Path, study: str) -> Path:
    """Where a study's spool files live: beside the study, or on local disk for an object-store work dir."""
    if storage.is_remote(workdir):
        base = Path(os.environ.get(SPOOL_DIR_ENV) or Path.home() / ".cache" / "mfcon" / "tracking-spool")
        return base / hashlib.sha256(storage.normalize(workdir).encode()).hexdigest()[:12] / study
    return Path(storage.normalize(workdir)) / study / "tracking-spool"


def public_uri(tracking_uri: str) -> str:
    """The URI without ``user:password@``: what the spool file, its name and every message may hold (the
    client keeps the credentials; ``mfcon sync`` gets them from MLFLOW_TRACKING_USERNAME/PASSWORD)."""
    parts = urlsplit(tracking_uri)
    if parts.username is None and parts.password is None:
        return tracking_uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def store_name(tracking_uri: str) -> str:
    """A file name per tracking store: a study tracked to two stores keeps two spools."""
    uri = public_uri(tracking_uri)
    scheme = uri.split(":", 1)[0] if ":" in uri else "file"
    return f"{scheme}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every complete, readable line of a spool file (for reports and tests; the writer tails it itself)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
    return out


class Spool:
    """One spool file and its writer thread; shared by every tracker of the study in this process."""

    def __init__(self, path: Path, tracking_uri: str, study: str, workdir: str):
        self.path, self.tracking_uri, self.study, self.workdir = path, tracking_uri, study, workdir
        self.public_uri = public_uri(tracking_uri)  # what the file and messages show
        self.files_dir = path.with_suffix(".files")
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
        self._stashed: dict[tuple[str, int, int], Path] = {}  # (source, size, mtime) -> its copy here
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
        self._lock_fd = _lock(self._lock_path)
        try:
            resolved = self._scan()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if self._size == 0:
                self._write({"spool": FORMAT_VERSION, "tracking_uri": self.public_uri, "study": self.study,
                             "workdir": self.workdir}, sync=True)
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
        self._drop_files(lambda seq: seq not in self._unacked)
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
        staged = self._stage(file) if file is not None else None
        with self._cond:
            self._reopen()
            seq = self._next_seq
            self._next_seq += 1
            entry = {"seq": seq, "op": op, "run": run, "t": int(time.time() * 1000), **payload}
            if staged is not None:
                target = self.files_dir / str(seq) / staged[1]
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged[0], target)
                entry["file"] = f"{seq}/{staged[1]}"
                if isinstance(file, Path):
                    st = file.stat()
                    self._stashed[(str(file.resolve()), st.st_size, st.st_mtime_ns)] = target
            self._unacked.add(seq)  # before the line exists: the writer reads the file without this lock
            try:
                self._write(entry, sync=True)
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

    def _stage(self, file: Path | tuple[str, bytes]) -> tuple[Path, str]:
        """A durable copy of an upload under a temporary name (hard-linked when the same file was staged before)."""
        incoming = self.files_dir / f".incoming-{uuid.uuid4().hex}"
        incoming.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(file, tuple):
            name, data = file
            with open(incoming, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return incoming, name
        file = Path(file)
        st = file.stat()
        earlier = self._stashed.get((str(file.resolve()), st.st_size, st.st_mtime_ns))
        try:
            if earlier is None:
                raise FileNotFoundError
            os.link(earlier, incoming)
        except OSError:
            with open(file, "rb") as src, open(incoming, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
        return incoming, file.name

    def _write(self, record: dict[str, Any], sync: bool) -> None:
        """One line, whole or not at all (a failed write is cut off again, or the next line would join it)."""
        data = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
            if sync:
                os.fsync(self._fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += len(data)

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

    # ------------------------------------------------------------------ the writer thread

    def _writer(self, generation: int) -> None:
        buffer: deque[dict[str, Any]] = deque()
        tail = b""
        with open(self.path, "rb") as reader:
            while self._running(generation):
                if not buffer:
                    tail = self._read_more(reader, tail, buffer)
                if not buffer:
                    with self._cond:
                        if reader.tell() >= self._size and self._running(generation):
                            self._cond.wait(1.0)
                    continue
                if self._apply(buffer[0], generation):
                    buffer.popleft()

    def _running(self, generation: int) -> bool:
        return not self._stopping and generation == self._generation

    def _read_more(self, reader, tail: bytes, buffer: deque) -> bytes:
        """Parse the next complete lines into ``buffer``: unacked entries only, at most ``MAX_IN_MEMORY``."""
        while len(buffer) < MAX_IN_MEMORY:
            chunk = reader.read(1 << 16)
            if not chunk:
                return tail
            *lines, tail = (tail + chunk).split(b"\n")
            for raw in lines:
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                if "seq" in rec and rec["seq"] in self._unacked:
                    buffer.append(rec)
        return tail

    def _apply(self, entry: dict[str, Any], generation: int) -> bool:
        """One entry until it is in MLflow or refused; False when the writer is stopped first."""
        attempts, pause = 0, FIRST_PAUSE_S
        while True:
            try:
                extra = self.replayer.apply(entry)
            except Exception as e:  # noqa: BLE001 - sorted into refused, retry, outage below
                kind = self.replayer.classify(e)
                attempts += kind != "outage"
                if kind == "refused" or attempts >= MAX_ATTEMPTS:
                    reason = self._public(str(e))
                    log.warning("tracking: %s of run %s refused by %s, skipped: %s", entry["op"], entry["run"],
                                self.public_uri, reason)
                    self._ack(entry, error=reason[:2000])
                    return True
                self.replayer.doubt(entry)
                if kind == "outage":
                    self._enter_outage(e)
                if not self._pause(pause, generation):
                    return False
                pause = min(2 * pause, LONGEST_PAUSE_S)
                while kind == "outage" and not self.replayer.reachable():
                    if not self._pause(pause, generation):
                        return False
                    pause = min(2 * pause, LONGEST_PAUSE_S)
                continue
            self._leave_outage()
            self._ack(entry, **(extra or {}))
            return True

    def _pause(self, seconds: float, generation: int) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: not self._running(generation), timeout=seconds)
            return self._running(generation)

    def _enter_outage(self, error: Exception) -> None:
        with self._cond:
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                log.warning("tracking: MLflow at %s is unreachable (%s); writes wait in %s and go out when it "
                            "answers", self.public_uri, self._public(str(error))[:200], self.path)
            self._cond.notify_all()

    def _leave_outage(self) -> None:
        with self._cond:
            if self._outage_since is not None:
                log.warning("tracking: MLflow at %s answers again after %.0f s; replaying %d spooled writes",
                            self.public_uri, time.monotonic() - self._outage_since, len(self._unacked))
                self._outage_since = None

    def _public(self, text: str) -> str:
        return text.replace(self.tracking_uri, self.public_uri) if self.tracking_uri != self.public_uri else text

    def _ack(self, entry: dict[str, Any], error: str | None = None, **extra: Any) -> None:
        seq = entry["seq"]
        record = {"ack": seq, **({"error": error} if error else {}), **extra}
        with self._cond:
            if self._fd is None:
                return  # closed meanwhile: the entry is replayed (idempotently) next time
            self._write(record, sync=False)  # a lost ack costs a duplicate check on replay, never a duplicate
            self._unacked.discard(seq)
            if error:
                self._refused[seq] = error
                self.refused += 1
            else:
                self.replayed += 1
            self._cond.notify_all()
        if "file" in entry:
            shutil.rmtree(self.files_dir / str(seq), ignore_errors=True)

    def _drop_files(self, done) -> None:
        """Copies of uploads whose entries are acked, and stale half-staged ones (a recent one may be a write
        being staged right now, outside the lock)."""
        if not self.files_dir.is_dir():
            return
        for child in self.files_dir.iterdir():
            if child.name.isdigit() and done(int(child.name)):
                shutil.rmtree(child, ignore_errors=True)
            elif child.name.startswith(".incoming-"):
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - child.stat().st_mtime > STALE_STAGED_S:
                        child.unlink()


def _lock(path: Path) -> int:
    """An exclusive flock held while the spool is open (the kernel drops it when the process dies)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SpoolBusy(f"{path.with_suffix('.jsonl')} is being replayed by process {holder} (a running study or "
                        "another mfcon sync); its own writer sends it to MLflow") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


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
