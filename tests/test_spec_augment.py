"""SpecAugment (time/frequency masking of training crops) and its config; a tiny run with it and "views"."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from mfcon.config import ConfigError, DataConfig, SpecAugmentConfig, TrainConfig, apply_overrides, load_train_config
from mfcon.data.spec_augment import MaskSpans, apply_masks, draw_masks, spec_augment, spec_augment_batch

WIDE = SpecAugmentConfig(prob=1.0, num_time_masks=3, max_time_width=12, num_freq_masks=2, max_freq_width=7)


def crop(seed: int = 0, shape=(60, 20)) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) + 3.0).astype(np.float32)


def masked_cells(spans: MaskSpans, shape) -> np.ndarray:
    cells = np.zeros(shape, dtype=bool)
    for start, width in spans.time:
        cells[start:start + width, :] = True
    for start, width in spans.freq:
        cells[:, start:start + width] = True
    return cells


def test_masks_have_the_requested_counts_and_width_bounds():
    rng = np.random.default_rng(0)
    time_widths, freq_widths = set(), set()
    for _ in range(500):
        spans = draw_masks((60, 20), WIDE, rng)
        assert len(spans.time) == 3 and len(spans.freq) == 2
        for (start, width), size, top in [*((s, 60, 12) for s in spans.time), *((s, 20, 7) for s in spans.freq)]:
            assert 0 <= width <= top and 0 <= start and start + width <= size
        time_widths.update(w for _, w in spans.time)
        freq_widths.update(w for _, w in spans.freq)
    assert time_widths == set(range(13)) and freq_widths == set(range(8))  # U[0, max], both ends reached


def test_a_mask_wider_than_the_crop_is_clipped_to_it():
    cfg = SpecAugmentConfig(prob=1.0, num_time_masks=2, max_time_width=500, num_freq_masks=1, max_freq_width=500)
    rng = np.random.default_rng(1)
    for _ in range(100):
        spans = draw_masks((15, 6), cfg, rng)
        assert all(s + w <= 15 for s, w in spans.time) and all(s + w <= 6 for s, w in spans.freq)


def test_exactly_the_masked_cells_take_the_crops_mean_and_the_input_is_not_modified():
    x = crop(2)
    before = x.copy()
    spans = MaskSpans(time=((5, 4), (50, 10)), freq=((3, 2),))
    out = apply_masks(x, spans)
    cells = masked_cells(spans, x.shape)
    assert np.array_equal(x, before)
    assert np.allclose(out[cells], before.mean()) and abs(before.mean() - 3.0) < 0.2  # the mean, not 0
    assert np.array_equal(out[~cells], before[~cells])
    assert out.dtype == np.float32


def test_prob_zero_is_the_identity_and_draws_nothing():
    rng = np.random.default_rng(3)
    state = rng.bit_generator.state
    xs = np.stack([crop(i) for i in range(5)])
    before = xs.copy()
    off = SpecAugmentConfig(prob=0.0, num_time_masks=4, max_time_width=30)
    assert all(spec_augment(x, off, rng) is x for x in xs)
    assert spec_augment_batch(xs, off, rng) is xs and np.array_equal(xs, before)
    assert rng.bit_generator.state == state


def test_prob_one_always_applies_the_drawn_masks():
    """Every crop gets exactly the masks a generator in the same state draws (none skipped)."""
    rng, twin = np.random.default_rng(4), np.random.default_rng(4)
    changed = 0
    for i in range(50):
        x = crop(i)
        out = spec_augment(x, WIDE, rng)
        assert np.array_equal(out, apply_masks(x, draw_masks(x.shape, WIDE, twin)))
        changed += not np.array_equal(out, x)
    assert changed == 50  # with 5 masks per crop, all of width 0 never happens here


def test_prob_half_masks_about_half_the_crops():
    cfg = SpecAugmentConfig(prob=0.5, num_time_masks=2, max_time_width=10)
    rng = np.random.default_rng(5)
    changed = sum(not np.array_equal(spec_augment(x, cfg, rng), x) for x in (crop(i) for i in range(400)))
    assert 150 < changed < 230  # ~ 0.5 x 400 less the rare all-width-0 draws


def test_the_same_seed_gives_the_same_masks_and_another_seed_others():
    xs = np.stack([crop(i) for i in range(8)])

    def run(seed):
        return spec_augment_batch(xs.copy(), WIDE, np.random.default_rng(seed))

    a, b, c = run(7), run(7), run(8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_a_batch_is_masked_in_place_crop_by_crop_as_single_crops_are():
    cfg = SpecAugmentConfig(prob=0.5, num_time_masks=2, max_time_width=10, max_freq_width=5)
    xs = np.stack([crop(i) for i in range(30)])
    single_rng = np.random.default_rng(9)
    singles = [spec_augment(x, cfg, single_rng) for x in xs]
    batch = xs.copy()
    assert spec_augment_batch(batch, cfg, np.random.default_rng(9)) is batch
    assert all(np.array_equal(b, s) for b, s in zip(batch, singles))
    assert not np.array_equal(batch, xs)


# --- config: typed, validated, round-trips through YAML, searchable by dotted keys ---

def test_defaults_are_off_with_wespeaker_counts_and_widths():
    cfg = TrainConfig().data
    assert cfg.positives == "utterances"
    assert cfg.spec_augment == SpecAugmentConfig(prob=0.0, num_time_masks=1, max_time_width=10,
                                                 num_freq_masks=1, max_freq_width=8)


def test_a_config_with_spec_augment_and_views_validates_and_round_trips_through_yaml(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("model_preset: tiny\nepochs: 1\ndata:\n  positives: views\n"
                    "  spec_augment: {prob: 0.6, num_time_masks: 2, max_time_width: 20}\n")
    cfg = load_train_config(path)
    assert cfg.data.positives == "views"
    assert cfg.data.spec_augment == SpecAugmentConfig(prob=0.6, num_time_masks=2, max_time_width=20)
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(cfg.model_dump()))
    assert load_train_config(again) == cfg


@pytest.mark.parametrize("data, fragments", [
    ("{spec_augment: {prob: 1.5}}", ["data.spec_augment.prob", "less than or equal to 1"]),
    ("{spec_augment: {max_freq_width: -1}}", ["data.spec_augment.max_freq_width", "greater than or equal to 0"]),
    ("{spec_augment: {probability: 0.5}}", ["data.spec_augment.probability", "Extra inputs"]),
    ("{positives: clips}", ["data.positives", "'utterances' or 'views'"]),
])
def test_bad_values_are_refused_naming_the_file_and_field(tmp_path, data, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(f"epochs: 1\ndata: {data}\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    for fragment in [str(path), *fragments]:
        assert fragment in str(err.value)


def test_dotted_overrides_reach_the_nested_fields():
    cfg = apply_overrides(TrainConfig(), {"data.spec_augment.prob": 0.3, "data.spec_augment.max_time_width": 5,
                                          "data.positives": "views"})
    assert cfg.data.spec_augment.prob == 0.3 and cfg.data.spec_augment.max_time_width == 5
    assert cfg.data.spec_augment.num_freq_masks == 1 and cfg.data.positives == "views"
    with pytest.raises(ConfigError, match="data.spec_augment.prob"):
        apply_overrides(TrainConfig(), {"data.spec_augment.prob": 2.0})


def test_a_search_space_can_search_both_options(tmp_path):
    from mfcon.study.spaces import load_search_space, trial_config

    path = tmp_path / "space.yaml"
    path.write_text("name: aug\nbase: {model_preset: tiny, epochs: 2, data: {spec_augment: {max_time_width: 20}}}\n"
                    "params:\n  data.spec_augment.prob: {type: uniform, low: 0.0, high: 0.8}\n"
                    "  data.positives: {type: categorical, choices: [utterances, views]}\n")
    space = load_search_space(path)
    cfg = trial_config(space, {"data.spec_augment.prob": 0.4, "data.positives": "views"})
    assert cfg.data.spec_augment == SpecAugmentConfig(prob=0.4, max_time_width=20)  # base kept, param set
    assert cfg.data.positives == "views"


def test_data_config_is_strict_about_the_nested_section():
    with pytest.raises(ValueError):
        DataConfig.model_validate({"spec_augment": {"prob": 0.5, "typo": 1}})


# --- training: a tiny local run with both options on, dev scored on clean features ---

@pytest.mark.slow
def test_tiny_run_with_spec_augment_and_views_trains_and_scores_dev_unaugmented(small_data, tmp_path):
    from mfcon.data.local import read_eval_set
    from mfcon.models.mfa_conformer import build_model
    from mfcon.evaluation.scoring import evaluate
    from mfcon.train.checkpoint import load_checkpoint
    from mfcon.train.local import train_local

    plain = TrainConfig.model_validate({
        "model_preset": "tiny", "epochs": 1, "seed": 0, "loss": {"mfcon_weight": 0.1, "mfcon_blocks": [1, 2]},
        "data": {"speakers_per_batch": 4, "utts_per_speaker": 2, "crop_seconds": 1.0}})
    cfg = apply_overrides(plain, {"data.spec_augment.prob": 1.0, "data.spec_augment.max_time_width": 30,
                                  "data.positives": "views"})
    (augmented,) = train_local(cfg, small_data, tmp_path / "aug", echo=False)
    (baseline,) = train_local(plain, small_data, tmp_path / "plain", echo=False)
    assert np.isfinite(augmented["train_loss"]) and np.isfinite(augmented["dev_eer"])
    # The options reach the training batches: same seed, same weights at start, different losses.
    assert augmented["train_loss"] != baseline["train_loss"]
    # Dev is scored on clean features: the checkpoint re-scored on the unaugmented dev set gives the same EER.
    model = build_model(cfg.model_config_resolved())
    model.load_state_dict(load_checkpoint(tmp_path / "aug" / "best.pt")["model"])
    assert evaluate(model, read_eval_set(small_data, "dev")).eer * 100 == pytest.approx(augmented["dev_eer"], abs=1e-6)
