"""A small synthetic VoxCeleb-like corpus from espeak-ng, for demos and tests.

Each speaker is a distinct espeak-ng voice drawn from the seed: an English
accent, a voice variant with its own formant table, spectral tilt, breathiness
and voicing, its own pitch and speaking rate. (No Klatt voices: klatt.c keeps
static flutter/noise state across calls, so they are not reproducible.) Each utterance is a new
sentence from a word bank with small per-utterance jitter (rate, pitch) and its
own "channel" (tilt filter, gain, noise), so no two recordings of a speaker are
the same. The last ``n_test_speakers`` speakers are held out for the trial list,
as in VoxCeleb1-O.

Everything is drawn from ``numpy.random.default_rng([seed, ...])`` keyed by
speaker and utterance, and the espeak wrapper is order-independent (see
:mod:`mfcon.data.corpus.espeak`), so the same spec gives byte-identical files.

Example::

    layout = make_corpus("data/synth", CorpusSpec(n_speakers=40, seed=0))
    utts = list_utterances(layout.root); trials = read_trials(layout.trials, root=layout.root)
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from mfcon.data.corpus.espeak import Espeak, Formant, VoiceVariant
from mfcon.data.corpus.voxceleb import make_trials, write_trials
from mfcon.files import atomic_path, atomic_write_text

GENERATOR_VERSION = 1  # bump when the synthesis changes: old corpora are then refused, not mixed
ENGLISH_VOICES = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
                  "en-029", "en-us-nyc")
VOLUME = 35  # espeak volume: at 60 some voices overflow and engage the library's static AGC (state across calls)

_ADJ = ("quiet", "golden", "narrow", "ancient", "bright", "heavy", "gentle", "distant", "crowded", "silver",
        "broken", "famous", "hidden", "little", "modern", "yellow", "frozen", "empty", "curious", "wooden")
_NOUN = ("river", "garden", "teacher", "window", "market", "engine", "village", "letter", "doctor", "mountain",
         "kitchen", "island", "painter", "station", "forest", "bottle", "captain", "library", "farmer", "bridge")
_VERB = ("opened", "followed", "painted", "carried", "noticed", "repaired", "visited", "described", "watched",
         "cleaned", "borrowed", "measured", "reached", "protected", "ordered", "discovered")
_NAME = ("Anna", "Oliver", "Maria", "Thomas", "Grace", "Daniel", "Sophie", "Martin", "Laura", "Peter")
_PLACE = ("near the harbour", "after the storm", "in the morning", "before dinner", "across the valley",
          "behind the old school", "during the winter", "at the end of the road", "under the bright lamps")
_ADV = ("slowly", "carefully", "yesterday", "again", "quickly", "quietly", "twice", "happily")


class CorpusSpec(BaseModel):
    """What to generate; unknown keys and out-of-range values are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_speakers: int = Field(40, ge=3)
    utts_per_speaker: int = Field(10, ge=2)
    n_test_speakers: int = Field(10, ge=2)
    min_seconds: float = Field(1.0, gt=0)
    max_seconds: float = Field(4.0, gt=0)
    seed: int = Field(0, ge=0)
    sample_rate: int = Field(16000, ge=8000)
    trials_per_utt: int = Field(3, ge=1)  # target trials per enrolment utterance, plus as many non-targets

    @model_validator(mode="after")
    def _consistent(self) -> CorpusSpec:
        if self.n_test_speakers >= self.n_speakers:
            raise ValueError(f"n_test_speakers ({self.n_test_speakers}) must be < n_speakers ({self.n_speakers})")
        if self.max_seconds < self.min_seconds:
            raise ValueError(f"max_seconds ({self.max_seconds}) < min_seconds ({self.min_seconds})")
        return self


@dataclass(frozen=True)
class SpeakerVoice:
    speaker: str
    language: str
    gender: str
    rate: int  # words per minute
    pitch: int  # espeak 0-100
    pitch_range: int  # espeak 0-100
    n_videos: int
    variant: VoiceVariant


@dataclass(frozen=True)
class CorpusLayout:
    root: Path  # wav/<speaker>/<video>/<utt>.wav
    trials: Path  # written last: its presence marks a complete corpus
    info: Path  # corpus.json: spec, voices, speaker split, texts


@dataclass(frozen=True)
class _Plan:
    utt_id: str
    speaker_index: int
    utt_index: int
    text: str
    seconds: float  # target length


def draw_voice(seed: int, index: int) -> SpeakerVoice:
    """Speaker ``index`` (0-based) of the corpus with ``seed``: independent of the corpus size."""
    rng = np.random.default_rng([seed, 0, index])
    gender = "female" if rng.random() < 0.5 else "male"
    scale = rng.uniform(1.05, 1.20) if gender == "female" else rng.uniform(0.88, 1.02)  # vocal-tract length
    formants = tuple(Formant(i, freq=round(100 * scale * rng.uniform(0.94, 1.06)), height=round(rng.uniform(70, 130)),
                             width=round(rng.uniform(80, 160))) for i in range(9))
    base = rng.uniform(145, 225) if gender == "female" else rng.uniform(75, 125)
    top = base + (rng.uniform(40, 90) if gender == "female" else rng.uniform(25, 60))
    tone = (600, 170, 1200, 135, 2000, 110, 3000, 110)  # the library's default tilt, scaled per speaker
    tone = tuple(v if i % 2 == 0 else round(v * rng.uniform(0.7, 1.3)) for i, v in enumerate(tone))
    breathy = rng.random() < 0.3
    variant = VoiceVariant(
        formants=formants, pitch_hz=(round(base), round(top)), tone=tone, gender=gender,
        breath=tuple(int(b) for b in rng.integers(0, 4, size=8)) if breathy else None,
        voicing=round(rng.uniform(85, 105)), consonants=(round(rng.uniform(70, 120)), round(rng.uniform(80, 120))))
    return SpeakerVoice(speaker=f"id{index + 1:05d}", language=ENGLISH_VOICES[rng.integers(len(ENGLISH_VOICES))],
                        gender=gender, rate=int(rng.integers(135, 196)), pitch=int(rng.integers(40, 61)),
                        pitch_range=int(rng.integers(30, 81)), n_videos=int(rng.integers(2, 4)), variant=variant)


def make_sentence(rng: np.random.Generator, n_words: int) -> str:
    """Word-bank sentences with at least ``n_words`` words."""
    def pick(bank):
        return bank[rng.integers(len(bank))]

    templates = (
        lambda: f"the {pick(_ADJ)} {pick(_NOUN)} {pick(_VERB)} the {pick(_NOUN)} {pick(_PLACE)}",
        lambda: f"{pick(_NAME)} {pick(_ADV)} {pick(_VERB)} a {pick(_ADJ)} {pick(_NOUN)}",
        lambda: f"{pick(_NAME)} and the {pick(_NOUN)} {pick(_VERB)} the {pick(_ADJ)} {pick(_NOUN)} {pick(_ADV)}",
    )
    sentences, count = [], 0
    while count < n_words:
        clause = templates[rng.integers(len(templates))]()
        if rng.random() < 0.4:
            clause += " and " + templates[rng.integers(len(templates))]()
        sentences.append(clause[0].upper() + clause[1:] + ("?" if rng.random() < 0.15 else "."))
        count += len(clause.split())
    return " ".join(sentences)


def _plan(spec: CorpusSpec, voices: list[SpeakerVoice]) -> list[_Plan]:
    plans = []
    for k, voice in enumerate(voices):
        videos = np.random.default_rng([spec.seed, 1, k]).permutation(spec.utts_per_speaker) % voice.n_videos
        for u in range(spec.utts_per_speaker):
            rng = np.random.default_rng([spec.seed, 2, k, u])
            seconds = float(rng.uniform(spec.min_seconds, spec.max_seconds))
            n_words = math.ceil(seconds * voice.rate / 60 * 1.3) + 2  # over-generate, then cut to length
            utt_id = f"{voice.speaker}/vid{videos[u] + 1:02d}/{u + 1:05d}.wav"
            plans.append(_Plan(utt_id, k, u, make_sentence(rng, n_words), seconds))
    return plans


@functools.lru_cache(maxsize=4)
def _resampler(orig: int, new: int) -> torchaudio.transforms.Resample:
    """Kernel built once (building it costs more than applying it). float64: torch's float32
    conv path may pick different kernels per thread count, the float64 one is stable."""
    return torchaudio.transforms.Resample(orig, new, dtype=torch.float64)


@contextlib.contextmanager
def _single_torch_thread():
    """Per-utterance tensors are small: OpenMP wake-ups cost more than they save (one resample
    took 5 ms on 1 thread vs 106 ms on 2 threads of a busy 2-core machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _trim_silence(wav: np.ndarray, sr: int, floor_db: float = -45.0) -> np.ndarray:
    """Drop leading/trailing 10 ms frames quieter than ``floor_db`` below the loudest frame."""
    hop = sr // 100
    n = len(wav) // hop
    if n == 0:
        return wav
    rms = np.sqrt((wav[: n * hop].reshape(n, hop) ** 2).mean(axis=1)) + 1e-12  # (frames,)
    loud = np.flatnonzero(20 * np.log10(rms / rms.max()) > floor_db)
    return wav[loud[0] * hop: (loud[-1] + 1) * hop]


def synthesize_utterance(tts: Espeak, voice: SpeakerVoice, plan: _Plan, spec: CorpusSpec) -> np.ndarray:
    """One utterance as float64 at ``spec.sample_rate``, length within [min_seconds, max_seconds]."""
    rng = np.random.default_rng([spec.seed, 3, plan.speaker_index, plan.utt_index])
    wav = tts.synthesize(plan.text, voice.language, voice.variant, rate=round(voice.rate * rng.uniform(0.92, 1.08)),
                         pitch=voice.pitch + int(rng.integers(-4, 5)), pitch_range=voice.pitch_range,
                         volume=VOLUME, seed=int(rng.integers(1, 2**31)))
    wav = _trim_silence(wav.astype(np.float64), tts.sample_rate)
    wav = _resampler(tts.sample_rate, spec.sample_rate)(torch.from_numpy(wav)).numpy()
    target, minimum = round(plan.seconds * spec.sample_rate), math.ceil(spec.min_seconds * spec.sample_rate)
    if len(wav) > target:
        wav = wav[:target].copy()
        fade = min(len(wav), spec.sample_rate // 50)  # 20 ms: no click at the cut
        wav[-fade:] *= np.linspace(1.0, 0.0, fade)
    elif len(wav) < minimum:
        wav = np.pad(wav, (0, minimum - len(wav)))
    tilt = rng.uniform(-0.3, 0.7)  # one-pole channel tilt: y[n] = x[n] - a x[n-1]
    wav = np.concatenate([wav[:1], wav[1:] - tilt * wav[:-1]])
    wav *= rng.uniform(0.25, 0.85) / max(np.abs(wav).max(), 1e-9)
    snr_db = rng.uniform(25, 45)
    wav += rng.standard_normal(len(wav)) * np.sqrt((wav**2).mean()) * 10 ** (-snr_db / 20)
    return np.clip(wav, -1.0, 32767 / 32768)


def _write_info(layout: CorpusLayout, spec: CorpusSpec, voices: list[SpeakerVoice], plans: list[_Plan],
                tts: Espeak) -> None:
    """Write corpus.json first; a re-run with another spec or generator is refused, never mixed in."""
    n_train = spec.n_speakers - spec.n_test_speakers
    info = {
        "generator": {"version": GENERATOR_VERSION, "espeak_ng": tts.version},
        "spec": spec.model_dump(),
        "train_speakers": [v.speaker for v in voices[:n_train]],
        "test_speakers": [v.speaker for v in voices[n_train:]],
        "voices": {v.speaker: asdict(v) for v in voices},
        "utterances": {p.utt_id: p.text for p in plans},
    }
    if layout.info.is_file():
        old = json.loads(layout.info.read_text())
        if old.get("spec") != info["spec"] or old.get("generator") != info["generator"]:
            changed = {k: (v, info["spec"].get(k)) for k, v in (old.get("spec") or {}).items()
                       if info["spec"].get(k) != v}
            flags = {"n_speakers": "--speakers", "utts_per_speaker": "--utts", "n_test_speakers": "--test-speakers",
                     "seed": "--seed"}
            what = (", ".join(f"{flags.get(k, k)} {was} -> {now}" for k, (was, now) in changed.items())
                    if changed else f"generator {old.get('generator')} -> {info['generator']}")
            raise ValueError(f"{layout.info}: this corpus was made with other options ({what}); give another --out "
                             "folder, or the options it was made with")
    atomic_write_text(layout.info, json.dumps(info, indent=1) + "\n")


def make_corpus(out_dir: str | Path, spec: CorpusSpec = CorpusSpec(), progress: bool = True) -> CorpusLayout:
    """Generate (or complete) the corpus in ``out_dir``; existing wav files are kept, not redone."""
    out_dir = Path(out_dir)
    layout = CorpusLayout(root=out_dir / "wav", trials=out_dir / "trials.txt", info=out_dir / "corpus.json")
    layout.root.mkdir(parents=True, exist_ok=True)
    tts = Espeak()
    voices = [draw_voice(spec.seed, k) for k in range(spec.n_speakers)]
    plans = _plan(spec, voices)
    _write_info(layout, spec, voices, plans, tts)
    with _single_torch_thread():
        for plan in tqdm(plans, desc="synthesising", unit="utt", disable=not progress):
            path = layout.root / plan.utt_id
            if path.is_file():
                continue
            wav = synthesize_utterance(tts, voices[plan.speaker_index], plan, spec)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                sf.write(tmp, wav, spec.sample_rate, format="WAV", subtype="PCM_16")
    test_speakers = {v.speaker for v in voices[spec.n_speakers - spec.n_test_speakers:]}
    test_utts: dict[str, list[str]] = {}
    for plan in plans:
        speaker = voices[plan.speaker_index].speaker
        if speaker in test_speakers:
            test_utts.setdefault(speaker, []).append(plan.utt_id)
    write_trials(layout.trials, make_trials(test_utts, spec.trials_per_utt, spec.seed))
    return layout
