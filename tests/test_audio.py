"""load_audio on real files: every failure names the file."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from mfcon.data.audio import SAMPLE_RATE, AudioError, load_audio


def _tone(seconds: float, sr: int, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_mono_16k_roundtrip(tmp_path: Path):
    path = tmp_path / "a.wav"
    sf.write(path, _tone(1.0, 16000), 16000)
    wav = load_audio(path)
    assert wav.dtype == np.float32 and wav.shape == (16000,)
    assert np.allclose(wav, _tone(1.0, 16000), atol=1e-4)  # PCM_16 quantisation only


def test_8k_is_resampled_to_16k_with_right_length(tmp_path: Path):
    path = tmp_path / "low.wav"
    sf.write(path, _tone(1.5, 8000), 8000)
    wav = load_audio(path)
    assert wav.shape == (int(1.5 * SAMPLE_RATE),)
    spectrum = np.abs(np.fft.rfft(wav))
    assert np.argmax(spectrum) * SAMPLE_RATE / len(wav) == pytest.approx(220.0, abs=2.0)


def test_flac_at_other_rate(tmp_path: Path):
    path = tmp_path / "a.flac"
    sf.write(path, _tone(1.0, 22050), 22050)
    assert load_audio(path).shape == (16000,)


def test_stereo_is_averaged(tmp_path: Path):
    path = tmp_path / "stereo.wav"
    left = _tone(1.0, 16000)
    sf.write(path, np.stack([left, np.zeros_like(left)], axis=1), 16000, subtype="FLOAT")
    wav = load_audio(path)
    assert wav.shape == (16000,)
    assert np.allclose(wav, left / 2, atol=1e-6)


def test_missing_file_names_it(tmp_path: Path):
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match="nope.wav.*not found"):
        load_audio(path)


def test_corrupt_file_names_it(tmp_path: Path):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(b"RIFF\x10\x00\x00\x00WAVEthis is not audio at all")
    with pytest.raises(AudioError, match="corrupt.wav.*cannot decode"):
        load_audio(path)


def test_truncated_header_names_it(tmp_path: Path):
    good = tmp_path / "good.wav"
    sf.write(good, _tone(1.0, 16000), 16000)
    bad = tmp_path / "truncated.wav"
    bad.write_bytes(good.read_bytes()[:20])
    with pytest.raises(AudioError, match="truncated.wav"):
        load_audio(bad)


@pytest.mark.parametrize("zero_bytes", [True, False])
def test_empty_file(tmp_path: Path, zero_bytes: bool):
    path = tmp_path / "empty.wav"
    if zero_bytes:
        path.write_bytes(b"")
    else:
        sf.write(path, np.zeros(0, dtype=np.float32), 16000)  # valid header, 0 samples
    with pytest.raises(AudioError, match="empty.wav.*empty"):
        load_audio(path)


def test_non_finite_samples(tmp_path: Path):
    path = tmp_path / "nan.wav"
    wav = _tone(1.0, 16000)
    wav[100] = np.nan
    sf.write(path, wav, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav.*NaN"):
        load_audio(path)


def test_too_short(tmp_path: Path):
    path = tmp_path / "short.wav"
    sf.write(path, _tone(0.2, 16000), 16000)
    with pytest.raises(AudioError, match="short.wav.*too short"):
        load_audio(path)
    assert load_audio(path, min_seconds=0.1).shape == (3200,)


def test_silent_recording_is_refused(tmp_path: Path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(16000, np.float32), 16000)
    with pytest.raises(AudioError, match="silence.wav: silent"):
        load_audio(path)
