"""cluster.yaml: a valid launcher config (offline) whose head serves MLflow safely to every node.

The head's tracking-server command is parsed by ``mfcon tracking-server``'s own parser and
built by ``mfcon.tracking.server`` (with the head's IP as ``hostname -I`` would print it), so
the command the head runs passes the same checks as a person typing it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from mfcon.cli.tracking_server import add_commands, server_spec
from mfcon.tracking.server import server_launch
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parent.parent
TEXT = (REPO / "cluster.yaml").read_text()
CFG = yaml.safe_load(TEXT)
HEAD_IP = "$(hostname -I | awk '{print $1}')"
SAMPLE_HEAD_IP = "10.0.1.23"  # what `hostname -I` prints first on a VPC node
# (vCPUs, GPUs) of the AWS instance types a node type may use (AWS instance-type specifications).
INSTANCE_SIZES = {"m6i.xlarge": (4, 0), "m6i.2xlarge": (8, 0), "m6i.4xlarge": (16, 0), "g5.xlarge": (4, 1),
                  "g5.2xlarge": (8, 1), "g5.12xlarge": (48, 4), "g5.48xlarge": (192, 8), "g6.12xlarge": (48, 4),
                  "p4d.24xlarge": (96, 8), "p5.48xlarge": (192, 8)}


def _head_commands() -> list[str]:
    return CFG.get("head_setup_commands", []) + CFG["head_start_ray_commands"]


def _server_command() -> str:
    found = [c for c in _head_commands() if "tracking_server" in c or "tracking-server" in c or "mlflow server" in c]
    assert len(found) == 1, f"expected one MLflow server command on the head, found {len(found)}"
    return found[0]


def _server_args() -> list[str]:
    """The options given to the tracking-server command, shell variables set as the command sets them."""
    command = _server_command()
    for name, value in re.findall(r"\b([A-Z_]+)=(\S+?);", command):
        command = command.replace(f"${name}", value)
    command = command.replace(HEAD_IP, SAMPLE_HEAD_IP)
    tail = re.split(r"tracking_server|tracking-server", command, maxsplit=1)[1]
    return shlex.split(tail.split(">", 1)[0])


def test_cluster_yaml_is_a_valid_launcher_config():
    validate_config(prepare_config(CFG))  # raises on schema errors
    assert CFG["docker"]["image"].startswith("rayproject/ray:2.60")
    assert any("pip install" in c for c in CFG["setup_commands"])


def test_head_starts_the_mlflow_server_on_its_private_ip_with_postgres_and_s3():
    import argparse

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tracking-server", *_server_args()])
    spec = server_spec(args)
    launch = server_launch(spec, {"PGPASSWORD": "x"}, ["mlflow"])  # refuses 0.0.0.0, public IPs, relative paths
    argv = list(launch.argv)
    assert argv[argv.index("--host") + 1] == SAMPLE_HEAD_IP
    assert argv[argv.index("--backend-store-uri") + 1].startswith("postgresql+psycopg2://mfcon@127.0.0.1:5432/")
    assert argv[argv.index("--artifacts-destination") + 1].startswith("s3://")
    assert launch.env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert args.port == 5000


def test_nothing_binds_mlflow_to_every_interface_and_no_password_is_written():
    server = _server_command()
    assert HEAD_IP in server and "0.0.0.0" not in server and "::" not in server
    assert not re.search(r"--host[= ]+(0\.0\.0\.0|::|\[::\])", TEXT)
    assert re.search(r'PGPASSWORD="\$\(cat ~/\.mfcon/pg_password\)"', server)
    assert not re.search(r"postgresql://[^@\s]*:[^@\s]*@", TEXT), "a password in a database URI"
    pg_start = next(c for c in _head_commands() if "pg_ctl" in c and " start" in c)
    assert "listen_addresses=127.0.0.1" in pg_start


@pytest.mark.parametrize("commands, ip", [("head_start_ray_commands", HEAD_IP),
                                          ("worker_start_ray_commands", "$RAY_HEAD_IP")])
def test_every_node_gets_the_tracking_uri_before_ray_starts(commands, ip):
    cmds = CFG[commands]
    writes = [i for i, c in enumerate(cmds) if f"MLFLOW_TRACKING_URI=http://{ip}:5000" in c and "~/mfcon.env" in c]
    starts = [i for i, c in enumerate(cmds) if "ray start" in c]
    assert writes and starts and writes[0] < starts[0], commands
    assert all("source ~/mfcon.env" in cmds[i] for i in starts), "the raylet (and every trial) inherits the URI"
    assert any("mfcon.env" in c and ".bashrc" in c for c in CFG["setup_commands"]), "interactive shells too"


def test_node_types_declare_their_true_cpu_and_gpu_counts():
    prepared = prepare_config(CFG)["available_node_types"]
    for name, node_type in CFG["available_node_types"].items():
        instance = node_type["node_config"]["InstanceType"]
        assert instance in INSTANCE_SIZES, f"{name}: add {instance}'s vCPUs and GPUs to INSTANCE_SIZES"
        cpus, gpus = INSTANCE_SIZES[instance]
        assert (node_type["resources"].get("CPU"), node_type["resources"].get("GPU", 0)) == (cpus, gpus), name
        assert prepared[name]["resources"] == node_type["resources"], name
    gpu_types = [n for n, t in CFG["available_node_types"].items() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(CFG["available_node_types"][n]["max_workers"] > 0 for n in gpu_types)


def test_ray_token_auth_is_on_for_head_workers_and_the_job_submitter():
    assert "-e RAY_AUTH_MODE=token" in CFG["docker"]["run_options"]  # every container: head and workers
    for key in ("head_run_options", "worker_run_options"):
        assert not any("RAY_AUTH_MODE" in o for o in CFG["docker"].get(key, [])), key
    for node_type in CFG["available_node_types"].values():
        assert "RAY_AUTH_MODE" not in str(node_type.get("docker", {}))
    assert CFG["file_mounts"].get("/home/ray/.ray/auth_token") == "~/.ray/auth_token"
    assert "RAY_AUTH_MODE=token ray job submit" in TEXT and "RAY_AUTH_MODE=disabled" not in TEXT


def test_comments_cite_only_the_repository():
    assert not re.search(r"/work/|shared/|RAY_NOTES|STYLE\.md", TEXT)
