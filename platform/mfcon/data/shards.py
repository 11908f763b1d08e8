"""Parquet feature shards + ``manifest.json`` (schema version 2).

Layout of a prepared data folder (see docs/ARCHITECTURE.md)::

    <data>/manifest.json            written last, atomically
    <data>/trials-dev.txt           normalised dev trial list (utt ids): what studies select on
    <data>/trials-test.txt          normalised test trial list: read only by replication, promotion, reports
    <data>/trials-test-<NAME>.txt   further named test lists (prepare --test-trials O=... --test-trials E=...)
    <data>/<split>-NNNNN.parquet    utt_id, speaker, speaker_index, num_frames, features

Splits ``train``, ``dev`` and ``test`` hold disjoint speakers; the ``test`` split
holds the utterances of every named test list (VoxCeleb1-O, -E, -H side by
side), and the manifest's ``trials`` / ``trials_sha256`` name and checksum
each list. Version 2 added
the dev/test protocol; a version-1 folder (one ``eval`` split) must be prepared
again, since nothing in it says which speakers a search may look at.

``features`` is ``list<fixed_size_list<float32, F>>`` (frames x bins): the
frames of one utterance are one contiguous float32 buffer, so readers get
(T, F) numpy views without copying (``features_from_column``), and Ray Data
crops them zero-copy.

Compact shards (``prepare --feature-dtype float16``, manifest
``feature_dtype: "float16"``) store ``list<fixed_size_list<float16, F>>``,
written with BYTE_STREAM_SPLIT + zstd for the feature column (about 0.36x the
bytes of float32 + snappy; docs/performance_shards.md). Readers still get
(T, F) float32 arrays: ``features_from_column`` converts each column chunk
once. A manifest without ``feature_dtype`` is float32, and a shard whose
feature type is not the manifest's is refused, naming the file.

A data folder is a *location* (:mod:`mfcon.storage`): a local path or an
object-store URI such as ``s3://bucket/vox1``; shard paths in a study are
locations too, so every node streams them from the same place. Every file is
finished locally and published atomically under its final name, so a final
name never holds a half-written file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import (
    BaseModel,
    ConfigDict,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
)

from mfcon import storage
from mfcon.config import FeatureConfig, format_validation_error
from mfcon.data.augment import AugmentConfig
from mfcon.data.shard_format import (  # noqa: F401  (the shard format's names, used through this module too)
    _ARROW_DTYPES,
    COMPACT_ZSTD_LEVEL,
    FEATURE_DTYPES,
    FLOAT16_MAX,
    SCHEMA_VERSION,
    FeatureDtype,
    _check_dtype,
    features_from_column,
    rows_to_table,
    schema_feature_dtype,
    shard_schema,
    writer_options,
)
from mfcon.files import file_sha256

MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "dev", "test")
EVAL_SPLITS = ("dev", "test")  # splits with a trial list; dev is what a search sees, test what verdicts use


TEST_LIST = "test"  # the name of a test list given without one (``--test-trials PATH``): trials-test.txt
LIST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")  # a named test list: O, E, H, vox1-o, ...
RESERVED_LIST_NAMES = ("dev", "train")  # split names that are not test lists


def trials_name(name: str) -> str:
    """File of a trial list beside the manifest: ``trials-dev.txt``, ``trials-test.txt`` (the list named ``test``),
    ``trials-test-<NAME>.txt`` for every other named test list."""
    return f"trials-{name}.txt" if name in EVAL_SPLITS else f"trials-test-{name}.txt"


def check_list_name(name: str, what: str = "test list name") -> str:
    """A test list's name: letters, digits, ``_`` and ``-`` (up to 32), not ``dev`` or ``train``."""
    if not LIST_NAME.match(name):
        raise ValueError(f"{what} {name!r}: use letters, digits, '_' and '-' (up to 32, e.g. O, E, H)")
    if name in RESERVED_LIST_NAMES:
        raise ValueError(f"{what} {name!r} is a split name; name a test list otherwise (e.g. O, E, H)")
    return name


ROW_GROUP_ROWS = 64  # rows per Parquet row group: the unit Ray Data reads and shuffles



class ShardIntegrityError(ValueError):
    """A shard listed in a manifest is missing or its bytes changed; ``paths`` lists them."""

    def __init__(self, message: str, paths: list[str]):
        super().__init__(message)
        self.paths = paths


class ManifestError(ValueError):
    """``manifest.json`` is missing, unreadable, invalid or of another schema version."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _name_in_folder(value: str) -> str:
    """A manifest names files directly in its data folder: a path out of it ('..', '/', absolute) is refused."""
    if value in ("", ".", "..") or "/" in value or "\\" in value or ":" in value:
        raise ValueError(f"{value!r} must be a file name inside the data folder (no '/', '..' or absolute path)")
    return value


class ShardEntry(_Model):
    file: str  # name relative to the data folder
    rows: int
    sha256: str

    @field_validator("file")
    @classmethod
    def _file_inside(cls, value: str) -> str:
        return _name_in_folder(value)


class SplitInfo(_Model):
    shards: list[ShardEntry]
    rows: int
    num_speakers: int


class SkippedAudio(_Model):
    path: str
    reason: str


class DevProtocol(_Model):
    """How the dev trial list was made: given as a file, or generated over held-out training speakers."""

    source: Literal["file", "held_out_speakers"]
    speakers: int  # number of dev speakers
    file: str | None = None  # the list given, for source == "file"
    trials_per_utt: int | None = None  # target trials per enrolment utterance, for generated lists
    seed: int | None = None


class Manifest(_Model):
    schema_version: Literal[2] = SCHEMA_VERSION
    feature_config: FeatureConfig
    speakers: dict[str, int]  # train speaker -> class index
    splits: dict[str, SplitInfo]  # train, dev, test
    trials: dict[str, str]  # dev, then every named test list -> normalised trial list beside the manifest
    trials_sha256: dict[str, str] = {}  # list name -> sha256 of that file; absent in folders prepared before it
    dev_protocol: DevProtocol
    skipped: list[SkippedAudio] = []
    created_at: str
    source: str  # corpus root the shards were computed from
    augmentation: AugmentConfig | None = None  # train-split augmentation; absent = none
    feature_dtype: FeatureDtype = "float32"  # how shards store features; absent = float32 (readers get float32)

    @field_validator("trials")
    @classmethod
    def _trials_inside(cls, value: dict[str, str]) -> dict[str, str]:
        return {split: _name_in_folder(name) for split, name in value.items()}

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """No ``augmentation`` key without augmentation and no ``feature_dtype`` key for float32: such manifests
        stay byte-identical to what older mfcon wrote and accepts (same ``manifest_hash``)."""
        data = handler(self)
        if data.get("augmentation") is None:
            data.pop("augmentation", None)
        if data.get("feature_dtype") == "float32":
            data.pop("feature_dtype", None)
        if not data.get("trials_sha256"):
            data.pop("trials_sha256", None)
        return data

    def test_lists(self) -> list[str]:
        """The named test lists, in the order ``prepare`` was given them (``test`` for a single unnamed one)."""
        return [name for name in self.trials if name != "dev"]

    def default_test_list(self) -> str:
        """The list verdicts decide on unless told otherwise: ``test`` when there is one, else the first."""
        names = self.test_lists()
        return TEST_LIST if TEST_LIST in names else names[0]

    def decided_list(self, name: str | None) -> str:
        """``name`` (``--decide-on``) when it is a test list here, else ValueError naming the lists; None: the
        default list."""
        if name is None:
            return self.default_test_list()
        if name not in self.test_lists():
            raise ValueError(f"--decide-on {name}: the data folder has no test list of that name (its test lists: "
                             f"{', '.join(self.test_lists())})")
        return name


@dataclass
class SplitArrays:
    """One split in memory; ``features[i]`` is a read-only (T_i, F) float32 view into Arrow buffers."""

    utt_ids: list[str]
    speakers: list[str]
    speaker_index: np.ndarray  # (N,) int64, -1 in the eval split
    features: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.utt_ids)


# ---------------------------------------------------------------- writing

def manifest_schema(manifest: Manifest) -> pa.Schema:
    """The shard schema a manifest promises: its bins and its ``feature_dtype``."""
    return shard_schema(manifest.feature_config.num_mel_bins, feature_dtype=manifest.feature_dtype)


def write_shard(path: str | Path, rows: Iterable[Mapping[str, Any]], num_mel_bins: int = 80,
                metadata: Mapping[str, str] | None = None, feature_dtype: str = "float32") -> ShardEntry:
    """Stream ``rows`` into a Parquet shard at ``path`` atomically; return its manifest entry.

    Rows are dicts ``{utt_id, speaker, speaker_index, features: (T, F) float32}``
    and may come from a generator: they are written ``ROW_GROUP_ROWS`` at a time
    to ``<name>.tmp-<pid>``, which is removed if anything raises, and renamed to
    ``path`` only once complete. ``metadata`` goes into the Parquet schema
    metadata (``prepare`` stores the shard's plan fingerprint there).
    ``feature_dtype="float16"`` writes a compact shard (:func:`writer_options`).

    >>> import tempfile
    >>> row = {"utt_id": "id1/v/1.wav", "speaker": "id1", "speaker_index": 0, "features": np.zeros((3, 80), np.float32)}
    >>> write_shard(Path(tempfile.mkdtemp()) / "train-00000.parquet", [row]).rows
    1
    """
    schema = shard_schema(num_mel_bins, metadata, feature_dtype)
    count = 0
    with storage.staged_file(path) as tmp:
        with open(tmp, "wb") as sink:
            writer = pq.ParquetWriter(sink, schema, **writer_options(feature_dtype))
            try:
                batch: list[Mapping[str, Any]] = []
                for row in rows:
                    batch.append(row)
                    if len(batch) == ROW_GROUP_ROWS:
                        writer.write_table(rows_to_table(batch, schema))
                        count, batch = count + len(batch), []
                if batch or count == 0:
                    writer.write_table(rows_to_table(batch, schema))
                    count += len(batch)
            finally:
                writer.close()
        digest = file_sha256(tmp)
    return ShardEntry(file=storage.basename(path), rows=count, sha256=digest)


def write_manifest(data_dir: str | Path, manifest: Manifest) -> str:
    path = storage.join(data_dir, MANIFEST_NAME)
    storage.write_text(path, manifest.model_dump_json(indent=2) + "\n")
    return path


# ---------------------------------------------------------------- reading

def read_manifest(data_dir: str | Path) -> Manifest:
    """Parse ``<data_dir>/manifest.json``; every failure is a ManifestError naming the file."""
    path = storage.join(data_dir, MANIFEST_NAME)
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest (prepare the data first: mfcon prepare --out <this folder>)") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read manifest ({e.strerror or e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: top level must be an object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(f"{path}: schema_version {version!r}, this mfcon reads version {SCHEMA_VERSION} "
                            "(separate dev and test trial lists); prepare the data again")
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        raise ManifestError(format_validation_error(e, str(path))) from None


def manifest_hash(data_dir: str | Path) -> str:
    """sha256 of the manifest bytes: identifies a prepared dataset (tags MLflow runs)."""
    path = storage.join(data_dir, MANIFEST_NAME)
    if not storage.is_file(path):
        raise ManifestError(f"{path}: no manifest (prepare the data first: mfcon prepare --out <this folder>)")
    return storage.sha256(path)


def trials_path(data_dir: str | Path, name: str, manifest: Manifest | None = None) -> str:
    """The normalised trial list named ``name``: ``dev``, ``test`` or another named test list."""
    manifest = manifest or read_manifest(data_dir)
    if name not in manifest.trials:
        raise ValueError(f"{storage.join(data_dir, MANIFEST_NAME)}: no trial list named {name!r} "
                         f"(has {', '.join(manifest.trials)})")
    return storage.join(data_dir, manifest.trials[name])


def list_split(name: str) -> str:
    """The split holding a named list's utterances: ``dev`` for the dev list, ``test`` for every test list."""
    return "dev" if name == "dev" else "test"


def verified_trials_path(data_dir: str | Path, name: str, manifest: Manifest | None = None) -> str:
    """:func:`trials_path`, after checking the file's sha256 against the manifest (when it records one), so a list
    edited after ``prepare`` is never scored as if it were the prepared one."""
    manifest = manifest or read_manifest(data_dir)
    path = trials_path(data_dir, name, manifest)
    expected = manifest.trials_sha256.get(name)
    if expected is not None and (digest := storage.sha256(path)) != expected:
        raise ManifestError(f"{path}: changed since prepare (sha256 {digest[:12]}..., manifest says "
                            f"{expected[:12]}...); prepare the data folder again")
    return path


def split_info(data_dir: str | Path, split: str, manifest: Manifest | None = None) -> SplitInfo:
    manifest = manifest or read_manifest(data_dir)
    if split not in manifest.splits:
        raise ValueError(f"{storage.join(data_dir, MANIFEST_NAME)}: no split {split!r} (has {sorted(manifest.splits)})")
    return manifest.splits[split]


def shard_paths(data_dir: str | Path, split: str, manifest: Manifest | None = None) -> list[str]:
    """Locations of the split's shards (absolute paths or URIs), in manifest order."""
    return [storage.join(data_dir, s.file) for s in split_info(data_dir, split, manifest).shards]


def _mismatch(schema: pa.Schema, expected: pa.Schema) -> str:
    """Why ``schema`` is not ``expected``: a feature dtype other than the manifest's is said so plainly."""
    found_dtype, want_dtype = schema_feature_dtype(schema), schema_feature_dtype(expected)
    if found_dtype != want_dtype and found_dtype in FEATURE_DTYPES and schema.equals(
            shard_schema(expected.field("features").type.value_type.list_size, feature_dtype=found_dtype),
            check_metadata=False):
        return (f"features are stored as {found_dtype} but {MANIFEST_NAME} says feature_dtype {want_dtype} "
                "(a shard of another prepare run?); prepare the data again")
    found = ", ".join(f"{f.name}: {f.type}" for f in schema)
    return (f"columns ({found}) are not an mfcon shard's (schema version {SCHEMA_VERSION}: "
            f"{', '.join(expected.names)})")


def read_shard_table(location: str, columns: list[str] | None = None) -> pa.Table:
    """One shard as an Arrow table, memory-mapped when local, streamed from the object store otherwise."""
    fs, path = storage.resolve(location)
    return pq.read_table(path, filesystem=fs, columns=columns, memory_map=not storage.is_remote(location))


def load_split(data_dir: str | Path, split: str, manifest: Manifest | None = None) -> SplitArrays:
    """Read all shards of ``split`` (manifest order) into memory."""
    manifest = manifest or read_manifest(data_dir)
    paths = shard_paths(data_dir, split, manifest)
    expected = manifest_schema(manifest)
    tables = [read_shard_table(p) for p in paths]
    for path, t in zip(paths, tables):
        if not t.schema.equals(expected, check_metadata=False):
            raise ValueError(f"{path}: {_mismatch(t.schema, expected)} "
                             f"({manifest.feature_config.num_mel_bins} bins, {manifest.feature_dtype})")
    table = pa.concat_tables(tables) if tables else expected.empty_table()
    return SplitArrays(
        utt_ids=table.column("utt_id").to_pylist(),
        speakers=table.column("speaker").to_pylist(),
        speaker_index=table.column("speaker_index").to_numpy().astype(np.int64),
        features=features_from_column(table.column("features")),
    )


# The integrity checks live in shard_checks.py; imported here last (they use this module) so callers keep one
# import for the whole shard API.
from mfcon.data.shard_checks import check_shard_schemas, verify_shards  # noqa: E402,F401
