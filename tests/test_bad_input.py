"""Every bad input through the public CLI: one clear error, nothing already written changed.

Two matrices, one test per row (docs/bad_input.md is the same table for people):

* ``AUDIO``: one odd file in a corpus given to ``mfcon prepare``. A format mfcon
  reads is accepted (resampled to 16 kHz, downmixed to mono) and its utterance
  lands in a shard with the frames of its duration; a file it cannot use is
  skipped, listed in the manifest's ``skipped`` with a reason naming the file,
  and the rest of the corpus is prepared. The corpus itself is never touched.
* ``ERRORS``: trial lists, shards, manifests, search spaces, resources, tracking
  URIs, model aliases and checkpoints that are wrong. Each must end the command
  with exit code 2 and exactly one ``error:`` message matching the row's pattern
  (the file, line or field), no traceback, and the same sha256 for every file of
  the data folder, study work dir (with its MLflow store) and checkpoint folder
  as before. Input errors come before anything trains: Ray must not even start
  (``ray.init`` is a tripwire here).

Everything runs on a small seeded tone corpus (8 speakers x 3 utterances of 1 s)
prepared once per module; no training, no Ray.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from mfcon.cli import main
from mfcon.data.features import num_frames
from mfcon.files import file_sha256
from mlflow_fixtures import free_port, write_study_store
from registry_fixtures import make_tone_corpus, write_test_trials

SR = 16000
ODD_FILE = "id10008/vid07/odd"  # an extra utterance of a training speaker, named in no trial list
GOOD_SPACE = """\
name: bad-input
base:
  model_preset: tiny
  epochs: 2
  data: {speakers_per_batch: 2, utts_per_speaker: 2, crop_seconds: 0.5}
params:
  loss.mfcon_weight: {type: loguniform, low: 0.01, high: 1.0}
  loss.mfcon_temperature: {type: loguniform, low: 0.03, high: 0.5}
budget: {num_samples: 1, max_concurrent_trials: 1}
resources: {num_workers: 1, cpus_per_worker: 1}
"""
TRAIN_CONFIG = """\
model_preset: tiny
epochs: 1
data: {speakers_per_batch: 2, utts_per_speaker: 2, crop_seconds: 0.5}
"""


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` by relative path ({} if it does not exist): compare before and after."""
    path = Path(path)
    if path.is_file():
        return {".": file_sha256(path)}
    return {f.relative_to(path).as_posix(): file_sha256(f) for f in sorted(path.rglob("*")) if f.is_file()}


# ---------------------------------------------------------------- shared, prepared once

@dataclass(frozen=True)
class Inputs:
    corpus: Path  # VoxCeleb layout root
    trials: Path  # test trial list (2 speakers)
    data: Path  # prepared with `mfcon prepare`
    workdir: Path  # a study's MLflow store (mlflow.db + mlartifacts), as `mfcon study` leaves it


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("bad-input")
    utts = make_tone_corpus(root / "wav", n_speakers=8, utts_per_speaker=3, seconds=1.0, seed=5)
    write_test_trials(root / "trials.txt", utts, sorted(utts)[:2])
    code, _, err = cli(["prepare", "--corpus", str(root / "wav"), "--test-trials", str(root / "trials.txt"),
                        "--dev-speakers", "2", "--out", str(root / "data"), "--workers", "0"])
    assert code == 0, err
    write_study_store(root / "runs", study="existing-study")
    return Inputs(root / "wav", root / "trials.txt", root / "data", root / "runs")


def cli(argv: list[str]) -> tuple[int, str, str]:
    """``mfcon ...`` in this process: (exit code, stdout, stderr); an exception escaping main is a traceback."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 1
        except Exception as e:  # noqa: BLE001 - reported as the failure it is
            pytest.fail(f"mfcon {' '.join(map(str, argv))} raised instead of printing one error: "
                        f"{type(e).__name__}: {e}")
    return code, out.getvalue(), err.getvalue()


def shard_rows(data: Path) -> dict[str, int]:
    """utt_id -> num_frames over every shard of a prepared folder."""
    rows: dict[str, int] = {}
    for shard in sorted(data.glob("*.parquet")):
        table = pq.read_table(shard, columns=["utt_id", "num_frames"])
        rows.update(zip(table.column("utt_id").to_pylist(), table.column("num_frames").to_pylist()))
    return rows


# ---------------------------------------------------------------- audio: accepted or skipped with a reason

def tone(sr: int, seconds: float = 1.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.02 * np.random.default_rng(0).standard_normal(t.size)
    return np.stack([x, 0.5 * x][:channels], axis=1) if channels > 1 else x


@dataclass(frozen=True)
class AudioRow:
    name: str
    ext: str
    write: Callable[[Path], None]
    accepted: bool
    reason: str = ""  # regex for the skipped reason


AUDIO = [
    AudioRow("corrupt-wav", "wav", lambda p: p.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(64)), False,
             r"cannot decode audio \(.+\)"),
    AudioRow("not-audio-named-wav", "wav", lambda p: p.write_text("this is a text file\n" * 50), False,
             r"cannot decode audio \(.*not recognised.*\)"),
    AudioRow("empty-file", "wav", lambda p: p.write_bytes(b""), False, r"file is empty \(0 bytes\)"),
    AudioRow("header-only-wav", "wav", lambda p: sf.write(p, np.zeros(0), SR), False,
             r"file is empty \(0 samples\)"),
    AudioRow("too-short", "wav", lambda p: sf.write(p, tone(SR, 0.2), SR), False, r"too short \(0\.200 s < 0\.5 s\)"),
    AudioRow("silent", "wav", lambda p: sf.write(p, np.zeros(SR), SR), False, r"silent \(every sample is 0\)"),
    AudioRow("float-wav-nan", "wav", lambda p: sf.write(p, np.full(SR, np.nan, np.float32), SR, subtype="FLOAT"),
             False, r"NaN or infinite samples"),
    AudioRow("8khz", "wav", lambda p: sf.write(p, tone(8000), 8000), True),
    AudioRow("48khz", "wav", lambda p: sf.write(p, tone(48000), 48000), True),
    AudioRow("stereo", "wav", lambda p: sf.write(p, tone(SR, channels=2), SR), True),
    AudioRow("24-bit-wav", "wav", lambda p: sf.write(p, tone(SR), SR, subtype="PCM_24"), True),
    AudioRow("float-wav", "wav", lambda p: sf.write(p, tone(SR).astype(np.float32), SR, subtype="FLOAT"), True),
    AudioRow("flac", "flac", lambda p: sf.write(p, tone(SR), SR, format="FLAC"), True),
    AudioRow("flac-44.1khz-stereo", "flac", lambda p: sf.write(p, tone(44100, channels=2), 44100, format="FLAC"),
             True),
]


@pytest.mark.parametrize("row", AUDIO, ids=[r.name for r in AUDIO])
def test_audio_file_is_accepted_or_skipped_with_its_reason(row: AudioRow, inputs: Inputs, tmp_path):
    corpus = tmp_path / "wav"
    shutil.copytree(inputs.corpus, corpus)
    odd = corpus / f"{ODD_FILE}.{row.ext}"
    odd.parent.mkdir(parents=True, exist_ok=True)
    row.write(odd)
    before = tree_digest(corpus)

    code, out, err = cli(["prepare", "--corpus", corpus, "--test-trials", inputs.trials, "--dev-speakers", "2",
                          "--out", tmp_path / "data", "--workers", "0"])

    assert code == 0, err
    assert "Traceback" not in out + err
    assert tree_digest(corpus) == before, "prepare changed its input corpus"
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    rows = shard_rows(tmp_path / "data")
    utt_id = f"{ODD_FILE}.{row.ext}"
    if row.accepted:
        assert manifest["skipped"] == []
        assert rows[utt_id] == num_frames(SR), "not resampled to 16 kHz mono with the duration kept"
    else:
        assert utt_id not in rows
        assert [s["path"] for s in manifest["skipped"]] == [str(odd.resolve())]
        reason = manifest["skipped"][0]["reason"]
        assert reason.startswith(f"{odd.resolve()}: ") and re.search(row.reason, reason), reason
        assert str(odd.resolve()) in out, "prepare's summary does not list the skipped file"
    assert len(rows) == 24 + row.accepted, "the rest of the corpus was not prepared"


# ---------------------------------------------------------------- everything else: one clear error, nothing changed

@dataclass
class Case:
    """The copies a row may break and must leave as they were."""

    tmp: Path
    inputs: Inputs
    data: Path
    workdir: Path
    checkpoints: Path
    space: Path
    closed_port: int  # nothing listens there

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def study(self, space: Path | None = None, *extra: object) -> list[object]:
        return ["study", "--space", space or self.space, "--data", self.data, "--workdir", self.workdir, *extra]

    def prepare(self, test_trials: Path) -> list[object]:
        """Into the existing prepared folder: a bad list must not touch it."""
        return ["prepare", "--corpus", self.inputs.corpus, "--test-trials", test_trials, "--dev-speakers", "2",
                "--out", self.data, "--workers", "0"]

    def trials_with(self, *lines: str, drop_first: bool = False) -> Path:
        good = self.inputs.trials.read_text().splitlines()
        return self.write("bad-trials.txt", "\n".join([*good[1 if drop_first else 0:], *lines]) + "\n")

    def space_with(self, old: str, new: str) -> Path:
        assert old in GOOD_SPACE
        return self.write("bad-space.yaml", GOOD_SPACE.replace(old, new, 1))

    def manifest(self) -> dict:
        return json.loads((self.data / "manifest.json").read_text())

    def set_manifest(self, manifest: dict) -> None:
        (self.data / "manifest.json").write_text(json.dumps(manifest, indent=2))

    def rehash(self, shard: str) -> None:
        """The manifest's sha256 for ``shard`` recomputed, as a careless copy tool or a forger would."""
        m = self.manifest()
        for entry in (e for split in m["splits"].values() for e in split["shards"] if e["file"] == shard):
            entry["sha256"] = file_sha256(self.data / shard)
        self.set_manifest(m)

    def train(self) -> list[object]:
        config = self.write("train.yaml", TRAIN_CONFIG)
        return ["train", "--config", config, "--data", self.data, "--out", self.checkpoints]


def _swapped(trials: Path, relabel: bool = False) -> str:
    """The first trial (a target) with enrollment and test swapped, the same pair for cosine scoring; relabelled 0."""
    label, enroll, test = trials.read_text().splitlines()[0].split()
    assert label == "1"
    return f"{'0' if relabel else label} {test} {enroll}"


def _shard(case: Case, split: str = "dev") -> Path:
    return case.data / f"{split}-00000.parquet"


def _flip_byte(case: Case) -> None:
    raw = bytearray(_shard(case).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    _shard(case).write_bytes(bytes(raw))


def _truncate(case: Case) -> None:
    raw = _shard(case).read_bytes()
    _shard(case).write_bytes(raw[: len(raw) // 2])


def _foreign_schema(case: Case) -> None:
    pq.write_table(pa.table({"utt": ["a", "b"], "embedding": [[0.1, 0.2], [0.3, 0.4]]}), _shard(case))
    case.rehash(_shard(case).name)


def _pickled_features(case: Case) -> None:
    """A train shard with every column, but ``features`` holds pickled Python objects (Ray's Arrow extension,
    registered once ray.data is imported): reading its values would run their ``__reduce__``."""
    from ray.data.extensions.object_extension import ArrowPythonObjectArray

    shard = _shard(case, "train")
    table = pq.read_table(shard)
    evil = ArrowPythonObjectArray.from_objects([_Evil(case.tmp / "PWNED") for _ in range(table.num_rows)])
    pq.write_table(table.set_column(table.schema.get_field_index("features"), "features", evil), shard)
    case.rehash(shard.name)


def _shard_outside(case: Case) -> None:
    shutil.copy(_shard(case), case.tmp / "outside.parquet")
    m = case.manifest()
    m["splits"]["dev"]["shards"][0]["file"] = "../outside.parquet"
    case.set_manifest(m)


def _trials_outside(case: Case) -> None:
    shutil.copy(case.data / "trials-dev.txt", case.tmp / "outside.txt")
    m = case.manifest()
    m["trials"]["dev"] = "../outside.txt"
    case.set_manifest(m)


class _Evil:
    """Unpickling this runs ``exec``: what a crafted checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def _checkpoint(case: Case, kind: str) -> None:
    import torch

    last = case.checkpoints / "last.pt"
    if kind == "pickle":
        torch.save({"epoch": 1, "model": _Evil(case.tmp / "PWNED")}, last)
    else:
        torch.save({"epoch": 1, "model": {"w": torch.zeros(64, 64)}}, last)
        last.write_bytes(last.read_bytes()[:700])


@dataclass(frozen=True)
class Row:
    name: str
    argv: Callable[[Case], list[object]]  # the command, after setup broke the copies
    expect: str  # regex the one error message must match: it names the file / line / field
    setup: Callable[[Case], None] = lambda case: None
    timeout_s: float = 0  # > 0: the command must have answered by then (a bad input fails fast)


ERRORS = [
    # trial lists (mfcon prepare into an existing data folder)
    Row("trials-missing-file", lambda c: c.prepare(c.tmp / "no-such-list.txt"),
        r"no-such-list\.txt: no such file \(given as --test-trials\)"),
    Row("trials-malformed-line", lambda c: c.prepare(c.trials_with("1 id10001/vid00/00001.wav")),
        r"bad-trials\.txt:\d+: .*expected '<0\|1> <enroll> <test>', got 2 fields"),
    Row("trials-bad-label", lambda c: c.prepare(c.trials_with("yes id10001/vid00/00001.wav id10002/vid01/00001.wav")),
        r"bad-trials\.txt:\d+: .*label must be 0 or 1"),
    Row("trials-unknown-utterance", lambda c: c.prepare(c.trials_with("0 id10001/vid00/00001.wav id99999/x/1.wav")),
        r"bad-trials\.txt:\d+: audio file .*id99999/x/1\.wav does not exist"),
    Row("trials-duplicate-pair", lambda c: c.prepare(c.trials_with(c.inputs.trials.read_text().splitlines()[0])),
        r"bad-trials\.txt:\d+: .*listed twice \(first on line 1\)"),
    Row("trials-pair-with-itself", lambda c: c.prepare(c.trials_with(
        "1 id10001/vid00/00001.wav id10001/vid00/00001.wav")), r"bad-trials\.txt:\d+: .*pairs .* with itself"),
    Row("trials-contradictory-labels", lambda c: c.prepare(c.trials_with(_swapped(c.inputs.trials, relabel=True))),
        r"bad-trials\.txt:\d+: .*label 0 contradicts line 1"),
    Row("trials-absolute-path", lambda c: c.prepare(c.trials_with("1 /etc/passwd id10001/vid00/00001.wav")),
        r"bad-trials\.txt:\d+: .*'/etc/passwd' must be a path relative to the corpus root"),
    Row("trials-dotdot-path", lambda c: c.prepare(c.trials_with("1 ../wav/id10001/vid00/00001.wav "
                                                                "id10001/vid00/00002.wav")),
        r"bad-trials\.txt:\d+: .*without '\.\.'"),
    # shards and manifest (mfcon study checks them before anything trains)
    Row("shard-wrong-checksum", lambda c: c.study(), r"dev-00000\.parquet: corrupted \(sha256", setup=_flip_byte),
    Row("shard-truncated", lambda c: c.study(), r"dev-00000\.parquet: corrupted \(sha256", setup=_truncate),
    Row("shard-truncated-sha-recomputed", lambda c: c.study(), r"dev-00000\.parquet: .*(Parquet|schema|columns)",
        setup=lambda c: (_truncate(c), c.rehash("dev-00000.parquet"))),
    Row("shard-foreign-schema", lambda c: c.study(), r"dev-00000\.parquet: .*(schema|columns)",
        setup=_foreign_schema),
    Row("shard-pickled-objects-train", lambda c: c.train(),
        r"train-00000\.parquet: columns .*features: extension<ray\.data\.arrow_pickled_object",
        setup=_pickled_features),
    Row("manifest-missing", lambda c: c.study(), r"manifest\.json: no manifest",
        setup=lambda c: (c.data / "manifest.json").unlink()),
    Row("manifest-shard-outside-folder", lambda c: c.study(), r"manifest\.json.*\.\./outside\.parquet",
        setup=_shard_outside),
    Row("manifest-trials-outside-folder", lambda c: c.study(), r"manifest\.json.*\.\./outside\.txt",
        setup=_trials_outside),
    # search spaces (refused when loaded: before the tracking store is opened or Ray starts)
    Row("space-unknown-key", lambda c: c.study(c.space_with("budget:", "budgett:")),
        r"bad-space\.yaml: invalid configuration\n\s+budgett: Extra inputs are not permitted"),
    Row("space-unknown-param-option", lambda c: c.study(c.space_with("high: 1.0}", "high: 1.0, log: true}")),
        r"bad-space\.yaml: .*params\.loss\.mfcon_weight\.loguniform\.log: Extra inputs"),
    Row("space-unknown-training-field", lambda c: c.study(c.space_with("loss.mfcon_weight", "loss.mfcon_wieght")),
        r"bad-space\.yaml: params\.loss\.mfcon_wieght: not a valid training-config field"),
    Row("space-empty-range", lambda c: c.study(c.space_with("low: 0.01, high: 1.0", "low: 1.0, high: 0.01")),
        r"bad-space\.yaml: .*params\.loss\.mfcon_weight\.loguniform: .*low \(1\.0\) must be < high \(0\.01\)"),
    Row("space-empty-choices", lambda c: c.study(c.space_with(
        "{type: loguniform, low: 0.03, high: 0.5}", "{type: categorical, choices: []}")),
        r"bad-space\.yaml: .*params\.loss\.mfcon_temperature\.categorical\.choices: .*at least 1"),
    Row("space-duplicate-parameter", lambda c: c.study(c.space_with(
        "  loss.mfcon_temperature:", "  loss.mfcon_weight: {type: uniform, low: 0.0, high: 0.5}\n"
                                     "  loss.mfcon_temperature:")),
        r"bad-space\.yaml:8: 'loss\.mfcon_weight' is given twice .*first on line 7"),
    Row("space-overlapping-parameters", lambda c: c.study(c.space_with(
        "params:\n", "params:\n  loss.mfcon_blocks: {type: blocks}\n"
                     "  loss.mfcon_blocks.b1: {type: categorical, choices: [true, false]}\n")),
        r"bad-space\.yaml: params\.loss\.mfcon_blocks\.b1: overlaps params\.loss\.mfcon_blocks"),
    Row("space-eval-every-2", lambda c: c.study(c.space_with("epochs: 2", "epochs: 2\n  eval_every: 2")),
        r"bad-space\.yaml: base\.eval_every: a study scores the dev list every epoch"),
    Row("space-more-workers-than-cpus", lambda c: c.study(c.space_with("num_workers: 1", "num_workers: 4096")),
        r"bad-space\.yaml: resources\.num_workers: 4096 workers .* but .* has \d+"),
    # tracking stores and models
    Row("tracking-server-unreachable", lambda c: c.study(None, "--tracking-uri", f"http://127.0.0.1:{c.closed_port}"),
        r"MLflow tracking server http://127\.0\.0\.1:\d+ is unreachable"),
    Row("tracking-uri-unknown-scheme", lambda c: c.study(None, "--tracking-uri", "mlfow://typo"),
        r"MLflow tracking store mlfow://typo cannot be opened"),
    Row("tracking-db-down", lambda c: ["verify", c.inputs.corpus / "id10001/vid00/00001.wav",
                                       c.inputs.corpus / "id10001/vid00/00002.wav", "--workdir", c.workdir,
                                       "--tracking-uri", f"postgresql+psycopg2://mfcon@127.0.0.1:{c.closed_port}/mlflow"],
        r"postgresql\+psycopg2://mfcon@127\.0\.0\.1:\d+/mlflow .*(unreachable|refused)", timeout_s=20),
    Row("verify-unknown-model-alias", lambda c: ["verify", c.inputs.corpus / "id10001/vid00/00001.wav",
                                                 c.inputs.corpus / "id10001/vid00/00002.wav", "--model",
                                                 "models:/mfcon-speaker@no-such-alias", "--workdir", c.workdir],
        r"models:/mfcon-speaker@no-such-alias: no such registered model version"),
    Row("checkpoint-truncated", lambda c: c.train(), r"last\.pt: not a readable torch checkpoint",
        setup=lambda c: _checkpoint(c, "truncated")),
    Row("checkpoint-pickled-object", lambda c: c.train(),
        r"last\.pt: refused: it holds pickled objects other than tensors and builtins \(exec\)",
        setup=lambda c: _checkpoint(c, "pickle")),
]


@pytest.fixture
def no_ray(monkeypatch):
    """Input errors come before anything trains: starting Ray is already a failure."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was called: an input error must be reported before Ray starts")

    monkeypatch.setattr(ray, "init", refuse)


class TookTooLong(BaseException):
    """Raised by the alarm; a BaseException, so no retry loop's ``except Exception`` swallows it."""


def _run(row: Row, argv: list[object]) -> tuple[int, str, str]:
    if not row.timeout_s:
        return cli(argv)

    def alarm(signum, frame):
        raise TookTooLong

    import mfcon.serving  # noqa: F401 - imported before the clock starts: on a busy machine imports take seconds

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, row.timeout_s)
    try:
        return cli(argv)
    except TookTooLong:
        pytest.fail(f"no answer within {row.timeout_s:.0f} s: a bad input must fail fast")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("row", [pytest.param(r, id=r.name) for r in ERRORS])
def test_bad_input_is_one_clear_error_and_changes_nothing(row: Row, inputs: Inputs, tmp_path, no_ray):
    data, workdir, checkpoints = tmp_path / "data", tmp_path / "runs", tmp_path / "ckpt"
    shutil.copytree(inputs.data, data)
    shutil.copytree(inputs.workdir, workdir)
    checkpoints.mkdir()
    case = Case(tmp_path, inputs, data, workdir, checkpoints, tmp_path / "space.yaml", free_port())
    case.space.write_text(GOOD_SPACE)
    row.setup(case)
    argv = row.argv(case)
    watched = {name: tree_digest(path) for name, path in
               (("data", data), ("workdir", workdir), ("checkpoints", checkpoints), ("corpus", inputs.corpus))}

    code, out, err = _run(row, argv)

    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, f"exit {code}, stderr:\n{err[-2000:]}"
    assert "Traceback" not in out + err
    message = err[err.index("error:"):]
    assert re.search(row.expect, message, re.DOTALL), f"the error does not name the file/line/field:\n{message}"
    for name, path in (("data", data), ("workdir", workdir), ("checkpoints", checkpoints), ("corpus", inputs.corpus)):
        assert tree_digest(path) == watched[name], f"the {name} folder changed"
    assert not (tmp_path / "PWNED").exists(), "unpickling the checkpoint ran code"


def test_trials_lost_to_a_skipped_file_are_counted_and_warned_about(inputs: Inputs, tmp_path):
    """A silent test utterance is skipped; the trials naming it leave the normalised list, and prepare says so:
    how many each list kept, and one warning line with the dropped share (the issue: 24% vanished silently)."""
    corpus = tmp_path / "wav"
    shutil.copytree(inputs.corpus, corpus)
    listed = inputs.trials.read_text().splitlines()
    victim = listed[0].split()[1]
    sf.write(corpus / victim, np.zeros(SR), SR)
    lost = sum(victim in line.split()[1:] for line in listed)

    code, out, err = cli(["prepare", "--corpus", corpus, "--test-trials", inputs.trials, "--dev-speakers", "2",
                          "--out", tmp_path / "data", "--workers", "0"])

    assert code == 0, err
    kept = len(listed) - lost
    assert f"test trials: kept {kept} of {len(listed)} (trials-test.txt)" in out
    assert len((tmp_path / "data" / "trials-test.txt").read_text().splitlines()) == kept
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: the test trial list lost {lost} of {len(listed)} trials "
                        f"({100 * lost / len(listed):.1f}%) because they name 1 skipped file; its EER is measured "
                        f"on the {kept} left (fix or replace those files and prepare again to keep them)"]
    assert f"prepared {tmp_path / 'data'}: manifest.json" in out and "next: mfcon train" in out
