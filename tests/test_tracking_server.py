"""The shared MLflow server: its command line (private address, no secrets in argv) and real servers.

The real servers run on 127.0.0.1: SQLite started through ``python -m mfcon.cli.tracking_server``
(what ``mfcon tracking-server`` runs), PostgreSQL as a throwaway cluster (the bench's helper)
with the password in the environment only.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mfcon.cli.tracking_server import main as tracking_server_main
from mfcon.tracking.server import (
    AuthSpec,
    ServerConfigError,
    ServerSpec,
    check_bind_host,
    mask_uri,
    running_server,
    server_launch,
    stop_server,
    wait_healthy,
    write_server_files,
)

REPO = Path(__file__).resolve().parents[1]
SECRET = "pa:ss@w/rd%"  # characters that break a URI unless handled
MLFLOW = ["mlflow"]
START_TIMEOUT_S = 300  # a server starts in ~10 s; a 2-core machine shared with other test runs can take minutes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on ``port``, read from /proc/net/tcp{,6} (no psutil here)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr_hex, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:
                continue
            raw = bytes.fromhex(addr_hex)
            if width == 8:
                found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
            else:  # four little-endian 32-bit words
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def _routed_ip() -> str | None:
    """This machine's non-loopback address (the one a route would use), or None without a network."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # UDP connect sends nothing
        except OSError:
            return None
        ip = s.getsockname()[0]
    return None if ip.startswith("127.") else ip


# ---------------------------------------------------------------- the command line (pure)

def test_sqlite_server_binds_loopback_and_turns_job_execution_off(tmp_path):
    launch = server_launch(ServerSpec(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "art")), {}, MLFLOW)
    argv = list(launch.argv)
    assert argv[:2] == ["mlflow", "server"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "5000"
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path}/mlflow.db"
    assert argv[argv.index("--artifacts-destination") + 1] == str(tmp_path / "art")
    assert launch.env == {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    assert launch.url == "http://127.0.0.1:5000"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", " ", "::0", "[::0]", "[::]", "0:0:0:0:0:0:0:0",
                                  "0000:0000::0000", "::ffff:0.0.0.0", "8.8.8.8", "2001:4860:4860::8888",
                                  "224.0.0.1", "mlflow.example.com"])
def test_every_interface_public_addresses_and_names_are_refused(host):
    with pytest.raises(ServerConfigError, match="--host"):
        check_bind_host(host)


@pytest.mark.parametrize("host", ["127.0.0.1", "10.0.3.17", "172.31.5.9", "192.168.1.2", "100.64.1.2", "::1",
                                  "fd00::2", "localhost"])
def test_loopback_and_private_addresses_are_accepted(host):
    assert check_bind_host(host) == host


@pytest.mark.parametrize("host, allowed", [
    ("127.0.0.1", None),
    ("10.0.3.17", "10.0.3.17,10.0.3.17:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*"),
    ("100.64.1.2", "100.64.1.2,100.64.1.2:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*"),
    ("fd00::2", "[fd00::2],[[]fd00::2]:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*"),
])
def test_a_private_bind_allows_its_own_host_header(host, allowed):
    """MLflow 3 answers 403 to a Host header outside its list, which covers only RFC 1918 ranges by default."""
    argv = list(server_launch(ServerSpec("sqlite:////abs/m.db", "/abs/a", host=host), {}, MLFLOW).argv)
    assert (argv[argv.index("--allowed-hosts") + 1] if "--allowed-hosts" in argv else None) == allowed


def test_postgres_password_from_the_environment_never_reaches_argv():
    spec = ServerSpec("postgresql://mfcon:${MFCON_DB_PASSWORD}@10.0.0.5:5432/mlflow", "s3://bucket/mlflow",
                      host="10.0.0.5", port=5001)
    launch = server_launch(spec, {"MFCON_DB_PASSWORD": SECRET}, MLFLOW)
    assert SECRET not in " ".join(launch.argv) and "MFCON_DB_PASSWORD" not in " ".join(launch.argv)
    argv = list(launch.argv)
    assert argv[argv.index("--backend-store-uri") + 1] == "postgresql+psycopg2://mfcon@10.0.0.5:5432/mlflow"
    assert launch.env["PGPASSWORD"] == SECRET  # libpq reads it; kept verbatim, not URL-encoded
    assert SECRET not in launch.display() and "PGPASSWORD=***" in launch.display()
    assert SECRET not in repr(launch)
    assert launch.url == "http://10.0.0.5:5001"


def test_a_password_placeholder_that_is_not_set_is_a_clear_error():
    spec = ServerSpec("postgresql://mfcon:${MFCON_DB_PASSWORD}@127.0.0.1/mlflow", "s3://b/m")
    with pytest.raises(ServerConfigError, match=r"--backend-store-uri refers to \$\{MFCON_DB_PASSWORD\}"):
        server_launch(spec, {}, MLFLOW)


def test_uri_without_password_keeps_the_ambient_pgpassword_and_gets_the_psycopg2_driver():
    launch = server_launch(ServerSpec("postgresql://mfcon@db:5432/mlflow", "s3://b/m"), {"PGPASSWORD": "x"}, MLFLOW)
    assert "postgresql+psycopg2://mfcon@db:5432/mlflow" in launch.argv and "PGPASSWORD" not in launch.env


def test_other_databases_with_a_password_pass_the_uri_through_the_environment():
    launch = server_launch(ServerSpec("mysql+pymysql://u:${PW}@db/mlflow", "s3://b/m"), {"PW": SECRET}, MLFLOW)
    assert "--backend-store-uri" not in launch.argv and SECRET not in " ".join(launch.argv)
    assert launch.env["MLFLOW_BACKEND_STORE_URI"] == "mysql+pymysql://u:pa%3Ass%40w%2Frd%25@db/mlflow"
    assert "MLFLOW_BACKEND_STORE_URI=***" in launch.display()


@pytest.mark.parametrize("backend, artifacts, option", [
    ("sqlite:///runs/mlflow.db", "/abs/art", "--backend-store-uri"),
    ("sqlite:////abs/mlflow.db", "runs/art", "--artifacts-destination"),
    ("mlflow.db", "/abs/art", "--backend-store-uri"),
])
def test_relative_paths_are_refused_naming_the_option(backend, artifacts, option):
    with pytest.raises(ServerConfigError, match=option):
        server_launch(ServerSpec(backend, artifacts), {}, MLFLOW)


def test_mask_uri():
    assert mask_uri("postgresql://mfcon:hunter2@db:5432/mlflow") == "postgresql://mfcon:***@db:5432/mlflow"
    assert mask_uri("postgresql://mfcon:${PW}@db/mlflow") == "postgresql://mfcon:***@db/mlflow"
    assert mask_uri("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"


def test_cli_dry_run_prints_the_masked_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MFCON_DB_PASSWORD", SECRET)
    code = tracking_server_main(["--dry-run", "--backend-store-uri", "postgresql://mfcon:${MFCON_DB_PASSWORD}@db/ml",
                                 "--artifacts-destination", "s3://bucket/mlflow", "--host", "10.1.2.3"])
    out, err = capsys.readouterr()
    assert code == 0 and SECRET not in out and "PGPASSWORD=***" in out and "--host 10.1.2.3" in out
    assert "has no authentication" in err and "--auth" in err  # a private bind without auth is called out
    assert tracking_server_main(["--dry-run", "--host", "0.0.0.0", "--workdir", str(tmp_path)]) == 2
    assert "every interface" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--dry-run"], ["--dry-run", "--auth"], ["--host", "::0"],
                                  ["--host", "[::0]", "--dry-run"], ["--auth"]])
def test_a_dry_run_or_a_refused_option_writes_nothing(argv, tmp_path, capsys, monkeypatch):
    """Neither ./runs nor --workdir nor any auth file appears (the last case: --auth without a password)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    if argv == ["--dry-run", "--auth"]:
        monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", SECRET)
    code = tracking_server_main([*argv, "--workdir", str(tmp_path / "store")])
    out, err = capsys.readouterr()
    assert code == (0 if "--dry-run" in argv and "--host" not in argv else 2), err
    assert list(tmp_path.iterdir()) == [], "the command wrote files"
    assert SECRET not in out + err


# ---------------------------------------------------------------- authentication (pure)

def _auth_spec(tmp_path, **auth) -> ServerSpec:
    return ServerSpec(f"sqlite:///{tmp_path}/runs/mlflow.db", str(tmp_path / "art"), host="10.0.0.5",
                      auth=AuthSpec(str(tmp_path / "runs"), **auth))


def _private(path, text: str):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def test_auth_runs_the_basic_auth_app_with_secrets_in_the_environment_only(tmp_path):
    launch = server_launch(_auth_spec(tmp_path), {"MLFLOW_AUTH_ADMIN_PASSWORD": SECRET}, MLFLOW)
    argv = " ".join(launch.argv)
    assert launch.argv[-2:] == ("--app-name", "basic-auth") and SECRET not in argv
    assert launch.env["MLFLOW_AUTH_ADMIN_PASSWORD"] == SECRET
    assert launch.env["MLFLOW_AUTH_CONFIG_PATH"] == str(tmp_path / "runs" / "basic_auth.ini")
    key = launch.env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    assert len(key) >= 32 and key not in launch.display() and SECRET not in launch.display()
    assert "MLFLOW_AUTH_ADMIN_PASSWORD=*** " in launch.display() and "MLFLOW_FLASK_SERVER_SECRET_KEY=*** " in launch.display()
    ini = dict(launch.files)[str(tmp_path / "runs" / "basic_auth.ini")]
    assert "default_permission = READ" in ini and f"database_uri = sqlite:///{tmp_path}/runs/basic_auth.db" in ini
    assert SECRET not in ini and "admin_password" not in ini
    assert "has no authentication" not in " ".join(launch.warnings)
    assert not (tmp_path / "runs").exists(), "building the command wrote files"
    write_server_files(launch)
    for name in ("basic_auth.ini", "flask_secret_key"):
        assert (tmp_path / "runs" / name).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "runs").stat().st_mode & 0o777 == 0o700
    again = server_launch(_auth_spec(tmp_path), {"MLFLOW_AUTH_ADMIN_PASSWORD": SECRET}, MLFLOW)
    assert again.env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == key, "the secret key changes between restarts"


def test_auth_admin_password_from_a_private_file(tmp_path):
    secret_file = _private(tmp_path / "admin_password", SECRET + "\n")
    launch = server_launch(_auth_spec(tmp_path, admin_password_file=str(secret_file)), {}, MLFLOW)
    assert launch.env["MLFLOW_AUTH_ADMIN_PASSWORD"] == SECRET
    os.chmod(secret_file, 0o644)
    with pytest.raises(ServerConfigError, match=r"--admin-password-file .*admin_password: readable by other users "
                                                r"\(mode 644\); run: chmod 600"):
        server_launch(_auth_spec(tmp_path, admin_password_file=str(secret_file)), {}, MLFLOW)


@pytest.mark.parametrize("auth, match", [
    ({}, r"--auth needs the admin's password: --admin-password-file FILE .* \(never on the command line\)"),
    ({"default_permission": "EDIT"}, r"--default-permission EDIT: every signed-in user could then write"),
    ({"admin_username": "a b"}, r"--admin-username 'a b'"),
    ({"database_uri": "postgresql://u:pw@db/auth"}, r"--auth-database-uri 'postgresql://u:\*\*\*@db/auth': no password"),
])
def test_auth_refusals_name_the_option(auth, match, tmp_path):
    environ = {} if not auth else {"MLFLOW_AUTH_ADMIN_PASSWORD": SECRET}
    with pytest.raises(ServerConfigError, match=match):
        server_launch(_auth_spec(tmp_path, **auth), environ, MLFLOW)


def test_auth_with_postgres_keeps_users_in_the_tracking_database(tmp_path):
    spec = ServerSpec("postgresql://mfcon:${MFCON_DB_PASSWORD}@127.0.0.1:5432/mlflow", "s3://b/m", host="10.0.0.5",
                      auth=AuthSpec(str(tmp_path / "auth")))
    launch = server_launch(spec, {"MFCON_DB_PASSWORD": SECRET, "MLFLOW_AUTH_ADMIN_PASSWORD": "x" * 16}, MLFLOW)
    ini = dict(launch.files)[str(tmp_path / "auth" / "basic_auth.ini")]
    assert "database_uri = postgresql+psycopg2://mfcon@127.0.0.1:5432/mlflow" in ini and SECRET not in ini
    assert launch.env["PGPASSWORD"] == SECRET


# ---------------------------------------------------------------- real servers

def _log_one_run(url: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    experiment = client.create_experiment("server-test")
    run = client.create_run(experiment, tags={"mfcon.role": "trial"})
    client.log_metric(run.info.run_id, "dev_eer", 12.5, step=1)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.mark.slow
def test_mfcon_tracking_server_serves_sqlite_on_loopback_only(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mfcon.cli.tracking_server", "--workdir", str(tmp_path),
                                 "--port", str(port), "--workers", "1"], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, cwd=REPO)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log, timeout_s=START_TIMEOUT_S)
        run_id = _log_one_run(url)
        assert _listening(port) == {"127.0.0.1"}  # nothing on 0.0.0.0 or ::
        ip = _routed_ip()
        if ip:
            with pytest.raises(OSError):
                socket.create_connection((ip, port), timeout=2).close()
        assert (tmp_path / "mlflow.db").exists()  # the embedded store `mfcon study` writes by default
        from mlflow.tracking import MlflowClient

        assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).data.metrics == {"dev_eer": 12.5}
        assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in log.read_text()
    finally:
        stop_server(proc)


@pytest.mark.slow
def test_a_server_bound_to_the_private_address_serves_clients_there_only(tmp_path):
    """The cluster head's case: bound to the node's private IP, reachable there, not on loopback."""
    ip = _routed_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback address")
    spec = ServerSpec(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "art"), host=ip, port=_free_port(), workers=1)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with running_server(spec, tmp_path / "server.log", START_TIMEOUT_S, environ=environ) as (url, _):
        assert url == f"http://{ip}:{spec.port}"
        _log_one_run(url)  # a Host header of the private IP is allowed (403 without --allowed-hosts)
        assert _listening(spec.port) == {ip}
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", spec.port), timeout=2).close()


@pytest.mark.slow
def test_postgres_server_gets_its_password_from_the_environment_only(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    from tracking_load import throwaway_postgres

    with throwaway_postgres() as pg:
        uri = pg.uri.replace(f"{pg.user}@", f"{pg.user}:${{MFCON_DB_PASSWORD}}@")
        environ = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG"))},
                   "MFCON_DB_PASSWORD": pg.password}
        spec = ServerSpec(uri, str(tmp_path / "art"), port=_free_port(), workers=1)
        with running_server(spec, tmp_path / "server.log", START_TIMEOUT_S, environ=environ) as (url, proc):
            _log_one_run(url)
            group = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(p) == proc.pid]
            assert group, "the server's process group is empty"
            for p in group:
                assert pg.password.encode() not in (p / "cmdline").read_bytes(), f"password in argv of pid {p.name}"
        assert pg.password not in (tmp_path / "server.log").read_text()


def _pgid(proc_dir: Path) -> int | None:
    try:
        return os.getpgid(int(proc_dir.name))
    except (ProcessLookupError, PermissionError):
        return None
