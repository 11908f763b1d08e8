"""Tracking load: N concurrent trial loggers against one real ``mlflow server`` on 127.0.0.1, per backend.

Each logger does what a study writes for one trial: a child run under one study run
(tags ``mlflow.parentRunId``, study, role, trial id, state), its sampled params, one
``log_batch`` of 7 metrics per epoch, then its final state tag and status. All loggers
start together (a barrier) and never sleep: the worst case of many trials reporting
at once. The client's HTTP retries are off (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``), so
every failed request is counted as an error instead of hidden in a retry; afterwards
every run is read back and a missing epoch counts as an error too.

The PostgreSQL backend is a throwaway cluster (initdb + pg_ctl in a temp dir, 127.0.0.1
on a free port, scram-sha-256 password auth; database user ``$PGUSER`` or ``mfcon``,
password ``$PGPASSWORD`` or a random one), stopped and removed at the end. The server
gets the password through its environment only (``${MFCON_DB_PASSWORD}`` in the URI).

    .venv/bin/python bench/tracking_load.py [--loggers 16] [--epochs 15] [--workers 4] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import os
import platform
import pwd
import secrets
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

try:
    from mfcon.tracking.server import ServerSpec, running_server
except ImportError:  # not installed: run from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))
    from mfcon.tracking.server import ServerSpec, running_server

START_TIMEOUT_S = 300  # a loaded shared machine can take minutes to start a server
PG_BIN = Path(os.environ.get("MFCON_PG_BIN", "/usr/local/bin"))
EPOCH_METRICS = ("train_loss", "margin_loss", "mfcon_loss", "dev_eer", "dev_min_dcf", "dev_min_dcf_005", "lr")
PARAMS = {"loss.mfcon_weight": 0.3, "loss.mfcon_temperature": 0.07, "loss.mfcon_blocks": "2,3", "optim.lr": 0.002,
          "model.num_blocks": 6, "model.d_model": 256, "data.crop_frames": 200, "data.speakers_per_batch": 32,
          "data.utts_per_speaker": 2, "seed": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- throwaway PostgreSQL

@dataclass(frozen=True)
class Postgres:
    """A running throwaway cluster: connect with ``uri`` (no password in it) and ``password``."""

    uri: str
    user: str
    password: str = field(repr=False)
    port: int
    version: str


def _pg_os_user() -> dict:
    """initdb refuses to run as root: as root, run the server as the ``postgres`` account (or $MFCON_PG_OS_USER)."""
    if os.geteuid() != 0:
        return {}
    account = pwd.getpwnam(os.environ.get("MFCON_PG_OS_USER", "postgres"))
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


@contextmanager
def throwaway_postgres(database: str = "mlflow") -> Iterator[Postgres]:
    """initdb + pg_ctl start in a fresh temp dir on 127.0.0.1:<free port>; always stopped and removed."""
    import psycopg2

    user = os.environ.get("PGUSER", "mfcon")
    password = os.environ.get("PGPASSWORD") or secrets.token_urlsafe(18)
    as_user = _pg_os_user()
    root = Path(tempfile.mkdtemp(prefix="mfcon-pg-"))  # not under pytest's 0700 tmp: the postgres account needs it
    if as_user:
        os.chown(root, as_user["user"], as_user["group"])
    run = dict(cwd=root, capture_output=True, text=True, **as_user)
    data, port = root / "data", free_port()
    try:
        pwfile = root / "pw"
        pwfile.write_text(password)
        pwfile.chmod(0o600)
        if as_user:
            os.chown(pwfile, as_user["user"], as_user["group"])
        _checked(subprocess.run([str(PG_BIN / "initdb"), "-D", str(data), "-U", user, f"--pwfile={pwfile}",
                                 "--auth=scram-sha-256", "--encoding=UTF8", "--no-instructions"], check=False, **run), "initdb")
        pwfile.unlink()
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root}"
        _checked(subprocess.run([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "postgres.log"),
                                 "-o", options, "-w", "-t", "60", "start"], check=False, **run), "pg_ctl start", root / "postgres.log")
        try:
            conn = psycopg2.connect(host="127.0.0.1", port=port, user=user, password=password, dbname="postgres")
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{database}"')
                cur.execute("SHOW server_version")
                version = cur.fetchone()[0]
            conn.close()
            yield Postgres(f"postgresql://{user}@127.0.0.1:{port}/{database}", user, password, port, version)
        finally:
            subprocess.run([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], check=False, **run)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _checked(done: subprocess.CompletedProcess, what: str, log: Path | None = None) -> None:
    if done.returncode != 0:
        extra = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stderr.strip()}\n{extra}")


# ---------------------------------------------------------------- the simulated trials

@dataclass
class Calls:
    """Every request a logger made: (kind, seconds) for successes, messages for failures."""

    latencies: list[tuple[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def timed(self, kind: str, fn, *args, **kwargs):
        started = time.perf_counter()
        try:
            out = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - counted, never raised: the bench reports them
            with self.lock:
                self.errors.append(f"{kind}: {type(e).__name__}: {str(e)[:200]}")
            return None
        with self.lock:
            self.latencies.append((kind, time.perf_counter() - started))
        return out


def simulated_trial(url: str, experiment_id: str, parent_id: str, index: int, epochs: int, calls: Calls,
                    start: threading.Barrier) -> str | None:
    """One trial's writes, as ``TrialRuns`` makes them (own client, like a separate process)."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    start.wait()
    trial_id = f"bench_{index:05d}"
    run = calls.timed("create_run", client.create_run, experiment_id, run_name=f"trial-{trial_id}", tags={
        "mlflow.parentRunId": parent_id, "mfcon.study": "tracking-load", "mfcon.role": "trial",
        "mfcon.trial_id": trial_id, "mfcon.trial_state": "running"})
    if run is None:
        return None
    run_id = run.info.run_id
    calls.timed("log_params", client.log_batch, run_id, params=[Param(k, str(v)) for k, v in PARAMS.items()])
    for epoch in range(1, epochs + 1):
        now = int(time.time() * 1000)
        values = [8.0 / epoch, 7.0 / epoch, 1.0 / epoch, 40.0 / (1 + 0.1 * epoch + 0.01 * index),
                  0.9 / epoch, 0.95 / epoch, 0.002]
        calls.timed("log_epoch", client.log_batch, run_id,
                    metrics=[Metric(k, v, now, epoch) for k, v in zip(EPOCH_METRICS, values)],
                    tags=[RunTag("mfcon.epoch", str(epoch))])
    calls.timed("set_state", client.set_tag, run_id, "mfcon.trial_state", "completed")
    calls.timed("terminate", client.set_terminated, run_id, "FINISHED")
    return run_id


def lost_writes(url: str, run_ids: list[str], epochs: int) -> list[str]:
    """Read every run back: each must hold every epoch of every metric and the final state."""
    from mlflow.tracking import MlflowClient

    client, problems = MlflowClient(url), []
    for run_id in run_ids:
        run = client.get_run(run_id)
        if run.data.tags.get("mfcon.trial_state") != "completed" or run.info.status != "FINISHED":
            problems.append(f"{run_id}: state {run.data.tags.get('mfcon.trial_state')} / {run.info.status}")
        for key in EPOCH_METRICS:
            steps = sorted(m.step for m in client.get_metric_history(run_id, key))
            if steps != list(range(1, epochs + 1)):
                problems.append(f"{run_id}: {key} has steps {steps}")
    return problems


@dataclass(frozen=True)
class LoadResult:
    backend: str
    loggers: int
    calls: int
    errors: int
    p50_ms: float
    p95_ms: float
    max_ms: float
    wall_s: float
    slowest: str  # the kind of request that took max_ms
    first_errors: tuple[str, ...]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def run_load(backend: str, url: str, loggers: int, epochs: int) -> LoadResult:
    """Start ``loggers`` simulated trials at once under one study run; time every request."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    experiment_id = client.create_experiment(f"tracking-load-{backend}")
    parent = client.create_run(experiment_id, run_name="study-tracking-load",
                               tags={"mfcon.study": "tracking-load", "mfcon.role": "study"})
    calls, start = Calls(), threading.Barrier(loggers)
    started = time.perf_counter()
    with ThreadPoolExecutor(loggers) as pool:
        futures = [pool.submit(simulated_trial, url, experiment_id, parent.info.run_id, i, epochs, calls, start)
                   for i in range(loggers)]
        run_ids = [f.result() for f in futures]
    wall = time.perf_counter() - started
    client.set_terminated(parent.info.run_id)
    errors = list(calls.errors) + lost_writes(url, [r for r in run_ids if r], epochs)
    ms = [1000 * s for _, s in calls.latencies] or [float("nan")]
    slowest = max(calls.latencies, key=lambda call: call[1])[0] if calls.latencies else "-"
    return LoadResult(backend, loggers, len(calls.latencies) + len(calls.errors), len(errors),
                      statistics.median(ms), percentile(ms, 95), max(ms), wall, slowest, tuple(errors[:5]))


# ---------------------------------------------------------------- per backend

def bench_sqlite(root: Path, args) -> LoadResult:
    spec = ServerSpec(f"sqlite:///{root / 'mlflow.db'}", str(root / "mlartifacts"), port=free_port(),
                      workers=args.workers)
    with running_server(spec, root / "server.log", START_TIMEOUT_S) as (url, _):
        return run_load("sqlite", url, args.loggers, args.epochs)


def bench_postgresql(root: Path, args) -> LoadResult:
    with throwaway_postgres() as pg:
        uri = pg.uri.replace(f"{pg.user}@", f"{pg.user}:${{MFCON_DB_PASSWORD}}@")
        spec = ServerSpec(uri, str(root / "mlartifacts"), port=free_port(), workers=args.workers)
        environ = {**os.environ, "MFCON_DB_PASSWORD": pg.password}
        with running_server(spec, root / "server.log", START_TIMEOUT_S, environ=environ) as (url, _):
            result = run_load("postgresql", url, args.loggers, args.epochs)
        return result


BACKENDS = {"sqlite": bench_sqlite, "postgresql": bench_postgresql}


def versions() -> str:
    import mlflow
    import psycopg2
    import sqlalchemy

    pg = subprocess.run([str(PG_BIN / "postgres"), "--version"], check=False, capture_output=True, text=True).stdout.strip()
    return (f"MLflow {mlflow.__version__} | SQLAlchemy {sqlalchemy.__version__} | SQLite {sqlite3.sqlite_version} | "
            f"{pg or 'postgres: not found'} | psycopg2 {psycopg2.__version__.split()[0]}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loggers", type=int, default=16, help="concurrent simulated trials (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=15, help="epochs per trial, one log_batch each (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=4, help="mlflow server worker processes (default: %(default)s)")
    ap.add_argument("--backends", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    args = ap.parse_args(argv)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # a failed request is an error, not a silent retry
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    print(f"machine: {platform.platform()} | {platform.processor() or platform.machine()} | {os.cpu_count()} CPUs | "
          f"Python {platform.python_version()} | load average {os.getloadavg()[0]:.1f} (shared machines vary)")
    print(versions())
    print(f"load: {args.loggers} concurrent loggers x (create_run + params + {args.epochs} epochs x log_batch of "
          f"{len(EPOCH_METRICS)} metrics + tag + state + terminate), one server on 127.0.0.1 with "
          f"{args.workers} workers, client retries off")
    head = f"{'backend':<11} {'loggers':>7} {'requests':>8} {'errors':>6} {'p50 ms':>7} {'p95 ms':>7} {'max ms':>7} " \
           f"{'req/s':>6} {'wall s':>6}  slowest"
    print(head + "\n" + "-" * len(head))
    for name in args.backends.split(","):
        with tempfile.TemporaryDirectory(prefix=f"mfcon-load-{name}-") as tmp:
            r = BACKENDS[name.strip()](Path(tmp), args)
        print(f"{r.backend:<11} {r.loggers:>7} {r.calls:>8} {r.errors:>6} {r.p50_ms:>7.1f} {r.p95_ms:>7.1f} "
              f"{r.max_ms:>7.1f} {r.calls / r.wall_s:>6.1f} {r.wall_s:>6.1f}  {r.slowest}", flush=True)
        for message in r.first_errors:
            print(f"    error: {message}")


if __name__ == "__main__":
    main()
