"""Speaker-balanced P x K batches of random crops, built from a row stream.

SupCon needs positives in every batch: with plain shuffled batches over
hundreds of speakers most anchors have none (PAPER.md). Rows arrive as a
stream (local shards or a Ray Data shard), so the batcher keeps a queue per
speaker and emits a batch whenever P speakers have K pending rows.

Every data-parallel worker must run the same number of steps per epoch or DDP
deadlocks, so the batcher always yields exactly ``steps`` batches: after the
stream ends it finishes with leftovers, then with a bounded reservoir of
recent crops.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch


@dataclass
class CropBatch:
    feats: torch.Tensor  # (B, T, F) float32
    lengths: torch.Tensor  # (B,) int64
    labels: torch.Tensor  # (B,) int64


def random_crop(feats: np.ndarray, crop_frames: int, rng: np.random.Generator) -> np.ndarray:
    """(T, F) -> (crop_frames, F); shorter utterances are tiled, as WeSpeaker does."""
    num = feats.shape[0]
    if num >= crop_frames:
        start = int(rng.integers(0, num - crop_frames + 1))
        return np.asarray(feats[start : start + crop_frames], dtype=np.float32)
    reps = -(-crop_frames // num)
    return np.tile(np.asarray(feats, dtype=np.float32), (reps, 1))[:crop_frames]


def stack_crops(crops: list[np.ndarray], labels: list[int]) -> CropBatch:
    feats = torch.from_numpy(np.stack(crops))
    return CropBatch(
        feats=feats,
        lengths=torch.full((len(crops),), feats.shape[1], dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
    )


class SpeakerBalancedBatcher:
    """Turn a stream of ``(features (T, F), speaker_index)`` rows into P x K crop batches."""

    def __init__(self, speakers_per_batch: int, utts_per_speaker: int, crop_frames: int,
                 steps: int, seed: int, reservoir_rows: int | None = None):
        if utts_per_speaker < 2:
            raise ValueError("utts_per_speaker must be >= 2 so every anchor has a positive")
        self.p, self.k, self.crop_frames, self.steps = speakers_per_batch, utts_per_speaker, crop_frames, steps
        self.rng = np.random.default_rng(seed)
        self.reservoir: deque[tuple[np.ndarray, int]] = deque(maxlen=reservoir_rows or 8 * self.p * self.k)

    def _emit(self, chosen: dict[int, list[np.ndarray]]) -> CropBatch:
        crops, labels = [], []
        for spk, rows in chosen.items():
            for crop in rows:
                crops.append(crop)
                labels.append(spk)
        return stack_crops(crops, labels)

    def _take(self, queues: dict[int, deque], speakers: list[int]) -> dict[int, list[np.ndarray]]:
        return {s: [queues[s].popleft() for _ in range(self.k)] for s in speakers}

    def batches(self, rows: Iterable[tuple[np.ndarray, int]]) -> Iterator[CropBatch]:
        queues: dict[int, deque] = defaultdict(deque)
        ready: set[int] = set()
        emitted = 0
        for feats, spk in rows:
            crop = random_crop(feats, self.crop_frames, self.rng)
            spk = int(spk)
            queues[spk].append(crop)
            self.reservoir.append((crop, spk))
            if len(queues[spk]) >= self.k:
                ready.add(spk)
            if len(ready) >= self.p:
                speakers = [int(s) for s in self.rng.choice(sorted(ready), self.p, replace=False)]
                chosen = self._take(queues, speakers)
                ready = {s for s in ready if len(queues[s]) >= self.k}
                yield self._emit(chosen)
                emitted += 1
                if emitted == self.steps:
                    return
        while emitted < self.steps:
            yield self._emit(self._fill_batch(queues))
            emitted += 1

    def _fill_batch(self, queues: dict[int, deque]) -> dict[int, list[np.ndarray]]:
        """After the stream: leftovers first, then reservoir crops; a speaker seen once gets
        a second random crop of the same rows (the MFCon authors' two-view positives)."""
        pool: dict[int, list[np.ndarray]] = defaultdict(list)
        for spk, queue in queues.items():
            pool[spk].extend(queue)
            queue.clear()
        for crop, spk in self.reservoir:
            pool[spk].append(crop)
        if not pool:
            raise ValueError("the training stream yielded no rows: is this worker's data shard empty?")
        order = sorted(pool, key=lambda s: -len(pool[s]))
        speakers = [int(s) for s in self.rng.permutation(order[: max(self.p, 1) * 2])[: self.p]]
        chosen = {}
        for spk in speakers:
            rows = pool[spk]
            idx = self.rng.choice(len(rows), self.k, replace=len(rows) < self.k)
            chosen[spk] = [_reroll(rows[i], self.rng) for i in idx]
        return chosen


def _reroll(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A circular shift gives a different view of a crop that is reused."""
    return np.roll(crop, int(rng.integers(0, crop.shape[0])), axis=0)
