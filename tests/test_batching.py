"""Speaker-balanced P x K batching from a row stream."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from mfcon.data.batching import SpeakerBalancedBatcher, random_crop


def rows(n_speakers: int, per_speaker: int, seed: int = 0, frames=(50, 300)):
    rng = np.random.default_rng(seed)
    items = [(rng.standard_normal((int(rng.integers(*frames)), 4)).astype(np.float32), s)
             for s in range(n_speakers) for _ in range(per_speaker)]
    order = rng.permutation(len(items))
    return [items[i] for i in order]


def test_every_batch_is_p_by_k_with_positives():
    batcher = SpeakerBalancedBatcher(speakers_per_batch=4, utts_per_speaker=2, crop_frames=40, steps=10, seed=0)
    batches = list(batcher.batches(rows(10, 8)))
    assert len(batches) == 10
    for b in batches:
        assert b.feats.shape == (8, 40, 4) and b.lengths.tolist() == [40] * 8
        counts = Counter(b.labels.tolist())
        assert len(counts) == 4 and set(counts.values()) == {2}


def test_exactly_steps_batches_even_when_the_stream_runs_short():
    """DDP needs the same step count on every worker: the batcher tops up from leftovers/reservoir."""
    batcher = SpeakerBalancedBatcher(speakers_per_batch=4, utts_per_speaker=2, crop_frames=40, steps=12, seed=0)
    batches = list(batcher.batches(rows(5, 3)))  # 15 rows: far fewer than 12 x 8
    assert len(batches) == 12
    for b in batches:
        counts = Counter(b.labels.tolist())
        assert min(counts.values()) >= 2  # still positives for SupCon


def test_stops_at_steps_on_a_long_stream():
    batcher = SpeakerBalancedBatcher(speakers_per_batch=2, utts_per_speaker=2, crop_frames=10, steps=3, seed=0)
    assert len(list(batcher.batches(rows(10, 20)))) == 3


def test_empty_stream_is_a_clear_error():
    batcher = SpeakerBalancedBatcher(speakers_per_batch=2, utts_per_speaker=2, crop_frames=10, steps=1, seed=0)
    with pytest.raises(ValueError, match="no rows"):
        list(batcher.batches([]))


def test_deterministic_for_a_seed_and_different_for_another():
    def first(seed):
        b = SpeakerBalancedBatcher(4, 2, 40, steps=3, seed=seed)
        return [x.feats.numpy() for x in b.batches(rows(10, 8))]

    a, b, c = first(1), first(1), first(2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_random_crop_is_a_window_and_short_utterances_tile():
    rng = np.random.default_rng(0)
    feats = np.arange(100 * 2, dtype=np.float32).reshape(100, 2)
    crop = random_crop(feats, 30, rng)
    start = int(crop[0, 0]) // 2
    assert np.array_equal(crop, feats[start:start + 30])
    short = feats[:7]
    tiled = random_crop(short, 20, rng)
    assert tiled.shape == (20, 2) and np.array_equal(tiled[7:14], short)


def test_k_below_two_is_refused():
    with pytest.raises(ValueError, match="positive"):
        SpeakerBalancedBatcher(4, 1, 40, steps=1, seed=0)
