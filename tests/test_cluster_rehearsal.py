"""The cluster path the way a user runs it, on one machine: Ray's real cluster launcher (``ray up`` /
``ray job submit`` / ``ray down``) with ``cluster-onprem.yaml`` and the scripts in ``cluster/``.

Two loopback addresses stand for two machines, each served by its own ``sshd`` on port 22 and each with its
own Unix user, ``/tmp`` and environment (the login hook below maps the address the client dialled to that
user): 127.0.0.11 is the head, 127.0.0.12 the worker. Ray's ``local`` provider drives both over SSH exactly as
on a lab's machines: rsync of the working tree (file_mounts with the repo's excludes), the set-up commands
(the lock-file runtime, PostgreSQL initdb with its password kept with the data, the supervised tracking
server), token auth, ``ray start`` on the head and, from the head's autoscaler, on the worker.

What the launcher config gets from the test, and nothing else: the two addresses, root's SSH key (the login
hook turns root into the node's user), the token file, the bucket, and ``MFCON_PREBUILT_VENV`` on the nodes
(the CI venv: ``cluster/setup_node.sh`` reuses it only after ``cluster/lock_check.py`` finds it has exactly
the locked versions; a bare node installs the lock). An S3 server (moto) on 127.0.0.1 holds data, study
and checkpoints; its settings reach the nodes as instance credentials would.

The head's tracking runs as its own system user (``cluster/head_common.sh``), which the head's set-up creates
through ``sudo`` as on a cloud image (the head's user gets a passwordless sudo rule here, removed at the end):
its processes, passwords and environment are out of the Ray user's reach, and jobs on the head sign in as a
non-admin MLflow account of their own.

Cold start: the worker "machine" comes up (its sshd starts) 60 s after the study job is submitted, then is set up,
so the job starts on zero worker nodes and its first trial waits longer than Train's default 60 s for its
placement group: it must wait for the autoscaler (cluster/node_env.sh) rather than fail.

Run alone: it needs root (users, sshd on port 22) and Debian's openssh-server, rsync, postgresql and sudo
(``make system-deps``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mfcon.tracking.store import STATE_TAG
from object_store_fixtures import run_s3_server

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HEAD_IP, WORKER_IP = "127.0.0.11", "127.0.0.12"
USERS = {HEAD_IP: "mfcon-rh", WORKER_IP: "mfcon-rw1"}  # one Unix user per "machine"
TRACKING_USER, JOBS_ACCOUNT = "mfcon-db", "ray-jobs"  # cluster/head_common.sh
DB, HEAD_DIR = Path("/var/lib/mfcon-db"), Path("/opt/mfcon")  # cluster/head_common.sh
# The head user's passwordless sudo (as a cloud image's ssh user has) and the rule cluster/head_root.sh writes.
SUDOERS = (Path("/etc/sudoers.d/mfcon-rehearsal"), Path("/etc/sudoers.d/mfcon-tracking"))
ONPREM_BUCKET = "s3://mfcon-studio-artifacts/mlflow"  # the bucket named in cluster-onprem.yaml
STUDY = "mfcon-smoke"  # search_spaces/mfcon.yaml under pipelines/study.py --smoke-test
WORKER_DELAY_S = 60  # the worker machine boots this long after the study job is submitted (+ its set-up)

LOGIN = """#!/bin/bash
# sshd ForceCommand: the address the client dialled is a machine; run the command as that machine's user.
set -- $SSH_CONNECTION
case "$3" in
{cases}
  *) echo "no machine at $3" >&2; exit 1 ;;
esac
export MFCON_NODE_IP=$3 TMPDIR=/tmp/$user MFCON_PREBUILT_VENV={venv} {aws}
exec runuser -l "$user" -w MFCON_NODE_IP,TMPDIR,MFCON_PREBUILT_VENV,{aws_names} -c "${{SSH_ORIGINAL_COMMAND:-exec bash -l}}"
"""

SSHD = """ListenAddress {ip}:22
HostKey {dir}/host_key
PidFile {dir}/sshd-{ip}.pid
AuthorizedKeysFile {dir}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
ForceCommand {dir}/login.sh
MaxStartups 100
MaxSessions 100
LogLevel ERROR
"""


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (Unix users per node, sshd on port 22)"
    for tool in ("/usr/sbin/sshd", "/usr/bin/ssh-keygen", "/usr/bin/rsync", "/usr/sbin/useradd", "/usr/sbin/runuser",
                 "/usr/bin/sudo", "/usr/sbin/visudo"):
        if not Path(tool).exists():
            return f"{tool} missing: make system-deps"
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        return "PostgreSQL server binaries missing: make system-deps"
    return None


def _run(cmd: list[str], env: dict[str, str], timeout: float, cwd: Path = REPO, check: bool = True,
         log: Path | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{done.stdout}\n{done.stderr}\n")
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:4])} ... failed ({done.returncode}):\n{done.stdout[-6000:]}\n"
                             f"{done.stderr[-4000:]}")
    return done


def _uids() -> set[int]:
    import pwd

    found = set()
    for user in (*USERS.values(), TRACKING_USER):
        try:
            found.add(pwd.getpwnam(user).pw_uid)
        except KeyError:
            pass
    return found


def _user_processes() -> dict[int, str]:
    """pid -> command line of every process the node users (and the head's tracking user) run."""
    uids, found = _uids(), {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if proc.stat().st_uid in uids:
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
        except OSError:
            pass
    return found


def _kill_user_processes() -> None:
    for pid in _user_processes():
        try:
            os.kill(pid, 9)
        except OSError:
            pass


def _remove_users() -> None:
    _kill_user_processes()
    for user in USERS.values():
        subprocess.run(["/usr/sbin/userdel", "-r", "-f", user], capture_output=True)
        shutil.rmtree(f"/tmp/{user}", ignore_errors=True)
    subprocess.run(["/usr/sbin/userdel", "-f", TRACKING_USER], capture_output=True)
    for folder in (DB, HEAD_DIR):
        shutil.rmtree(folder, ignore_errors=True)
    for rule in SUDOERS:
        rule.unlink(missing_ok=True)


def _create_users() -> None:
    _remove_users()
    for user in USERS.values():
        subprocess.run(["/usr/sbin/useradd", "-m", "-s", "/bin/bash", user], check=True, capture_output=True)
        tmp = Path(f"/tmp/{user}")
        tmp.mkdir(mode=0o700)
        shutil.chown(tmp, user, user)
    SUDOERS[0].write_text(f"{USERS[HEAD_IP]} ALL=(ALL) NOPASSWD: ALL\n")
    SUDOERS[0].chmod(0o440)


def _open_interpreter_path() -> list[tuple[Path, int]]:
    """Let the node users (and the head's tracking user) run the CI venv's interpreter and import from the
    venv (pyenv's Python under /root, a clone in a mode-700 ``mktemp -d`` folder): o+x on each folder above
    either that lacks it. Returns (folder, old mode) to restore, innermost first."""
    changed = []
    for start in (Path(os.path.realpath(sys.executable)), BIN):
        for folder in start.parents:
            mode = folder.stat().st_mode
            if not mode & 0o001:
                folder.chmod(mode | 0o001)
                changed.append((folder, mode))
    return changed


def _sshd(ip: str, ssh_dir: Path) -> subprocess.Popen:
    cfg = ssh_dir / f"sshd-{ip}.conf"
    cfg.write_text(SSHD.format(ip=ip, dir=ssh_dir))
    Path("/run/sshd").mkdir(exist_ok=True)
    return subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(cfg), "-E", str(ssh_dir / f"sshd-{ip}.log")],
                            start_new_session=True)


def _launcher_config(tmp: Path, key: Path, token_file: Path, bucket_mlflow: str, workers: int | None = None) -> Path:
    """cluster-onprem.yaml with this machine's addresses, key, token file and bucket; every command as is."""
    cfg = yaml.safe_load((REPO / "cluster-onprem.yaml").read_text())
    cfg["provider"].update(head_ip=HEAD_IP, worker_ips=[WORKER_IP])
    cfg["auth"] = {"ssh_user": "root", "ssh_private_key": str(key)}
    cfg["min_workers"] = cfg["max_workers"] = 1
    cfg["file_mounts"]["~/.ray/auth_token"] = str(token_file)
    cfg["head_start_ray_commands"] = [c.replace(ONPREM_BUCKET, bucket_mlflow) for c in cfg["head_start_ray_commands"]]
    if workers is not None:  # a changed server setting: `ray up` again must apply it
        cfg["head_start_ray_commands"] = [f"MFCON_MLFLOW_WORKERS={workers} {c}" if "start_head.sh" in c else c
                                          for c in cfg["head_start_ray_commands"]]
    out = tmp / f"cluster-{workers or 'first'}.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def _readme_commands() -> dict[str, str]:
    """The README's cluster commands, one per line (continuations joined)."""
    text = (REPO / "README.md").read_text().split("## On a Ray cluster", 1)[1].split("\n## ", 1)[0]
    lines = text.replace("\\\n", " ").split("\n")
    found = {}
    for name, pattern in (("study", r"^RAY_AUTH_MODE=token ray job submit .* pipelines/study\.py .*--address auto$"),
                          ("promote", r"^RAY_AUTH_MODE=token ray job submit .* -m mfcon\.cli promote .*--force$")):
        found[name] = next(line for line in lines if re.match(pattern, line.strip())).strip()
    return found


def _head_file(name: str) -> Path:
    return DB / name


def _pid(name: str) -> int:
    return int(_head_file(name).read_text().strip())


def _postmaster_pid() -> int:
    return int(_head_file("pgdata/postmaster.pid").read_text().split()[0])


def _owner(pid: int) -> str:
    import pwd

    return pwd.getpwuid(Path(f"/proc/{pid}").stat().st_uid).pw_name


def _head_user_reads(path: Path) -> bool:
    """Whether the head's Ray user (every job on the head) can read ``path``."""
    done = subprocess.run(["/usr/sbin/runuser", "-u", USERS[HEAD_IP], "--", "cat", str(path)], capture_output=True)
    return done.returncode == 0


def _tracking_isolation(server_pid: int) -> dict:
    """Who runs the head's tracking, who owns its files, and what the Ray user can read of them."""
    postmaster, supervisor = _postmaster_pid(), _pid("supervisor.pid")
    secret_files = ("pg_password", "mlflow_admin_password", "mlflow_jobs_password")
    return {
        "owners": {"server": _owner(server_pid), "postgres": _owner(postmaster), "supervisor": _owner(supervisor)},
        "files": {name or ".": (oct(_head_file(name).stat().st_mode & 0o777), _head_file(name).owner())
                  for name in ("", *secret_files, "pgdata")},
        "ray user reads": {str(p): _head_user_reads(p) for p in (
            *(_head_file(n) for n in secret_files), Path(f"/proc/{server_pid}/environ"),
            Path(f"/proc/{postmaster}/environ"))},
    }


def _job_id(output: str) -> str:
    return re.search(r"Job '(raysubmit_\w+)' submitted", output).group(1)


NODE_TIMES = """
import json, sys
from ray.util.state import list_nodes
from ray.job_submission import JobSubmissionClient
nodes = list_nodes(address=sys.argv[1], detail=True, raise_on_missing_output=False)
job = JobSubmissionClient(sys.argv[1]).get_job_info(sys.argv[2])
print(json.dumps({"job_start_ms": job.start_time, "workers": [
    {"ip": n.node_ip, "start_ms": n.start_time_ms} for n in nodes if not n.is_head_node]}))
"""


def test_ray_up_job_submit_second_ray_up_and_ray_down_on_loopback_machines(small_corpus, tmp_path, monkeypatch):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    log = tmp_path / "rehearsal.log"
    ssh_dir = tmp_path / "ssh"
    ssh_dir.mkdir()
    os.chmod(tmp_path, 0o755)
    key = ssh_dir / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh_dir / "host_key")], check=True)
    shutil.copy(f"{key}.pub", ssh_dir / "authorized_keys")
    token = secrets.token_hex(16)
    token_file = tmp_path / "auth_token"
    token_file.write_text(token)
    submitter_tmp = tmp_path / "submitter-tmp"
    submitter_tmp.mkdir()
    sshds: list[subprocess.Popen] = []
    boot = threading.Timer(WORKER_DELAY_S, lambda: sshds.append(_sshd(WORKER_IP, ssh_dir)))
    cfg = None
    env = {}
    with run_s3_server(tmp_path) as s3:
        aws = " ".join(f"{k}={v}" for k, v in s3.env.items())
        cases = "\n".join(f"  {ip}) user={user} ;;" for ip, user in USERS.items())
        login = ssh_dir / "login.sh"
        login.write_text(LOGIN.format(cases=cases, venv=BIN.parent, aws=aws, aws_names=",".join(s3.env)))
        login.chmod(0o755)
        # The submitter: a user's laptop with the token, the bucket's settings and the repo's venv on PATH.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
        env.update(s3.env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_TMPDIR=str(submitter_tmp),
                   PATH=f"{BIN}:{env['PATH']}", RAY_USAGE_STATS_ENABLED="0",
                   RAY_UP_enable_autoscaler_v2="0")  # as the README's `ray up` (v2 loses the local provider's head)
        opened = _open_interpreter_path()
        try:
            _create_users()
            sshds.append(_sshd(HEAD_IP, ssh_dir))
            cfg = _launcher_config(tmp_path, key, token_file, s3.uri("mlflow"))
            _run(["ray", "up", "-y", "--no-config-cache", str(cfg)], env, timeout=420, log=log)
            up_s = time.monotonic() - started
            tracking = f"http://{HEAD_IP}:5000"
            urllib.request.urlopen(f"{tracking}/health", timeout=10)

            # The data, prepared from the submitter straight into the bucket.
            data = s3.uri("data")
            _run([sys.executable, "-m", "mfcon.cli", "prepare", "--corpus", str(small_corpus.root), "--test-trials",
                  str(small_corpus.trials), "--dev-speakers", "4", "--out", data], env, timeout=300, cwd=tmp_path,
                 log=log)

            # The README's job command, with this rehearsal's head and bucket; the worker machine boots later.
            commands = _readme_commands()
            study_cmd = (commands["study"].replace("<head-ip>", HEAD_IP)
                         .replace("s3://bucket/vox1-shards", data).replace("s3://bucket/runs", s3.uri("runs")))
            boot.start()
            for _ in range(10):  # right after `ray up` the head's job agent may not have registered yet
                job = _run(["bash", "-c", study_cmd], env, timeout=900, log=log, check=False)
                if "No available agent to submit job" not in job.stdout + job.stderr:
                    break
                time.sleep(6)
            assert job.returncode == 0, f"study job failed:\n{job.stdout[-8000:]}\n{job.stderr[-3000:]}"
            node_times = json.loads(_run([sys.executable, "-c", NODE_TIMES, f"http://{HEAD_IP}:8265",
                                          _job_id(job.stdout)], env, timeout=120).stdout.strip().splitlines()[-1])
            promote_cmd = commands["promote"].replace("<head-ip>", HEAD_IP).replace("s3://bucket/vox1-shards", data)
            _run(["bash", "-c", promote_cmd], env, timeout=600, log=log)

            # `ray up` again, with a changed server setting: the server restarts with it, the database stays.
            server_pid, postmaster = _pid("mlflow-server.pid"), _postmaster_pid()
            secret_names = ("pg_password", "mlflow_admin_password", "mlflow_jobs_password")
            first_secrets = {name: _head_file(name).read_text() for name in secret_names}
            cfg = _launcher_config(tmp_path, key, token_file, s3.uri("mlflow"), workers=1)
            _run(["ray", "up", "-y", "--no-config-cache", str(cfg)], env, timeout=420, log=log)
            second_server_pid = _pid("mlflow-server.pid")
            server_cmdline = Path(f"/proc/{second_server_pid}/cmdline").read_bytes().decode().split("\0")
            assert _postmaster_pid() == postmaster, "PostgreSQL was restarted by `ray up`"
            isolation = _tracking_isolation(second_server_pid)
            kept_secrets = {name: _head_file(name).read_text() == first_secrets[name] for name in secret_names}
            jobs_file = Path(f"/home/{USERS[HEAD_IP]}/.mfcon/mlflow_jobs_password")
            jobs_file_facts = (oct(jobs_file.stat().st_mode & 0o777), jobs_file.owner(),
                               jobs_file.read_text() == first_secrets["mlflow_jobs_password"])
            head_env = Path(f"/home/{USERS[HEAD_IP]}/mfcon.env").read_text()
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient

            # The head's server runs MLflow basic auth: anonymous clients cannot write, the admin (whose password
            # lives beside the database, 0600) can read everything the jobs wrote.
            password_file = _head_file("mlflow_admin_password")
            assert password_file.stat().st_mode & 0o077 == 0
            with pytest.raises(MlflowException):
                MlflowClient(tracking).create_experiment("anonymous-write")
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password_file.read_text().strip())
            client = MlflowClient(tracking)
            exp = client.get_experiment_by_name(STUDY)
            trials = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mfcon.role") == "trial"]
            champion = client.get_model_version_by_alias("mfcon-speaker", "champion")
            # The jobs' own account created the study's experiment and the registered model (MANAGE, the
            # creator's grant): the study and promote signed in as it, and it is no admin.
            from mlflow.server.auth.client import AuthServiceClient

            auth = AuthServiceClient(tracking)
            jobs_grants = {"admin": auth.get_user(JOBS_ACCOUNT).is_admin,
                           "experiment": auth.get_user_permission(JOBS_ACCOUNT, "experiment",
                                                                  exp.experiment_id).permission,
                           "registered_model": auth.get_user_permission(JOBS_ACCOUNT, "registered_model",
                                                                        "mfcon-speaker").permission}
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", JOBS_ACCOUNT)  # its password still works
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", jobs_file.read_text().strip())
            jobs_see_study = MlflowClient(tracking).get_experiment_by_name(STUDY) is not None

            _run(["ray", "down", "-y", str(cfg)], env, timeout=300, log=log)
            deadline = time.monotonic() + 150
            while _user_processes() and time.monotonic() < deadline:
                time.sleep(2)
            left = list(_user_processes().values())
            homes = {user: sorted(str(p.relative_to(f"/home/{user}")) for p in Path(f"/home/{user}").rglob("*")
                                  if p.is_file() and re.search(r"checkpoint\.pt|\.parquet$|study\.json|mlflow\.db|"
                                                               r"MLmodel|\.pth?$", p.name)
                                  and "mfcon-venv" not in p.parts and "mfcon-studio" not in p.parts)
                     for user in USERS.values()}
            # (mfcon-shard-cache: the reader's local copy of shards read from the bucket, not an output)
            tmps = {user: [str(p) for p in Path(f"/tmp/{user}").rglob("*") if p.is_file()
                           and re.search(r"checkpoint\.pt|\.parquet$|study\.json", p.name)
                           and "mfcon-shard-cache" not in p.parts] for user in USERS.values()}
            keys = s3.keys()
            shipped = Path(f"/home/{USERS[HEAD_IP]}/mfcon-studio")
            never_shipped = [n for n in (".venv", ".git", "runs", "demo_out") if (shipped / n).exists()]
        except BaseException:
            print(log.read_text()[-20000:] if log.exists() else "(no log)")
            for f in sorted(ssh_dir.glob("sshd-*.log")):
                print(f, f.read_text()[-2000:])
            head_db = _head_file("")
            for name in ("mlflow-server.log", "supervisor.log"):
                if (head_db / name).exists():
                    print(name, (head_db / name).read_text()[-3000:])
            raise
        finally:
            boot.cancel()
            if cfg is not None:
                subprocess.run([str(BIN / "ray"), "down", "-y", str(cfg)], env=env, cwd=REPO, capture_output=True,
                               timeout=300)
            for proc in sshds:
                proc.terminate()
                proc.wait(timeout=30)
            _remove_users()
            for folder, mode in opened:
                folder.chmod(mode)
    wall = time.monotonic() - started
    print(f"rehearsal wall {wall:.0f}s (first ray up {up_s:.0f}s); worker nodes {node_times}")

    # The study ran on the worker the autoscaler started after the job: the first trial waited for it.
    assert [w["ip"] for w in node_times["workers"]] == [WORKER_IP], node_times
    waited_s = (node_times["workers"][0]["start_ms"] - node_times["job_start_ms"]) / 1000
    assert waited_s > 60, f"the worker joined {waited_s:.0f}s after the job started: not a cold start"
    assert len(trials) == 2 and all(r.data.tags.get(STATE_TAG) in ("completed", "pruned") for r in trials), \
        [(r.info.run_name, r.data.tags.get(STATE_TAG)) for r in trials]
    assert champion.source and champion.run_id
    # A second `ray up` applied the changed setting (a new server process with it) and kept the database.
    assert second_server_pid != server_pid and server_cmdline[server_cmdline.index("--workers") + 1] == "1"
    # The head's tracking runs as its own user, whose data and passwords the Ray user (every job on the head)
    # cannot read, nor the server's or PostgreSQL's environment; the same passwords after the second `ray up`.
    assert isolation["owners"] == dict.fromkeys(isolation["owners"], TRACKING_USER), isolation
    assert isolation["files"] == {".": ("0o700", TRACKING_USER), "pgdata": ("0o700", TRACKING_USER),
                                  **{n: ("0o600", TRACKING_USER) for n in secret_names}}, isolation
    assert not any(isolation["ray user reads"].values()), isolation
    assert all(kept_secrets.values()), kept_secrets
    # Jobs on the head sign in as the jobs' account, from the Ray user's own 0600 copy of its password.
    assert jobs_file_facts == ("0o600", USERS[HEAD_IP], True), jobs_file_facts
    assert f"MLFLOW_TRACKING_USERNAME={JOBS_ACCOUNT}" in head_env and "admin" not in head_env, head_env
    assert jobs_grants == {"admin": False, "experiment": "MANAGE", "registered_model": "MANAGE"}, jobs_grants
    assert jobs_see_study
    # Data, study state, checkpoints and models in the bucket; nothing on the nodes but the head's database.
    assert "data/manifest.json" in keys
    assert f"runs/{STUDY}/study.json" in keys
    assert any(k.startswith(f"runs/{STUDY}/train/") and k.endswith("/checkpoint.pt") for k in keys)
    assert any(k.startswith("mlflow/") and k.endswith("MLmodel") for k in keys)
    assert homes == {u: [] for u in USERS.values()} and tmps == {u: [] for u in USERS.values()}, (homes, tmps)
    assert left == [], f"processes left after ray down: {left}"
    assert never_shipped == [], f"file_mounts shipped {never_shipped}"
