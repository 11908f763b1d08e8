"""VoxCeleb-style corpus layout and trial lists.

Layout ``<root>/<speaker>/<video>/<utt>.<ext>`` (VoxCeleb1/2, and what
:func:`mfcon.data.corpus.synthetic.make_corpus` writes). Utterance ids are posix
paths relative to the root, which is exactly what VoxCeleb trial lists name,
e.g. ``1 id10270/x6uYqmx31kE/00001.wav id10270/8jEAjG6SegY/00008.wav``.

Example::

    utts = list_utterances("data/wav")
    trials = read_trials("data/trials.txt", root="data/wav")
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from mfcon import storage

AUDIO_EXTENSIONS = (".wav", ".flac")


class CorpusError(ValueError):
    """The corpus root is missing or holds no audio; the message names the root."""


class TrialListError(ValueError):
    """A trial list is malformed or names missing audio; the message names the file and line."""


@dataclass(frozen=True)
class Utterance:
    utt_id: str  # posix path relative to the root, e.g. id10270/x6uYqmx31kE/00001.wav
    speaker: str
    path: Path


@dataclass(frozen=True)
class TrialPair:
    """One line of a verification trial list (not a tuning trial): two utterances and whether they share a speaker."""

    label: int  # 1 = same speaker (target), 0 = different speakers
    enroll: str  # utterance id
    test: str


def list_utterances(root: str | Path, extensions: Iterable[str] = AUDIO_EXTENSIONS) -> list[Utterance]:
    """All ``<root>/<speaker>/<video>/<utt>.<ext>`` files, sorted by utt_id; other depths are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"corpus root {root} does not exist or is not a folder")
    exts = tuple(e.lower() for e in extensions)
    utts = [
        Utterance(path.relative_to(root).as_posix(), path.parts[-3], path)
        for path in root.glob("*/*/*")
        if path.suffix.lower() in exts and path.is_file()
    ]
    if not utts:
        raise CorpusError(f"corpus root {root} holds no {'/'.join(exts)} files at <speaker>/<video>/<utt> depth")
    return sorted(utts, key=lambda u: u.utt_id)


def _parse_line(path: str, lineno: int, line: str) -> TrialPair:
    fields = line.split()
    where = f"{path}:{lineno}: {line.strip()!r}"
    if len(fields) != 3:
        raise TrialListError(f"{where}: expected '<0|1> <enroll> <test>', got {len(fields)} fields")
    if fields[0] not in ("0", "1"):
        raise TrialListError(f"{where}: label must be 0 or 1, got {fields[0]!r}")
    for utt in fields[1:]:
        parts = PurePosixPath(utt).parts
        if utt.startswith(("/", "\\")) or ".." in parts or (len(utt) > 1 and utt[1] == ":"):
            raise TrialListError(f"{where}: {utt!r} must be a path relative to the corpus root "
                                 "(<speaker>/<video>/<utt>), without '..'")
    return TrialPair(int(fields[0]), fields[1], fields[2])


def read_trials(path: str | Path, root: str | Path | None = None) -> list[TrialPair]:
    """Parse ``<0|1> <enroll> <test>`` lines (blank lines skipped); with ``root``, check every file exists.

    Refused with the file and line: a trial listed twice (it would weigh twice
    in the EER), an utterance paired with itself (a free perfect score), and
    one pair with both labels (in either order: cosine scoring is symmetric).
    """
    path = storage.describe(path)
    try:
        lines = storage.read_text(path).splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise TrialListError(f"{path}: cannot read trial list ({err})") from err
    trials: list[TrialPair] = []
    seen: dict[tuple[str, str], int] = {}  # (enroll, test) -> first line
    labels: dict[frozenset[str], tuple[int, int]] = {}  # unordered pair -> (label, first line)
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        trial = _parse_line(path, lineno, line)
        _check_unique(path, lineno, line, trial, seen, labels)
        if root is not None:
            for utt in (trial.enroll, trial.test):
                if not (Path(root) / utt).is_file():
                    raise TrialListError(f"{path}:{lineno}: audio file {Path(root) / utt} does not exist")
        trials.append(trial)
    if not trials:
        raise TrialListError(f"{path}: trial list is empty")
    return trials


def _check_unique(path: object, lineno: int, line: str, trial: TrialPair, seen: dict[tuple[str, str], int],
                  labels: dict[frozenset[str], tuple[int, int]]) -> None:
    where = f"{path}:{lineno}: {line.strip()!r}"
    if trial.enroll == trial.test:
        raise TrialListError(f"{where}: pairs {trial.enroll} with itself")
    if (trial.enroll, trial.test) in seen:
        raise TrialListError(f"{where}: this trial is listed twice (first on line {seen[trial.enroll, trial.test]}); "
                             "each trial must appear once")
    pair = frozenset((trial.enroll, trial.test))
    if pair in labels and labels[pair][0] != trial.label:
        raise TrialListError(f"{where}: label {trial.label} contradicts line {labels[pair][1]}, which gives the same "
                             f"pair label {labels[pair][0]}")
    seen[trial.enroll, trial.test] = lineno
    labels.setdefault(pair, (trial.label, lineno))


def write_trials(path: str | Path, trials: Iterable[TrialPair]) -> None:
    """Write a trial list atomically, to a local path or an object-store URI."""
    text = "".join(f"{t.label} {t.enroll} {t.test}\n" for t in trials)
    storage.write_text(path, text)


def make_trials(test_utts: dict[str, list[str]], per_utt: int, seed: int) -> list[TrialPair]:
    """A seeded trial list over held-out speakers (the demo's test list, a generated dev list).

    Each utterance enrols up to ``per_utt`` target trials against other
    utterances of its speaker (every same-speaker pair once, so a speaker with
    n utterances gives at most n(n-1)/2 targets) and as many non-target trials
    against utterances of other speakers (at least one), each unordered pair
    at most once. Balanced classes keep EER estimates as stable as VoxCeleb1-O's
    near 50/50 list does; ``seed`` fixes every draw.
    """
    rng = np.random.default_rng([seed, 4])
    speakers = sorted(test_utts)
    seen: set[frozenset[str]] = set()
    trials: list[TrialPair] = []
    for spk in speakers:
        others = [u for s in speakers if s != spk for u in test_utts[s]]
        for enroll in test_utts[spk]:
            same = [u for u in test_utts[spk] if u != enroll and frozenset((enroll, u)) not in seen]
            targets = [same[i] for i in rng.permutation(len(same))[:per_utt]]
            candidates = [others[i] for i in rng.permutation(len(others))]
            nontargets = [u for u in candidates if frozenset((enroll, u)) not in seen][: max(len(targets), 1)]
            for label, tests in ((1, targets), (0, nontargets)):
                for test in tests:
                    seen.add(frozenset((enroll, test)))
                    trials.append(TrialPair(label, enroll, test))
    return trials
