"""Things the MLflow tests start: a study store written as a study writes it, a real
``mlflow server`` over it, and headless Debian Chromium.

Conftest-free on purpose: a test module imports what it needs
(``from mlflow_fixtures import ...``) and wraps it in a fixture named for what it
starts (``mlflow_server``, ``chromium``). No training happens here: trial runs are
written through ``StudyTracker`` / ``TrialRuns`` with hand-made epoch results, the
same calls ``mfcon.study.callbacks.MLflowStudyCallback`` makes.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mfcon.tracking.server import stop_server, wait_healthy

REPO = Path(__file__).resolve().parents[1]
SPACE_FILE = REPO / "search_spaces" / "demo.yaml"  # tiny model: 3 Conformer blocks, 4 epochs
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
INSTALL_HINT = "install them with: apt-get update && apt-get install -y chromium chromium-driver"
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=1600,1000")


@dataclass(frozen=True)
class TrialSpec:
    """One hand-made trial: what Optuna sampled, the eer (percent) per epoch, how it ended."""

    trial_id: str
    sampled: dict[str, Any]
    eers: tuple[float, ...]
    state: str  # completed | pruned | failed
    baseline_seed: int | None = None  # a study's lambda = 0 trial at this seed (tag mfcon.baseline)


DEMO_TRIALS = (
    TrialSpec("5f0c1_00000", {"loss.mfcon_weight": 0.05, "loss.mfcon_temperature": 0.07,
                              "loss.mfcon_blocks.b1": True, "loss.mfcon_blocks.b2": False,
                              "loss.mfcon_blocks.b3": True}, (31.0, 26.5, 23.0, 21.25), "completed"),
    TrialSpec("5f0c1_00001", {"loss.mfcon_weight": 0.3, "loss.mfcon_temperature": 0.2,
                              "loss.mfcon_blocks.b1": False, "loss.mfcon_blocks.b2": True,
                              "loss.mfcon_blocks.b3": True}, (29.0, 22.0, 18.5, 16.75), "completed"),
    TrialSpec("5f0c1_00002", {"loss.mfcon_weight": 0.9, "loss.mfcon_temperature": 0.4,
                              "loss.mfcon_blocks.b1": False, "loss.mfcon_blocks.b2": False,
                              "loss.mfcon_blocks.b3": False}, (41.0,), "pruned"),
    TrialSpec("5f0c1_00003", {"loss.mfcon_weight": 0.02, "loss.mfcon_temperature": 0.04,
                              "loss.mfcon_blocks.b1": True, "loss.mfcon_blocks.b2": True,
                              "loss.mfcon_blocks.b3": False}, (36.0, 34.5), "pruned"),
    TrialSpec("5f0c1_00004", {"loss.mfcon_weight": 0.5, "loss.mfcon_temperature": 0.1,
                              "loss.mfcon_blocks.b1": True, "loss.mfcon_blocks.b2": True,
                              "loss.mfcon_blocks.b3": True}, (44.0,), "failed"),
)


@dataclass
class StudyStore:
    """A finished study's work dir: ``mlflow.db`` + ``mlartifacts/`` (the layout ``mfcon study`` leaves)."""

    workdir: Path
    tracking_uri: str
    study: str
    experiment_id: str
    parent_run_id: str
    trial_runs: dict[str, str] = field(default_factory=dict)  # trial id -> run id
    trials: tuple[TrialSpec, ...] = ()

    def run_name(self, trial_id: str) -> str:
        return f"trial-{trial_id}"

    def best_trial(self) -> TrialSpec:
        return min((t for t in self.trials if t.state != "failed"), key=lambda t: min(t.eers))


def study_params(space, sampled: dict[str, Any]) -> dict[str, Any]:
    """What the study callback logs for a trial (``mfcon.study.spaces.trial_params``)."""
    from mfcon.study.spaces import trial_params

    return trial_params(space, sampled)


def epoch_result(eer: float, epoch: int) -> dict[str, float]:
    """What a trial reports to Tune each epoch (dev eer in percent, dev min_dcf absolute)."""
    return {"epoch": epoch, "dev_eer": eer, "dev_min_dcf": min(1.0, eer / 40.0), "dev_min_dcf_005": min(1.0, eer / 50.0),
            "train_loss": 8.0 / epoch, "margin_loss": 7.0 / epoch, "mfcon_loss": 1.0 / epoch, "lr": 0.002}


def write_study_store(workdir: Path, study: str = "ui-study", trials: tuple[TrialSpec, ...] = DEMO_TRIALS,
                      space_file: Path = SPACE_FILE, tracking_uri: str | None = None) -> StudyStore:
    """Parent run + one child run per trial, through the classes the study callback uses."""
    from mfcon.names import BASELINE_KEY, SEED_KEY
    from mfcon.study.spaces import load_search_space
    from mfcon.tracking import BASELINE_TAG, StudyTracker, TrialRuns, default_tracking_uri

    workdir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or default_tracking_uri(workdir)
    space = load_search_space(space_file)
    tracker = StudyTracker(uri, study, workdir)
    tracker.log_study_inputs(space_file, space.base, data_hash="0" * 64)
    runs = TrialRuns(tracker)
    best = math.inf
    t0 = int(time.time() * 1000)
    for trial in trials:
        sampled = trial.sampled
        if trial.baseline_seed is not None:  # as the study's searcher suggests its baseline trials
            sampled = {**sampled, BASELINE_KEY: True, SEED_KEY: trial.baseline_seed}
        runs.start(trial.trial_id, study_params(space, sampled),
                   {BASELINE_TAG: "true"} if trial.baseline_seed is not None else None)
        for epoch, eer in enumerate(trial.eers, start=1):
            result = epoch_result(eer, epoch)
            runs.log_epoch(trial.trial_id, result, t0 + 1000 * epoch)
            if eer < best:
                best = eer
                tracker.log_best(trial.trial_id, eer, "dev_eer")
        runs.finish(trial.trial_id, trial.state)
    states: dict[str, int] = {}
    for trial in trials:
        states[trial.state] = states.get(trial.state, 0) + 1
    tracker.client.log_dict(tracker.parent_run_id, {"study": study, "num_trials": len(trials), "states": states},
                            "study_summary.json")
    tracker.finish("FINISHED")
    return StudyStore(workdir, uri, study, tracker.experiment_id, tracker.parent_run_id, dict(runs.run_ids), trials)


def gaussian_scores(n: int = 400, seed: int = 0, d_prime: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Cosine-like trial scores: targets (label 1) N(d', 1), non-targets N(0, 1), scaled into [-1, 1]-ish."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.int64)
    return (rng.normal(size=n) + d_prime * labels) / 5.0, labels


# ---------------------------------------------------------------- mlflow server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_cli() -> list[str]:
    exe = Path(sys.executable).with_name("mlflow")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]


# One implementation for the product's own server command and the tests' servers.
_wait_healthy = wait_healthy
stop_process_group = stop_server  # SIGTERM the process group, SIGKILL if it lingers


class MlflowServer:
    """``mlflow server`` over ``workdir/mlflow.db`` and ``workdir/mlartifacts`` on a fixed 127.0.0.1 port.

    ``stop()`` and ``start()`` again make an outage: the URL stays the same, so a client
    that knew the server finds it again when it is back.
    """

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir, self.port = workdir, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "mlflow-server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # else ~7 job-runner processes
        cmd = [*_mlflow_cli(), "server", "--backend-store-uri", f"sqlite:///{(self.workdir / 'mlflow.db').resolve()}",
               "--artifacts-destination", str((self.workdir / "mlartifacts").resolve()),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            _wait_healthy(self.url, self.proc, self.log, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.url

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)
            self.proc = None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False


@contextmanager
def run_mlflow_server(workdir: Path, timeout_s: float = 120.0) -> Iterator[str]:
    """``mlflow server`` over ``workdir/mlflow.db`` and ``workdir/mlartifacts``; yields its URL, always stopped."""
    server = MlflowServer(workdir)
    server.start(timeout_s)
    try:
        yield server.url
    finally:
        server.stop()


# ---------------------------------------------------------------- chromium

class BrowserMissing(RuntimeError):
    pass


def require_chromium() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not (p.exists() and os.access(p, os.X_OK))]
    if missing:
        raise BrowserMissing(f"browser test needs Debian's Chromium and ChromeDriver; missing {', '.join(missing)}; "
                             f"{INSTALL_HINT}")
    try:
        import selenium  # noqa: F401
    except ImportError:
        raise BrowserMissing("selenium is not installed: pip install -e '.[test]'") from None


@contextmanager
def headless_chromium(user_data_dir: Path) -> Iterator[Any]:
    """Selenium-driven headless Chromium with a fresh profile; quit on exit."""
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(user_data_dir.parent / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(user_data_dir, ignore_errors=True)
