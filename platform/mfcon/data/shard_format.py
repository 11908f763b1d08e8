"""The Arrow/Parquet form of a shard: its schema, writer options, rows -> table, and the features column
-> per-row float32 frames. Pure format, no files: :mod:`mfcon.data.shards` reads and writes the folders.

``features`` is ``list<fixed_size_list<float32, F>>`` (frames x bins), or float16 in compact shards: the
frames of one utterance are one contiguous buffer, so readers get (T, F) numpy views without copying
(``features_from_column``; float16 is converted once per chunk).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 2
FeatureDtype = Literal["float32", "float16"]
FEATURE_DTYPES: tuple[str, ...] = ("float32", "float16")  # float32: today's shards; float16: compact
_ARROW_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}
_FEATURES_LEAF = "features.list.element.list.element"  # the Parquet column path of the feature values
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: larger features would become inf
COMPACT_ZSTD_LEVEL = 6  # float16 shards: zstd 6 is within 0.1% of 9-12 in size, reads as fast as 1-3


def _check_dtype(feature_dtype: str) -> str:
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature_dtype must be one of {FEATURE_DTYPES}, got {feature_dtype!r}")
    return feature_dtype


def shard_schema(num_mel_bins: int = 80, metadata: Mapping[str, str] | None = None,
                 feature_dtype: str = "float32") -> pa.Schema:
    """Arrow schema of a shard; ``num_mel_bins`` comes from the FeatureConfig, ``feature_dtype`` from the
    manifest (float32, or float16 for compact shards)."""
    value_type = _ARROW_DTYPES[_check_dtype(feature_dtype)]
    fields = [
        pa.field("utt_id", pa.string(), nullable=False),
        pa.field("speaker", pa.string(), nullable=False),
        pa.field("speaker_index", pa.int32(), nullable=False),
        pa.field("num_frames", pa.int32(), nullable=False),
        pa.field("features", pa.list_(pa.list_(value_type, num_mel_bins)), nullable=False),
    ]
    meta = {"mfcon.schema_version": str(SCHEMA_VERSION), **(metadata or {})}
    return pa.schema(fields, metadata=meta)


def writer_options(feature_dtype: str = "float32") -> dict[str, Any]:
    """``pq.ParquetWriter`` options for a shard. float32: pyarrow's defaults (snappy, dictionary pages), as
    shards were always written. float16: the feature values BYTE_STREAM_SPLIT (no dictionary) + zstd, which
    shrank float16 shards a further ~15% at about the same read speed (docs/performance_shards.md)."""
    if _check_dtype(feature_dtype) == "float32":
        return {}
    return {"compression": "zstd", "compression_level": COMPACT_ZSTD_LEVEL,
            "use_dictionary": ["utt_id", "speaker", "speaker_index", "num_frames"],
            "use_byte_stream_split": [_FEATURES_LEAF]}


def schema_feature_dtype(schema: pa.Schema) -> str | None:
    """``float32``/``float16`` for a shard-like schema's feature values, None if there is no such column."""
    try:
        value = schema.field("features").type.value_type.value_type
    except (KeyError, AttributeError):
        return None
    return next((name for name, t in _ARROW_DTYPES.items() if value == t), str(value))


def rows_to_table(rows: list[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows ``{utt_id, speaker, speaker_index, features (T, F)}`` -> Arrow table (one copy of the frames)."""
    inner = schema.field("features").type.value_type
    bins, value_type = inner.list_size, inner.value_type
    feats = [np.ascontiguousarray(r["features"], dtype=np.float32) for r in rows]
    for r, x in zip(rows, feats):
        if x.ndim != 2 or x.shape[1] != bins:
            raise ValueError(f"{r['utt_id']}: features must be (T, {bins}), got {x.shape}")
        if value_type == pa.float16() and x.size and float(np.abs(x).max()) > FLOAT16_MAX:
            raise ValueError(f"{r['utt_id']}: features exceed the float16 range (|x| > {FLOAT16_MAX:g}); "
                             "prepare with feature_dtype float32")
    frames = np.array([x.shape[0] for x in feats], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(frames, dtype=np.int64)]).astype(np.int32)
    flat = np.concatenate(feats).reshape(-1) if feats else np.zeros(0, np.float32)  # (sum T * F,)
    flat = flat.astype(value_type.to_pandas_dtype(), copy=False)  # float16: round to nearest
    column = pa.ListArray.from_arrays(pa.array(offsets),
                                      pa.FixedSizeListArray.from_arrays(pa.array(flat, value_type), bins))
    return pa.Table.from_arrays([
        pa.array([str(r["utt_id"]) for r in rows], pa.string()),
        pa.array([str(r["speaker"]) for r in rows], pa.string()),
        pa.array([int(r["speaker_index"]) for r in rows], pa.int32()),
        pa.array(frames, pa.int32()),
        column,
    ], schema=schema)


def features_from_column(column: pa.ChunkedArray | pa.Array | np.ndarray) -> list[np.ndarray]:
    """``features`` column -> one (T, F) float32 array per row, zero-copy for float32 Arrow input.

    Accepts a ChunkedArray (``pq.read_table``), an Array (one record batch, as
    Ray Data's ``batch_format="pyarrow"`` gives), or a numpy object array of
    per-row frames (``batch_format="numpy"``). Arrow-backed results are
    read-only views into the column's buffers: copy before writing into them.
    A float16 (compact) column is converted to float32 once per chunk, and the
    rows are read-only views into that conversion.
    """
    if isinstance(column, np.ndarray):
        return [_frames_from_numpy(x) for x in column]
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out: list[np.ndarray] = []
    for chunk in chunks:
        if chunk.null_count:
            raise ValueError("features column holds nulls")
        bins = chunk.type.value_type.list_size
        offsets = chunk.offsets.to_numpy()  # (N + 1,) into chunk.values, slice-aware
        frames = chunk.values  # FixedSizeListArray, unsliced
        flat = frames.flatten().to_numpy(zero_copy_only=True).reshape(-1, bins)  # (sum T, F)
        if flat.dtype != np.float32:  # compact shards: one conversion per chunk
            flat = flat.astype(np.float32)
            flat.flags.writeable = False
        out.extend(flat[offsets[i]:offsets[i + 1]] for i in range(len(chunk)))
    return out


def _frames_from_numpy(x: Any) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype == object:  # ragged rows come back as an array of per-frame arrays
        arr = np.stack([np.asarray(f, dtype=np.float32) for f in arr]) if len(arr) else arr.astype(np.float32)
    return np.asarray(arr, dtype=np.float32)
