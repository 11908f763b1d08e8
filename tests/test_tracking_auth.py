"""``mfcon tracking-server --auth``: MLflow's basic-auth app on a real server on 127.0.0.1 (docs/tracking_server.md).

One server, started as users start it (``python -m mfcon.cli.tracking_server --auth`` with the admin
password in a 0600 file), and four callers: nobody (no or wrong credentials), a trainer (logs a
study's runs and its model), a reader (no grant: the default READ) and a promoter (EDIT on the
registered model ``mfcon-speaker``). Asserted:

* anonymous and unknown callers can neither write nor read (401);
* the reader reads runs and can use the champion (``mfcon verify``), but can neither log into the
  trainer's study nor register a version nor move ``champion`` (403);
* the promoter registers the trainer's model and moves ``champion``;
* the credentials file MLflow reads (``~/.mlflow/credentials``) works as the environment does;
* no password (admin's, users', the app's secret key) appears in any param, tag, artifact, logged-model
  tag, the server's argv, its log, the auth config file, or anything the commands printed; the files
  the server keeps are 0600 in a 0700 folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mfcon.cli import main
from mfcon.config import FeatureConfig
from mfcon.model_files import log_speaker_model, use_tracking_uri
from mfcon.tracking.server import stop_server, wait_healthy
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow_fixtures import free_port
from registry_fixtures import export_micro_model, make_tone_corpus

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300
PASSWORDS = {"admin": "admin-Passw0rd-51c7e2", "trainer": "trainer-Passw0rd-9d04aa",
             "reader": "reader-Passw0rd-03bf61", "promoter": "promoter-Passw0rd-7e22c9"}
MODEL = "mfcon-speaker"

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def as_user(name: str | None, password: str | None = None):
    """MLflow's client reads MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD on every request."""
    saved = {k: os.environ.pop(k, None) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    if name is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = name
        os.environ["MLFLOW_TRACKING_PASSWORD"] = PASSWORDS[name] if password is None else password
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def _private_file(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The authenticated server over a SQLite store, users created and granted by the admin."""
    root = tmp_path_factory.mktemp("auth")
    store = root / "runs"
    admin_file = _private_file(root / "admin_password", PASSWORDS["admin"] + "\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    log = root / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mfcon.cli.tracking_server", "--workdir", str(store),
                                 "--port", str(port), "--workers", "1", "--auth",
                                 "--admin-password-file", str(admin_file)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    old_retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # a refusal is an answer, not something to retry
    try:
        wait_healthy(url, proc, log, START_TIMEOUT_S)
        from mlflow.server.auth.client import AuthServiceClient

        with as_user("admin"):
            admin = AuthServiceClient(url)
            for name in ("trainer", "reader", "promoter"):
                admin.create_user(name, PASSWORDS[name])
            MlflowClient(url).create_registered_model(MODEL)  # created by the admin: no user squats the name
            admin.grant_user_permission("promoter", "registered_model", MODEL, "EDIT")
        yield {"url": url, "root": root, "store": store, "proc": proc, "log": log}
    finally:
        stop_server(proc)
        if old_retries is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = old_retries


@pytest.fixture(scope="module")
def trained(server):
    """The trainer's study: an experiment, a run with a param and a tag, and its logged speaker model."""
    url = server["url"]
    with as_user("trainer"):
        client = MlflowClient(url)
        exp = client.create_experiment("study-auth")
        run = client.create_run(exp, tags={"mfcon.role": "trial"})
        client.log_param(run.info.run_id, "loss.mfcon_weight", 0.3)
        model_uri = log_speaker_model(client, run.info.run_id, export_micro_model(server["root"] / "ck" / "best.pt"),
                                      FeatureConfig(), tracking_uri=url)
    return {"exp": exp, "run_id": run.info.run_id, "model_uri": model_uri}


def _refused(call, code: str) -> str:
    with pytest.raises(MlflowException) as err:
        call()
    text = str(err.value)
    assert code in text, text
    return text


def test_anonymous_and_unknown_callers_are_refused(server, trained):
    url = server["url"]
    for who in (None, "reader-with-a-wrong-password"):
        with as_user(*((None,) if who is None else ("reader", who))):
            client = MlflowClient(url)
            _refused(lambda: client.create_experiment("anonymous"), "401")
            _refused(lambda: client.set_registered_model_alias(MODEL, "champion", "1"), "401")
            _refused(lambda: client.get_run(trained["run_id"]), "401")
            _refused(lambda: client.log_param(trained["run_id"], "x", 1), "401")


def test_a_reader_reads_but_cannot_log_register_or_move_the_alias(server, trained):
    url = server["url"]
    with as_user("reader"):
        client = MlflowClient(url)
        assert client.get_run(trained["run_id"]).data.params["loss.mfcon_weight"] == "0.3"
        _refused(lambda: client.create_run(trained["exp"]), "403")
        _refused(lambda: client.log_param(trained["run_id"], "x", 1), "403")
        _refused(lambda: client.create_model_version(MODEL, source=trained["model_uri"], model_id=_id(trained)), "403")
    with as_user("promoter"):
        version = MlflowClient(url).create_model_version(MODEL, source=trained["model_uri"], model_id=_id(trained)).version
        MlflowClient(url).set_registered_model_alias(MODEL, "champion", version)
    with as_user("reader"):
        client = MlflowClient(url)
        _refused(lambda: client.set_registered_model_alias(MODEL, "champion", version), "403")
        _refused(lambda: client.delete_registered_model_alias(MODEL, "champion"), "403")
        assert client.get_model_version_by_alias(MODEL, "champion").version == version


def test_a_promoter_registers_and_moves_champion(server, trained):
    url = server["url"]
    with as_user("promoter"):
        client = MlflowClient(url)
        first = client.create_model_version(MODEL, source=trained["model_uri"], model_id=_id(trained)).version
        second = client.create_model_version(MODEL, source=trained["model_uri"], model_id=_id(trained)).version
        client.set_registered_model_alias(MODEL, "champion", second)
        client.set_registered_model_alias(MODEL, "previous", first)
        assert client.get_model_version_by_alias(MODEL, "champion").version == second
        _refused(lambda: client.log_param(trained["run_id"], "x", 1), "403")  # not the trainer's


def test_the_reader_verifies_with_the_champion_through_mfcon(server, trained, capsys, tmp_path):
    """Loading needs READ only; credentials given in the URI are masked in everything printed."""
    utts = make_tone_corpus(tmp_path / "wav", n_speakers=2, utts_per_speaker=1, seconds=1.0)
    wavs = [str(tmp_path / "wav" / u) for spk in sorted(utts) for u in utts[spk]]
    with as_user("promoter"):
        client = MlflowClient(server["url"])
        version = client.create_model_version(MODEL, source=trained["model_uri"], model_id=_id(trained)).version
        client.set_registered_model_alias(MODEL, "champion", version)
    uri = server["url"].replace("http://", f"http://reader:{PASSWORDS['reader']}@")
    with as_user(None):
        code = main(["verify", *wavs, "--threshold", "0.5", "--tracking-uri", uri])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"models:/{MODEL}/{version}" in out
    assert PASSWORDS["reader"] not in out + err


def test_mlflow_credentials_file_works_like_the_environment(server, trained, tmp_path):
    home = tmp_path / "home"
    (home / ".mlflow").mkdir(parents=True, mode=0o700)
    _private_file(home / ".mlflow" / "credentials",
                  f"[mlflow]\nmlflow_tracking_username = reader\nmlflow_tracking_password = {PASSWORDS['reader']}\n")
    script = ("import sys; from mlflow.tracking import MlflowClient; "
              f"print(MlflowClient({server['url']!r}).get_run({trained['run_id']!r}).data.params['loss.mfcon_weight'])")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"HOME": str(home)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0 and done.stdout.strip() == "0.3", done.stderr[-2000:]


def _everything(url: str, dest: Path) -> str:
    """Every experiment, run param/tag, logged-model tag, model version tag and artifact byte, as admin."""
    import mlflow

    chunks = []
    with as_user("admin"):
        client = MlflowClient(url)
        for exp in client.search_experiments():
            chunks.append(json.dumps([exp.name, exp.tags]))
            for run in client.search_runs([exp.experiment_id]):
                chunks.append(json.dumps([run.data.params, run.data.tags]))
                folder = Path(client.download_artifacts(run.info.run_id, "", str(dest / run.info.run_id)))
                chunks += [f.read_bytes().decode("utf-8", "replace") for f in folder.rglob("*") if f.is_file()]
            for model in client.search_logged_models([exp.experiment_id]):
                chunks.append(json.dumps([model.params, model.tags]))
                with use_tracking_uri(url):
                    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{model.model_id}",
                                                                      dst_path=str(dest / model.model_id)))
                chunks += [f.read_bytes().decode("utf-8", "replace") for f in folder.rglob("*") if f.is_file()]
        for mv in client.search_model_versions(f"name = '{MODEL}'"):
            chunks.append(json.dumps([mv.tags, mv.source]))
    return "\n".join(chunks)


def test_no_credential_leaks_and_server_files_are_private(server, trained, tmp_path):
    secret_key = (server["store"] / "flask_secret_key").read_text().strip()
    secrets = {**PASSWORDS, "secret key": secret_key}
    texts = {"MLflow runs, models and artifacts": _everything(server["url"], tmp_path),
             "the server's log and printed command": server["log"].read_text(errors="replace"),
             "basic_auth.ini": (server["store"] / "basic_auth.ini").read_text()}
    group = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(p) == server["proc"].pid]
    assert group, "the server's process group is empty"
    texts["the server's argv"] = "\n".join((p / "cmdline").read_bytes().decode(errors="replace") for p in group)
    assert "--app-name\0basic-auth" in texts["the server's argv"]
    assert "MLFLOW_AUTH_ADMIN_PASSWORD=***" in texts["the server's log and printed command"]
    for name, secret in secrets.items():
        for where, text in texts.items():
            assert secret not in text, f"the {name} password leaked into {where}"
    assert "default_permission = READ" in texts["basic_auth.ini"]
    for name in ("basic_auth.ini", "flask_secret_key"):
        mode = (server["store"] / name).stat().st_mode & 0o777
        assert mode == 0o600, f"{name} has mode {mode:o}"
    assert server["store"].stat().st_mode & 0o077 == 0, "the server's folder (databases too) is open to other users"


def _pgid(proc_dir: Path) -> int | None:
    try:
        return os.getpgid(int(proc_dir.name))
    except (ProcessLookupError, PermissionError, ValueError):
        return None


def _id(trained: dict) -> str:
    return trained["model_uri"].rsplit("/", 1)[-1]


def test_ensure_user_gives_jobs_a_non_admin_account_and_keeps_its_password(server, tmp_path):
    """The cluster head's account for Ray jobs (cluster/tracking.sh): created once, the file's password set
    again on every start, never an admin; it creates its own experiment and writes there."""
    from mfcon.tracking.server_auth import ensure_user
    from mlflow.server.auth.client import AuthServiceClient

    admin_file = server["root"] / "admin_password"
    jobs_file = _private_file(tmp_path / "jobs_password", "jobs-Passw0rd-0a1b2c3d\n")
    assert ensure_user(server["url"], "ray-jobs", jobs_file, admin_file) == "created"
    assert ensure_user(server["url"], "ray-jobs", jobs_file, admin_file) == "kept"
    with as_user("admin"):
        assert AuthServiceClient(server["url"]).get_user("ray-jobs").is_admin is False
    with as_user("ray-jobs", "jobs-Passw0rd-0a1b2c3d"):
        client = MlflowClient(server["url"])
        exp = client.create_experiment("study-ray-jobs")
        client.log_param(client.create_run(exp).info.run_id, "x", 1)
        _refused(lambda: AuthServiceClient(server["url"]).create_user("someone", "someone-Passw0rd-1"), "403")
    with pytest.raises(Exception, match="readable by other users"):
        jobs_file.chmod(0o644)
        ensure_user(server["url"], "ray-jobs", jobs_file, admin_file)
