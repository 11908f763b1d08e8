"""Training-data augmentation at prepare time: MUSAN noise, music and babble, RIR reverberation, speed perturbation.

What every system a speaker-verification result is compared against trains with:

* Kaldi x-vector recipe (egs/voxceleb/v2): augmented copies of each training
  utterance with MUSAN noise (SNR 0-15 dB), music (5-15 dB), babble of 3-7
  MUSAN speech speakers (13-20 dB), and reverberation with the RIRS_NOISES
  simulated room impulse responses; the copies keep the speaker label.
* WeSpeaker speed perturbation: 0.9x / 1.1x copies resampled in time (pitch
  moves too), each factor a NEW speaker ``<speaker>-sp<factor>`` whose class
  index is ``index + (j + 1) * num_speakers`` as in WeSpeaker's processor.

Only the train split is augmented. Every random choice of a copy (its kind, bank
files, offsets, SNR) is drawn when the shard plan is made, from
``(seed, utt_id, copy index)`` alone (:class:`Recipe`), so a copy is the same
whichever worker builds it and in whatever order, and a shard's plan
fingerprint covers exactly what it will contain. Workers receive bank *file
names* in the recipes and read the audio lazily (:func:`bank_clip`): a window
straight from a long file (MUSAN speech files run ~8 minutes, and a babble row
needs up to 7 of them), a whole file cached per process when it must be looped
or resampled, or is an RIR (:func:`load_bank_audio`); no audio is pickled into a task.

This module is the config, the banks and the recipes (no torch: the manifest
model imports :class:`AugmentConfig`); the signal processing that applies a
recipe is :mod:`mfcon.data.augment_signal`.

Example::

    cfg = AugmentConfig(copies=2, musan_dir="musan", rir_dir="RIRS_NOISES/simulated_rirs", speed_factors=[0.9, 1.1])
    aug = Augmentation.build(cfg)             # lists the banks; AugmentError names an empty folder
    rows = list(aug.variants("id1/v/1.wav", "id1"))  # (utt_id, speaker, Variant): 3 speeds x (clean + 2 copies)
    wav = augment_signal.apply_variant(torch.from_numpy(load_audio(path)), rows[4][2], 16000)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mfcon.config import format_validation_error

AUGMENT_VERSION = 1  # bump when the signal processing changes: augmented shards are then rebuilt
Kind = Literal["noise", "music", "babble", "reverb"]
KINDS: tuple[str, ...] = ("noise", "music", "babble", "reverb")
MUSAN_FOLDERS = {"noise": "noise", "music": "music", "babble": "speech"}  # kind -> <musan>/<folder>/**/*.wav


class AugmentError(ValueError):
    """The augmentation config, or a MUSAN/RIR folder or file, is unusable; the message names the field or path."""


# ---------------------------------------------------------------- the config

class AugmentConfig(BaseModel):
    """What augmented training rows ``prepare`` builds. ``copies=0`` and no ``speed_factors`` is off (the default).

    SNR ranges and the babble speaker count are Kaldi's (egs/voxceleb/v2/run.sh).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    copies: int = Field(0, ge=0)  # augmented copies per (speed-perturbed) training utterance
    kinds: list[Kind] = Field(default_factory=lambda: list(KINDS), min_length=1)
    noise_snr: list[float] = Field(default_factory=lambda: [0.0, 15.0], min_length=2, max_length=2)
    music_snr: list[float] = Field(default_factory=lambda: [5.0, 15.0], min_length=2, max_length=2)
    babble_snr: list[float] = Field(default_factory=lambda: [13.0, 20.0], min_length=2, max_length=2)
    babble_speakers: list[int] = Field(default_factory=lambda: [3, 7], min_length=2, max_length=2)
    musan_dir: str | None = None  # <musan>/{noise,music,speech}/**/*.wav
    rir_dir: str | None = None  # e.g. RIRS_NOISES/simulated_rirs: **/*.wav
    speed_factors: list[float] = Field(default_factory=list)  # each makes new speakers <speaker>-sp<factor>
    seed: int = Field(0, ge=0)

    @field_validator("musan_dir", "rir_dir", mode="before")
    @classmethod
    def _absolute(cls, value: Any) -> Any:
        """Recorded in the manifest, and read by workers whose working directory may differ."""
        return str(Path(value).expanduser().resolve()) if isinstance(value, (str, Path)) else value

    @field_validator("speed_factors")
    @classmethod
    def _speeds(cls, factors: list[float]) -> list[float]:
        bad = [f for f in factors if not 0.5 <= f <= 2.0 or f == 1.0]
        if bad:
            raise ValueError(f"speed factors must be in [0.5, 2] and not 1 (the original), got {bad}")
        if len({speed_tag(f) for f in factors}) != len(factors):
            raise ValueError(f"speed factors must be distinct, got {factors}")
        return sorted(factors)  # one canonical order: speaker indices and fingerprints follow it

    @model_validator(mode="after")
    def _consistent(self) -> AugmentConfig:
        if len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"kinds: each kind at most once, got {self.kinds}")
        for name in ("noise_snr", "music_snr", "babble_snr"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: [low, high] dB with low <= high, got {[low, high]}")
        low, high = self.babble_speakers
        if not 1 <= low <= high:
            raise ValueError(f"babble_speakers: [low, high] with 1 <= low <= high, got {[low, high]}")
        if self.copies:
            musan_kinds = [k for k in self.kinds if k in MUSAN_FOLDERS]
            if musan_kinds and self.musan_dir is None:
                raise ValueError(f"musan_dir is required for kinds {musan_kinds} (or leave them out of kinds)")
            if "reverb" in self.kinds and self.rir_dir is None:
                raise ValueError("rir_dir is required for kind 'reverb' (or leave it out of kinds)")
        return self

    @property
    def active(self) -> bool:
        """Whether prepare builds any extra row at all."""
        return self.copies > 0 or bool(self.speed_factors)

    def snr_range(self, kind: str) -> list[float]:
        return {"noise": self.noise_snr, "music": self.music_snr, "babble": self.babble_snr}[kind]


def augment_config(source: str = "augmentation", **fields: Any) -> AugmentConfig:
    """An AugmentConfig from loose values (CLI, YAML); a bad field is an AugmentError naming ``source`` and it."""
    try:
        return AugmentConfig(**fields)
    except ValidationError as e:
        raise AugmentError(format_validation_error(e, source)) from None


def speed_tag(factor: float) -> str:
    """``sp0.9``: the suffix of a speed-perturbed utterance id and speaker."""
    return f"sp{factor:g}"


# ---------------------------------------------------------------- the banks (file lists, never audio)

@dataclass(frozen=True)
class AugmentBanks:
    """Sorted absolute paths of the bank files; indices into them are what recipes draw."""

    noise: tuple[str, ...] = ()
    music: tuple[str, ...] = ()
    speech: tuple[str, ...] = ()  # babble
    rir: tuple[str, ...] = ()

    def for_kind(self, kind: str) -> tuple[str, ...]:
        return {"noise": self.noise, "music": self.music, "babble": self.speech, "reverb": self.rir}[kind]


def _wav_files(folder: Path, needed_for: str, layout: str) -> tuple[str, ...]:
    files = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() == ".wav" and p.is_file()) \
        if folder.is_dir() else []
    if not files:
        where = "does not exist or is not a folder" if not folder.is_dir() else "holds no .wav files"
        raise AugmentError(f"{folder}: {where} (needed for augment kind {needed_for!r}; expected layout {layout})")
    return tuple(files)


def find_banks(cfg: AugmentConfig) -> AugmentBanks:
    """List the bank folders the config's kinds need; AugmentError names a folder without wav files."""
    if not cfg.copies:
        return AugmentBanks()
    lists: dict[str, tuple[str, ...]] = {}
    for kind in cfg.kinds:
        if kind == "reverb":
            lists["rir"] = _wav_files(Path(cfg.rir_dir), kind, "<rir_dir>/**/*.wav, e.g. RIRS_NOISES/simulated_rirs")
        else:
            folder = MUSAN_FOLDERS[kind]
            lists[folder] = _wav_files(Path(cfg.musan_dir) / folder, kind, f"<musan>/{folder}/**/*.wav")
    return AugmentBanks(**lists)


# ---------------------------------------------------------------- recipes: every random choice, made at plan time

class Recipe(NamedTuple):
    """One augmented copy, fully drawn: applying it needs no random numbers."""

    kind: str
    copy: int  # 1-based copy index
    snr_db: float | None  # None for reverb
    sources: tuple[str, ...]  # the noise/music file, the babble speech files, or the RIR
    offsets: tuple[float, ...]  # where each source starts, as a fraction of its spare length


class Variant(NamedTuple):
    """How a training row differs from its recording: speed first, then at most one recipe."""

    speed: float = 1.0
    recipe: Recipe | None = None


CLEAN = Variant()


def copy_rng(seed: int, utt_id: str, copy: int) -> np.random.Generator:
    """The generator of one copy: a function of (seed, utt_id, copy) only."""
    digest = hashlib.sha256(f"{seed}\0{utt_id}\0{copy}".encode()).digest()
    return np.random.default_rng([int(x) for x in np.frombuffer(digest, dtype=np.uint32)])


def kind_order(cfg: AugmentConfig, utt_id: str) -> list[str]:
    """The kinds in the seeded order ``utt_id``'s copies take them (copy c gets entry (c - 1) mod len)."""
    return [cfg.kinds[int(i)] for i in copy_rng(cfg.seed, utt_id, 0).permutation(len(cfg.kinds))]


def draw_recipe(cfg: AugmentConfig, banks: AugmentBanks, utt_id: str, copy: int,
                order: list[str] | None = None) -> Recipe:
    """Copy ``copy`` (1-based) of ``utt_id``: kinds rotate through a per-utterance seeded order, so with
    ``copies == len(kinds)`` every utterance gets one copy of each kind (as Kaldi before subsetting).
    ``order`` is ``kind_order(cfg, utt_id)``, passed when drawing several copies."""
    order = order or kind_order(cfg, utt_id)
    kind = order[(copy - 1) % len(order)]
    rng, files = copy_rng(cfg.seed, utt_id, copy), banks.for_kind(kind)
    if kind == "reverb":
        return Recipe(kind, copy, None, (files[rng.integers(len(files))],), (0.0,))
    snr = float(rng.uniform(*cfg.snr_range(kind)))
    if kind == "babble":
        low, high = cfg.babble_speakers
        n = int(rng.integers(low, high + 1))
        chosen = rng.choice(len(files), size=n, replace=n > len(files))
    else:
        chosen = rng.integers(len(files), size=1)
    return Recipe(kind, copy, snr, tuple(files[i] for i in chosen), tuple(float(u) for u in rng.random(len(chosen))))


@dataclass(frozen=True)
class Augmentation:
    """A config with its bank file lists: turns each training utterance into its rows."""

    config: AugmentConfig
    banks: AugmentBanks

    @classmethod
    def build(cls, cfg: AugmentConfig) -> Augmentation:
        return cls(cfg, find_banks(cfg))

    def speakers(self, speakers: list[str]) -> dict[str, int]:
        """speaker -> class index: the originals keep 0..S-1, factor j adds ``<speaker>-sp<f>`` at (j+1) S + i."""
        index = {s: i for i, s in enumerate(speakers)}
        for j, factor in enumerate(self.config.speed_factors):
            index |= {f"{s}-{speed_tag(factor)}": (j + 1) * len(speakers) + i for i, s in enumerate(speakers)}
        return index

    def variants(self, utt_id: str, speaker: str) -> Iterator[tuple[str, str, Variant]]:
        """(row utt_id, row speaker, variant): per speed (1 first), the clean row then ``copies`` copies."""
        for factor in (1.0, *self.config.speed_factors):
            source, who = (utt_id, speaker) if factor == 1.0 else \
                (f"{utt_id}#{speed_tag(factor)}", f"{speaker}-{speed_tag(factor)}")
            yield source, who, Variant(factor)
            order = kind_order(self.config, source) if self.config.copies else []
            for copy in range(1, self.config.copies + 1):
                recipe = draw_recipe(self.config, self.banks, source, copy, order)
                yield f"{source}#{recipe.kind}{copy}", who, Variant(factor, recipe)
