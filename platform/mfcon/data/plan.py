"""What goes where: speakers to train/dev/test (the dev/test protocol), utterances to shards.

Test is what the test trial lists name (e.g. VoxCeleb1-O, -E and -H); dev is a given dev list
or ``n`` seeded training speakers held out with a generated list; train is every
other speaker. The three are speaker-disjoint, so a search never sees the
speakers a verdict is judged on, nor trains on those it selects with.

The shard plan is deterministic: the same inputs and seed give the same
``ShardTask`` list, each with a fingerprint that lets a re-run keep finished shards.
With an :class:`~mfcon.data.augment.Augmentation`, each training utterance
becomes several rows (speed-perturbed speakers, augmented copies with their
recipes drawn here), shuffled together; dev and test are never augmented, so
their tasks and fingerprints are the same as without it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mfcon.config import FeatureConfig
from mfcon.data.augment import AUGMENT_VERSION, CLEAN, Augmentation, Variant
from mfcon.data.corpus.voxceleb import TrialPair, Utterance, make_trials
from mfcon.data.shards import EVAL_SPLITS, SCHEMA_VERSION, SPLITS


class SplitError(ValueError):
    """The trial lists and the corpus do not give disjoint train/dev/test speakers; the message names the file."""


def _named(trials: list[TrialPair], by_id: dict[str, Utterance], trials_path: str | Path) -> list[Utterance]:
    named = sorted({t.enroll for t in trials} | {t.test for t in trials})
    missing = [u for u in named if u not in by_id]
    if missing:
        raise SplitError(f"{trials_path}: {len(missing)} utterances are not in the corpus listing, e.g. {missing[0]}")
    return [by_id[u] for u in named]


def hold_out_dev(utterances: list[Utterance], exclude: set[str], n_speakers: int, trials_per_utt: int,
                 seed: int) -> list[TrialPair]:
    """A generated dev list over ``n_speakers`` seeded speakers (with >= 2 utterances) not in ``exclude``."""
    by_speaker: dict[str, list[str]] = {}
    for u in utterances:
        if u.speaker not in exclude:
            by_speaker.setdefault(u.speaker, []).append(u.utt_id)
    eligible = sorted(s for s, utts in by_speaker.items() if len(utts) >= 2)
    if n_speakers < 2 or n_speakers > len(eligible) - 2:
        raise SplitError(f"--dev-speakers {n_speakers}: need 2..{len(eligible) - 2} (the corpus has {len(eligible)} "
                         "non-test speakers with >= 2 utterances, and training keeps at least 2)")
    chosen = sorted(np.random.default_rng([seed, 7]).choice(eligible, n_speakers, replace=False).tolist())
    return make_trials({s: sorted(by_speaker[s]) for s in chosen}, trials_per_utt, seed)


def split_corpus(utterances: list[Utterance], lists: dict[str, tuple[list[TrialPair], str | Path]]
                 ) -> dict[str, list[Utterance]]:
    """{split: utterances}: dev = what the dev list names, test = what any test list names, train = the rest.

    ``lists`` maps ``dev`` and each named test list (``test``, or ``O``, ``E``, ...) to (trials, where they came
    from, for messages). Test lists may share speakers (VoxCeleb1-E contains -O); none may share one with dev.
    """
    by_id = {u.utt_id: u for u in utterances}
    named = {name: _named(trials, by_id, source) for name, (trials, source) in lists.items()}
    dev_speakers = {u.speaker for u in named["dev"]}
    test: dict[str, Utterance] = {}
    for name, utts in named.items():
        if name == "dev":
            continue
        shared = dev_speakers & {u.speaker for u in utts}
        if shared:
            raise SplitError(f"{lists['dev'][1]} and {lists[name][1]} share {len(shared)} speakers, e.g. "
                             f"{min(shared)}: dev and test speakers must be disjoint")
        test.update((u.utt_id, u) for u in utts)
    splits = {"dev": named["dev"], "test": sorted(test.values(), key=lambda u: u.utt_id)}
    held_out = dev_speakers | {u.speaker for u in splits["test"]}
    splits["train"] = [u for u in utterances if u.speaker not in held_out]
    if len({u.speaker for u in splits["train"]}) < 2:
        sources = ", ".join(str(source) for name, (_, source) in lists.items() if name != "dev")
        raise SplitError(f"{sources}: the dev and test lists leave fewer than 2 training speakers")
    return splits


class ShardRow(NamedTuple):
    """One row a shard task builds: a recording, and how the row's waveform differs from it."""

    utt_id: str  # the recording's id, + "#sp0.9" / "#music1" for speed-perturbed and augmented rows
    speaker: str  # "<speaker>-sp0.9" for speed-perturbed rows
    speaker_index: int  # -1 in dev and test
    path: str  # the recording
    variant: Variant = CLEAN


@dataclass(frozen=True)
class ShardTask:
    """Everything one worker needs to build one shard (picklable; augmentation banks only as file names)."""

    split: str
    file: str
    utterances: tuple[ShardRow, ...]
    feature_config: FeatureConfig
    dither_seed: int
    plan: str  # fingerprint of all of the above + audio sizes/mtimes
    feature_dtype: str = "float32"  # how the shard stores features (float16: compact); in the fingerprint


def plan_shards(splits: dict[str, list[Utterance]], feature_cfg: FeatureConfig, rows_per_shard: int, seed: int,
                augment: Augmentation | None = None,
                feature_dtype: str = "float32") -> tuple[dict[str, int], list[ShardTask]]:
    """Deterministic shard plan: (speaker -> index over train speakers, tasks in order).

    ``augment`` adds speed-perturbed speakers (indices after the originals) and
    augmented copies to train only; the train rows are shuffled with ``seed``
    after expansion, so a shard mixes speakers, speeds and copies.
    ``feature_dtype`` (float32 or float16) is part of every fingerprint, so a
    re-run with another dtype rebuilds every shard rather than mixing dtypes.
    """
    base = sorted({u.speaker for u in splits["train"]})
    speakers = augment.speakers(base) if augment else {s: i for i, s in enumerate(base)}
    train = _train_rows(splits["train"], speakers, augment)
    order = np.random.default_rng(seed).permutation(len(train))
    ordered = {"train": [train[i] for i in order],
               **{name: [ShardRow(u.utt_id, u.speaker, -1, str(u.path))
                         for u in sorted(splits[name], key=lambda u: u.utt_id)] for name in EVAL_SPLITS}}
    tasks = []
    for split in SPLITS:
        rows_of_split = ordered[split]
        for n, start in enumerate(range(0, len(rows_of_split), rows_per_shard)):
            rows = tuple(rows_of_split[start:start + rows_per_shard])
            file = f"{split}-{n:05d}.parquet"
            dither_seed = int.from_bytes(hashlib.sha256(f"{seed}/{file}".encode()).digest()[:4], "little")
            tasks.append(ShardTask(split, file, rows, feature_cfg, dither_seed,
                                   _fingerprint(file, rows, feature_cfg, dither_seed, feature_dtype), feature_dtype))
    return speakers, tasks


def _train_rows(train: list[Utterance], speakers: dict[str, int], augment: Augmentation | None) -> list[ShardRow]:
    if augment is None:
        return [ShardRow(u.utt_id, u.speaker, speakers[u.speaker], str(u.path)) for u in train]
    return [ShardRow(utt_id, speaker, speakers[speaker], str(u.path), variant)
            for u in train for utt_id, speaker, variant in augment.variants(u.utt_id, u.speaker)]


def _stats(paths: list[str]) -> list[tuple[int, int]]:
    stats = []
    for path in paths:
        st = Path(path).stat()
        stats.append((st.st_size, st.st_mtime_ns))
    return stats


def _fingerprint(file: str, rows: tuple[ShardRow, ...], cfg: FeatureConfig, dither_seed: int,
                 feature_dtype: str = "float32") -> str:
    """sha256 of what the shard holds. A shard without augmented rows hashes exactly as before augmentation
    existed, so folders prepared then still resume; one with them adds the recipes and their bank files.
    Likewise a float32 shard hashes as before feature dtypes existed; any other dtype is added."""
    blob: list = [SCHEMA_VERSION, file, cfg.model_dump(), dither_seed, [r[:4] for r in rows],
                  _stats([r.path for r in rows])]
    variants = [r.variant for r in rows]
    if any(v != CLEAN for v in variants):
        banks = sorted({s for v in variants if v.recipe for s in v.recipe.sources})
        blob += [AUGMENT_VERSION, variants, banks, _stats(banks)]
    if feature_dtype != "float32":
        blob += [{"feature_dtype": feature_dtype}]
    return hashlib.sha256(json.dumps(blob).encode()).hexdigest()
