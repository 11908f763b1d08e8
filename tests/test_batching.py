"""Speaker-balanced P x K batching from a row stream."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from mfcon.config import SpecAugmentConfig
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


# --- speakers with fewer than K utterances, and crops that are real different views ---

def uneven_rows(counts: dict[int, int], seed: int = 0, frames=(60, 160), dim: int = 8):
    """Rows for speakers with the given utterance counts, shuffled; column 0 holds the utterance id."""
    rng = np.random.default_rng(seed)
    items, utt = [], 0
    for spk, n in counts.items():
        for _ in range(n):
            feats = rng.standard_normal((int(rng.integers(*frames)), dim)).astype(np.float32)
            feats[:, 0] = utt
            items.append((feats, spk))
            utt += 1
    return [items[i] for i in rng.permutation(len(items))]


def is_shift_of(a: np.ndarray, b: np.ndarray) -> bool:
    """True when b equals a circularly shifted along time by any amount (0 included: equal)."""
    return any(np.array_equal(np.roll(a, s, axis=0), b) for s in range(a.shape[0]))


def assert_p_by_k_distinct(batch, p: int, k: int) -> None:
    labels = batch.labels.tolist()
    counts = Counter(labels)
    assert len(counts) == p and set(counts.values()) == {k}
    feats = batch.feats.numpy()
    for spk in counts:
        crops = [feats[i] for i, s in enumerate(labels) if s == spk]
        for i in range(k):
            for j in range(i + 1, k):
                assert not is_shift_of(crops[i], crops[j]), f"speaker {spk}: crops {i} and {j} are copies"


@pytest.mark.parametrize("k", [2, 3])
def test_speakers_with_1_2_3_utterances_all_appear_with_distinct_crops(k):
    counts = {s: 1 + s % 3 for s in range(12)} | {s: 8 for s in range(12, 16)}  # 1, 2, 3 and 8 utterances
    batcher = SpeakerBalancedBatcher(speakers_per_batch=4, utts_per_speaker=k, crop_frames=40, steps=20, seed=0)
    batches = list(batcher.batches(uneven_rows(counts)))
    assert len(batches) == 20
    for b in batches:
        assert b.feats.shape == (4 * k, 40, 8)
        assert_p_by_k_distinct(b, 4, k)
    appeared = {s for b in batches for s in b.labels.tolist()}
    assert appeared == set(counts)  # none dropped


def test_with_the_training_loops_step_count_no_speaker_is_dropped():
    """steps = rows // (P K), as the loop computes it: leftovers not yet in a batch go first."""
    counts = {s: 1 + s % 3 for s in range(12)}  # 24 rows
    batcher = SpeakerBalancedBatcher(speakers_per_batch=4, utts_per_speaker=2, crop_frames=40, steps=3, seed=0)
    batches = list(batcher.batches(uneven_rows(counts)))
    assert len(batches) == 3
    for b in batches:
        assert_p_by_k_distinct(b, 4, 2)
    assert {s for b in batches for s in b.labels.tolist()} == set(counts)


def test_single_utterance_speaker_gets_k_different_crops_of_it():
    batcher = SpeakerBalancedBatcher(speakers_per_batch=2, utts_per_speaker=3, crop_frames=40, steps=1, seed=0)
    (b,) = batcher.batches(uneven_rows({0: 1, 1: 1}))
    assert_p_by_k_distinct(b, 2, 3)
    for spk in (0, 1):
        crops = b.feats.numpy()[b.labels.numpy() == spk]
        assert len({float(c[0, 0]) for c in crops}) == 1  # one utterance, three views of it


def test_a_speaker_with_k_utterances_uses_k_different_utterances_in_every_phase():
    """Mid-stream, leftovers (one pending row + a used one) and top-ups: 3 utterances, K = 2."""
    counts = {s: 3 for s in range(6)}
    batcher = SpeakerBalancedBatcher(speakers_per_batch=3, utts_per_speaker=2, crop_frames=40, steps=8, seed=0)
    for b in batcher.batches(uneven_rows(counts)):
        feats, labels = b.feats.numpy(), b.labels.numpy()
        for spk in set(labels.tolist()):
            assert len({float(c[0, 0]) for c in feats[labels == spk]}) == 2


def test_top_up_batches_are_p_distinct_speakers_with_fresh_crops():
    batcher = SpeakerBalancedBatcher(speakers_per_batch=4, utts_per_speaker=3, crop_frames=40, steps=15, seed=3)
    batches = list(batcher.batches(uneven_rows({s: 1 + s % 3 for s in range(5)})))  # 10 rows, short stream
    assert len(batches) == 15
    for b in batches:
        assert_p_by_k_distinct(b, 4, 3)


def test_crops_skip_an_utterance_with_no_new_offset_and_a_lone_short_one_repeats():
    """A tiled utterance has one crop; the cycle takes the others from a longer utterance. A speaker
    whose only utterance is shorter than the crop honestly gets K identical (tiled) crops."""
    rng = np.random.default_rng(0)
    short, long = (rng.standard_normal((n, 8)).astype(np.float32) for n in (10, 100))
    batcher = SpeakerBalancedBatcher(speakers_per_batch=2, utts_per_speaker=3, crop_frames=40, steps=1, seed=0)
    crops = batcher._crops([short, long])
    assert np.array_equal(crops[0][:10], short)
    for c in crops[1:]:  # windows of the long utterance
        assert any(np.array_equal(c, long[s:s + 40]) for s in range(61))
    for i in range(3):
        for j in range(i + 1, 3):
            assert not is_shift_of(crops[i], crops[j])
    lone = batcher._crops([short])
    assert all(np.array_equal(c, lone[0]) for c in lone)


def test_same_stream_and_seed_give_the_same_batches_with_top_ups():
    def run(seed):
        b = SpeakerBalancedBatcher(4, 3, 40, steps=12, seed=seed)
        return [(x.labels.numpy(), x.feats.numpy()) for x in b.batches(uneven_rows({s: 1 + s % 3 for s in range(9)}))]

    a, b = run(5), run(5)
    assert all(np.array_equal(la, lb) and np.array_equal(fa, fb) for (la, fa), (lb, fb) in zip(a, b))
    assert not all(np.array_equal(fa, fc) for (_, fa), (_, fc) in zip(a, run(6)))


def test_fewer_than_p_speakers_is_a_clear_error():
    batcher = SpeakerBalancedBatcher(speakers_per_batch=4, utts_per_speaker=2, crop_frames=40, steps=2, seed=0)
    with pytest.raises(ValueError, match=r"3 distinct speakers.*speakers_per_batch=4"):
        list(batcher.batches(uneven_rows({0: 5, 1: 5, 2: 5})))


def test_memory_stays_bounded_on_a_speaker_sorted_stream():
    """A speaker keeps at most 2 K pending rows and the reservoir a bounded set; batches stay valid."""
    items = [it for s in range(6) for it in uneven_rows({s: 30}, seed=s)]  # not shuffled across speakers
    batcher = SpeakerBalancedBatcher(speakers_per_batch=3, utts_per_speaker=2, crop_frames=40, steps=6, seed=0)
    batches = list(batcher.batches(items))
    assert len(batches) == 6
    for b in batches:
        assert_p_by_k_distinct(b, 3, 2)


# --- positives="views" (K crops of one utterance) and SpecAugment on the stacked crops ---

def test_utterances_mode_draws_the_same_crops_as_before_these_options_existed():
    """Digests of the batches the batcher drew before ``positives``/``spec_augment`` were added (same seeds)."""
    import hashlib

    def digest(batcher, stream):
        h = hashlib.sha256()
        for b in batcher.batches(stream):
            h.update(b.labels.numpy().tobytes())
            h.update(b.feats.numpy().tobytes())
        return h.hexdigest()[:16]

    off = SpecAugmentConfig(prob=0.0, num_time_masks=3)
    assert digest(SpeakerBalancedBatcher(4, 3, 40, steps=12, seed=5),
                  uneven_rows({s: 1 + s % 3 for s in range(9)})) == "9bf6a5182bae1437"
    assert digest(SpeakerBalancedBatcher(4, 2, 40, steps=20, seed=1, positives="utterances", spec_augment=off),
                  uneven_rows({s: 1 + s % 4 for s in range(16)})) == "f5328d5bd3d02360"


def constant_rows(counts: dict[int, int], seed: int = 0, frames=(60, 160), dim: int = 8):
    """Every cell of an utterance holds its utterance id (distinct per utterance, even after a mask fill)."""
    return [(np.full_like(f, f[0, 0]), s) for f, s in uneven_rows(counts, seed, frames, dim)]


@pytest.mark.parametrize("spec_augment", [None, SpecAugmentConfig(prob=1.0, max_time_width=20, max_freq_width=4)])
def test_views_gives_k_crops_of_one_utterance_in_every_phase(spec_augment):
    """Mid-stream, leftovers and top-ups (20 steps read more rows than the stream has)."""
    counts = {s: 1 + s % 4 for s in range(10)}
    batcher = SpeakerBalancedBatcher(speakers_per_batch=4, utts_per_speaker=3, crop_frames=40, steps=20, seed=0,
                                     positives="views", spec_augment=spec_augment)
    used: dict[int, set[float]] = {}
    for b in batcher.batches(constant_rows(counts)):
        feats, labels = b.feats.numpy(), b.labels.numpy()
        assert len(Counter(labels.tolist())) == 4 and set(Counter(labels.tolist()).values()) == {3}
        for spk in set(labels.tolist()):
            values = np.unique(feats[labels == spk])
            assert len(values) == 1, f"speaker {spk}: crops from {values.tolist()}"  # one utterance
            used.setdefault(spk, set()).add(float(values[0]))
    assert set(used) == set(counts)  # none dropped
    assert all(len(used[s]) > 1 for s in counts if counts[s] >= 3)  # different utterances across batches


def test_views_are_different_crops_of_the_utterance():
    batcher = SpeakerBalancedBatcher(speakers_per_batch=4, utts_per_speaker=3, crop_frames=40, steps=10, seed=2,
                                     positives="views")
    for b in batcher.batches(uneven_rows({s: 4 for s in range(8)})):
        assert_p_by_k_distinct(b, 4, 3)
        feats, labels = b.feats.numpy(), b.labels.numpy()
        for spk in set(labels.tolist()):
            assert len({float(c[0, 0]) for c in feats[labels == spk]}) == 1


def test_views_read_one_utterance_per_speaker_per_batch():
    """P rows a batch: the loop's ``steps = rows // (P K)`` reads about 1/K of a shuffled stream."""
    items = uneven_rows({s: 10 for s in range(8)})  # 80 rows
    read = []

    def stream():
        for item in items:
            read.append(item)
            yield item

    batcher = SpeakerBalancedBatcher(speakers_per_batch=4, utts_per_speaker=2, crop_frames=40, steps=10, seed=0,
                                     positives="views")
    assert len(list(batcher.batches(stream()))) == 10
    assert len(read) < 60  # utterances mode would need all 80 rows for 10 x 4 x 2 crops


def test_spec_augment_masks_the_crops_the_batcher_would_draw_without_it():
    """Same labels and crops as with it off (its own random stream); the differences are whole frames and bins."""
    def run(spec_augment, seed=0):
        b = SpeakerBalancedBatcher(4, 2, 40, steps=6, seed=seed, spec_augment=spec_augment)
        return list(b.batches(uneven_rows({s: 3 for s in range(8)})))

    aug = SpecAugmentConfig(prob=1.0, num_time_masks=2, max_time_width=8, num_freq_masks=1, max_freq_width=3)
    plain, masked = run(None), run(aug)
    assert all(np.array_equal(a.feats, b.feats) for a, b in zip(plain, run(SpecAugmentConfig(prob=0.0))))
    changed = 0
    for a, b in zip(plain, masked):
        assert np.array_equal(a.labels, b.labels) and a.feats.shape == b.feats.shape
        for x, y in zip(a.feats.numpy(), b.feats.numpy()):
            diff = x != y
            rows, cols = diff.all(axis=1), diff.all(axis=0)
            assert np.array_equal(diff, rows[:, None] | cols[None, :])  # a union of time spans and bands
            changed += bool(diff.any())
    assert changed >= 40  # of 48 crops; only all-width-0 draws leave one untouched
    again = run(aug)
    assert all(np.array_equal(a.feats, b.feats) for a, b in zip(masked, again))
    assert not all(np.array_equal(a.feats, b.feats) for a, b in zip(masked, run(aug, seed=1)))


def test_unknown_positives_is_refused():
    with pytest.raises(ValueError, match="data.positives"):
        SpeakerBalancedBatcher(4, 2, 40, steps=1, seed=0, positives="clips")
