"""AS-norm against a reference written from the formula, one trial and one cohort score at a time."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from mfcon.evaluation.score_norm import MIN_TOP_N, TrialScorer, adaptive_snorm, speaker_cohort


def _cos(a, b) -> float:
    return float(sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b)))


def reference_asnorm(score: float, e, t, cohort, top_n: int) -> float:
    """s_norm = 0.5 ((s - mu_e)/sd_e + (s - mu_t)/sd_t), mu/sd over the top_n highest cohort scores of each side."""
    def stats(x):
        top = sorted((_cos(x, c) for c in cohort), reverse=True)[:top_n]
        mu = sum(top) / len(top)
        return mu, math.sqrt(sum((v - mu) ** 2 for v in top) / len(top))

    (mu_e, sd_e), (mu_t, sd_t) = stats(e), stats(t)
    return 0.5 * ((score - mu_e) / sd_e + (score - mu_t) / sd_t)


@pytest.mark.parametrize("top_n", [MIN_TOP_N, 25, 40, 1000])
def test_asnorm_matches_the_formula(top_n):
    rng = np.random.default_rng(7)
    enroll, test, cohort = rng.normal(size=(30, 16)), rng.normal(size=(30, 16)), rng.normal(size=(40, 16))
    scores = np.array([_cos(a, b) for a, b in zip(enroll, test)])
    got = adaptive_snorm(scores, enroll, test, cohort, top_n=top_n)
    want = [reference_asnorm(s, e, t, cohort.tolist(), top_n) for s, e, t in zip(scores, enroll, test)]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("top_n", [-1, 0, 1, 5, MIN_TOP_N - 1])
def test_too_few_top_cohort_scores_are_refused(top_n):
    """top_n=1 has a spread of exactly 0 (clipped to 1e-6): scores of ~1e5 instead of a few units."""
    rng = np.random.default_rng(1)
    enroll, test, cohort = rng.normal(size=(5, 8)), rng.normal(size=(5, 8)), rng.normal(size=(40, 8))
    scores = np.array([_cos(a, b) for a, b in zip(enroll, test)])
    with pytest.raises(ValueError, match=f"top_n must be >= {MIN_TOP_N}, got top_n={top_n}"):
        adaptive_snorm(scores, enroll, test, cohort, top_n=top_n)
    with pytest.raises(ValueError, match="top_n"):
        TrialScorer(None, cohort.astype(np.float32), top_n).score(enroll, test)
    with pytest.raises(ValueError, match="at least 2 speakers"):
        adaptive_snorm(scores, enroll, test, cohort[:1])
    assert np.abs(adaptive_snorm(scores, enroll, test, cohort, top_n=MIN_TOP_N)).max() < 50


def test_asnorm_separates_a_speaker_that_sits_near_everyone():
    """A 'hub' enrolment scores high against every impostor; after AS-norm its impostor trials fall back."""
    rng = np.random.default_rng(0)
    shared = rng.normal(size=32)  # a direction every impostor leans towards
    cohort = rng.normal(size=(200, 32)) + shared
    impostors = rng.normal(size=(50, 32)) + shared
    hub, others = shared + rng.normal(size=32) * 0.3, rng.normal(size=(50, 32))
    raw_hub = np.array([_cos(hub, x) for x in impostors])
    raw_other = np.array([_cos(o, x) for o, x in zip(others, impostors)])
    norm_hub = adaptive_snorm(raw_hub, np.tile(hub, (50, 1)), impostors, cohort, top_n=50)
    norm_other = adaptive_snorm(raw_other, others, impostors, cohort, top_n=50)

    def gap(a, b):  # difference of means in units of the pooled spread
        return (a.mean() - b.mean()) / np.sqrt((a.var() + b.var()) / 2)

    assert gap(raw_hub, raw_other) > 2  # raw impostor scores favour the hub...
    assert abs(gap(norm_hub, norm_other)) < 0.7 * gap(raw_hub, raw_other)  # ...normalised ones clearly less


def test_speaker_cohort_is_the_unit_mean_per_speaker():
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0]], dtype=np.float32)
    cohort = speaker_cohort(emb, ["b", "a", "b"])
    np.testing.assert_allclose(cohort, [[0.0, 1.0], [1.0, 0.0]], atol=1e-6)  # sorted by name: a, b
    with pytest.raises(ValueError, match="2 speaker labels"):
        speaker_cohort(emb, ["a", "b"])
    with pytest.raises(ValueError, match="non-empty cohort"):
        adaptive_snorm(np.zeros(1), emb[:1], emb[:1], np.zeros((0, 2)))


def test_score_trials_with_a_cohort_is_asnorm_of_the_centred_embeddings():
    from mfcon.data.corpus.voxceleb import TrialPair
    from mfcon.evaluation.scoring import score_trials

    rng = np.random.default_rng(3)
    emb = rng.normal(size=(12, 8)).astype(np.float32)
    cohort = speaker_cohort(rng.normal(size=(30, 8)).astype(np.float32), [f"s{i % 10}" for i in range(30)])
    utts = [f"u{i}" for i in range(12)]
    trials = [TrialPair(int(i % 2), utts[i], utts[(i + 5) % 12]) for i in range(12)]
    plain, labels = score_trials(utts, emb, trials)
    normed, _ = score_trials(utts, emb, trials, cohort=cohort, top_n=MIN_TOP_N)
    mean = emb.mean(axis=0)
    a, b = emb[[i for i in range(12)]], emb[[(i + 5) % 12 for i in range(12)]]
    want = [reference_asnorm(s, x - mean, y - mean, (cohort - mean).tolist(), MIN_TOP_N)
            for s, x, y in zip(plain, a, b)]
    np.testing.assert_allclose(normed, want, rtol=2e-4, atol=2e-4)
    assert labels.tolist() == [t.label for t in trials]


def test_the_cohort_is_clean_training_speakers_only(small_data):
    from mfcon.data.local import read_cohort, read_eval_set
    from mfcon.data.shards import read_manifest

    cohort = read_cohort(small_data, utts_per_speaker=2)
    train = set(read_manifest(small_data).speakers)
    eval_speakers = {u.split("/")[0] for split in ("dev", "test") for u in read_eval_set(small_data, split).utt_ids}
    assert set(cohort.speakers) == train and not set(cohort.speakers) & eval_speakers
    assert all(cohort.speakers.count(s) == 2 for s in train)
    assert read_cohort(small_data, utts_per_speaker=2).speakers == cohort.speakers  # deterministic
    assert len(set(read_cohort(small_data, max_speakers=3, seed=1).speakers)) == 3


def test_evaluate_with_a_cohort_scores_the_same_trials_differently(small_data):
    import torch
    from mfcon.config import tiny_model_config
    from mfcon.data.local import read_cohort, read_eval_set
    from mfcon.models.mfa_conformer import build_model
    from mfcon.evaluation.scoring import evaluate

    torch.manual_seed(0)
    model = build_model(tiny_model_config())
    dev = read_eval_set(small_data, "dev")
    plain = evaluate(model, dev)
    normed = evaluate(model, dataclasses.replace(dev, cohort=read_cohort(small_data), top_n=MIN_TOP_N))
    assert read_eval_set(small_data, "dev", "asnorm", 12).score_norm == "asnorm(top_n=12)" and dev.score_norm == "mean"
    assert np.array_equal(plain.labels, normed.labels)
    assert not np.allclose(plain.scores, normed.scores)
    assert 0.0 <= normed.eer <= 1.0
