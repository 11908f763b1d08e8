"""The spool's own copies of files to upload (``<store>.files/<seq>/<name>``).

An entry that uploads a file must outlive the file's temporary folder and the
process, so the file is copied (fsynced) before its entry is written, and the
copy is removed once the server took it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

STALE_STAGED_S = 3600.0


class Uploads:
    """The copies of one spool's uploads; a file uploaded again unchanged is hard-linked, not copied."""

    def __init__(self, files_dir: Path):
        self.files_dir = files_dir
        self._stashed: dict[tuple[str, int, int], Path] = {}  # (source, size, mtime) -> its copy here

    def stage(self, file: Path | tuple[str, bytes]) -> tuple[Path, str]:
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

    def place(self, staged: tuple[Path, str], seq: int, file: Path | tuple[str, bytes]) -> str:
        """Move a staged copy to entry ``seq``'s folder; returns its name there (the entry's ``file``)."""
        target = self.files_dir / str(seq) / staged[1]
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged[0], target)
        if isinstance(file, Path):
            st = file.stat()
            self._stashed[(str(file.resolve()), st.st_size, st.st_mtime_ns)] = target
        return f"{seq}/{staged[1]}"

    def drop(self, seq: int) -> None:
        """The copy of an entry the server took."""
        shutil.rmtree(self.files_dir / str(seq), ignore_errors=True)

    def drop_done(self, done: Callable[[int], bool]) -> None:
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
