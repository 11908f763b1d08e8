"""Train-split augmentation: MUSAN noise/music/babble at the drawn SNR, RIR reverberation, speed perturbation,
seeded copies, and prepare with it (train rows x copies, speed speakers, dev/test untouched, resume, rebuild).

No MUSAN or RIRS_NOISES can be downloaded here, so the banks are made in their layouts: coloured noise, tone
sequences for music, the generated corpus's own speech for babble, exponentially decaying noise behind a
direct-path spike for room impulse responses.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from mfcon.cli import main as cli_main
from mfcon.data.audio import load_audio
from mfcon.data.augment import (
    KINDS,
    Augmentation,
    AugmentConfig,
    AugmentError,
    Recipe,
    Variant,
    augment_config,
    draw_recipe,
)
from mfcon.data.augment_signal import apply_variant, bank_clip, fit_length, load_bank_audio, reverberate, speed_perturb
from mfcon.data.corpus.noise_banks import coloured_noise, decaying_rir, tone_sequence, write_wav
from mfcon.data.corpus.synthetic import CorpusSpec, make_corpus
from mfcon.data.corpus.voxceleb import list_utterances
from mfcon.data.features import compute_fbank
from mfcon.data.prepare import prepare_dataset
from mfcon.data.shards import load_split, read_manifest, verify_shards

SR = 16000  # the corpus and banks rate
TRAIN_UTTS = 8  # 6 speakers - 2 test - 2 dev = 2 training speakers x 4 utterances


# ---------------------------------------------------------------- banks in MUSAN / RIRS_NOISES layout

def write_banks(base: Path, speech: list[Path]) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    musan, rirs = base / "musan", base / "RIRS_NOISES" / "simulated_rirs"
    write_wav(musan / "noise/free-sound/white.wav", rng.standard_normal(int(0.6 * SR)))  # shorter: looped
    write_wav(musan / "noise/free-sound/pink.wav", coloured_noise(rng, 3 * SR, 1.0))
    write_wav(musan / "noise/sound-bible/brown.wav", coloured_noise(rng, 3 * SR, 2.0))
    for i in range(2):
        write_wav(musan / f"music/fma/tones-{i:04d}.wav", tone_sequence(rng, 4.0))
    for i, path in enumerate(speech):
        (musan / "speech/librivox").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, musan / f"speech/librivox/speech-librivox-{i:04d}.wav")
    for i, rt60 in enumerate((0.2, 0.4, 0.6)):
        write_wav(rirs / f"smallroom/Room001/Room001-{i + 1:05d}.wav", decaying_rir(rng, rt60, delay=40 + 10 * i))
    return musan, rirs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """6 espeak speakers x 4 utterances of 1-2 s: 2 test, 2 dev (held out), 2 training speakers."""
    spec = CorpusSpec(n_speakers=6, utts_per_speaker=4, n_test_speakers=2, min_seconds=1.0, max_seconds=2.0, seed=3)
    return make_corpus(tmp_path_factory.mktemp("corpus"), spec, progress=False)


@pytest.fixture(scope="module")
def banks(corpus, tmp_path_factory) -> tuple[Path, Path]:
    """(musan, rir) folders; babble is the corpus's own speech (its test speakers)."""
    test_speakers = {json.loads(corpus.info.read_text())["test_speakers"][i] for i in range(2)}
    speech = [u.path for u in list_utterances(corpus.root) if u.speaker in test_speakers]
    return write_banks(tmp_path_factory.mktemp("banks"), speech)


def config(banks: tuple[Path, Path], **fields) -> AugmentConfig:
    return AugmentConfig(musan_dir=str(banks[0]), rir_dir=str(banks[1]), **fields)


@pytest.fixture(scope="module")
def clean(corpus) -> torch.Tensor:
    return torch.from_numpy(load_audio(list_utterances(corpus.root)[0].path))


def snr_db(clean: torch.Tensor, mixed: torch.Tensor) -> float:
    return float(10 * torch.log10(clean.pow(2).sum() / (mixed - clean).pow(2).sum()))


# ---------------------------------------------------------------- the signal processing

@pytest.mark.parametrize("kind, source", [("noise", "white.wav"), ("noise", "brown.wav"), ("music", None),
                                          ("babble", None)])
def test_noise_music_and_babble_mix_at_the_requested_snr(banks, clean, kind, source):
    aug = Augmentation.build(config(banks, copies=1, kinds=[kind]))
    recipe = draw_recipe(aug.config, aug.banks, "id/v/1.wav", 1)
    if source:  # white.wav (0.6 s) is looped to the utterance's length, brown.wav (3 s) cropped
        recipe = recipe._replace(sources=tuple(p for p in aug.banks.noise if p.endswith(source)))
    if kind == "babble":
        assert 3 <= len(recipe.sources) <= 7 and len(set(recipe.sources)) == len(recipe.sources)
    for snr in (0.0, 7.5, 15.0, 20.0):
        mixed = apply_variant(clean, Variant(1.0, recipe._replace(snr_db=snr)), SR)
        assert mixed.shape == clean.shape
        assert snr_db(clean, mixed) == pytest.approx(snr, abs=0.1)


def test_a_window_read_from_a_long_file_equals_the_cached_whole_file(banks):
    noise = sorted((banks[0] / "noise").rglob("*.wav"))
    for path in map(str, noise):  # brown and pink (3 s) are read as windows, white (0.6 s) is looped
        for length, offset in ((SR, 0.0), (SR, 0.37), (SR + 123, 0.999), (2 * SR, 0.5)):
            torch.testing.assert_close(bank_clip(path, length, offset, SR),
                                       fit_length(load_bank_audio(path, SR), length, offset), rtol=0, atol=0)


def test_unreadable_bank_files_are_named(tmp_path):
    garbage, silent = tmp_path / "garbage.wav", tmp_path / "silent.wav"
    garbage.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio" * 10)
    sf.write(silent, np.zeros(SR // 2, np.float32), SR)
    with pytest.raises(AugmentError, match=f"{garbage}: cannot read an augmentation bank file"):
        bank_clip(str(garbage), SR, 0.0, SR)
    with pytest.raises(AugmentError, match=f"{silent}: silent .*\\(an augmentation bank file\\)"):
        bank_clip(str(silent), SR, 0.0, SR)  # shorter than the utterance: loaded whole, and refused


def test_drawn_snrs_stay_in_the_kaldi_ranges(banks):
    aug = Augmentation.build(config(banks, copies=8))
    drawn: dict[str, list[float]] = {}
    for u in range(50):
        for copy in range(1, 9):
            recipe = draw_recipe(aug.config, aug.banks, f"id/v/{u}.wav", copy)
            drawn.setdefault(recipe.kind, []).append(recipe.snr_db)
    assert set(drawn) == set(KINDS) and set(drawn["reverb"]) == {None}
    for kind, (low, high) in (("noise", (0, 15)), ("music", (5, 15)), ("babble", (13, 20))):
        assert low <= min(drawn[kind]) < low + 2 and high - 2 < max(drawn[kind]) <= high


def test_reverb_keeps_length_changes_the_signal_and_keeps_its_energy(banks, clean):
    impulse = torch.zeros(800)
    impulse[123] = 0.5  # a pure delay: aligned at the direct path it is no change at all
    torch.testing.assert_close(reverberate(clean, impulse), clean, atol=1e-5, rtol=0)
    rirs = Augmentation.build(config(banks, copies=1, kinds=["reverb"])).banks.rir
    assert len(rirs) == 3
    for path in rirs:
        out = apply_variant(clean, Variant(1.0, Recipe("reverb", 1, None, (path,), (0.0,))), SR)
        assert out.shape == clean.shape
        assert float((out - clean).pow(2).sum() / clean.pow(2).sum()) > 0.05  # audibly reverberant
        assert abs(10 * torch.log10(out.pow(2).sum() / clean.pow(2).sum())) < 3.0  # energy within 3 dB


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_perturbation_changes_length_and_pitch_by_the_factor(factor):
    t = torch.arange(SR, dtype=torch.float32) / SR
    tone = 0.5 * torch.sin(2 * np.pi * 440 * t)
    out = speed_perturb(tone, SR, factor)
    assert abs(out.numel() - SR / factor) <= 1
    peak_hz = float(torch.argmax(torch.fft.rfft(out).abs())) * SR / out.numel()
    assert peak_hz == pytest.approx(440 * factor, abs=2)


def test_copies_are_deterministic_by_seed_and_cover_every_kind(banks, clean):
    cfg = config(banks, copies=4, speed_factors=[1.1, 0.9])
    first = [*Augmentation.build(cfg).variants("a/v/1.wav", "a"), *Augmentation.build(cfg).variants("b/v/1.wav", "b")]
    again = Augmentation.build(cfg)  # fresh object, other order: the same rows
    assert [*again.variants("b/v/1.wav", "b")] == first[15:] and [*again.variants("a/v/1.wav", "a")] == first[:15]
    assert [r[0] for r in first[:5]] == ["a/v/1.wav", *(f"a/v/1.wav#{r[2].recipe.kind}{c}" for c, r in
                                                        enumerate(first[1:5], 1))]
    assert [r[0] for r in first[5:7]] == ["a/v/1.wav#sp0.9", f"a/v/1.wav#sp0.9#{first[6][2].recipe.kind}1"]
    assert {r[1] for r in first[:15]} == {"a", "a-sp0.9", "a-sp1.1"}
    for start in range(0, 30, 5):  # per (utterance, speed): clean, then one copy of each kind
        assert first[start][2].recipe is None
        assert sorted(r[2].recipe.kind for r in first[start + 1:start + 5]) == sorted(KINDS)
    other = [*Augmentation.build(config(banks, copies=4, speed_factors=[0.9, 1.1], seed=1)).variants("a/v/1.wav", "a")]
    assert [r[2] for r in other] != first[:15]
    for _, _, variant in first[:15]:
        a, b = apply_variant(clean, variant, SR), apply_variant(clean.clone(), variant, SR)
        assert torch.equal(a, b)


def test_augmented_fbank_differs_and_comes_closer_with_the_snr(banks, clean):
    aug = Augmentation.build(config(banks, copies=3, kinds=["noise", "music", "babble"]))
    reference = compute_fbank(clean)
    for copy in (1, 2, 3):
        recipe = draw_recipe(aug.config, aug.banks, "id/v/1.wav", copy)
        distances = [float((compute_fbank(apply_variant(clean, Variant(1.0, recipe._replace(snr_db=snr)), SR))
                            - reference).abs().mean()) for snr in (0.0, 5.0, 10.0, 20.0, 30.0)]
        assert distances[-1] > 0.01, recipe.kind
        assert distances == sorted(distances, reverse=True), (recipe.kind, distances)


# ---------------------------------------------------------------- the config

@pytest.mark.parametrize("fields, message", [
    ({"copies": 1, "kinds": ["noise", "wind"]}, "kinds.1"),
    ({"copies": 1, "noise_snr": [15, 0]}, "noise_snr: \\[low, high\\] dB with low <= high"),
    ({"copies": 1, "babble_speakers": [0, 3]}, "babble_speakers"),
    ({"speed_factors": [1.0]}, "speed factors must be in \\[0.5, 2\\] and not 1"),
    ({"speed_factors": [0.9, 0.9]}, "speed factors must be distinct"),
    ({"copies": "2"}, "copies"),  # strict: no silent string coercion
    ({"copies": 1, "musan_dir": None}, "musan_dir is required for kinds \\['noise', 'music', 'babble'\\]"),
    ({"copies": 1, "kinds": ["reverb"], "rir_dir": None}, "rir_dir is required for kind 'reverb'"),
    ({"copies": 1, "shuffle": True}, "shuffle"),
])
def test_bad_config_is_an_error_naming_the_field(banks, fields, message):
    with pytest.raises(AugmentError, match=f"mfcon prepare options: invalid configuration\n(.|\n)*{message}"):
        augment_config("mfcon prepare options", **{"musan_dir": str(banks[0]), "rir_dir": str(banks[1]), **fields})


def test_config_defaults_are_off_and_kaldi(banks):
    cfg = AugmentConfig()
    assert not cfg.active and cfg.copies == 0 and cfg.speed_factors == []
    assert (cfg.noise_snr, cfg.music_snr, cfg.babble_snr, cfg.babble_speakers) == ([0, 15], [5, 15], [13, 20], [3, 7])
    assert config(banks, speed_factors=[1.1, 0.9]).speed_factors == [0.9, 1.1]  # canonical order
    assert AugmentConfig.model_validate(json.loads(config(banks, copies=2).model_dump_json())) == config(banks, copies=2)


@pytest.mark.parametrize("broken, kind", [("musan/music", "music"), ("musan/speech", "babble"),
                                          ("RIRS_NOISES/simulated_rirs", "reverb")])
def test_bad_bank_folders_are_named_before_any_shard_is_written(corpus, banks, tmp_path, broken, kind):
    base = tmp_path / "banks"
    shutil.copytree(banks[0], base / "musan")
    shutil.copytree(banks[1], base / "RIRS_NOISES/simulated_rirs")
    for wav in (base / broken).rglob("*.wav"):
        wav.rename(wav.with_suffix(".mp3"))  # the folder is there, its wav files are not
    cfg = config((base / "musan", base / "RIRS_NOISES/simulated_rirs"), copies=1)
    with pytest.raises(AugmentError, match=f"{base / broken}: holds no .wav files \\(needed for augment kind '{kind}'"):
        prepare(corpus, tmp_path / "data", augment=cfg)
    assert not (tmp_path / "data").exists()
    missing = config((tmp_path / "nowhere", base / "RIRS_NOISES/simulated_rirs"), copies=1, kinds=["noise"])
    with pytest.raises(AugmentError, match=f"{tmp_path / 'nowhere' / 'noise'}: does not exist or is not a folder"):
        prepare(corpus, tmp_path / "data", augment=missing)
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------- prepare with augmentation

def prepare(corpus, out: Path, **kwargs):
    kwargs = {"dev_speakers": 2, "rows_per_shard": 16, "num_workers": 0, "progress": False, **kwargs}
    return prepare_dataset(corpus.root, corpus.trials, out, **kwargs)


def content(manifest) -> dict:
    return manifest.model_dump(exclude={"created_at"})


def shard_stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.glob("*.parquet"))}


@pytest.fixture(scope="module")
def plain(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "data"
    return out, prepare(corpus, out)


@pytest.fixture(scope="module")
def augmented(corpus, banks, tmp_path_factory):
    """2 copies per utterance and speeds 0.9/1.1, built on a 2-process pool: (out, manifest, config)."""
    out, cfg = tmp_path_factory.mktemp("augmented") / "data", config(banks, copies=2, speed_factors=[0.9, 1.1])
    return out, prepare(corpus, out, augment=cfg, num_workers=2), cfg


def test_train_rows_are_copies_and_speed_speakers(plain, augmented):
    out, manifest, _ = augmented
    verify_shards(out)
    assert manifest.splits["train"].rows == 3 * (1 + 2) * TRAIN_UTTS == 72
    base = sorted(plain[1].speakers)
    assert manifest.speakers == {**{s: i for i, s in enumerate(base)}, **{f"{s}-sp0.9": 2 + i for i, s in enumerate(base)},
                                 **{f"{s}-sp1.1": 4 + i for i, s in enumerate(base)}}
    assert manifest.splits["train"].num_speakers == 6
    train, clean = load_split(out, "train"), load_split(plain[0], "train")
    by_id = dict(zip(train.utt_ids, zip(train.speakers, train.speaker_index, train.features)))
    assert len(by_id) == 72
    for utt, speaker, feats in zip(clean.utt_ids, clean.speakers, clean.features):
        np.testing.assert_array_equal(by_id[utt][2], feats)  # the clean row is unchanged by augmentation
        for sp in ("", "#sp0.9", "#sp1.1"):
            who = speaker + sp.replace("#", "-")
            assert by_id[utt + sp][:2] == (who, manifest.speakers[who])
            copies = sorted(u for u in by_id if re.fullmatch(re.escape(utt + sp) + "#(noise|music|babble|reverb)[0-9]+", u))
            assert sorted(c[-1] for c in copies) == ["1", "2"] and all(by_id[c][:2] == by_id[utt + sp][:2] for c in copies)
            for c in copies:  # a copy: as long as its source, not equal to it
                source = by_id[utt + sp][2]
                assert by_id[c][2].shape == source.shape and not np.allclose(by_id[c][2], source, atol=0.1)
        assert abs(len(by_id[utt + "#sp1.1"][2]) - len(feats) / 1.1) <= 2
        assert abs(len(by_id[utt + "#sp0.9"][2]) - len(feats) / 0.9) <= 2
    speakers_per_shard = [len(set(pq.read_table(out / e.file, columns=["speaker"]).column(0).to_pylist()))
                          for e in manifest.splits["train"].shards]
    assert min(speakers_per_shard) >= 3  # rows are shuffled after expansion


def test_dev_and_test_are_identical_to_an_unaugmented_prepare(plain, augmented):
    (plain_out, plain_manifest), (out, manifest, _) = plain, augmented
    for split in ("dev", "test"):
        assert manifest.splits[split] == plain_manifest.splits[split]  # files, rows, sha256
        assert (out / f"trials-{split}.txt").read_bytes() == (plain_out / f"trials-{split}.txt").read_bytes()
    assert manifest.trials == plain_manifest.trials and manifest.dev_protocol == plain_manifest.dev_protocol
    assert set(load_split(out, "dev").speaker_index.tolist()) == {-1}


def test_manifest_records_the_config_and_omits_it_without_augmentation(plain, augmented):
    out, manifest, cfg = augmented
    assert manifest.augmentation == cfg and read_manifest(out).augmentation == cfg
    recorded = json.loads((out / "manifest.json").read_text())["augmentation"]
    assert recorded["copies"] == 2 and recorded["musan_dir"] == cfg.musan_dir and recorded["speed_factors"] == [0.9, 1.1]
    assert "augmentation" not in json.loads((plain[0] / "manifest.json").read_text())
    assert read_manifest(plain[0]).augmentation is None


def test_any_worker_builds_the_same_copies(corpus, augmented, tmp_path):
    _, manifest, cfg = augmented
    assert content(prepare(corpus, tmp_path / "data", augment=cfg, num_workers=0)) == content(manifest)


def test_rerun_resumes_and_a_changed_config_rebuilds_train_only(corpus, plain, augmented, tmp_path):
    out, manifest, cfg = augmented
    data = tmp_path / "data"
    shutil.copytree(out, data)
    before = shard_stats(data)
    assert content(prepare(corpus, data, augment=cfg)) == content(manifest)
    assert shard_stats(data) == before  # nothing rebuilt

    fewer = cfg.model_copy(update={"copies": 1})
    changed = prepare(corpus, data, augment=fewer)
    after = shard_stats(data)
    assert changed.splits["train"].rows == 3 * 2 * TRAIN_UTTS and changed.augmentation == fewer
    assert {n: s for n, s in after.items() if not n.startswith("train")} == \
        {n: s for n, s in before.items() if not n.startswith("train")}  # dev and test kept
    assert all(after[e.file] != before.get(e.file) for e in changed.splits["train"].shards)
    assert sorted(after) == sorted(e.file for i in changed.splits.values() for e in i.shards)  # old shards removed

    assert content(prepare(corpus, data)) == content(plain[1])  # augmentation off: exactly the plain dataset


def test_cli_prepare_with_augmentation(corpus, banks, tmp_path, capsys):
    out = tmp_path / "data"
    code = cli_main(["prepare", "--corpus", str(corpus.root), "--test-trials", str(corpus.trials), "--dev-speakers", "2",
                     "--out", str(out), "--workers", "0", "--augment-copies", "1", "--augment-kinds", "noise,reverb",
                     "--musan", str(banks[0]), "--rir", str(banks[1]), "--speed-perturb", "1.1"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    manifest = read_manifest(out)
    assert manifest.augmentation == config(banks, copies=1, kinds=["noise", "reverb"], speed_factors=[1.1])
    assert manifest.splits["train"].rows == 2 * 2 * TRAIN_UTTS
    assert "train: 32 rows, 4 speakers" in printed and "augmented train: 1 copies per utterance (noise, reverb), " \
        "speed 1.1 as new speakers; 4 classes" in printed
    code = cli_main(["prepare", "--corpus", str(corpus.root), "--test-trials", str(corpus.trials), "--dev-speakers", "2",
                     "--out", str(tmp_path / "other"), "--augment-copies", "1", "--augment-kinds", "noise,wind",
                     "--musan", str(banks[0])])
    assert code == 2 and "kinds.1: Input should be 'noise', 'music', 'babble' or 'reverb'" in capsys.readouterr().err
    code = cli_main(["prepare", "--corpus", str(corpus.root), "--test-trials", str(corpus.trials), "--dev-speakers", "2",
                     "--out", str(tmp_path / "other"), "--musan", str(banks[0])])
    assert code == 2 and "--musan given without --augment-copies N" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_ray_tasks_build_the_same_augmented_shards(corpus, augmented, ray_local_2cpu, tmp_path):
    _, manifest, cfg = augmented
    assert content(prepare(corpus, tmp_path / "data", augment=cfg)) == content(manifest)
