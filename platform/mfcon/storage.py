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
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from mfcon.files import atomic_path

CHUNK = 1 << 20


# Object stores pyarrow.fs opens from a URI; any other scheme (http://, a typo such as s4://) is an error.
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


class StorageURIError(ValueError):
    """A location that looks like a URI but is not one this module can open (``s3:/b/x``, ``s4://b``, ``s3:///x``)."""


def _split_uri(location: str | Path) -> tuple[str, str] | None:
    """(scheme, rest after ``//``) for an object-store URI, None for a local path; raises on a malformed URI.

    ``s3:/bucket/x`` (one slash), ``s3:bucket/x``, ``s3:///x`` (no bucket) and schemes other than
    :data:`OBJECT_STORE_SCHEMES` and ``file://`` raise, so a typo never becomes a local folder named ``s3:``.
    """
    text = str(location)
    match = _SCHEME.match(text)
    if match is None:
        return None  # Path("s3://b/x") prints as "s3:/b/x" and is refused below, as the string would be
    scheme = match.group(1).lower()
    rest = text[match.end():]
    known = scheme in OBJECT_STORE_SCHEMES or scheme == "file"
    if not rest.startswith("//"):
        if known or rest.startswith("/"):
            hint = f" (did you mean {scheme}://{rest.lstrip('/')}?)" if known else ""
            raise StorageURIError(f"{text}: not a valid storage URI{hint}; write scheme://bucket/folder")
        return None  # a local name with a colon in it ("a:b")
    if not known:
        raise StorageURIError(f"{text}: unknown storage scheme {scheme!r}; use a local path or one of "
                              + ", ".join(f"{s}://" for s in (*OBJECT_STORE_SCHEMES, "file")))
    if scheme == "file":
        return None
    bucket = rest[2:].split("/", 1)[0]
    if not bucket:
        raise StorageURIError(f"{text}: a storage URI needs a bucket, e.g. {scheme}://bucket/folder")
    return scheme, rest[2:]


def is_remote(location: str | Path) -> bool:
    """True for object-store URIs (``s3://``, ``gs://``, ...); False for local paths and ``file://``.

    Raises :class:`StorageURIError` for a malformed URI or an unknown scheme.
    """
    return _split_uri(location) is not None


def normalize(location: str | Path) -> str:
    """A canonical location string: URIs without a trailing slash, local paths absolute.

    Raises :class:`StorageURIError` for a malformed URI or an unknown scheme (never a local folder ``s3:``).
    """
    text = str(location)
    split = _split_uri(location)
    if split is not None:
        return f"{split[0]}://{split[1]}".rstrip("/")
    if _SCHEME.match(text) and text.lower().startswith("file://"):
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


_USERINFO_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/@:]*):(?P<secret>[^\s@]*)@")


def mask_uri(text: str | Path) -> str:
    """Every ``scheme://user:password@`` in ``text`` as ``scheme://user:***@`` (``s3://KEY:SECRET@bucket`` too):
    what may be printed, logged or put in an error message."""
    return _USERINFO_PASSWORD.sub(r"\g<head>:***@", str(text))


def describe(location: str | Path) -> str:
    """How a location appears in messages: the URI itself with any password masked, never a credential."""
    return mask_uri(normalize(location))


# ---------------------------------------------------------------- where a cluster's nodes can reach

SHARED_FS_ENV = "MFCON_SHARED_FS"  # colon-separated local roots mounted at the same path on every node
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"  # `ray up` leaves it on the head: this machine heads a cluster


class ClusterStorageError(ValueError):
    """A local path given to a study on a multi-node cluster, where other nodes cannot reach it."""


def _this_machine_addresses() -> set[str]:
    """This machine's names and addresses: its host name's, and the source address of its default route."""
    import socket

    found = {"localhost", socket.gethostname()}
    with contextlib.suppress(OSError):
        found.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None))
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: only the route is looked up
        found.add(probe.getsockname()[0])
    return found


def is_cluster_address(address: str | None, launcher_config: str = LAUNCHER_CONFIG) -> bool:
    """Whether ``address`` names a Ray cluster whose nodes may be other machines.

    None/"local" (a private Ray) is not. ``ray://`` and a host that is not this machine are. ``auto`` and
    this machine's own addresses are when this machine is the head of a launcher cluster (``ray up`` wrote
    ``~/ray_bootstrap_config.yaml``), which is where ``ray job submit`` runs every driver.
    """
    if not address or address == "local":
        return False
    if address.startswith("ray://"):
        return True
    head_here = Path(launcher_config).expanduser().exists()
    if address == "auto":
        return head_here
    host = address.rsplit(":", 1)[0].strip("[]")
    if host.startswith("127.") or host == "::1" or host in _this_machine_addresses():
        return head_here
    return True


def shared_roots(env: dict[str, str] | None = None) -> list[str]:
    """The local roots declared shared by every node (``MFCON_SHARED_FS=/nfs/team:/shared``)."""
    value = (os.environ if env is None else env).get(SHARED_FS_ENV, "")
    return [str(Path(p).expanduser().resolve()) for p in value.split(":") if p.strip()]


def check_cluster_locations(address: str | None, env: dict[str, str] | None = None, **locations: str | Path | None) -> None:
    """Refuse local paths for a study on a multi-node cluster, before anything starts.

    Every node reads the data and writes checkpoints (Ray Train uploads them from the workers), so on a
    cluster each of ``locations`` (``data=..., workdir=...``) must be an object-store URI, or a local path
    under a root declared in ``MFCON_SHARED_FS`` (a filesystem mounted at the same path on every node).
    Malformed URIs raise :class:`StorageURIError` everywhere (``normalize``).
    """
    texts = {name: normalize(loc) for name, loc in locations.items() if loc is not None}
    if not is_cluster_address(address):
        return
    roots = shared_roots(env)
    local = [f"--{name.replace('_', '-')} {text}" for name, text in texts.items()
             if not is_remote(text) and not any(text == r or text.startswith(r.rstrip("/") + "/") for r in roots)]
    if local:
        raise ClusterStorageError(
            f"{', '.join(local)}: a local path on this machine, but --address {address} is a cluster whose other "
            "nodes cannot see it (trials would write checkpoints to their own disks). Use an object-store URI "
            f"(s3://bucket/folder), or declare a filesystem mounted at the same path on every node: "
            f"{SHARED_FS_ENV}=/shared/root")


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
