"""The spool file on disk: where it lives, what its lines hold, and how a line is written, read and locked.

Kept apart from the spool's logic so the format is defined once: the spool writes and scans it, its writer
thread tails it, ``mfcon sync`` and the tests read it back.

File: ``<workdir>/<study>/tracking-spool/<store>.jsonl`` (one per study and
tracking store; a study kept in an object store spools under
``$MFCON_SPOOL_DIR`` or ``~/.cache/mfcon/tracking-spool``, since fsync needs a
local disk). Lines: a header ``{"spool": 1, "tracking_uri", "study",
"workdir"}``; entries ``{"seq", "op", "run", "t", ...}``; acks ``{"ack": seq}``
(with ``run_id`` for a run the entry created or found, ``error`` for an entry
the server refused). Files an entry uploads are copied to ``<store>.files/<seq>/``
(``tracking.spool_uploads``) and removed once acked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mfcon import storage

FORMAT_VERSION = 1
SPOOL_DIR_ENV = "MFCON_SPOOL_DIR"
START_OPS = ("start_parent", "start_child")


class SpoolBusy(RuntimeError):
    """Another process (a running study, another ``mfcon sync``) is replaying this spool."""


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


def write_line(fd: int, record: dict[str, Any], size: int, sync: bool) -> int:
    """Append one line to a file of ``size`` bytes, whole or not at all (a failed write is cut off again, or the
    next line would join it); returns the new size."""
    data = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise
    return size + len(data)


def take_lock(path: Path) -> int:
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
