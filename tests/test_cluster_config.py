"""cluster.yaml and cluster-onprem.yaml, offline: valid for Ray's own launcher, one pinned runtime, the same
set-up scripts, least-privilege node profiles, a head that takes no trials, and the tracking server command
that cluster/tracking.sh builds passing ``mfcon tracking-server``'s own checks.

tests/test_cluster_rehearsal.py runs cluster-onprem.yaml for real; what only AWS could show is listed there.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parent.parent
TEXT = (REPO / "cluster.yaml").read_text()
CFG = yaml.safe_load(TEXT)
ONPREM = yaml.safe_load((REPO / "cluster-onprem.yaml").read_text())
LOCK = (REPO / "requirements.lock").read_text()
COMMAND_KEYS = ("setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands")
# (vCPUs, GPUs) of the AWS instance types a node type may use (AWS instance-type specifications).
INSTANCE_SIZES = {"m6i.xlarge": (4, 0), "m6i.2xlarge": (8, 0), "m6i.4xlarge": (16, 0), "g5.xlarge": (4, 1),
                  "g5.2xlarge": (8, 1), "g5.12xlarge": (48, 4), "g5.48xlarge": (192, 8), "g6.12xlarge": (48, 4),
                  "p4d.24xlarge": (96, 8), "p5.48xlarge": (192, 8)}


@pytest.mark.parametrize("cfg", [CFG, ONPREM], ids=["cluster.yaml", "cluster-onprem.yaml"])
def test_both_configs_pass_rays_own_validation(cfg):
    validate_config(prepare_config(cfg))  # raises on schema errors


def test_both_clusters_run_the_same_setup_and_start_scripts():
    for key in COMMAND_KEYS:
        assert CFG[key] == ONPREM[key], key
    scripts = {m for key in COMMAND_KEYS for c in CFG[key] for m in re.findall(r"cluster/[\w.]+", c)}
    assert scripts == {"cluster/setup_node.sh", "cluster/start_head.sh", "cluster/start_worker.sh"}
    assert all((REPO / s).is_file() for s in scripts)


@pytest.mark.parametrize("cfg", [CFG, ONPREM], ids=["cluster.yaml", "cluster-onprem.yaml"])
def test_file_mounts_never_ship_the_venv_git_or_run_outputs(cfg):
    excluded = set(cfg["rsync_exclude"])
    assert {".venv", ".git", "runs", "demo_out", "test-artifacts"} <= excluded
    assert ".gitignore" in cfg["rsync_filter"]
    assert "." in cfg["file_mounts"].values()


def test_the_gpu_stack_is_named_explicitly():
    assert CFG["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"  # Ray and Python as the lock
    for name, node_type in CFG["available_node_types"].items():
        assert node_type["node_config"].get("ImageId", "").startswith("ami-"), f"{name}: no ImageId"
    assert "base-oss-nvidia-driver-gpu-ubuntu-22.04" in TEXT and "580" in TEXT
    setup = (REPO / "cluster" / "setup_node.sh").read_text()
    assert "nvidia-smi" in setup and "-lt 580" in setup  # an older driver stops the set-up
    assert "torch==2.11.0" in LOCK and "nvidia-cuda-runtime==13." in LOCK  # the CUDA 13 build needs 580+


def _pins() -> dict[str, str]:
    return {re.sub(r"[-_.]+", "-", m.group(1)).lower(): m.group(2)
            for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\$", LOCK, re.M)}


def test_the_lock_pins_every_requirement_of_pyproject_with_hashes():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [r for extra in ("server", "test") for r in
                                        project["optional-dependencies"][extra]]
    pins = _pins()
    for text in wanted:
        req = Requirement(text)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is not in requirements.lock: run make lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{text} vs locked {pins[name]}: make lock"
    entries = re.split(r"\n(?=[A-Za-z0-9])", LOCK.split("\n", 2)[2])
    assert all("--hash=sha256:" in e for e in entries if "==" in e), "every pin carries its hashes"


def test_ci_and_every_node_install_the_lock():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^\$\(STAMP\): \$\(LOCK\)", makefile, re.M), "the venv is rebuilt when the lock changes"
    assert "--require-hashes --no-deps -r $(LOCK)" in makefile and "--no-deps -e ." in makefile
    runtime = (REPO / "cluster" / "runtime.sh").read_text()
    assert "--require-hashes --no-deps -r" in runtime and "requirements.lock" in runtime
    assert "--no-deps" in runtime and "--force-reinstall" in runtime  # the project as shipped, not editable
    setup = (REPO / "cluster" / "setup_node.sh").read_text()  # workers as their user, the head as root
    assert 'bash "$src/cluster/runtime.sh" "$venv" "$src"' in setup
    assert 'bash "$src/cluster/runtime.sh" "$MFCON_HEAD_DIR/venv"' in (REPO / "cluster" / "head_root.sh").read_text()


def test_the_lock_check_reads_every_pin():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lock_check", REPO / "cluster" / "lock_check.py")
    lock_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock_check)
    assert lock_check.pins(LOCK) == _pins()
    assert lock_check.mismatches("surely-not-a-package==1.0 \\\n") == ["surely-not-a-package: locked 1.0, found None"]


def test_the_head_takes_no_trials_and_workers_declare_their_true_sizes():
    head = CFG["head_node_type"]
    assert CFG["available_node_types"][head]["resources"] == {"CPU": 0, "GPU": 0, "memory": 0}
    start = (REPO / "cluster" / "start_head.sh").read_text()
    assert "--num-cpus=0 --num-gpus=0 --memory=0" in start  # on-prem too (its node type cannot say it)
    for name, node_type in CFG["available_node_types"].items():
        instance = node_type["node_config"]["InstanceType"]
        assert instance in INSTANCE_SIZES, f"{name}: add {instance}'s vCPUs and GPUs to INSTANCE_SIZES"
        if name != head:
            assert (node_type["resources"]["CPU"], node_type["resources"].get("GPU", 0)) == INSTANCE_SIZES[instance]
            assert node_type["min_workers"] == 0 and node_type["max_workers"] > 0  # scale up from zero


def _policy(title: str) -> dict:
    doc = (REPO / "docs" / "cluster.md").read_text()
    section = doc.split(f"**{title}**", 1)[1]
    return json.loads(section.split("```json", 1)[1].split("```", 1)[0])


def test_each_node_type_gets_its_own_least_privilege_profile():
    profiles = {n: t["node_config"]["IamInstanceProfile"]["Arn"] for n, t in CFG["available_node_types"].items()}
    assert profiles["head"].endswith("/mfcon-head") and profiles["gpu_worker"].endswith("/mfcon-worker")
    assert not re.search(r"ray-autoscaler-v1", TEXT)
    worker = _policy("Workers")
    actions = {a for s in worker["Statement"] for a in s["Action"]}
    assert actions == {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"}
    by_sid = {s["Sid"]: s for s in worker["Statement"]}
    assert by_sid["ReadShards"]["Action"] == ["s3:GetObject"]
    assert all("*" not in s["Resource"].split(":::", 1)[1].split("/", 1)[0] for s in worker["Statement"])
    head = _policy("Head")
    head_actions = {a for s in head["Statement"] for a in s["Action"]}
    assert "iam:PassRole" in head_actions and "ec2:RunInstances" in head_actions
    assert not any(a in ("s3:*", "ec2:*", "iam:*") for a in head_actions)
    passrole = next(s for s in head["Statement"] if "iam:PassRole" in s["Action"])
    assert passrole["Resource"].endswith("role/mfcon-worker")


def _server_argv(env: dict[str, str], db: str = "/var/lib/mfcon-db") -> list[str]:
    """The tracking-server command cluster/tracking.sh builds for the head."""
    script = REPO / "cluster" / "tracking.sh"
    src = script.read_text()
    body = src.split("server_command() {", 1)[1].split("\n}\n", 1)[0]
    done = subprocess.run(["bash", "-c", f"set -eu; venv=/v; db={db}\n{body}"], env=env,
                          capture_output=True, text=True, check=True)
    return shlex.split(done.stdout)


def test_the_head_serves_mlflow_on_its_private_ip_with_postgres_on_a_socket_and_s3(tmp_path):
    import argparse

    from mfcon.cli.tracking_server import add_commands, server_spec
    from mfcon.tracking.server import server_launch

    db = tmp_path / "mfcon-db"
    db.mkdir(mode=0o700)
    password = "cluster-admin-" + "x" * 16
    (db / "mlflow_admin_password").write_text(password + "\n")
    (db / "mlflow_admin_password").chmod(0o600)
    argv = _server_argv({"MFCON_NODE_IP": "10.0.1.23", "MFCON_ARTIFACTS": "s3://mfcon-studio-artifacts/mlflow",
                         "PATH": "/usr/bin:/bin"}, str(db))
    assert argv[:3] == ["/v/bin/python", "-m", "mfcon.cli.tracking_server"]
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tracking-server", *argv[3:]])
    launch = server_launch(server_spec(args), {"PGPASSWORD": "x"}, ["mlflow"])  # refuses 0.0.0.0, public IPs
    out = list(launch.argv)
    assert out[out.index("--host") + 1] == "10.0.1.23"
    assert out[out.index("--backend-store-uri") + 1] == f"postgresql+psycopg2://mfcon@/mlflow?host={db}/run"
    assert out[out.index("--artifacts-destination") + 1].startswith("s3://")
    assert launch.env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    # Authenticated by default: MLflow's basic-auth app, the admin password from its file, never in argv.
    assert out[out.index("--app-name") + 1] == "basic-auth"
    assert password not in " ".join(out) and password not in " ".join(argv)


def test_no_password_in_any_config_and_postgres_has_no_tcp():
    tracking = (REPO / "cluster" / "tracking.sh").read_text()
    assert "listen_addresses=''" in tracking  # Unix socket only
    assert 'PGPASSWORD=$(cat "$db/pg_password")' in tracking
    assert '"$db/pg_password"' in tracking and "--pwfile=" in tracking  # the password lives with the data
    for text in (TEXT, (REPO / "cluster-onprem.yaml").read_text(), tracking):
        assert not re.search(r"postgresql://[^@\s]*:[^@\s]*@", text), "a password in a database URI"
        assert not re.search(r"--host[= ]+(0\.0\.0\.0|::|\[::\])", text)
    assert "-v /home/ubuntu/mfcon-db:/var/lib/mfcon-db" in CFG["docker"]["head_run_options"]


def _head_settings() -> dict[str, str]:
    done = subprocess.run(["bash", "-c", f"source {REPO / 'cluster' / 'head_common.sh'}; set | grep ^MFCON_"],
                          capture_output=True, text=True, check=True)
    return dict(line.split("=", 1) for line in done.stdout.split())


def test_the_head_tracking_runs_as_its_own_user_behind_one_sudo_rule():
    """What tests/test_cluster_rehearsal.py checks on running processes, on the scripts themselves."""
    head = _head_settings()
    assert head["MFCON_TRACKING_USER"] == "mfcon-db" and head["MFCON_JOBS_ACCOUNT"] == "ray-jobs"
    assert f"-v /home/ubuntu/mfcon-db:{head['MFCON_DB_DIR']}" in CFG["docker"]["head_run_options"]
    root = (REPO / "cluster" / "head_root.sh").read_text()
    assert "useradd --system" in root and 'chmod 700 "$db"' in root
    assert "$ray_user ALL=($user) NOPASSWD: $MFCON_HEAD_DIR/tracking.sh" in root and "visudo -cqf" in root
    assert 'install -o root -g root -m 755 "$src/cluster/tracking.sh"' in root  # the Ray user cannot edit it
    tracking = (REPO / "cluster" / "tracking.sh").read_text()
    assert 'venv=$MFCON_HEAD_DIR/venv' in tracking and '[ "$(id -un)" = "$MFCON_TRACKING_USER" ]' in tracking
    assert 'pgrep -u "$(cat "$db/ray-uid")" -x gcs_server' in tracking  # Ray is another user's
    start = (REPO / "cluster" / "start_head.sh").read_text()
    assert "MLFLOW_TRACKING_USERNAME=$MFCON_JOBS_ACCOUNT" in start and "admin" not in start.split("cat >>", 1)[1]
    assert 'tracking start "$(id -u)"' in start


@pytest.mark.parametrize("name, value", [("MFCON_ARTIFACTS", "s3://b/m; cat /var/lib/mfcon-db/pg_password"),
                                         ("MFCON_ARTIFACTS", "file:///var/lib/mfcon-db"),
                                         ("MFCON_ARTIFACTS", "/var/lib/mfcon-db"),
                                         ("MFCON_NODE_IP", "10.0.0.1 --x $(id)"),
                                         ("MFCON_MLFLOW_WORKERS", "2;id")])
def test_the_ray_users_settings_never_reach_the_tracking_users_shell(name, value):
    """The settings pass sudo (env_keep) into a command line the tracking user's shell runs: checked first."""
    body = (REPO / "cluster" / "tracking.sh").read_text().split("check_settings() {", 1)[1].split("\n}\n", 1)[0]
    good = {"MFCON_NODE_IP": "10.0.1.23", "MFCON_ARTIFACTS": "s3://mfcon-studio-artifacts/mlflow",
            "PATH": "/usr/bin:/bin"}
    ok = subprocess.run(["bash", "-c", f"set -eu\n{body}"], env=good, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(["bash", "-c", f"set -eu\n{body}"], env={**good, name: value}, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and name in bad.stderr, bad.stderr


def test_every_node_gets_tracking_token_and_cold_start_settings_before_ray_starts():
    env_script = (REPO / "cluster" / "node_env.sh").read_text()
    for line in ("export MLFLOW_TRACKING_URI=http://$head_ip:", "export RAY_AUTH_MODE=token",
                 "export RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=${MFCON_WORKER_GROUP_START_TIMEOUT_S:-1800}"):
        assert line in env_script, line
    for name in ("start_head.sh", "start_worker.sh"):
        script = (REPO / "cluster" / name).read_text()
        assert script.index("node_env.sh") < script.index("source ~/mfcon.env") < script.index("ray start")
    assert "-e RAY_AUTH_MODE=token" in CFG["docker"]["run_options"]
    assert CFG["file_mounts"].get("/home/ray/.ray/auth_token") == "~/.ray/auth_token"
    assert ONPREM["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def test_the_readme_job_command_keeps_everything_in_the_bucket():
    readme = (REPO / "README.md").read_text().split("## On a Ray cluster", 1)[1].split("\n## ", 1)[0]
    study = next(line for line in readme.splitlines() if "pipelines/study.py" in line and "ray job submit" in line)
    assert "RAY_AUTH_MODE=token ray job submit" in study
    assert re.search(r"--data s3://\S+ --workdir s3://\S+ --address auto", study)
    assert "ray up cluster-onprem.yaml" in readme and "ray down cluster-onprem.yaml" in readme


def test_comments_cite_only_the_repository():
    for path in ("cluster.yaml", "cluster-onprem.yaml", "docs/cluster.md", *[f"cluster/{p.name}" for p in
                                                                            (REPO / "cluster").iterdir()]):
        assert not re.search(r"/work/|shared/|RAY_NOTES|STYLE\.md", (REPO / path).read_text()), path
