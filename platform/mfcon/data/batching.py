"""Speaker-balanced P x K batches of random crops, built from a row stream.

SupCon needs positives in every batch: with plain shuffled batches over
hundreds of speakers most anchors have none (MFCon, arXiv 2410.05037, trains
on P speakers x K crops). Rows arrive as a stream (local shards or a Ray Data
shard), so the batcher queues each speaker's utterances and cuts crops from
them when the speaker goes into a batch.

Every batch holds exactly P distinct speakers with K crops each, and no crop is
a copy or a circular shift of another crop of its speaker: crops of one
utterance use different random offsets. A speaker with fewer than K
utterances is never dropped: its K crops cycle through its utterances (one
utterance gives K views of it, as the MFCon authors' training set does). A
crop repeats only when the speaker has fewer distinct (utterance, offset)
pairs than K: its only utterance is shorter than the crop (tiled: one offset)
or barely longer.

When a speaker is ready: as soon as it has K pending utterances, since K
different utterances are the best positives. A speaker with fewer waits for
the end of the stream, since in a shuffled stream more of its rows may still
come; then leftovers not yet in a batch go first, and a leftover's crops also
use its last used rows, so it gets different utterances where it has them.
Waiting holds at most K - 1 rows per speaker; a ready speaker keeps at most 2K.

Every data-parallel worker must run the same number of steps per epoch or DDP
deadlocks, so the batcher yields exactly ``steps`` batches: after the stream
ends it empties the leftovers, then tops up with P distinct speakers from a
bounded reservoir of the last K used rows of recently used speakers, each
with fresh random crops. Everything random comes from ``seed``: the same
stream and seed give the same batches.

Two options, both off by default (``DataConfig.positives``, ``DataConfig.spec_augment``):

- ``positives="views"``: each speaker's K crops are K random crops of ONE
  utterance (two views of one recording, as the MFCon authors' training set
  has it) instead of K different utterances. A speaker is ready with one
  pending utterance and each batch uses one utterance per speaker, so the
  loop's ``steps = rows // (P K)`` reads about 1/K of the stream per epoch:
  the same number of crops and steps as ``utterances``, from fewer recordings.
- SpecAugment (``mfcon.data.spec_augment``) masks the stacked training crops,
  drawing from its own generator spawned from ``seed``: the crops themselves
  are the same with it on or off. Only this training batcher applies it; the
  dev/test scoring path never does.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from mfcon.config import Positives, SpecAugmentConfig
from mfcon.data.prefetch import prefetched
from mfcon.data.spec_augment import spec_augment_batch


@dataclass
class CropBatch:
    feats: torch.Tensor  # (B, T, F) float32
    lengths: torch.Tensor  # (B,) int64
    labels: torch.Tensor  # (B,) int64


def num_offsets(num_frames: int, crop_frames: int) -> int:
    """How many different crops an utterance of ``num_frames`` frames gives (1 when tiled)."""
    return max(1, num_frames - crop_frames + 1)


def crop_at(feats: np.ndarray, start: int, crop_frames: int) -> np.ndarray:
    """(T, F) -> (crop_frames, F) from ``start``; shorter utterances are tiled, as WeSpeaker does."""
    num = feats.shape[0]
    if num >= crop_frames:
        return np.array(feats[start : start + crop_frames], dtype=np.float32)
    reps = -(-crop_frames // num)
    return np.tile(np.asarray(feats, dtype=np.float32), (reps, 1))[:crop_frames]


def random_crop(feats: np.ndarray, crop_frames: int, rng: np.random.Generator) -> np.ndarray:
    start = int(rng.integers(0, num_offsets(feats.shape[0], crop_frames)))
    return crop_at(feats, start, crop_frames)


def stack_crops(crops: list[np.ndarray], labels: list[int]) -> CropBatch:
    feats = torch.from_numpy(np.stack(crops))
    return CropBatch(
        feats=feats,
        lengths=torch.full((len(crops),), feats.shape[1], dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
    )


class SpeakerBalancedBatcher:
    """Turn a stream of ``(features (T, F), speaker_index)`` rows into P x K crop batches.

    ``reservoir_rows`` bounds the rows kept for end-of-epoch top-ups (default
    8 P K: the last K rows of each of the 8 P most recently used speakers).
    ``positives`` and ``spec_augment`` are ``DataConfig``'s fields of the same
    names (see the module docstring). ``prefetch_batches`` / ``pin_device``: build batches that many ahead in a
    background thread, pinned for a CUDA device (``mfcon.data.prefetch``); None takes them from the rows.

    >>> b = SpeakerBalancedBatcher(2, 2, 40, steps=1, seed=0, positives="views",
    ...                            spec_augment=SpecAugmentConfig(prob=1.0))
    """

    def __init__(self, speakers_per_batch: int, utts_per_speaker: int, crop_frames: int,
                 steps: int, seed: int, reservoir_rows: int | None = None, *,
                 positives: Positives = "utterances", spec_augment: SpecAugmentConfig | None = None,
                 prefetch_batches: int | None = None, pin_device: torch.device | None = None):
        if utts_per_speaker < 2:
            raise ValueError("utts_per_speaker must be >= 2 so every anchor has a positive")
        if speakers_per_batch < 1 or crop_frames < 1 or steps < 0:
            raise ValueError("speakers_per_batch and crop_frames must be >= 1, steps >= 0")
        if positives not in ("utterances", "views"):
            raise ValueError(f"data.positives must be 'utterances' or 'views', got {positives!r}")
        self.p, self.k, self.crop_frames, self.steps = speakers_per_batch, utts_per_speaker, crop_frames, steps
        self.rng = np.random.default_rng(seed)
        self.aug_rng = self.rng.spawn(1)[0]  # a child stream: spawning draws nothing from self.rng
        self.spec_augment = spec_augment or SpecAugmentConfig()
        self.rows_per_speaker = 1 if positives == "views" else self.k  # rows one speaker uses in a batch
        rows = reservoir_rows or 8 * self.p * self.k
        self.reservoir_speakers = max(2 * self.p, rows // self.k)
        self.max_pending = 2 * self.k
        # None: as the rows ask (``shard_stream.Rows``); set by the caller, it holds for any row source.
        self.prefetch_batches, self.pin_device = prefetch_batches, pin_device

    def batches(self, rows: Iterable[tuple[np.ndarray, int]]) -> Iterator[CropBatch]:
        """The epoch's ``steps`` batches. When ``rows`` asks for it (``prefetch_batches`` > 0, as
        ``shard_stream.Rows`` does) they are built that many ahead by a background thread, pinned for a CUDA
        ``pin_device``: the same batches in the same order as without (``mfcon.data.prefetch``)."""
        depth = self.prefetch_batches
        if depth is None:
            depth = int(getattr(rows, "prefetch_batches", 0) or 0)
        if depth > 0:
            return prefetched(self._batches(rows), depth, self.pin_device or getattr(rows, "pin_device", None))
        return self._batches(rows)

    def _batches(self, rows: Iterable[tuple[np.ndarray, int]]) -> Iterator[CropBatch]:
        pending: dict[int, deque[np.ndarray]] = defaultdict(deque)  # unused rows per speaker
        recent: OrderedDict[int, deque[np.ndarray]] = OrderedDict()  # used rows, LRU over speakers
        seen: set[int] = set()
        used: set[int] = set()  # speakers already in a batch this epoch
        ready: set[int] = set()
        emitted = 0

        def retire(spk: int, row: np.ndarray) -> None:
            """Keep a used row for top-ups; the reservoir holds a bounded number of speakers."""
            recent.setdefault(spk, deque(maxlen=self.k)).append(row)
            recent.move_to_end(spk)
            while len(recent) > self.reservoir_speakers:
                recent.popitem(last=False)

        need = self.rows_per_speaker

        def take(spk: int) -> list[np.ndarray]:
            """Up to ``need`` of the speaker's pending rows, made up to ``need`` from its used rows where it has any.

            ``views``: one row; a top-up (no pending row) picks one of its used rows at random."""
            queue = pending.get(spk)
            if not queue:
                old = list(recent[spk])
                return old if need == self.k else [old[int(self.rng.integers(len(old)))]]
            out = [queue.popleft() for _ in range(min(need, len(queue)))]
            if not queue:
                del pending[spk]
            old = list(recent.get(spk, ()))[len(out) - need:] if len(out) < need else []
            for row in out:
                retire(spk, row)
            used.add(spk)
            return out + old

        def emit(speakers: list[int]) -> CropBatch:
            crops, labels = [], []
            for spk in speakers:
                crops.extend(self._crops(take(spk)))
                labels.extend([spk] * self.k)
            batch = stack_crops(crops, labels)
            spec_augment_batch(batch.feats.numpy(), self.spec_augment, self.aug_rng)  # in place: shares memory
            return batch

        if self.steps == 0:
            return
        for feats, spk in rows:
            spk = int(spk)
            seen.add(spk)
            queue = pending[spk]
            queue.append(np.array(feats, dtype=np.float32))  # a copy: never pin the source's buffers
            if len(queue) > self.max_pending:
                retire(spk, queue.popleft())
            if len(queue) >= need:
                ready.add(spk)
            while len(ready) >= self.p:
                speakers = sorted(ready)[: self.p]
                yield emit(speakers)
                emitted += 1
                if emitted == self.steps:
                    return
                ready = {s for s in ready if len(pending.get(s, ())) >= need}

        if not seen:
            raise ValueError("the training stream yielded no rows: is this worker's data shard empty?")
        if len(seen) < self.p:
            raise ValueError(f"the training stream had {len(seen)} distinct speakers, fewer than "
                             f"speakers_per_batch={self.p}: a batch needs {self.p} distinct speakers")
        while emitted < self.steps:
            yield emit(self._end_speakers(pending, recent, used))
            emitted += 1

    def _end_speakers(self, pending: dict[int, deque], recent: OrderedDict[int, deque],
                      used: set[int]) -> list[int]:
        """After the stream: leftovers (speakers not yet in a batch first), then reservoir speakers."""
        leftovers = [int(s) for s in self.rng.permutation(sorted(pending))]
        leftovers.sort(key=lambda s: s in used)  # stable: unused speakers first, random within
        chosen = leftovers[: self.p]
        others = sorted(set(recent) - set(chosen))
        need = self.p - len(chosen)  # others suffice: the reservoir keeps >= 2 P speakers, or all seen
        if need:
            chosen += [int(s) for s in self.rng.choice(others, need, replace=False)]
        return chosen

    def _crops(self, rows: list[np.ndarray]) -> list[np.ndarray]:
        """K crops cycling through ``rows``, each at a random offset not yet used for its row.

        A row runs out of offsets only when it is tiled (one offset) or barely longer than the
        crop; the cycle then skips it, and a crop repeats only when every row has run out
        (so a speaker whose only utterance is shorter than the crop gets K identical crops).
        """
        sizes = [num_offsets(r.shape[0], self.crop_frames) for r in rows]
        taken: list[list[int]] = [[] for _ in rows]
        crops, n, i = [], len(rows), 0
        for _ in range(self.k):
            order = [(i + d) % n for d in range(n)]
            j = next((x for x in order if len(taken[x]) < sizes[x]), order[0])
            i = j + 1
            if len(taken[j]) == sizes[j]:
                start = int(self.rng.integers(sizes[j]))  # nothing new left anywhere
            else:  # uniform over the offsets this row has not used yet
                start = int(self.rng.integers(sizes[j] - len(taken[j])))
                for t in sorted(taken[j]):
                    start += start >= t
                taken[j].append(start)
            crops.append(crop_at(rows[j], start, self.crop_frames))
        return crops
