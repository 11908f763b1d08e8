"""VoxCeleb layout, trial lists, the espeak wrapper and the synthetic corpus, on real files."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from mfcon.data.corpus.espeak import Espeak, EspeakError, Formant, VoiceVariant
from mfcon.data.corpus.synthetic import CorpusSpec, make_corpus
from mfcon.data.corpus.voxceleb import (
    CorpusError,
    TrialListError,
    TrialPair,
    list_utterances,
    read_trials,
    write_trials,
)

SMALL = CorpusSpec(n_speakers=6, utts_per_speaker=3, n_test_speakers=2, seed=0)


def _touch_wav(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(1600, dtype=np.float32), 16000)


# --- voxceleb layout --------------------------------------------------------------------------

def test_list_utterances_sorted_and_ignores_other_depths(tmp_path: Path):
    for rel in ["id2/v1/00002.wav", "id1/v2/00001.flac", "id1/v1/00003.wav", "id1/v1/00001.wav"]:
        _touch_wav(tmp_path / rel)
    _touch_wav(tmp_path / "id1" / "stray.wav")  # depth 2
    _touch_wav(tmp_path / "id1" / "v1" / "deep" / "x.wav")  # depth 4
    (tmp_path / "id1" / "v1" / "notes.txt").write_text("not audio")
    utts = list_utterances(tmp_path)
    assert [u.utt_id for u in utts] == ["id1/v1/00001.wav", "id1/v1/00003.wav", "id1/v2/00001.flac",
                                        "id2/v1/00002.wav"]
    assert [u.speaker for u in utts] == ["id1", "id1", "id1", "id2"]
    assert utts[0].path == tmp_path / "id1/v1/00001.wav"


def test_list_utterances_missing_or_empty_root(tmp_path: Path):
    with pytest.raises(CorpusError, match="nothere"):
        list_utterances(tmp_path / "nothere")
    (tmp_path / "a" / "b").mkdir(parents=True)
    with pytest.raises(CorpusError, match=str(tmp_path)):
        list_utterances(tmp_path)


def test_read_trials_happy_path_and_roundtrip(tmp_path: Path):
    path = tmp_path / "trials.txt"
    path.write_text("1 a/x/1.wav a/y/2.wav\n\n0 a/x/1.wav b/z/3.wav\n")
    assert read_trials(path) == [TrialPair(1, "a/x/1.wav", "a/y/2.wav"), TrialPair(0, "a/x/1.wav", "b/z/3.wav")]
    out = tmp_path / "copy.txt"
    write_trials(out, read_trials(path))
    assert read_trials(out) == read_trials(path)
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.parametrize("bad_line", ["1 a/x/1.wav", "2 a/x/1.wav b/y/2.wav", "yes a b", "1 a b c",
                                      "1 /etc/passwd a/x/1.wav", "0 a/x/1.wav ../b/y/2.wav", "1 a/../../x.wav b/y/2.wav"])
def test_read_trials_malformed_line_names_file_and_line(tmp_path: Path, bad_line: str):
    path = tmp_path / "bad_trials.txt"
    path.write_text(f"1 a/x/1.wav a/y/2.wav\n\n{bad_line}\n")
    with pytest.raises(TrialListError) as err:
        read_trials(path)
    assert "bad_trials.txt:3" in str(err.value) and bad_line in str(err.value)


def test_read_trials_empty_list(tmp_path: Path):
    path = tmp_path / "empty.txt"
    path.write_text("\n  \n")
    with pytest.raises(TrialListError, match="empty.txt.*empty"):
        read_trials(path)


def test_read_trials_with_root_names_missing_audio(tmp_path: Path):
    _touch_wav(tmp_path / "wav/a/x/1.wav")
    _touch_wav(tmp_path / "wav/b/y/2.wav")
    path = tmp_path / "trials.txt"
    path.write_text("0 a/x/1.wav b/y/2.wav\n1 a/x/1.wav a/x/9.wav\n")
    with pytest.raises(TrialListError, match=r"trials.txt:2.*a/x/9.wav"):
        read_trials(path, root=tmp_path / "wav")
    path.write_text("0 a/x/1.wav b/y/2.wav\n")
    assert len(read_trials(path, root=tmp_path / "wav")) == 1


# --- espeak wrapper -------------------------------------------------------------------------

def test_espeak_is_reproducible_in_any_order_and_leaves_wheel_alone(tmp_path: Path):
    import espeakng_loader

    wheel_variants = Path(espeakng_loader.get_data_path()) / "voices" / "!v"
    before = sorted(p.name for p in wheel_variants.iterdir())
    tts = Espeak(tmp_path / "cache")
    voice = VoiceVariant(formants=(Formant(1, 112), Formant(2, 108, 90)), pitch_hz=(160, 220), breath=(0, 2, 2, 1))
    first = tts.synthesize("The golden river opened the market.", "en-gb-scotland", voice, rate=150, seed=3)
    assert first.dtype == np.float32 and tts.sample_rate == 22050 and len(first) > 0.8 * 22050
    tts.synthesize("Something else entirely, twice.", "en-us", VoiceVariant(pitch_hz=(90, 120)), seed=9)
    again = tts.synthesize("The golden river opened the market.", "en-gb-scotland", voice, rate=150, seed=3)
    assert np.array_equal(first, again)
    assert (tts.data_dir / "voices" / "!v" / voice.name).is_file()
    assert sorted(p.name for p in wheel_variants.iterdir()) == before
    with pytest.raises(EspeakError, match="xx-nope"):
        tts.synthesize("hello", voice="xx-nope")
    with pytest.raises(EspeakError, match="nosuchvariant"):
        tts.synthesize("hello", variant="nosuchvariant")  # the library would silently ignore it


def test_espeak_broken_data_dir_is_a_clear_error_and_recoverable(tmp_path: Path):
    good = Espeak(tmp_path / "good")
    before = good.synthesize("Hello there.", seed=1)
    broken = tmp_path / "broken" / "espeak-ng-data"
    broken.mkdir(parents=True)
    (broken / "phontab").write_text("not phoneme data")
    with pytest.raises(EspeakError, match="cannot initialise.*broken"):
        Espeak(tmp_path / "broken")
    assert np.array_equal(good.synthesize("Hello there.", seed=1), before)  # re-initialised, same output


# --- synthetic corpus -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus_a"), SMALL, progress=False)


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_corpus_layout_and_audio(small_corpus):
    utts = list_utterances(small_corpus.root)
    assert len(utts) == 6 * 3
    assert sorted({u.speaker for u in utts}) == [f"id{k:05d}" for k in range(1, 7)]
    for u in utts:
        assert u.path.relative_to(small_corpus.root).parts[1].startswith("vid")
        info = sf.info(u.path)
        assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
        assert SMALL.min_seconds <= info.frames / 16000 <= SMALL.max_seconds
        wav, _ = sf.read(u.path, dtype="float32")
        assert np.abs(wav).max() > 0.1  # speech, not silence
    info = json.loads(small_corpus.info.read_text())
    assert info["spec"] == SMALL.model_dump()
    assert info["test_speakers"] == ["id00005", "id00006"] and len(info["train_speakers"]) == 4
    assert set(info["voices"]) == {u.speaker for u in utts}


def test_trials_cover_test_speakers_only(small_corpus):
    trials = read_trials(small_corpus.trials, root=small_corpus.root)  # every file exists
    test_utts = {u.utt_id for u in list_utterances(small_corpus.root) if u.speaker in ("id00005", "id00006")}
    used = {t.enroll for t in trials} | {t.test for t in trials}
    assert used == test_utts  # only test speakers, and every test utterance
    assert {t.label for t in trials} == {0, 1}
    for t in trials:
        assert t.label == (t.enroll.split("/")[0] == t.test.split("/")[0])
    assert 0.3 <= np.mean([t.label for t in trials]) <= 0.7


def test_corpus_is_byte_identical_across_runs(small_corpus, tmp_path: Path):
    other = make_corpus(tmp_path / "corpus_b", SMALL, progress=False)
    assert _digests(other.root) == _digests(small_corpus.root)
    assert other.trials.read_bytes() == small_corpus.trials.read_bytes()
    assert other.info.read_bytes() == small_corpus.info.read_bytes()


def test_rerun_skips_existing_files_and_refuses_other_spec(small_corpus):
    stamps = {p: p.stat().st_mtime_ns for p in small_corpus.root.rglob("*.wav")}
    make_corpus(small_corpus.root.parent, SMALL, progress=False)
    assert {p: p.stat().st_mtime_ns for p in small_corpus.root.rglob("*.wav")} == stamps
    with pytest.raises(ValueError, match="corpus.json"):
        make_corpus(small_corpus.root.parent, SMALL.model_copy(update={"seed": 1}), progress=False)


@pytest.fixture
def one_torch_thread():
    """Small tensors: OpenMP threads only fight each other on a busy 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_speakers_differ_more_than_utterances_of_one_speaker(small_corpus, one_torch_thread):
    feats: dict[str, list[np.ndarray]] = {}
    for u in list_utterances(small_corpus.root):
        wav, _ = sf.read(u.path, dtype="float32")
        fbank = torchaudio.compliance.kaldi.fbank(torch.from_numpy(wav)[None] * 32768, num_mel_bins=40)
        feats.setdefault(u.speaker, []).append(fbank.mean(0).numpy())  # (40,) mean log-mel
    x = {s: np.stack(v) for s, v in feats.items()}
    within = np.mean([np.linalg.norm(v[:, None] - v[None], axis=2)[np.triu_indices(len(v), 1)].mean()
                      for v in x.values()])
    spk = sorted(x)
    between = np.mean([np.linalg.norm(x[a][:, None] - x[b][None], axis=2).mean()
                       for i, a in enumerate(spk) for b in spk[i + 1:]])
    assert between > 1.15 * within


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="n_test_speakers"):
        CorpusSpec(n_speakers=4, n_test_speakers=4)
    with pytest.raises(ValueError, match="max_seconds"):
        CorpusSpec(min_seconds=3, max_seconds=2)
    with pytest.raises(ValueError):
        CorpusSpec(n_speaker=3)  # typo: unknown key
