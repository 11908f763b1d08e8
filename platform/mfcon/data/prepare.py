"""Corpus (VoxCeleb layout) + trial lists -> Parquet fbank shards + manifest, resumable.

Splits, with disjoint speakers:

* ``test``: the utterances the test trial list names (e.g. VoxCeleb1-O). Read
  only by replication, promotion and final reports, never by a search, so a
  verdict is not judged on the list its winner was picked on.
* ``dev``: what a study optimises, what ASHA prunes on and what picks each
  trial's best checkpoint. Either a given dev trial list, or ``dev_speakers``
  training speakers held out (seeded) with a generated list
  (:func:`mfcon.data.corpus.voxceleb.make_trials`).
* ``train``: every utterance of the remaining speakers. The train order is shuffled with ``seed`` before
it is cut into shards: every shard mixes speakers, which the speaker-balanced
streaming batcher needs (it only sees a window of shards at a time).

The shard plan is deterministic. One task (``build_shard``, a plain top-level
function) builds one shard: load audio, fbank, write the shard atomically, then
write ``<shard>.done.json`` recording its sha256, skipped audio and a plan
fingerprint. Tasks run on a process pool, or as Ray tasks when
``ray.is_initialized()``. The output folder is a location (:mod:`mfcon.storage`):
a local path or an object-store URI such as ``s3://bucket/vox1``, so Ray tasks
on any node write their shards straight to the store. A re-run
with the same inputs keeps every shard whose sidecar fingerprint and sha256
still match; ``manifest.json`` is written last, then the sidecars are removed.

Compact shards (``feature_dtype="float16"``, ``mfcon prepare --feature-dtype
float16``) store features as float16 with BYTE_STREAM_SPLIT + zstd, about 0.36x
the bytes (:mod:`mfcon.data.shards`); readers still get float32. The dtype is
in every shard's fingerprint and in the manifest: a re-run over a folder of
the other dtype is refused (or, with ``overwrite``, rebuilt whole), never mixed.

Augmentation (:mod:`mfcon.data.augment`, off by default) adds train rows only:
speed-perturbed speakers and MUSAN/RIR copies, each drawn into the plan from
``(seed, utt_id, copy)``. Its bank folders are checked before anything is
written; the manifest records its config; a changed config changes the
fingerprints of the train shards it touches, so those are rebuilt and the rest
resume.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable

from tqdm.auto import tqdm

from mfcon import storage
from mfcon.config import FeatureConfig
from mfcon.data.augment import Augmentation, AugmentConfig
from mfcon.data.corpus.voxceleb import (
    list_utterances,
    read_trials,
    write_trials,
)
from mfcon.data.plan import ShardTask, SplitError, hold_out_dev, plan_shards, split_corpus
from mfcon.data.shard_build import PLAN_KEY, PrepareError, run_shard_tasks, sidecar_path  # noqa: F401 (PrepareError: raised from here)
from mfcon.data.shards import (
    TEST_LIST,
    check_list_name,
    FEATURE_DTYPES,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SPLITS,
    DevProtocol,
    Manifest,
    ManifestError,
    ShardEntry,
    SkippedAudio,
    SplitInfo,
    read_manifest,
    trials_name,
    write_manifest,
)

DEFAULT_FEATURES = FeatureConfig()
_OWN_FILE = re.compile(r"^((train|dev|test)-\d{5}\.parquet(\.done\.json)?|manifest\.json"
                       r"|trials-(dev|test|test-[A-Za-z0-9_-]+)\.txt)"
                       r"(\.tmp-\d+)?$")


# ---------------------------------------------------------------- resume

def _adopt_manifest(out: str, feature_cfg: FeatureConfig, tasks: list[ShardTask], overwrite: bool,
                    feature_dtype: str = "float32") -> None:
    """Turn an existing manifest into sidecars (so its shards can be reused), then remove it.

    Removing it first means an interrupted re-run never leaves a manifest that
    points at shards the re-run has replaced.
    """
    path = storage.join(out, MANIFEST_NAME)
    if not storage.exists(path):
        return
    try:
        old = read_manifest(out)
    except ManifestError as e:
        if not overwrite:
            raise ManifestError(f"{e}\n(choose another output folder, or rebuild it: mfcon prepare --overwrite)"
                                ) from None
        storage.delete(path)
        return
    if old.feature_config != feature_cfg and not overwrite:
        raise ManifestError(
            f"{path}: prepared with a different feature config ({old.feature_config.model_dump()} vs "
            f"{feature_cfg.model_dump()}); choose another output folder (--out), or rebuild every shard "
            "(mfcon prepare --overwrite)")
    if old.feature_dtype != feature_dtype and not overwrite:
        raise ManifestError(
            f"{path}: prepared with feature_dtype {old.feature_dtype}, this run asks for {feature_dtype}; a folder "
            "never mixes the two: choose another output folder (--out), or rebuild every shard "
            "(mfcon prepare --overwrite)")
    by_file = {t.file: t for t in tasks}
    for info in old.splits.values():
        for entry in info.shards:
            shard, task = storage.join(out, entry.file), by_file.get(entry.file)
            if task is None or not storage.is_file(shard) or storage.exists(sidecar_path(out, entry.file)):
                continue
            plan = _stored_plan(shard)
            paths = {row.path for row in task.utterances}
            skipped = [s.model_dump() for s in old.skipped if s.path in paths]
            record = {"plan": plan, "entry": entry.model_dump(), "skipped": skipped, "rows": len(task.utterances)}
            storage.write_text(sidecar_path(out, entry.file), json.dumps(record, indent=1))
    storage.delete(path)


def _stored_plan(shard: str) -> str | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        fs, path = storage.resolve(shard)
        meta = pq.read_schema(path, filesystem=fs).metadata or {}
    except (OSError, ValueError, pa.ArrowException):  # unreadable shard: rebuild it
        return None
    value = meta.get(PLAN_KEY.encode())
    return value.decode() if value else None


def _finished(out: str, task: ShardTask) -> dict[str, Any] | None:
    """The task's sidecar record if its shard is complete and unchanged, else None."""
    try:
        record = json.loads(storage.read_text(sidecar_path(out, task.file)))
        entry = ShardEntry.model_validate(record["entry"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    shard = storage.join(out, task.file)
    if record.get("plan") != task.plan or entry.file != task.file or not storage.is_file(shard):
        return None
    return record if storage.sha256(shard) == entry.sha256 else None


# ---------------------------------------------------------------- running tasks

# ---------------------------------------------------------------- the entry point

def named_test_lists(test_trials: str | Path | Mapping[str, str | Path]) -> dict[str, str | Path]:
    """{name: trial list}: one list is named ``test``; names are checked (:func:`check_list_name`)."""
    if isinstance(test_trials, (str, Path)):
        return {TEST_LIST: test_trials}
    if not test_trials:
        raise SplitError("no test trial list given (--test-trials PATH or NAME=PATH)")
    return {check_list_name(str(name)): path for name, path in test_trials.items()}


def prepare_dataset(corpus_root: str | Path, test_trials: str | Path | Mapping[str, str | Path],
                    out_dir: str | Path, *,
                    dev_trials: str | Path | None = None, dev_speakers: int | None = None, dev_trials_per_utt: int = 3,
                    feature_cfg: FeatureConfig = DEFAULT_FEATURES, rows_per_shard: int = 256, num_workers: int = 2,
                    seed: int = 0, progress: bool = True, overwrite: bool = False,
                    augment: AugmentConfig | None = None, feature_dtype: str = "float32",
                    trial_report: Callable[[str, int, int, int], None] | None = None) -> Manifest:
    """Prepare train/dev/test shards for ``corpus_root`` in ``out_dir``; return the manifest.

    ``test_trials`` is one test list (named ``test``) or several named ones, ``{"O": ..., "E": ..., "H": ...}``
    (VoxCeleb1-O/E/H side by side): the test split holds the utterances of all of them, and the speakers of
    every one are held out of train and dev. Each is written as its own normalised list, checksummed in the
    manifest (:func:`mfcon.data.shards.trials_name`).

    The dev set is ``dev_trials`` (a trial list over speakers disjoint from the
    test list's) or ``dev_speakers`` training speakers held out with a generated
    list; exactly one must be given. Resumable: shards finished by an earlier
    (possibly interrupted) run with the same inputs are kept. ``num_workers=0``
    builds in this process; the process pool starts workers with
    forkserver/spawn, so a calling script needs the ``if __name__ == "__main__":``
    guard. Refuses an ``out_dir`` whose manifest used another feature config
    unless ``overwrite`` (then every shard is rebuilt).

    ``feature_dtype="float16"`` writes compact shards (about 0.36x the bytes;
    readers still get float32) and records ``feature_dtype`` in the manifest;
    an ``out_dir`` prepared with the other dtype is refused unless
    ``overwrite`` (then every shard is rebuilt).

    ``trial_report(name, kept, listed, skipped_files)`` is called for the dev and each test list: trials kept in the
    normalised list, trials listed, and how many skipped (unreadable) files the dropped trials name.

    ``augment`` adds augmented copies and speed-perturbed speakers to the train
    split only (:mod:`mfcon.data.augment`); its MUSAN/RIR folders are checked
    (AugmentError naming the folder) before anything is written.

    >>> m = prepare_dataset("vox/wav", "vox/veri_test2.txt", "data/vox", dev_speakers=40)  # doctest: +SKIP
    >>> m.splits["train"].rows, len(m.speakers)  # doctest: +SKIP
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows per shard (--rows-per-shard) must be >= 1, got {rows_per_shard}")
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature_dtype must be one of {FEATURE_DTYPES}, got {feature_dtype!r}")
    if (dev_trials is None) == (dev_speakers is None):
        raise SplitError("give exactly one of dev_trials (a dev trial list; --dev-trials) or dev_speakers (hold out "
                         "N training speakers; --dev-speakers): a study selects on dev, and test stays unseen until "
                         "the verdict")
    augmentation = Augmentation.build(augment) if augment is not None and augment.active else None
    root, out = Path(corpus_root).resolve(), storage.normalize(out_dir)
    utterances = list_utterances(root)
    sources = named_test_lists(test_trials)
    tests = {name: read_trials(path, root=root) for name, path in sources.items()}
    if dev_trials is not None:
        dev, dev_source = read_trials(dev_trials, root=root), str(dev_trials)
    else:
        named = {u for trials in tests.values() for t in trials for u in (t.enroll, t.test)}
        test_speakers = {u.speaker for u in utterances if u.utt_id in named}
        dev = hold_out_dev(utterances, test_speakers, dev_speakers, dev_trials_per_utt, seed)
        dev_source = f"dev_speakers={dev_speakers}"
    splits = split_corpus(utterances, {"dev": (dev, dev_source),
                                       **{name: (tests[name], source) for name, source in sources.items()}})
    protocol = (DevProtocol(source="file", speakers=len({u.speaker for u in splits["dev"]}), file=str(dev_trials))
                if dev_trials is not None else
                DevProtocol(source="held_out_speakers", speakers=dev_speakers, trials_per_utt=dev_trials_per_utt,
                            seed=seed))
    speakers, tasks = plan_shards(splits, feature_cfg, rows_per_shard, seed, augmentation, feature_dtype)
    storage.makedirs(out)
    _adopt_manifest(out, feature_cfg, tasks, overwrite, feature_dtype)

    records = {t.file: r for t in tasks if (r := _finished(out, t)) is not None}
    todo = [t for t in tasks if t.file not in records]
    with tqdm(total=sum(len(t.utterances) for t in todo), unit="row", desc=f"prepare {storage.basename(out)}",
              disable=not progress, smoothing=0.1) as bar:  # rows, augmented copies included
        for record in run_shard_tasks(out, todo, num_workers, bar):
            records[record["entry"]["file"]] = record

    manifest = _assemble(root, feature_cfg, speakers, tasks, records, protocol, list(tests))
    manifest = manifest.model_copy(update={"feature_dtype": feature_dtype})
    if augmentation is not None:
        manifest = manifest.model_copy(update={"augmentation": augmentation.config})
    lost = _skipped_utt_ids(tasks, records)
    checksums = {}
    for name, trials in {"dev": dev, **tests}.items():  # atomic
        kept = [t for t in trials if t.enroll not in lost and t.test not in lost]
        path = storage.join(out, trials_name(name))
        write_trials(path, kept)
        checksums[name] = storage.sha256(path)
        if trial_report is not None:
            named = {u for t in trials for u in (t.enroll, t.test)} & lost
            trial_report(name, len(kept), len(trials), len(named))
    manifest = manifest.model_copy(update={"trials_sha256": checksums})
    write_manifest(out, manifest)
    _clean(out, manifest)
    return manifest


def _assemble(root: Path, cfg: FeatureConfig, speakers: dict[str, int], tasks: list[ShardTask],
              records: dict[str, dict[str, Any]], protocol: DevProtocol, test_lists: list[str]) -> Manifest:
    splits: dict[str, SplitInfo] = {}
    skipped: dict[str, SkippedAudio] = {}  # by path: a recording behind several augmented rows is listed once
    for split in SPLITS:
        entries, present = [], set()
        for task in (t for t in tasks if t.split == split):
            record = records[task.file]
            entries.append(ShardEntry.model_validate(record["entry"]))
            lost = {s["path"] for s in record["skipped"]}
            skipped |= {s["path"]: SkippedAudio.model_validate(s) for s in record["skipped"]}
            present |= {row.speaker for row in task.utterances if row.path not in lost}
        splits[split] = SplitInfo(shards=entries, rows=sum(e.rows for e in entries), num_speakers=len(present))
    return Manifest(schema_version=SCHEMA_VERSION, feature_config=cfg, speakers=speakers, splits=splits,
                    trials={name: trials_name(name) for name in ("dev", *test_lists)}, dev_protocol=protocol,
                    skipped=sorted(skipped.values(), key=lambda s: s.path),
                    created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), source=str(root))


def _skipped_utt_ids(tasks: list[ShardTask], records: dict[str, dict[str, Any]]) -> set[str]:
    """Utterances whose audio was skipped: their trials are left out of the normalised list."""
    skipped_paths = {s["path"] for r in records.values() for s in r["skipped"]}
    return {row.utt_id for t in tasks for row in t.utterances if row.path in skipped_paths}


def _clean(out: str, manifest: Manifest) -> None:
    """Remove sidecars, temp files and shards of older plans (only names this module writes)."""
    keep = {MANIFEST_NAME, *manifest.trials.values()} | {s.file for info in manifest.splits.values() for s in info.shards}
    for name in storage.list_names(out):
        if name not in keep and _OWN_FILE.match(name):
            storage.delete(storage.join(out, name))
