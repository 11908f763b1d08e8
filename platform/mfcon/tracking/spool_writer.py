"""The spool's writer thread: replays the spool file to MLflow in order, riding out outages.

Apart from the spool's writing and waiting side because it is the one part that
talks to the server: it retries with backoff, tells an outage (wait) from a
refusal (record it, go on), and acks what the server took. It holds at most
``MAX_IN_MEMORY`` entries; the rest wait on disk, so memory stays bounded
however long an outage lasts.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO, Any

from mfcon.tracking.replay import Replayer
from mfcon.tracking.spool_file import write_line
from mfcon.tracking.spool_uploads import Uploads

log = logging.getLogger(__name__)

MAX_IN_MEMORY = 256  # entries the writer holds at once
FIRST_PAUSE_S, LONGEST_PAUSE_S = 0.5, 5.0  # backoff between retries
MAX_ATTEMPTS = 5  # tries of one entry while the server answers; then it is recorded as refused


class SpoolWriter:
    """The writer-thread half of :class:`mfcon.tracking.spool.Spool`, which sets the state below (guarded by
    ``_cond``) and runs ``_writer`` in a thread per opening (``generation``)."""

    path: Path
    tracking_uri: str
    public_uri: str
    uploads: Uploads
    replayer: Replayer | None
    replayed: int
    refused: int
    _cond: threading.Condition
    _fd: int | None
    _size: int
    _generation: int
    _stopping: bool
    _unacked: set[int]
    _refused: dict[int, str]
    _outage_since: float | None

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

    def _read_more(self, reader: IO[bytes], tail: bytes, buffer: deque[dict[str, Any]]) -> bytes:
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
            # a lost ack costs a duplicate check on replay, never a duplicate
            self._size = write_line(self._fd, record, self._size, sync=False)
            self._unacked.discard(seq)
            if error:
                self._refused[seq] = error
                self.refused += 1
            else:
                self.replayed += 1
            self._cond.notify_all()
        if "file" in entry:
            self.uploads.drop(seq)
