"""Attacks on ``mfcon verify`` / ``mfcon embed`` through the model they load (docs/security.md).

Each case is a crafted model or registry state, made the way an attacker with write access to the
registry or the artifact store would make it: an honest model logged by ``log_speaker_model``, then
its files changed in the artifact store. Where the attack is on the model's *structure* (its
``MLmodel``), the attacker also rewrites the checksums recorded on the logged model, so the structural
check is shown to hold on its own. Every case asserts a clear refusal naming the model and the
problem, and that the marker file the crafted code would write never appears.

Loading builds the embedder from the checkpoint (``weights_only=True``) and the feature config
directly: nothing from the model directory is imported or executed, and MLflow's pyfunc loader
chain is never called (``test_security.py`` scans the sources for that).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mfcon.cli import main
from mfcon.config import FeatureConfig
from mfcon.serving import embedder_of, load_embedder, log_speaker_model, use_tracking_uri
from mfcon.tracking import default_tracking_uri
from mlflow.tracking import MlflowClient
from registry_fixtures import export_micro_model, make_tone_corpus

try:
    from mfcon.model_files import FILES_TAG
except ImportError:  # older models recorded no checksums
    FILES_TAG = "mfcon.model_files_sha256"

MODEL_NAME = "mfcon-speaker"


class RunsCode:
    """Unpickling this writes ``marker``: what a crafted pickle would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


class PickledModel(mlflow.pyfunc.PythonModel):
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)

    def predict(self, context, model_input, params=None):
        return model_input


def _evil_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('code ran')\n"


# ---------------------------------------------------------------- the store and the attacker's tools

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks")
    uri = default_tracking_uri(root)
    client = MlflowClient(uri)
    exp = client.create_experiment("attacks", artifact_location=(root / "mlartifacts").as_uri())
    honest = export_micro_model(root / "honest" / "best.pt")  # stored as artifacts/best.pt
    other = export_micro_model(root / "elsewhere" / "other.pt", degenerate=True)  # a checkpoint outside the model
    wavs = make_tone_corpus(root / "wav", n_speakers=2, utts_per_speaker=1, seconds=1.0)
    pair = [root / "wav" / u for spk in sorted(wavs) for u in wavs[spk]]
    return {"root": root, "uri": uri, "client": client, "exp": exp, "honest": honest, "other": other,
            "marker": root / "code-ran", "pair": pair}


def _logged(store, tag: str) -> tuple[str, Path]:
    """An honest model as log_speaker_model writes it: (models:/m-... URI, its folder in the artifact store)."""
    client = store["client"]
    uri = log_speaker_model(client, client.create_run(store["exp"], run_name=tag).info.run_id, store["honest"],
                            FeatureConfig(), tracking_uri=store["uri"])
    return uri, store["root"] / "mlartifacts" / "models" / uri.rsplit("/", 1)[-1] / "artifacts"


def _rerecord(store, uri: str, folder: Path) -> None:
    """The attacker also has tag access: the recorded checksums now match the crafted files."""
    digests = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != "registered_model_meta":  # a symlink is hashed as what it points at: what a copy of the folder holds
            digests[path.relative_to(folder).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    store["client"].set_logged_model_tags(uri.rsplit("/", 1)[-1], {FILES_TAG: json.dumps(digests, sort_keys=True)})


def _mlmodel(folder: Path) -> dict:
    return yaml.safe_load((folder / "MLmodel").read_text())


def _write_mlmodel(folder: Path, meta: dict) -> None:
    (folder / "MLmodel").write_text(yaml.safe_dump(meta))


def _flavor(meta: dict) -> dict:
    return meta["flavors"]["python_function"]


# ---------------------------------------------------------------- the attacks

def attack_data_key(store, uri, folder):
    """``data: inner``: MLflow reads a second MLmodel from <model>/inner/, naming inner/evil.py."""
    inner = folder / "inner"
    inner.mkdir()
    meta = _mlmodel(folder)
    inner_meta = json.loads(json.dumps(meta))
    _flavor(inner_meta)["model_code_path"] = "evil.py"
    _write_mlmodel(inner, inner_meta)
    (inner / "evil.py").write_text(_evil_code(store["marker"]) + (folder / "speaker_embedder.py").read_text())
    shutil.copytree(folder / "artifacts", inner / "artifacts")
    _flavor(meta)["data"] = "inner"
    _write_mlmodel(folder, meta)
    return True


def attack_loader_module(store, uri, folder):
    """Another pyfunc loader: mlflow.pytorch torch.load()s <data> with full unpickling."""
    meta = _mlmodel(folder)
    _flavor(meta).update(loader_module="mlflow.pytorch", data="data")
    _flavor(meta).pop("model_code_path")
    meta["flavors"]["pytorch"] = {"model_data": "data", "pytorch_version": str(torch.__version__),
                                  "pickle_module_name": "mlflow.pytorch.pickle_module", "code": None}
    (folder / "data").mkdir()
    torch.save(RunsCode(store["marker"]), folder / "data" / "model.pth")
    _write_mlmodel(folder, meta)
    return True


def attack_code_paths(store, uri, folder):
    """``code: code``: a folder put on sys.path ahead of mfcon, shadowing mfcon.serving."""
    shadow = folder / "code" / "mfcon" / "serving"
    shadow.mkdir(parents=True)
    (folder / "code" / "mfcon" / "__init__.py").write_text("")
    (shadow / "__init__.py").write_text(_evil_code(store["marker"]) + "SpeakerEmbedder = object\n")
    meta = _mlmodel(folder)
    _flavor(meta)["code"] = "code"
    _write_mlmodel(folder, meta)
    return True


def attack_pickled_python_model(store, uri, folder):
    """A pyfunc whose python_model is a cloudpickle that runs code (logged with MLflow, not mfcon)."""
    with use_tracking_uri(store["uri"]), mlflow.start_run(experiment_id=store["exp"], run_name="pickled"):
        return mlflow.pyfunc.log_model(name="model", python_model=PickledModel(store["marker"]),
                                       pip_requirements=["mlflow"]).model_uri


def attack_cloudpickle_keys(store, uri, folder):
    """mfcon's entry file, plus a pickled python_model and its cloudpickle settings beside it."""
    meta = _mlmodel(folder)
    (folder / "python_model.pkl").write_bytes(__import__("pickle").dumps(RunsCode(store["marker"])))
    _flavor(meta).update(python_model="python_model.pkl", python_model_compression=None)
    _write_mlmodel(folder, meta)
    return True


def attack_absolute_artifact(store, uri, folder):
    """The checkpoint artifact is an absolute path: any local checkpoint would load."""
    meta = _mlmodel(folder)
    _flavor(meta)["artifacts"]["checkpoint"]["path"] = str(store["other"])
    _write_mlmodel(folder, meta)
    return True


def attack_dotdot_artifact(store, uri, folder):
    """The checkpoint artifact climbs out of the model directory with ``..``."""
    meta = _mlmodel(folder)
    _flavor(meta)["artifacts"]["checkpoint"]["path"] = "../" * 40 + str(store["other"]).lstrip("/")  # from any copy
    _write_mlmodel(folder, meta)
    return True


def attack_symlink_out(store, uri, folder):
    """artifacts/best.pt is a symlink to a checkpoint outside the model directory."""
    (folder / "artifacts" / "best.pt").unlink()
    (folder / "artifacts" / "best.pt").symlink_to(store["other"])
    return True


def attack_swapped_checkpoint(store, uri, folder):
    """Other weights in place of the logged checkpoint (checksums left as recorded)."""
    shutil.copyfile(store["other"], folder / "artifacts" / "best.pt")
    return False


def attack_pickled_checkpoint(store, uri, folder):
    """A checkpoint whose pickled object runs code, and checksums re-recorded to match."""
    torch.save({"model": RunsCode(store["marker"])}, folder / "artifacts" / "best.pt")
    return True


def attack_changed_entry(store, uri, folder):
    """The models-from-code entry file runs the attacker's code first."""
    entry = folder / "speaker_embedder.py"
    entry.write_text(_evil_code(store["marker"]) + entry.read_text())
    return True


def attack_changed_feature_config(store, uri, folder):
    """Other front-end settings than the model was trained with (checksums left as recorded)."""
    path = folder / "artifacts" / "feature_config.json"
    cfg = json.loads(path.read_text())
    cfg["frame_shift_ms"] = cfg["frame_shift_ms"] * 2
    path.write_text(json.dumps(cfg))
    return False


def attack_no_checksums(store, uri, folder):
    """A model logged without recorded checksums (by hand, or by an older mfcon): nothing to check against."""
    store["client"].delete_logged_model_tag(uri.rsplit("/", 1)[-1], FILES_TAG) \
        if FILES_TAG in store["client"].get_logged_model(uri.rsplit("/", 1)[-1]).tags else None
    return False


ATTACKS = {
    "data_key": (attack_data_key, r"'data' key"),
    "loader_module": (attack_loader_module, r"loader 'mlflow\.pytorch'|flavors? .*pytorch"),
    "code_paths": (attack_code_paths, r"code folder"),
    "pickled_python_model": (attack_pickled_python_model, r"loader 'mlflow\.pyfunc\.model'"),
    "cloudpickle_keys": (attack_cloudpickle_keys, r"python_model"),
    "absolute_artifact": (attack_absolute_artifact, r"artifact 'checkpoint'.*absolute"),
    "dotdot_artifact": (attack_dotdot_artifact, r"artifact 'checkpoint'.*outside the model directory"),
    "symlink_out": (attack_symlink_out, r"artifacts/best\.pt.*symlink"),
    "swapped_checkpoint": (attack_swapped_checkpoint, r"artifacts/best\.pt does not match the sha256 recorded"),
    "pickled_checkpoint": (attack_pickled_checkpoint, r"best\.pt: refused: .*pickled objects"),
    "changed_entry": (attack_changed_entry, r"entry file speaker_embedder\.py is not mfcon's"),
    "changed_feature_config": (attack_changed_feature_config,
                               r"artifacts/feature_config\.json does not match the sha256 recorded"),
    "no_checksums": (attack_no_checksums, r"no checksums recorded"),
}


@pytest.fixture(autouse=True)
def no_marker(store):
    store["marker"].unlink(missing_ok=True)
    yield
    assert not store["marker"].exists(), "loading the crafted model ran its code"


def _outcome(uri: str, store) -> str:
    """'loaded', or 'refused: <message>' (any mfcon input error)."""
    try:
        embedder_of(load_embedder(uri, store["uri"], device="cpu"))
    except ValueError as e:
        return f"refused: {type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - an attack that crashes MLflow is not a clear refusal
        return f"crashed: {type(e).__name__}: {e}"
    return "loaded"


@pytest.mark.parametrize("name", list(ATTACKS))
def test_a_crafted_model_is_refused_and_runs_nothing(name, store):
    attack, expect = ATTACKS[name]
    uri, folder = _logged(store, name)
    crafted = attack(store, uri, folder)
    if isinstance(crafted, str):  # the attack logged a model of its own
        uri = crafted
    elif crafted:
        _rerecord(store, uri, folder)
    outcome = _outcome(uri, store)
    assert not store["marker"].exists(), f"{name}: loading the crafted model ran its code ({outcome})"
    assert outcome.startswith("refused: UntrustedModelError") or "CheckpointError" in outcome, f"{name}: {outcome}"
    assert uri in outcome, f"{name}: the refusal does not name the model: {outcome}"
    assert re.search(expect, outcome), f"{name}: {outcome}"


def test_the_honest_model_loads_and_embeds(store):
    uri, _ = _logged(store, "honest")
    model = embedder_of(load_embedder(uri, store["uri"], device="cpu"))
    state = torch.load(store["honest"], weights_only=True)
    assert model.model_config.embed_dim == state["model_config"]["embed_dim"]
    emb = model.embed_features([np.zeros((200, 80), dtype=np.float32)])
    assert emb.shape == (1, model.model_config.embed_dim)


# ---------------------------------------------------------------- through the registry and the CLI

def _register_champion(store, uri: str) -> str:
    client = store["client"]
    if not client.search_registered_models(f"name = '{MODEL_NAME}'"):
        client.create_registered_model(MODEL_NAME)
    with use_tracking_uri(store["uri"]):
        mv = client.create_model_version(MODEL_NAME, source=uri, model_id=uri.rsplit("/", 1)[-1],
                                         tags={"eer_threshold": "0.5", "score_mean": json.dumps([0.0] * 32)})
    client.set_registered_model_alias(MODEL_NAME, "champion", mv.version)
    return str(mv.version)


@pytest.mark.parametrize("command", ["verify", "embed"])
def test_mfcon_verify_and_embed_refuse_a_crafted_champion(command, store, capsys, tmp_path):
    """Registry state: the ``champion`` alias was moved to a version whose model has the ``data:`` hole."""
    uri, folder = _logged(store, f"champion-{command}")
    attack_data_key(store, uri, folder)
    _rerecord(store, uri, folder)
    version = _register_champion(store, uri)
    argv = (["verify", *map(str, store["pair"])] if command == "verify"
            else ["embed", str(store["root"] / "wav"), "--out", str(tmp_path / "emb.parquet")])
    code = main([*argv, "--workdir", str(store["root"])])
    err = capsys.readouterr().err
    assert not store["marker"].exists(), "mfcon " + command + " ran the crafted model's code"
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    assert f"models:/{MODEL_NAME}/{version}" in err and "'data' key" in err, err
    assert not (tmp_path / "emb.parquet").exists()


def test_a_cohort_swapped_after_promotion_is_refused(store, capsys):
    """The AS-norm cohort of the champion is replaced by other embeddings (or a pickle) after promotion."""
    from mfcon.serving.verify import store_cohort

    uri, _ = _logged(store, "cohort")
    version = _register_champion(store, uri)
    run_id = store["client"].get_logged_model(uri.rsplit("/", 1)[-1]).source_run_id
    cohort_uri = store_cohort(store["client"], MODEL_NAME, version, run_id, np.ones((4, 32), dtype=np.float32))
    store["client"].set_model_version_tag(MODEL_NAME, version, "score_norm", "asnorm")
    stored = next((store["root"] / "mlartifacts").rglob(cohort_uri.rsplit("/", 1)[-1]))
    stored.write_bytes(__import__("pickle").dumps(RunsCode(store["marker"])))
    code = main(["verify", *map(str, store["pair"]), "--workdir", str(store["root"])])
    err = capsys.readouterr().err
    assert not store["marker"].exists()
    assert code == 2 and "does not match its sha256 tag" in err and f"models:/{MODEL_NAME}/{version}" in err, err


def test_only_logged_model_uris_load(store):
    """A run's model loads through runs:/<run>/model; a bare folder or artifact path has no recorded checksums."""
    uri, folder = _logged(store, "uris")
    run_id = store["client"].get_logged_model(uri.rsplit("/", 1)[-1]).source_run_id
    assert embedder_of(load_embedder(f"runs:/{run_id}/model", store["uri"], device="cpu")).model_config.embed_dim == 32
    for other in (str(folder), folder.as_uri(), f"runs:/{run_id}/checkpoint"):
        with pytest.raises(ValueError, match=r"refused: mfcon loads only logged models|logged no model named"):
            load_embedder(other, store["uri"], device="cpu")
