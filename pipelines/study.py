"""Run one study (``mfcon study``) as a pipeline file, for ``ray job submit`` on a cluster (README, "On a Ray
cluster"; ``cluster/`` sets the nodes up):

    ray job submit --address http://<head-ip>:8265 --working-dir . -- python pipelines/study.py \\
        --space search_spaces/mfcon.yaml --data s3://bucket/vox1-shards --workdir s3://bucket/runs --address auto

On a cluster --data and --workdir must be object-store URIs (every node reads the shards and writes its
checkpoints; a local path is refused before anything starts), unless MFCON_SHARED_FS declares a filesystem
mounted on every node. ``--smoke-test`` runs the space as a wiring check: the tiny model, 2 trials of one
epoch, one CPU worker each, named ``<name>-smoke``.

The job driver imports the ``mfcon`` installed on the node (the one every trial uses, installed by
cluster/setup_node.sh); only a checkout without an installed package falls back to ``platform/``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

try:
    import mfcon  # noqa: F401  (the node's installed copy, the same as the trials')
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))

import yaml  # noqa: E402
from mfcon.cli import main  # noqa: E402

SMOKE = {"model_preset": "tiny", "epochs": 1,
         "data": {"speakers_per_batch": 4, "utts_per_speaker": 2, "crop_seconds": 1.0}}


def smoke_space(space: str, out_dir: str) -> str:
    """The space at its smallest: tiny model, 1 epoch, 2 trials one at a time, 1 CPU worker, no baseline."""
    doc = yaml.safe_load(Path(space).read_text())
    doc["name"] = f"{doc['name']}-smoke"
    base = doc.setdefault("base", {})
    base.update({k: v for k, v in SMOKE.items() if k != "data"})
    base.setdefault("data", {}).update(SMOKE["data"])
    base.setdefault("optim", {}).update({"warmup_steps": 2})
    base.pop("amp", None)
    doc["budget"] = {**doc.get("budget", {}), "num_samples": 2, "max_concurrent_trials": 1, "grace_period": 1,
                     "baseline": False}
    doc["resources"] = {**doc.get("resources", {}), "num_workers": 1, "cpus_per_worker": 1}
    out = Path(out_dir, Path(space).name)
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(out)


def study_argv(argv: list[str], tmp: str) -> list[str]:
    if "--smoke-test" not in argv:
        return argv
    argv = [a for a in argv if a != "--smoke-test"]
    i = argv.index("--space") + 1
    argv[i] = smoke_space(argv[i], tmp)
    return argv


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="mfcon-space-") as tmp:
        sys.exit(main(["study", *study_argv(sys.argv[1:], tmp)]))
