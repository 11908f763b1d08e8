"""A bounded node-local cache of the shard files a worker reads from an object store.

Without it every epoch reads the whole train split from the bucket again. With
it, the first time a worker reads a remote shard's rows the whole file is copied
to a local folder (one streamed GET), and from then on that worker, and every
other worker of the node using the same folder, reads the local copy,
memory-mapped. Local shards are never cached.

- Bounded by bytes, least recently used first: before a copy is added, the
  entries used longest ago are deleted until the folder's entries fit in
  ``max_bytes``. A file bigger than the bound, or than the disk's free space
  (less a 1 GiB margin), is not cached: it is streamed as without a cache.
- Checked: each entry has a sidecar ``<key>.json`` (source, size, last-modified
  time, sha256 of the bytes as copied), written after the data file, so an
  entry without one is incomplete and ignored. When the manifest's sha256 of the
  shard is known, an entry is used only if its sha256 is that one, and a copy
  whose bytes do not hash to it is refused (``ShardCacheError``, naming the
  shard) instead of cached; otherwise an entry is used only if the object's size
  and last-modified time (one HEAD request; pyarrow does not expose ETags) are
  still the entry's. A stale or damaged entry is fetched again.
- Several processes may share the folder: copies are written under a unique
  temporary name and renamed into place (a copy that is there is replaced, never
  deleted first); deleting a file another process has memory-mapped is safe on
  POSIX (its pages stay valid until unmapped), and a reader whose copy was
  evicted before it opened it reads the object store instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from mfcon import storage

CHUNK = 4 << 20
DISK_MARGIN = 1 << 30
DEFAULT_FOLDER_NAME = "mfcon-shard-cache"


class ShardCacheError(ValueError):
    """A shard's bytes, as copied from the object store, are not those the manifest lists."""


def default_folder() -> Path:
    return Path(tempfile.gettempdir()) / DEFAULT_FOLDER_NAME


@dataclass
class CacheStats:
    hits: int = 0
    fetches: int = 0  # copies made (misses, and stale or damaged entries fetched again)
    refetches: int = 0  # of those, entries that were there but stale or damaged
    evictions: int = 0
    bypassed: int = 0  # files too big for the bound or the disk: streamed, not cached


class ShardCache:
    """``local_copy(location, sha256)``: a verified local path of a remote shard, copied once."""

    def __init__(self, folder: str | Path | None, max_bytes: int):
        self.folder = Path(folder) if folder else default_folder()
        self.max_bytes = int(max_bytes)
        self.stats = CacheStats()
        self._lock = threading.Lock()

    # ------------------------------------------------------------ entries

    @staticmethod
    def key(location: str) -> str:
        return hashlib.sha256(storage.normalize(location).encode()).hexdigest()[:40]

    def data_path(self, location: str) -> Path:
        return self.folder / f"{self.key(location)}.parquet"

    def meta_path(self, location: str) -> Path:
        return self.folder / f"{self.key(location)}.json"

    def _entry(self, location: str) -> dict | None:
        try:
            meta = json.loads(self.meta_path(location).read_text())
            size = self.data_path(location).stat().st_size
        except (OSError, ValueError):
            return None
        if meta.get("location") != storage.normalize(location) or meta.get("size") != size:
            return None  # a truncated or replaced data file: damaged
        return meta

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, data file) of every complete entry."""
        out = []
        for meta in self.folder.glob("*.json"):
            data = meta.with_suffix(".parquet")
            with contextlib.suppress(OSError):
                st = data.stat()
                out.append((st.st_mtime, st.st_size, data))
        return out

    def cached_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    # ------------------------------------------------------------ lookup and fetch

    def lookup(self, location: str, sha256: str | None = None, info: pafs.FileInfo | None = None) -> str | None:
        """The local copy when it is there and current (no copy is made); marks it used."""
        meta = self._entry(location)
        if meta is None:
            return None
        if sha256 is not None:
            current = meta.get("sha256") == sha256
        else:
            info = info or self._info(location)
            current = meta.get("size") == info.size and meta.get("mtime_ns") == _mtime_ns(info)
        if not current:
            return None
        path = self.data_path(location)
        with contextlib.suppress(OSError):
            os.utime(path)  # last use: what LRU eviction orders by
        return str(path)

    def local_copy(self, location: str, sha256: str | None = None) -> str | None:
        """A current local copy of the remote shard ``location``, made now if needed; None when it does not
        fit (then read it from the object store)."""
        info = None if sha256 is not None else self._info(location)
        with self._lock:
            hit = self.lookup(location, sha256, info)
            if hit is not None:
                self.stats.hits += 1
                return hit
            stale = self.meta_path(location).exists() or self.data_path(location).exists()
            info = info or self._info(location)
            if info.size > self.max_bytes or not self._room_on_disk(info.size):
                self.stats.bypassed += 1
                return None
            # Only the sidecar goes: the data file is replaced atomically by the new copy, so another process
            # that has just made (and is about to open) a copy never finds it deleted under it.
            with contextlib.suppress(FileNotFoundError):
                self.meta_path(location).unlink()
            self._evict(keep_free=info.size)
        path = self._fetch(location, info, sha256)  # outside the lock: reader threads copy shards side by side
        with self._lock:
            self.stats.fetches += 1
            self.stats.refetches += int(stale)
        return path

    def _info(self, location: str) -> pafs.FileInfo:
        fs, path = storage.resolve(location)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{storage.describe(location)}: no such shard")
        return info

    def _room_on_disk(self, size: int) -> bool:
        self.folder.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.folder).free >= size + DISK_MARGIN

    def _remove(self, data: Path) -> None:
        for path in (data.with_suffix(".json"), data):  # the sidecar first: the entry is incomplete from then on
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _evict(self, keep_free: int) -> None:
        """Delete least recently used entries until ``keep_free`` more bytes fit in the bound."""
        entries = sorted(self.entries())
        total = sum(size for _, size, _ in entries)
        for _, size, data in entries:
            if total + keep_free <= self.max_bytes:
                break
            self._remove(data)
            total -= size
            self.stats.evictions += 1

    def _fetch(self, location: str, info: pafs.FileInfo, sha256: str | None) -> str:
        fs, path = storage.resolve(location)
        data = self.data_path(location)
        tmp = data.with_name(f"{data.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        digest = hashlib.sha256()
        try:
            with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
            got = digest.hexdigest()
            if sha256 is not None and got != sha256:
                raise ShardCacheError(f"{storage.describe(location)}: its bytes hash to sha256 {got}, not the "
                                      f"manifest's {sha256}: the shard changed after the manifest was written; "
                                      "prepare the data again")
            os.replace(tmp, data)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        meta = {"location": storage.normalize(location), "size": data.stat().st_size,
                "mtime_ns": _mtime_ns(info), "sha256": got}
        meta_tmp = self.meta_path(location).with_name(f"{data.stem}.json.tmp-{os.getpid()}-{threading.get_ident()}")
        meta_tmp.write_text(json.dumps(meta))
        os.replace(meta_tmp, self.meta_path(location))
        return str(data)


def _mtime_ns(info: pafs.FileInfo) -> int | None:
    return info.mtime_ns if info.mtime is not None else None
