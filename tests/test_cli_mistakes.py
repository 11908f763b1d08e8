"""A newcomer's mistakes, through the real ``mfcon`` command (a subprocess each): one line, exit 2, nothing changed.

Every row is something a person types wrong on a first day: a flag value, a
missing or wrong file, a folder given for a file, options that contradict each
other, a study, run or model that does not exist, a server that is down. Each
must end with exit code 2 and a stderr that is exactly one ``error:`` line
(continuation lines of a multi-field message indented under it) naming the
file, line, field or flag in command-line terms, no Python traceback and no
Python API names (``overwrite=True``, ``prepare_dataset``, ``out_dir``), and a
work folder whose every file has the same sha256 before and after (nothing
created either). Unexpected errors would leave a traceback file in
``MFCON_CRASH_DIR``: it must stay empty.

Nothing trains and Ray never starts: these fail before anything heavy. The rows
run three at a time (each in its own copy of the work folder) in one
module-scoped fixture; each row is then its own test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from mfcon.files import file_sha256
from mlflow_fixtures import free_port, write_study_store
from registry_fixtures import export_micro_model, make_tone_corpus, write_test_trials

PYTHON_NAMES = re.compile(r"overwrite=True|prepare_dataset|\bout_dir\b|dev_speakers=|Traceback")
TRAIN_CONFIG = "model_preset: tiny\nepochs: 1\ndata: {speakers_per_batch: 8, utts_per_speaker: 2}\n"


@dataclass(frozen=True)
class Mistake:
    name: str
    argv: tuple[str, ...]  # after `mfcon`; {W} is the work folder, {PORT} a port nobody listens on
    expect: str  # regex the error line must match (the file, line, field or flag)


M = Mistake
MISTAKES = [
    # the command line itself
    M("no-command", (), r"^error: mfcon: the following arguments are required: COMMAND"),
    M("unknown-command", ("trian",), r"^error: mfcon: argument COMMAND: invalid choice: 'trian'"),
    M("unknown-option", ("verify", "{W}/a.wav", "{W}/b.wav", "--modle", "x"), r"unrecognized arguments: --modle x"),
    # make-corpus
    M("corpus-speakers-below-default-test-speakers", ("make-corpus", "--out", "{W}/new", "--speakers", "8"),
      r"--test-speakers 10 must be fewer than --speakers 8"),
    M("corpus-one-utterance", ("make-corpus", "--out", "{W}/new", "--utts", "1"), r"--utts 1: .*at least 2"),
    M("corpus-two-speakers", ("make-corpus", "--out", "{W}/new", "--speakers", "2", "--test-speakers", "1"),
      r"--speakers 2: a corpus needs at least 3"),
    M("corpus-one-test-speaker", ("make-corpus", "--out", "{W}/new", "--speakers", "5", "--test-speakers", "1"),
      r"--test-speakers 1: .*at least 2"),
    M("corpus-speakers-not-a-number", ("make-corpus", "--out", "{W}/new", "--speakers", "forty"),
      r"argument --speakers: expected a whole number, got 'forty'"),
    M("corpus-no-out", ("make-corpus",), r"required: --out"),
    M("corpus-rerun-with-another-seed", ("make-corpus", "--out", "{W}/made", "--speakers", "3", "--test-speakers",
                                         "2", "--utts", "2", "--seed", "1"),
      r"made/corpus\.json: this corpus was made with other options \(--seed 0 -> 1\); give another --out"),
    # prepare
    M("prepare-missing-corpus", ("prepare", "--corpus", "{W}/nowhere", "--test-trials", "{W}/trials.txt",
                                 "--dev-speakers", "2", "--out", "{W}/new"),
      r"nowhere: no such folder \(given as --corpus\)"),
    M("prepare-corpus-is-a-file", ("prepare", "--corpus", "{W}/trials.txt", "--test-trials", "{W}/trials.txt",
                                   "--dev-speakers", "2", "--out", "{W}/new"), r"trials\.txt: not a folder"),
    M("prepare-missing-trials", ("prepare", "--corpus", "{W}/wav", "--test-trials", "{W}/trails.txt",
                                 "--dev-speakers", "2", "--out", "{W}/new"),
      r"trails\.txt: no such file \(given as --test-trials\)"),
    M("prepare-test-trials-name-without-path", ("prepare", "--corpus", "{W}/wav", "--test-trials", "O=",
                                                 "--dev-speakers", "2", "--out", "{W}/new"),
      r"argument --test-trials/--trials: 'O=': NAME=PATH with no PATH after '='"),
    M("prepare-test-trials-name-twice", ("prepare", "--corpus", "{W}/wav", "--test-trials", "O={W}/trials.txt",
                                         "--test-trials", "O={W}/trials.txt", "--dev-speakers", "2", "--out",
                                         "{W}/new"), r"--test-trials: the name 'O' is given twice"),
    M("prepare-no-dev", ("prepare", "--corpus", "{W}/wav", "--test-trials", "{W}/trials.txt", "--out", "{W}/new"),
      r"one of the arguments --dev-trials --dev-speakers is required"),
    M("prepare-both-devs", ("prepare", "--corpus", "{W}/wav", "--test-trials", "{W}/trials.txt", "--dev-trials",
                            "{W}/trials.txt", "--dev-speakers", "2", "--out", "{W}/new"),
      r"argument --dev-speakers: not allowed with argument --dev-trials"),
    M("prepare-dev-speakers-zero", ("prepare", "--corpus", "{W}/wav", "--test-trials", "{W}/trials.txt",
                                    "--dev-speakers", "0", "--out", "{W}/new"), r"--dev-speakers: must be >= 1"),
    M("prepare-dev-speakers-too-many", ("prepare", "--corpus", "{W}/wav", "--test-trials", "{W}/trials.txt",
                                        "--dev-speakers", "50", "--out", "{W}/new"), r"--dev-speakers 50: need 2\.\.4"),
    M("prepare-negative-workers", ("prepare", "--corpus", "{W}/wav", "--test-trials", "{W}/trials.txt",
                                   "--dev-speakers", "2", "--out", "{W}/new", "--workers", "-1"),
      r"--workers: must be >= 0"),
    M("prepare-rows-per-shard-zero", ("prepare", "--corpus", "{W}/wav", "--test-trials", "{W}/trials.txt",
                                      "--dev-speakers", "2", "--out", "{W}/new", "--rows-per-shard", "0"),
      r"--rows-per-shard: must be >= 1"),
    M("prepare-unknown-dtype", ("prepare", "--corpus", "{W}/wav", "--test-trials", "{W}/trials.txt",
                                "--dev-speakers", "2", "--out", "{W}/new", "--feature-dtype", "float64"),
      r"argument --feature-dtype: invalid choice: 'float64'"),
    M("prepare-musan-without-copies", ("prepare", "--corpus", "{W}/wav", "--test-trials", "{W}/trials.txt",
                                       "--dev-speakers", "2", "--out", "{W}/new", "--musan", "{W}/wav"),
      r"--musan given without --augment-copies"),
    M("prepare-speed-not-numbers", ("prepare", "--corpus", "{W}/wav", "--test-trials", "{W}/trials.txt",
                                    "--dev-speakers", "2", "--out", "{W}/new", "--speed-perturb", "fast"),
      r"argument --speed-perturb: expected comma-separated numbers"),
    M("prepare-trials-two-fields", ("prepare", "--corpus", "{W}/wav", "--test-trials", "{W}/two-fields.txt",
                                    "--dev-speakers", "2", "--out", "{W}/new"),
      r"two-fields\.txt:3: .*expected '<0\|1> <enroll> <test>', got 2 fields"),
    M("prepare-trials-unknown-utterance", ("prepare", "--corpus", "{W}/wav", "--test-trials", "{W}/unknown-utt.txt",
                                           "--dev-speakers", "2", "--out", "{W}/new"),
      r"unknown-utt\.txt:\d+: audio file .*id99999/x/1\.wav does not exist"),
    M("prepare-other-dtype-into-prepared-folder", ("prepare", "--corpus", "{W}/wav", "--test-trials",
                                                   "{W}/trials.txt", "--dev-speakers", "2", "--out", "{W}/data",
                                                   "--feature-dtype", "float16"),
      r"data/manifest\.json: prepared with feature_dtype float32, .*another output folder \(--out\).*--overwrite"),
    # train
    M("train-missing-config", ("train", "--config", "{W}/tiny.yml", "--data", "{W}/data", "--out", "{W}/ckpt"),
      r"tiny\.yml: cannot read config"),
    M("train-unknown-preset", ("train", "--config", "{W}/huge.yaml", "--data", "{W}/data", "--out", "{W}/ckpt"),
      r"(?s)huge\.yaml: invalid configuration\n\s+model_preset: Input should be 'paper' or 'tiny'"),
    M("train-data-not-prepared", ("train", "--config", "{W}/train.yaml", "--data", "{W}/wav", "--out", "{W}/ckpt"),
      r"wav/manifest\.json: no manifest \(prepare the data first: mfcon prepare"),
    M("train-too-few-speakers", ("train", "--config", "{W}/train.yaml", "--data", "{W}/data", "--out", "{W}/ckpt"),
      r"train\.yaml: data\.speakers_per_batch is 8, but the train split of .*data has 4 speakers"),
    # study, replicate, report
    M("study-num-samples-not-a-number", ("study", "--space", "{W}/space.yaml", "--num-samples", "ten"),
      r"argument --num-samples: invalid int value: 'ten'"),
    M("replicate-no-study", ("replicate", "--workdir", "{W}/runs"), r"required: --study"),
    M("replicate-top-k-not-a-number", ("replicate", "--study", "s", "--top-k", "best"), r"argument --top-k"),
    M("report-unknown-format", ("report", "--study", "existing", "--workdir", "{W}/runs", "--format", "pdf"),
      r"argument --format: invalid choice: 'pdf'"),
    M("report-no-store", ("report", "--study", "existing", "--workdir", "{W}/nowhere"),
      r"no MLflow store at sqlite:///.*nowhere/mlflow\.db"),
    M("report-unknown-study", ("report", "--study", "nope", "--workdir", "{W}/runs"), r"'nope'"),
    M("report-server-down", ("report", "--study", "existing", "--tracking-uri", "http://127.0.0.1:{PORT}"),
      r"MLflow tracking server http://127\.0\.0\.1:\d+ is unreachable"),
    # promote
    M("promote-without-study", ("promote", "--workdir", "{W}/runs"), r"promote needs --study NAME and --data DIR"),
    M("promote-unknown-metric", ("promote", "--study", "existing", "--metric", "accuracy"),
      r"argument --metric: invalid choice: 'accuracy'"),
    M("promote-n-boot-zero", ("promote", "--study", "existing", "--n-boot", "0"), r"argument --n-boot: must be >= 1"),
    # verify, embed
    M("verify-missing-recording", ("verify", "{W}/wav/id10001/vid00/00001.wav", "{W}/wav/id10001/vid00/9.wav",
                                   "--workdir", "{W}/runs"), r"9\.wav: no such audio file \(the second recording\)"),
    M("verify-no-store", ("verify", "{W}/wav/id10001/vid00/00001.wav", "{W}/wav/id10001/vid00/00002.wav",
                          "--workdir", "{W}/nowhere"), r"nowhere/mlflow\.db: MLflow store does not exist"),
    M("verify-threshold-not-a-number", ("verify", "a.wav", "b.wav", "--threshold", "high"),
      r"argument --threshold: invalid float value: 'high'"),
    M("verify-unknown-alias", ("verify", "{W}/wav/id10001/vid00/00001.wav", "{W}/wav/id10001/vid00/00002.wav",
                               "--workdir", "{W}/runs", "--model", "models:/mfcon-speaker@no-such-alias"),
      r"models:/mfcon-speaker@no-such-alias: no such registered model version"),
    M("embed-missing-folder", ("embed", "{W}/wavs", "--out", "{W}/e.parquet", "--workdir", "{W}/runs"),
      r"wavs: no such folder or list file"),
    M("embed-out-is-a-folder", ("embed", "{W}/wav", "--out", "{W}/data", "--workdir", "{W}/runs"),
      r"--out .*data: is a folder; give the \.parquet file"),
    M("embed-no-out", ("embed", "{W}/wav"), r"required: --out"),
    # score
    M("score-unknown-named-list", ("score", "--lists", "O", "--data", "{W}/data", "--model", "{W}/ckpt/best.pt"),
      r"O: no such trial list .*one of dev, test for the data folder's own lists"),
    M("score-missing-list", ("score", "{W}/tirals.txt", "--data", "{W}/data", "--model", "{W}/ckpt/best.pt"),
      r"tirals\.txt: no such trial list"),
    M("score-list-is-a-folder", ("score", "{W}/wav", "--data", "{W}/data", "--model", "{W}/ckpt/best.pt"),
      r"wav: is a folder, not a trial list file"),
    M("score-list-names-unprepared-utterance", ("score", "{W}/unprepared.txt", "--data", "{W}/data", "--model",
                                                "{W}/ckpt/best.pt"),
      r"unprepared\.txt:2: utterance '.*/00009\.wav' is not in the data folder"),
    M("score-list-mixes-splits", ("score", "{W}/mixed.txt", "--data", "{W}/data", "--model", "{W}/ckpt/best.pt"),
      r"mixed\.txt:2: utterance 'id10001/vid00/00001\.wav' is in the (dev|train) split, while 2 of the list's "
      r"utterances are in the test split"),
    M("score-list-only-targets", ("score", "{W}/targets.txt", "--data", "{W}/data", "--model", "{W}/ckpt/best.pt"),
      r"targets\.txt: every trial has label 1"),
    M("score-list-malformed", ("score", "{W}/two-fields.txt", "--data", "{W}/data", "--model", "{W}/ckpt/best.pt"),
      r"two-fields\.txt:3: .*got 2 fields"),
    M("score-data-missing", ("score", "test", "--data", "{W}/shards", "--model", "{W}/ckpt/best.pt"),
      r"--data .*shards: no such folder"),
    M("score-data-not-prepared", ("score", "test", "--data", "{W}/wav", "--model", "{W}/ckpt/best.pt"),
      r"wav/manifest\.json: no manifest"),
    M("score-missing-checkpoint", ("score", "test", "--data", "{W}/data", "--model", "{W}/ckpt/bset.pt"),
      r"bset\.pt: no such checkpoint file or model URI"),
    M("score-checkpoint-folder-without-best", ("score", "test", "--data", "{W}/data", "--model", "{W}/wav"),
      r"wav: folder has no best\.pt"),
    M("score-center-model-on-a-checkpoint", ("score", "test", "--data", "{W}/data", "--model", "{W}/ckpt/best.pt",
                                             "--center", "model"), r"--center model: .*carries no score_mean"),
    M("score-n-boot-zero", ("score", "test", "--data", "{W}/data", "--n-boot", "0"), r"--n-boot: must be >= 1"),
    M("score-top-n-three", ("score", "test", "--data", "{W}/data", "--top-n", "3"), r"--top-n: must be >= 10"),
    M("score-unknown-norm", ("score", "test", "--data", "{W}/data", "--score-norm", "znorm"),
      r"argument --score-norm: invalid choice: 'znorm'"),
    M("score-out-is-a-file", ("score", "test", "--data", "{W}/data", "--model", "{W}/ckpt/best.pt", "--out",
                              "{W}/trials.txt"), r"--out .*trials\.txt: exists and is not a folder"),
    M("score-no-store-for-a-registered-model", ("score", "test", "--data", "{W}/data", "--model",
                                                "models:/mfcon-speaker@champion", "--workdir", "{W}/nowhere"),
      r"sqlite:///.*nowhere/mlflow\.db: MLflow store does not exist"),
    M("score-log-to-unknown-run", ("score", "test", "--data", "{W}/data", "--model", "{W}/ckpt/best.pt",
                                   "--log-to-run", "0123456789abcdef", "--workdir", "{W}/runs"),
      r"--log-to-run 0123456789abcdef: no such run"),
]


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` by relative path (empty folders count too)."""
    out = {f.relative_to(path).as_posix(): file_sha256(f) for f in sorted(path.rglob("*")) if f.is_file()}
    out.update({d.relative_to(path).as_posix() + "/": "dir" for d in path.rglob("*") if d.is_dir()})
    return out


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """One work folder as a newcomer has it: a corpus, its trials, a prepared folder, a checkpoint, a study's
    MLflow store, a made corpus and a few bad files."""
    w = tmp_path_factory.mktemp("newcomer")
    utts = make_tone_corpus(w / "wav", n_speakers=8, utts_per_speaker=3, seconds=1.0, seed=5)
    trials = write_test_trials(w / "trials.txt", utts, sorted(utts)[-2:])
    env = _env(tmp_path_factory.mktemp("crash"))
    done = subprocess.run([sys.executable, "-m", "mfcon.cli", "prepare", "--corpus", w / "wav", "--test-trials",
                           w / "trials.txt", "--dev-speakers", "2", "--out", w / "data", "--workers", "0"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    export_micro_model(w / "ckpt" / "best.pt")
    write_study_store(w / "runs", study="existing")
    done = subprocess.run([sys.executable, "-m", "mfcon.cli", "make-corpus", "--out", w / "made", "--speakers", "3",
                           "--test-speakers", "2", "--utts", "2"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    good = [f"{t.label} {t.enroll} {t.test}" for t in trials]
    (w / "two-fields.txt").write_text("\n".join([*good[:2], "1 id10001/vid00/00001.wav", *good[2:]]) + "\n")
    (w / "unknown-utt.txt").write_text("\n".join([*good, "0 id10001/vid00/00001.wav id99999/x/1.wav"]) + "\n")
    nontarget = next(g for g in good if g.startswith("0 "))
    enroll = nontarget.split()[1]
    (w / "unprepared.txt").write_text(f"{nontarget}\n1 {enroll} {enroll.rsplit('/', 1)[0]}/00009.wav\n")
    (w / "mixed.txt").write_text(f"{nontarget}\n1 id10001/vid00/00001.wav id10001/vid00/00002.wav\n")
    (w / "targets.txt").write_text("\n".join(g for g in good if g.startswith("1 ")) + "\n")
    (w / "train.yaml").write_text(TRAIN_CONFIG)
    (w / "huge.yaml").write_text("epochs: 1\nmodel_preset: huge\n")
    (w / "space.yaml").write_text("name: s\n")
    return w


def _env(crash_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MFCON_"))}
    env.update(MFCON_PROGRESS="0", MFCON_CRASH_DIR=str(crash_dir), RAY_ADDRESS="127.0.0.1:1", OMP_NUM_THREADS="1")
    return env


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    changed: list[str]
    crashes: list[str]
    seconds: float = 0.0


def _attempt(mistake: Mistake, template: Path, root: Path, port: int) -> Outcome:
    started = time.monotonic()
    work = root / mistake.name / "w"
    shutil.copytree(template, work)
    crash = root / mistake.name / "crash"
    crash.mkdir()
    before = tree_digest(work)
    argv = [a.replace("{W}", str(work)).replace("{PORT}", str(port)) for a in mistake.argv]
    done = subprocess.run([sys.executable, "-m", "mfcon.cli", *argv], capture_output=True, text=True,
                          env=_env(crash), cwd=work, timeout=180)
    after = tree_digest(work)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return Outcome(done.returncode, done.stdout, done.stderr, changed, sorted(p.name for p in crash.iterdir()),
                   time.monotonic() - started)


@pytest.fixture(scope="module")
def outcomes(template, tmp_path_factory) -> dict[str, Outcome]:
    root, port = tmp_path_factory.mktemp("mistakes"), free_port()
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {m.name: pool.submit(_attempt, m, template, root, port) for m in MISTAKES}
        results = {name: f.result() for name, f in futures.items()}
    slow = sorted(results.items(), key=lambda kv: -kv[1].seconds)[:5]
    print(f"\n{len(results)} mistakes in {time.monotonic() - started:.0f} s; slowest: "
          + ", ".join(f"{name} {o.seconds:.1f} s" for name, o in slow))
    return results


def test_the_table_is_long_and_every_row_is_named_once():
    assert len(MISTAKES) >= 40
    assert len({m.name for m in MISTAKES}) == len(MISTAKES)


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.name for m in MISTAKES])
def test_a_mistake_is_one_error_line_exit_2_and_changes_nothing(mistake: Mistake, outcomes):
    o = outcomes[mistake.name]
    lines = [line for line in o.stderr.splitlines() if line.strip()]
    assert o.code == 2, f"exit {o.code}\nstdout:\n{o.stdout[-1500:]}\nstderr:\n{o.stderr[-3000:]}"
    assert lines and lines[0].startswith("error: "), o.stderr[-3000:]
    assert sum(line.startswith("error:") for line in lines) == 1, o.stderr
    assert all(line[:1].isspace() for line in lines[1:]), f"stray stderr lines:\n{o.stderr}"
    assert not PYTHON_NAMES.search(o.stderr + o.stdout), o.stderr
    assert re.search(mistake.expect, o.stderr), f"the error does not name the file/line/flag:\n{o.stderr}"
    assert o.changed == [], f"the work folder changed: {o.changed}"
    assert o.crashes == [], "an unexpected error wrote a traceback file"
