"""The real ``optuna-dashboard`` on 127.0.0.1 (a free port) over a storage URL, read through its HTTP API."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        assert resp.status == 200, (url, resp.status)
        return json.loads(resp.read())


@contextlib.contextmanager
def optuna_dashboard(storage_url: str, log: Path, start_timeout_s: float = 90) -> Iterator[str]:
    """``optuna-dashboard STORAGE`` as a person starts it; yields its base URL once ``/api/studies`` answers,
    and stops it (and waits for it) whatever happens."""
    exe = Path(sys.executable).parent / "optuna-dashboard"  # the venv's, beside this Python
    command = str(exe) if exe.exists() else shutil.which("optuna-dashboard")
    assert command, "optuna-dashboard is not installed (pip install -e '.[dashboard]')"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen([command, storage_url, "--host", "127.0.0.1", "--port", str(port),
                                 "--server", "wsgiref"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            assert proc.poll() is None, f"optuna-dashboard exited {proc.returncode}: {log.read_text()[-2000:]}"
            try:
                get_json(f"{base}/api/studies", timeout=2)
                break
            except (urllib.error.URLError, OSError):
                assert time.monotonic() < deadline, f"optuna-dashboard did not answer: {log.read_text()[-2000:]}"
                time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def dashboard_study(base: str, name: str) -> dict:
    """The study called ``name`` as the dashboard serves it (``/api/studies/<id>``: its trials, states, params)."""
    summaries = get_json(f"{base}/api/studies")["study_summaries"]
    ids = [s["study_id"] for s in summaries if s["study_name"] == name]
    assert ids, f"no study {name!r} in the dashboard: {[s['study_name'] for s in summaries]}"
    study = get_json(f"{base}/api/studies/{ids[0]}")
    assert study["name"] == name
    return study
