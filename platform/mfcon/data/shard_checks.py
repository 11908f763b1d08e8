"""Integrity checks of a prepared folder's shards against its manifest: before a study trains (``verify_shards``,
sha256 and footer of every shard) and before ``mfcon train`` builds a model (``check_shard_schemas``, footers only).
A mismatch is an input error naming each file, never a crash mid-epoch."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mfcon import storage
from mfcon.data.shards import (
    MANIFEST_NAME,
    Manifest,
    ShardIntegrityError,
    _mismatch,
    manifest_schema,
    read_manifest,
    shard_paths,
)


def verify_shards(data_dir: str | Path, manifest: Manifest | None = None) -> None:
    """Recompute every shard's sha256 and read its Parquet footer; raise ShardIntegrityError naming each missing,
    changed, unreadable or foreign shard (a matching sha256 proves nothing when the manifest was rewritten too)."""
    manifest = manifest or read_manifest(data_dir)
    expected = manifest_schema(manifest)
    problems, bad = [], []
    for split, info in manifest.splits.items():
        for entry in info.shards:
            path = storage.join(data_dir, entry.file)
            if not storage.is_file(path):
                problems.append(f"{path}: missing ({split} shard listed in {MANIFEST_NAME})")
            elif (digest := storage.sha256(path)) != entry.sha256:
                problems.append(f"{path}: corrupted (sha256 {digest[:12]}..., manifest says {entry.sha256[:12]}...)")
            elif (problem := _schema_problem(path, expected)) is not None:
                problems.append(f"{path}: {problem}")
            else:
                continue
            bad.append(str(path))
    if problems:
        raise ShardIntegrityError("shard integrity check failed:\n  " + "\n  ".join(problems), bad)


def check_shard_schemas(data_dir: str | Path, manifest: Manifest | None = None) -> None:
    """Read every shard's Parquet footer (cheap, no sha256): raise ShardIntegrityError naming each one that is
    not readable or not an mfcon shard. ``mfcon train`` calls it before building a model."""
    manifest = manifest or read_manifest(data_dir)
    expected = manifest_schema(manifest)
    problems = [(path, problem) for split in manifest.splits for path in shard_paths(data_dir, split, manifest)
                if storage.is_file(path) and (problem := _schema_problem(path, expected)) is not None]
    if problems:
        raise ShardIntegrityError("shard check failed:\n  " + "\n  ".join(f"{p}: {why}" for p, why in problems),
                                  [str(p) for p, _ in problems])


def _schema_problem(path: str, expected: pa.Schema) -> str | None:
    """Why the file at ``path`` is not a shard of ``expected``'s layout, or None when it is."""
    fs, local = storage.resolve(path)
    try:
        schema = pq.read_schema(local, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as e:
        return f"not a readable Parquet file (truncated?): {e}"
    if not schema.equals(expected, check_metadata=False):
        return _mismatch(schema, expected)
    return None
