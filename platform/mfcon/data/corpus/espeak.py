"""ctypes wrapper over the libespeak-ng bundled by the ``espeakng-loader`` wheel.

The wheel ships ``libespeak-ng.so`` (1.52) and its ``espeak-ng-data`` folder, so
no system package or root is needed. Three library quirks shape this module:

* The library is one process-global synthesiser: every call goes through one
  lock, and it is initialised once per process per data folder.
* Voice qualities (formants, pitch in Hz, breath, ...) can only be set through
  voice-variant files in ``espeak-ng-data/voices/!v/``, which it re-reads on
  every voice change. We write them into a private copy of the data folder,
  never into the wheel. An unknown ``+variant`` is silently ignored by the
  library, so we check that the file exists.
* wavegen.c keeps function-static state that ``espeak_ng_Terminate`` does not
  reset (``Flutter_ix`` in AdvanceParameters, ``cycle_count`` for roughness), so
  with flutter or roughness below 8 a waveform depends on what the process
  synthesised before. Variants default to ``flutter 0`` and ``roughness 8``
  (8 = N_ROUGHNESS switches modulation off) and the noise generator is reseeded
  before every call (``espeak_ng_SetRandSeed``): the same call then gives the
  same samples in any process and any order. Klatt voices keep more static
  state (klatt.c) and are not reproducible that way.

Example::

    tts = Espeak()
    voice = VoiceVariant(formants=(Formant(1, freq=110), Formant(2, freq=108)), pitch_hz=(150, 210))
    wav = tts.synthesize("Hello there.", voice="en-gb-scotland", variant=voice, rate=160)  # float32, 22050 Hz
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mfcon.files import atomic_write_text

NATIVE_SAMPLE_RATE = 22050
RATE_RANGE = (80, 450)  # espeakRATE_MINIMUM, espeakRATE_MAXIMUM (words per minute)

# speak_lib.h / espeak_ng.h constants
_MODE_SYNCHRONOUS = 0x0001  # ENOUTPUT_MODE_SYNCHRONOUS == AUDIO_OUTPUT_SYNCHRONOUS without playback
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_P_RATE, _P_VOLUME, _P_PITCH, _P_RANGE = 1, 2, 3, 4
_ENS_OK = 0

_CALLBACK_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class EspeakError(RuntimeError):
    """The library cannot be loaded, initialised, or refuses a voice or text."""


@dataclass(frozen=True)
class Formant:
    """One ``formant N freq height width [freqadd]`` line; values are percent of the language's defaults."""

    index: int  # 0-8
    freq: int = 100
    height: int = 100
    width: int = 100
    freq_add: int = 0  # Hz


@dataclass(frozen=True)
class VoiceVariant:
    """A voice-variant file (espeak-ng docs/voices.md). ``None`` keeps the language's value."""

    formants: tuple[Formant, ...] = ()
    pitch_hz: tuple[int, int] | None = None  # base and top of the pitch range, Hz
    tone: tuple[int, ...] | None = None  # freq/height pairs: spectral tilt
    breath: tuple[int, ...] | None = None  # up to 8 breath amounts, one per formant
    voicing: int | None = None  # percent
    consonants: tuple[int, int] | None = None  # unvoiced, voiced consonant amplitude (percent)
    echo: tuple[int, int] | None = None  # delay ms, amplitude percent
    klatt: int | None = None  # Klatt source type (1-6); NOT reproducible: klatt.c keeps static state
    flutter: int = 0  # != 0 makes output depend on process history (see module doc)
    roughness: int = 8  # < 8 makes output depend on process history (see module doc)
    gender: str | None = None

    def to_text(self) -> str:
        lines = ["language variant"]
        if self.gender:
            lines.append(f"gender {self.gender}")
        if self.pitch_hz:
            lines.append("pitch {} {}".format(*self.pitch_hz))
        for f in self.formants:
            if not 0 <= f.index <= 8:
                raise ValueError(f"formant index must be 0-8, got {f.index}")
            lines.append(f"formant {f.index} {f.freq} {f.height} {f.width} {f.freq_add}")
        optional = {"tone": self.tone, "breath": self.breath, "voicing": self.voicing,
                    "consonants": self.consonants, "echo": self.echo, "klatt": self.klatt}
        for key, value in optional.items():
            if value is not None:
                values = value if isinstance(value, tuple) else (value,)
                lines.append(f"{key} " + " ".join(str(int(v)) for v in values))
        lines += [f"flutter {self.flutter}", f"roughness {self.roughness}"]
        return "\n".join(lines) + "\n"

    @property
    def name(self) -> str:
        """File name from the content: equal variants share a file (short: voice names are char[40])."""
        return "mfcon_" + hashlib.sha1(self.to_text().encode()).hexdigest()[:10]

    def to_dict(self) -> dict:
        return asdict(self)


class _Library:
    """Process-global state of the one libespeak-ng instance."""

    lock = threading.RLock()
    lib: ctypes.CDLL | None = None
    data_dir: str | None = None
    sample_rate = NATIVE_SAMPLE_RATE
    chunks: list[np.ndarray] = []


def _collect(wav, n_samples, _events) -> int:
    if wav and n_samples > 0:
        _Library.chunks.append(np.ctypeslib.as_array(wav, shape=(n_samples,)).copy())
    return 0  # 0 = continue


_CALLBACK = _CALLBACK_TYPE(_collect)  # module-level: must outlive every synthesis call


def _after_fork() -> None:
    _Library.lock = threading.RLock()  # a lock held by another thread at fork() would never be released


os.register_at_fork(after_in_child=_after_fork)


def _load_library() -> ctypes.CDLL:
    if _Library.lib is None:
        try:
            import espeakng_loader

            path = espeakng_loader.get_library_path()
        except ImportError as err:
            raise EspeakError("espeakng-loader is not installed (pip install espeakng-loader==0.2.4)") from err
        try:
            lib = ctypes.CDLL(path)
        except OSError as err:
            raise EspeakError(f"cannot load libespeak-ng from {path}: {err}") from err
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_Synthesize.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                             ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_ng_SetVoiceByName.argtypes = [ctypes.c_char_p]
        _Library.lib = lib
    return _Library.lib


def _status_message(lib: ctypes.CDLL, status: int) -> str:
    buf = ctypes.create_string_buffer(512)
    lib.espeak_ng_GetStatusCodeMessage(status, buf, len(buf))
    return f"{buf.value.decode(errors='replace')} (status 0x{status & 0xFFFFFFFF:08x})"


def _activate(data_dir: str) -> ctypes.CDLL:
    """Initialise the library on ``data_dir`` unless it already is (call with the lock held)."""
    lib = _load_library()
    if _Library.data_dir == data_dir:
        return lib
    if _Library.data_dir is not None:
        lib.espeak_ng_Terminate()
        _Library.data_dir = None
    lib.espeak_ng_InitializePath(data_dir.encode())
    context = ctypes.c_void_p()
    status = lib.espeak_ng_Initialize(ctypes.byref(context))
    lib.espeak_ng_ClearErrorContext(ctypes.byref(context))
    if status != _ENS_OK:
        raise EspeakError(f"espeak-ng cannot initialise on {data_dir}: {_status_message(lib, status)}")
    status = lib.espeak_ng_InitializeOutput(_MODE_SYNCHRONOUS, 0, None)
    if status != _ENS_OK:
        raise EspeakError(f"espeak-ng output setup failed: {_status_message(lib, status)}")
    lib.espeak_SetSynthCallback(_CALLBACK)
    _Library.sample_rate = int(lib.espeak_ng_GetSampleRate())
    _Library.data_dir = data_dir
    return lib


def _private_copy(parent: Path) -> Path:
    """``parent/espeak-ng-data``, copied from the wheel once (atomically: temp folder + rename)."""
    target = parent / "espeak-ng-data"
    if (target / "phontab").is_file():
        return target
    try:
        import espeakng_loader

        source = Path(espeakng_loader.get_data_path())
    except (ImportError, RuntimeError) as err:  # RuntimeError: the wheel's data folder is missing
        raise EspeakError(f"espeak-ng data not available from espeakng-loader: {err}") from err
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f"espeak-ng-data.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    if not (target / "phontab").is_file():
        raise EspeakError(f"{target} is not an espeak-ng-data folder")
    return target


_TEMP_CACHE: dict[int, Path] = {}  # pid -> this process's temporary cache


def _temp_cache_dir() -> Path:
    """One temporary copy per process, removed at exit by the process that made it (not by forks)."""
    pid = os.getpid()
    if pid not in _TEMP_CACHE:
        path = Path(tempfile.mkdtemp(prefix="mfcon-espeak-"))
        _TEMP_CACHE[pid] = path
        atexit.register(lambda: os.getpid() == pid and shutil.rmtree(path, ignore_errors=True))
    return _TEMP_CACHE[pid]


class Espeak:
    """Synthesiser bound to a private copy of espeak-ng-data under ``cache_dir``.

    ``cache_dir=None`` shares one temporary copy per process, removed at exit.
    """

    def __init__(self, cache_dir: str | Path | None = None):
        if cache_dir is None:
            cache_dir = _temp_cache_dir()
        self.data_dir = _private_copy(Path(cache_dir).resolve())
        self._variants_dir = self.data_dir / "voices" / "!v"
        self._written: set[str] = set()
        with _Library.lock:
            lib = _activate(str(self.data_dir))
            self.version = lib.espeak_Info(None).decode()

    @property
    def sample_rate(self) -> int:
        return _Library.sample_rate

    def add_variant(self, variant: VoiceVariant) -> str:
        """Write ``variant`` into the private data folder (once); returns its name for ``voice+name``."""
        name = variant.name
        if name not in self._written:
            path, text = self._variants_dir / name, variant.to_text()
            if not path.is_file() or path.read_text() != text:
                atomic_write_text(path, text)
            self._written.add(name)
        return name

    def synthesize(self, text: str, voice: str = "en", variant: str | VoiceVariant | None = None,
                   rate: int = 175, pitch: int = 50, pitch_range: int = 50, volume: int = 100,
                   seed: int = 0) -> np.ndarray:
        """Text -> float32 waveform in [-1, 1] at :attr:`sample_rate` (22050 Hz).

        ``variant``: a :class:`VoiceVariant`, the name of a variant file (e.g. the
        wheel's ``"m3"``, not reproducible: it has flutter), or ``None`` for the
        language's own voice quality made reproducible (``VoiceVariant()``).
        ``rate`` words/min (80-450); ``pitch`` and ``pitch_range`` 0-100 scale the
        variant's Hz values (50 = unchanged); ``seed`` drives breath/Klatt noise.
        """
        if not text.strip():
            raise EspeakError("cannot synthesise empty text")
        if "+" in voice:  # the library would read "en+m3+x" as variant "m3+x" and silently ignore it
            raise EspeakError(f"voice {voice!r}: pass the variant as variant=, not after '+'")
        variant = VoiceVariant() if variant is None else variant
        vname = self.add_variant(variant) if isinstance(variant, VoiceVariant) else variant
        if vname not in self._written and not (self._variants_dir / vname).is_file():
            raise EspeakError(f"unknown voice variant {vname!r} (no file in {self._variants_dir})")
        name = f"{voice}+{vname}"
        params = {_P_RATE: int(np.clip(rate, *RATE_RANGE)), _P_PITCH: int(np.clip(pitch, 0, 100)),
                  _P_RANGE: int(np.clip(pitch_range, 0, 100)), _P_VOLUME: int(np.clip(volume, 0, 200))}
        data = text.encode("utf-8") + b"\0"
        with _Library.lock:
            lib = _activate(str(self.data_dir))
            status = lib.espeak_ng_SetVoiceByName(name.encode())
            if status != _ENS_OK:
                raise EspeakError(f"voice {name!r}: {_status_message(lib, status)}")
            for key, value in params.items():
                lib.espeak_ng_SetParameter(key, value, 0)
            lib.espeak_ng_SetRandSeed(seed)
            _Library.chunks = []
            status = lib.espeak_ng_Synthesize(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            chunks, _Library.chunks = _Library.chunks, []
        if status != _ENS_OK:
            raise EspeakError(f"synthesis of {text[:40]!r} failed: {_status_message(lib, status)}")
        if not chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32) / 32768.0
