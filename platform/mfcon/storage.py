"""Where data, studies and checkpoints live: a local path or an object-store URI, one code path for both.

A *location* is a string: a local path (made absolute) or a URI such as
``s3://bucket/vox1`` or ``gs://bucket/vox1``. Every read and write of a
prepared data folder, a study's files and its checkpoints goes through
``pyarrow.fs`` here, so a study on a cluster needs no shared POSIX mount:
shards and checkpoints sit in the object store and every node reads them
from there. S3 settings come from the usual environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL`` for
an S3-compatible server); nothing here takes a credential as an argument.

Writes are atomic everywhere: the bytes are finished in a local file first
and then published under the final name in one step (a rename on a local
disk; an upload to ``name.tmp-<pid>`` and a server-side move in an object
store), so a reader never sees half a file.

>>> import tempfile
>>> base = tempfile.mkdtemp()
>>> write_text(join(base, "a", "b.txt"), "hi")
>>> read_text(join(base, "a", "b.txt")), list_names(join(base, "a"))
('hi', ['b.txt'])
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from mfcon.files import atomic_path

CHUNK = 1 << 20


def is_remote(location: str | Path) -> bool:
    """True for ``scheme://`` URIs other than ``file://``."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def normalize(location: str | Path) -> str:
    """A canonical location string: URIs without a trailing slash, local paths absolute."""
    text = str(location)
    if is_remote(text):
        return text.rstrip("/")
    if text.startswith("file://"):
        text = urlparse(text).path
    return str(Path(text).expanduser().resolve())


def join(base: str | Path, *names: str) -> str:
    """``base`` / ``names``, keeping a URI a URI (``Path`` would turn ``s3://b`` into ``s3:/b``)."""
    text = normalize(base)
    if is_remote(text):
        return "/".join([text, *(n.strip("/") for n in names)])
    return str(Path(text, *names))


def basename(location: str | Path) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def parent(location: str | Path) -> str:
    text = normalize(location)
    return text.rsplit("/", 1)[0] if is_remote(text) else str(Path(text).parent)


@functools.lru_cache(maxsize=32)
def _remote_filesystem(scheme: str, bucket: str, endpoint: str | None) -> pafs.FileSystem:
    """One client per bucket and endpoint (the endpoint comes from the environment: part of the key)."""
    fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")
    return fs


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``location`` and the path inside it."""
    text = normalize(location)
    if not is_remote(text):
        return pafs.LocalFileSystem(), text
    parsed = urlparse(text)
    if not parsed.netloc:
        raise ValueError(f"{location}: a storage URI needs a bucket, e.g. s3://bucket/folder")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return _remote_filesystem(parsed.scheme, parsed.netloc, endpoint), f"{parsed.netloc}{parsed.path}".rstrip("/")


def describe(location: str | Path) -> str:
    """How a location appears in messages (the URI itself; never a credential)."""
    return normalize(location)


# ---------------------------------------------------------------- reading

def file_info(location: str | Path) -> pafs.FileInfo:
    fs, path = resolve(location)
    return fs.get_file_info(path)


def exists(location: str | Path) -> bool:
    return file_info(location).type != pafs.FileType.NotFound


def is_file(location: str | Path) -> bool:
    return file_info(location).type == pafs.FileType.File


def is_dir(location: str | Path) -> bool:
    return file_info(location).type == pafs.FileType.Directory


def read_bytes(location: str | Path) -> bytes:
    """The whole file; FileNotFoundError naming the location when it is not there."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"{describe(location)}: no such file")
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode("utf-8")


def sha256(location: str | Path) -> str:
    fs, path = resolve(location)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def list_names(folder: str | Path) -> list[str]:
    """Names of the files directly in ``folder`` (sorted; empty when it does not exist)."""
    fs, path = resolve(folder)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


# ---------------------------------------------------------------- writing

def makedirs(location: str | Path) -> None:
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)


@contextlib.contextmanager
def staged_file(location: str | Path) -> Iterator[Path]:
    """Yield a local path to write; when the block ends without error it becomes ``location`` atomically.

    Local targets are staged beside the target (same filesystem, so the final
    rename is atomic) and fsynced; object-store targets are staged in a temp
    folder and published by :func:`publish`. On error nothing appears at
    ``location`` and the staged file is removed.
    """
    target = normalize(location)
    if is_remote(target):
        with tempfile.TemporaryDirectory(prefix="mfcon-stage-") as tmp:
            staged = Path(tmp, basename(target))
            yield staged
            publish(staged, target)
        return
    final = Path(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(final) as staged:
        yield staged
        with open(staged, "rb+") as f:
            os.fsync(f.fileno())


def publish(local_file: str | Path, location: str | Path) -> None:
    """Copy a finished local file to ``location`` so that it appears whole or not at all."""
    target = normalize(location)
    if not is_remote(target):
        with staged_file(target) as staged:
            shutil.copyfile(local_file, staged)
        return
    fs, path = resolve(target)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(local_file, "rb") as src, fs.open_output_stream(tmp) as dst:
            while block := src.read(CHUNK):
                dst.write(block)
        fs.move(tmp, path)  # a server-side copy: the final key appears complete
    except BaseException:
        with contextlib.suppress(Exception):
            fs.delete_file(tmp)
        raise


def write_bytes(location: str | Path, data: bytes) -> None:
    with staged_file(location) as staged:
        staged.write_bytes(data)


def write_text(location: str | Path, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def delete(location: str | Path) -> None:
    """Remove a file; a missing one is not an error."""
    fs, path = resolve(location)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


# ---------------------------------------------------------------- folders

def download_dir(location: str | Path, local_dir: str | Path) -> Path:
    """Copy a folder (a Ray Train checkpoint, say) to ``local_dir``; a local folder is copied as well."""
    fs, path = resolve(location)
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


@contextlib.contextmanager
def local_copy(location: str | Path) -> Iterator[Path]:
    """A local path holding ``location``'s file: the file itself when local, a temp download otherwise."""
    target = normalize(location)
    if not is_remote(target):
        yield Path(target)
        return
    with tempfile.TemporaryDirectory(prefix="mfcon-fetch-") as tmp:
        local = Path(tmp, basename(target))
        local.write_bytes(read_bytes(target))
        yield local
