"""cluster.yaml validates against the installed Ray's cluster-launcher schema (offline)."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parent.parent


def test_cluster_yaml_is_a_valid_launcher_config():
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))  # raises on schema errors
    assert cfg["docker"]["image"].startswith("rayproject/ray:2.60")
    assert any("pip install" in c for c in cfg["setup_commands"])
