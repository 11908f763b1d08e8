"""``mfcon sync``: replay what a study's spool still holds to its tracking server, idempotently.

A study whose tracking server was away at its end, or that crashed, leaves
writes in its spool (``tracking.spool``). This replays them in order; entries
MLflow already has are skipped (the spool records acks, and replay checks the
server), so running it twice is harmless. Runs the spool started but never
ended belong to a study that died: they are marked FAILED, as a study that
fails on its own does. A running study holds its spool, and sync refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mfcon.tracking.spool import spool_at
from mfcon.tracking.spool_file import read_lines, spool_dir


class NoSpool(ValueError):
    """The study has no tracking spool under that work dir."""


@dataclass(frozen=True)
class SyncReport:
    """One spool file after a sync: what was there, what went to MLflow now, what is left."""

    spool_file: Path
    tracking_uri: str
    entries: int  # writes ever spooled
    pending_before: int  # writes not in MLflow when the sync began (with the FAILED ends of crashed runs)
    replayed: int
    points_written: int  # metric points among them
    points_skipped: int  # already in MLflow (a write whose ack was lost)
    refused: int
    closed_runs: tuple[str, ...]  # runs left RUNNING by a crashed study, now FAILED
    pending: int

    def line(self) -> str:
        if not self.pending_before and not self.closed_runs:
            return f"{self.spool_file.name}: nothing to replay ({self.entries} writes, all in {self.tracking_uri})"
        closed = f", {len(self.closed_runs)} runs left RUNNING by a crash marked FAILED" if self.closed_runs else ""
        return (f"{self.spool_file.name} -> {self.tracking_uri}: replayed {self.replayed} writes "
                f"({self.points_written} metric points, {self.points_skipped} already there), "
                f"{self.refused} refused{closed}; {self.pending} still pending")


def study_spools(workdir: str | Path, study: str) -> list[Path]:
    folder = spool_dir(workdir, study)
    files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    if not files:
        raise NoSpool(f"no tracking spool for study {study!r} under {workdir} (looked in {folder})")
    return files


def sync_study(workdir: str | Path, study: str, tracking_uri: str | None = None,
               timeout_s: float = 300.0) -> list[SyncReport]:
    """Replay every spool of ``study``; ``tracking_uri`` sends them to another server than the one they name.

    Waits up to ``timeout_s`` per spool for an unreachable server. Raises ``SpoolBusy`` while a study holds it.
    """
    return [_sync(path, tracking_uri, timeout_s) for path in study_spools(workdir, study)]


def _sync(path: Path, tracking_uri: str | None, timeout_s: float) -> SyncReport:
    spool = spool_at(path, tracking_uri)
    entries = sum(1 for rec in read_lines(path) if "seq" in rec)
    orphans = tuple(spool.open_runs())
    for run in reversed(orphans):  # trials first, their study run last
        spool.append("terminate", run, status="FAILED")
    left = spool.close(timeout_s)
    replayer = spool.replayer
    return SyncReport(path, spool.public_uri, entries, spool.pending_at_open + len(orphans), spool.replayed,
                      replayer.points_written if replayer else 0, replayer.points_skipped if replayer else 0,
                      spool.refused, orphans, left)
