"""Security defaults, each checked by behaviour (docs/bad_input.md lists them).

* Checkpoints load with ``weights_only=True``: a crafted one whose pickled object
  would run code is refused with a clear error, and its code never runs.
* Served models: mfcon never calls MLflow's pyfunc loader; it builds the
  embedder from the checkpoint and feature config after checking the model's
  layout and the checksums recorded when it was logged, so a pickled
  ``python_model``, a changed entry file or a swapped checkpoint inside a
  registered model is refused by ``mfcon verify`` before anything runs (the
  full attack suite is tests/test_model_attacks.py).
* Nothing deserialises data with pickle: a source scan (every ``torch.load`` has
  ``weights_only=True``; no ``pickle``/``yaml.load``/``eval`` on data), and
  crafted shards, trial lists and MLflow params that would run code if unpickled
  or YAML-loaded are read as the data they claim to be, or refused.
* Manifest entries and trial lists cannot name files outside their folder.
* Servers bind 127.0.0.1: the test MLflow server, MLflow's ``ui``/``server``
  default, and the local Ray dashboard (``init_ray``), whose cluster keeps Ray's
  token authentication on.
* Credentials never reach MLflow params, tags, artifacts, files or logs: a study
  is started through the CLI against a real ``mlflow server`` with
  ``user:password@`` in ``--tracking-uri`` and secrets in the environment, and
  everything it leaves is scanned.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest
import torch
from mfcon.cli import main
from mfcon.cli.common import credentials_out_of_uris
from mfcon.config import FeatureConfig
from mfcon.data.corpus.voxceleb import TrialListError, read_trials
from mfcon.data.shards import ManifestError, read_manifest
from mfcon.files import file_sha256
from mfcon.serving import log_speaker_model, use_tracking_uri
from mfcon.tracking import default_tracking_uri
from mfcon.train.checkpoint import CheckpointError, load_checkpoint
from mlflow.tracking import MlflowClient
from mlflow_fixtures import DEMO_TRIALS, run_mlflow_server, write_study_store
from registry_fixtures import export_micro_model, make_tone_corpus, write_test_trials

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "platform" / "mfcon"
SPACE = """\
name: secrets
base:
  model_preset: tiny
  epochs: 2
  data: {speakers_per_batch: 2, utts_per_speaker: 2, crop_seconds: 0.5}
params:
  loss.mfcon_weight: {type: loguniform, low: 0.01, high: 1.0}
budget: {num_samples: 1, max_concurrent_trials: 1}
resources: {num_workers: 1, cpus_per_worker: 1}
"""


class RunsCode:
    """Unpickling this calls ``exec``, which writes ``marker``: what a crafted file would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


class PickledModel(mlflow.pyfunc.PythonModel):
    """A pyfunc whose cloudpickle runs code on load, as an attacker with registry access could log."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)

    def predict(self, context, model_input, params=None):
        return model_input


def cli(argv: list[object], capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse refuses an option value: exit status 2, one line on stderr
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """(corpus root, prepared data folder): 8 tone speakers x 3 utterances, prepared in-process."""
    root = tmp_path_factory.mktemp("security")
    utts = make_tone_corpus(root / "wav", n_speakers=8, utts_per_speaker=3, seconds=1.0, seed=9)
    write_test_trials(root / "trials.txt", utts, sorted(utts)[:2])
    assert main(["prepare", "--corpus", str(root / "wav"), "--test-trials", str(root / "trials.txt"),
                 "--dev-speakers", "2", "--out", str(root / "data"), "--workers", "0"]) == 0
    return root / "wav", root / "data"


# ---------------------------------------------------------------- checkpoints

def test_a_checkpoint_holding_a_pickled_object_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.pt"
    torch.save({"epoch": 3, "model": RunsCode(marker)}, crafted)
    legacy = tmp_path / "legacy.pt"  # a bare pickle, the pre-zip torch format
    legacy.write_bytes(pickle.dumps({"model": RunsCode(marker)}))

    with pytest.raises(CheckpointError, match=r"crafted\.pt: refused: .*pickled objects .*\(exec\).*weights_only=True"):
        load_checkpoint(crafted)
    with pytest.raises(CheckpointError, match=r"legacy\.pt: "):
        load_checkpoint(legacy)
    assert not marker.exists(), "loading a checkpoint ran the code pickled in it"

    honest = tmp_path / "honest.pt"
    torch.save({"epoch": 3, "model": {"w": torch.ones(2)}, "history": [{"dev_eer": 9.5}]}, honest)
    assert load_checkpoint(honest)["history"] == [{"dev_eer": 9.5}]


# ---------------------------------------------------------------- served models

@pytest.fixture(scope="module")
def model_store(tmp_path_factory) -> dict:
    """An SQLite store with an honest mfcon model and three that would run code if loaded naively."""
    root = tmp_path_factory.mktemp("models")
    uri = default_tracking_uri(root)
    client = MlflowClient(uri)
    exp = client.create_experiment("models", artifact_location=(root / "mlartifacts").as_uri())
    checkpoint = export_micro_model(root / "best.pt")
    markers = {name: root / f"{name}-ran" for name in ("checkpoint", "pickle", "entry")}

    def logged(tag: str) -> tuple[str, Path]:
        uri_ = log_speaker_model(client, client.create_run(exp, run_name=tag).info.run_id, checkpoint,
                                 FeatureConfig(), tracking_uri=uri)
        return uri_, next((root / "mlartifacts").rglob(f"{uri_.rsplit('/', 1)[-1]}/artifacts/MLmodel")).parent

    honest, _ = logged("honest")
    swapped, folder = logged("checkpoint-swapped")
    torch.save({"model": RunsCode(markers["checkpoint"])}, folder / "artifacts" / "best.pt")
    entry, folder = logged("entry-changed")
    (folder / "speaker_embedder.py").write_text(
        f"open({str(markers['entry'])!r}, 'w').write('code ran')\n" + (folder / "speaker_embedder.py").read_text())
    with use_tracking_uri(uri), mlflow.start_run(experiment_id=exp, run_name="pickled"):
        pickled = mlflow.pyfunc.log_model(name="model", python_model=PickledModel(markers["pickle"]),
                                          pip_requirements=["mlflow"]).model_uri  # no inference: it would load it
    assert not any(m.exists() for m in markers.values())
    return {"root": root, "honest": honest, "checkpoint": swapped, "entry": entry, "pickle": pickled,
            "markers": markers}


@pytest.mark.parametrize("variant, expect", [
    ("checkpoint", r"refused: artifacts/best\.pt does not match the sha256 recorded when the model was logged"),
    ("pickle", r"refused: not an mfcon speaker model \(its pyfunc loader 'mlflow\.pyfunc\.model' is not MLflow's "
               r"models-from-code loader"),
    ("entry", r"refused: not an mfcon speaker model \(its entry file speaker_embedder\.py is not mfcon's"),
])
def test_verify_refuses_a_model_that_would_run_code(variant, expect, model_store, data, capsys):
    corpus, _ = data
    wavs = sorted(corpus.rglob("*.wav"))[:2]
    code, _, err = cli(["verify", *wavs, "--model", model_store[variant], "--threshold", "0.5",
                          "--workdir", model_store["root"]], capsys)
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    assert re.search(expect, err), err
    assert not any(m.exists() for m in model_store["markers"].values()), "loading the model ran its code"


def test_verify_loads_mfcon_s_own_model(model_store, data, capsys):
    corpus, _ = data
    wavs = sorted(corpus.rglob("*.wav"))[:2]
    code, out, err = cli(["verify", *wavs, "--model", model_store["honest"], "--threshold", "0.5",
                          "--workdir", model_store["root"]], capsys)
    assert code == 0, err
    assert out.startswith("score ")


# ---------------------------------------------------------------- nothing unpickles data

UNSAFE_CALLS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "cloudpickle.load", "cloudpickle.loads", "dill.load",
    "dill.loads", "joblib.load", "marshal.load", "marshal.loads", "shelve.open", "pandas.read_pickle",
    "pd.read_pickle", "yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "eval", "exec",
    "mlflow.pytorch.load_model", "mlflow.sklearn.load_model", "torch.jit.load",
}


# Loads of a file the same function has just written (nothing from outside reaches them).
SELF_WRITTEN_LOADS = {("platform/mfcon/serving/export.py", "torch.jit.load")}


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(aliases.get(node.id, node.id))
    elif parts:  # a method of a computed value, e.g. ``Wrapper(m).eval()``: never the builtin
        parts.append("<value>")
    return ".".join(reversed(parts))


def _calls(path: Path) -> list[tuple[int, str, ast.Call]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname or a.name: a.name for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module:
            aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    return [(n.lineno, _dotted(n.func, aliases), n) for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _keyword(call: ast.Call, name: str) -> object:
    found = [k.value for k in call.keywords if k.arg == name]
    return found[0].value if found and isinstance(found[0], ast.Constant) else (found[0] if found else None)


def test_no_source_deserialises_data_with_pickle_or_unsafe_yaml():
    """Every torch.load is weights-only, nothing unpickles or YAML-loads unsafely, and no code hands a model
    to MLflow's pyfunc loader (mfcon builds its embedder from the checked files: test_model_attacks.py);
    nor is Ray Data told to unpickle object columns."""
    sources = [*PACKAGE.rglob("*.py"), *(REPO / "pipelines").glob("*.py"), *(REPO / "bench").glob("*.py")]
    problems, pyfunc_loads = [], []
    for path in sources:
        rel = path.relative_to(REPO).as_posix()
        for line, name, call in _calls(path):
            where = f"{rel}:{line}: {name}"
            if (rel, name) in SELF_WRITTEN_LOADS:
                continue
            if name in UNSAFE_CALLS:
                problems.append(where)
            elif name == "torch.load" and _keyword(call, "weights_only") is not True:
                problems.append(f"{where} without weights_only=True")
            elif name == "yaml.load" and "Safe" not in ast.unparse(call):
                problems.append(f"{where} without a SafeLoader")
            elif name in ("numpy.load", "np.load") and _keyword(call, "allow_pickle") not in (None, False):
                problems.append(f"{where} with allow_pickle")
            elif name.startswith("mlflow.") and name.endswith(".load_model") or name == "mlflow.models.Model.load":
                pyfunc_loads.append(f"{rel}:{line}: {name}")
        text = path.read_text()
        if "RAY_DATA_AUTOLOAD_PICKLE_OBJECT_SCALAR" in text or re.search(r"RAY_AUTH_MODE.{0,20}disabled", text):
            problems.append(f"{rel}: turns off a Ray safety default (pickled-object columns or token auth)")
    assert not problems, "unsafe deserialisation:\n" + "\n".join(problems)
    assert pyfunc_loads == [], "MLflow's model loader chain is called:\n" + "\n".join(pyfunc_loads)
    load = next(n for n in ast.walk(ast.parse((PACKAGE / "serving" / "embedder.py").read_text()))
                if isinstance(n, ast.FunctionDef) and n.name == "load_embedder")
    names = [_dotted(n.func, {}) for n in ast.walk(load) if isinstance(n, ast.Call)]
    assert names.index("check_model_dir") < names.index("check_model_digests") < names.index(
        "SpeakerEmbedder.from_files"), names


def test_a_shard_of_pickled_python_objects_is_never_unpickled(data, tmp_path, capsys):
    """Ray's pickled-object Arrow extension: reading its values would unpickle them (the type is registered as
    soon as ray.data is imported), and Ray Data's own Parquet reader refuses such columns. A train shard that
    looks right (every column, a matching sha256 in the manifest) but whose ``features`` are pickled objects
    must never be unpickled by ``mfcon train``. (That it is also refused as one clear error before training
    is a row of the bad-input matrix.)"""
    from ray.data.extensions.object_extension import ArrowPythonObjectArray

    _, prepared = data
    folder = tmp_path / "data"
    shutil.copytree(prepared, folder)
    marker = tmp_path / "code-ran"
    shard = folder / "train-00000.parquet"
    table = pq.read_table(shard)
    evil = ArrowPythonObjectArray.from_objects([RunsCode(marker) for _ in range(table.num_rows)])
    pq.write_table(table.set_column(table.schema.get_field_index("features"), "features", evil), shard)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = file_sha256(shard)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "train.yaml").write_text("model_preset: tiny\nepochs: 1\n"
                                         "data: {speakers_per_batch: 2, utts_per_speaker: 2, crop_seconds: 0.5}\n")

    with contextlib.suppress(Exception):  # refused or crashed: either way, nothing may have been unpickled
        main(["train", "--config", str(tmp_path / "train.yaml"), "--data", str(folder), "--out", str(tmp_path / "o")])
    capsys.readouterr()
    assert not marker.exists(), "a shard's pickled objects were unpickled"


def test_trial_lists_and_mlflow_params_are_only_text(data, tmp_path, capsys):
    corpus, _ = data
    marker = tmp_path / "code-ran"
    pickled_list = tmp_path / "trials.pkl"
    pickled_list.write_bytes(pickle.dumps([RunsCode(marker)]))
    code, _, err = cli(["prepare", "--corpus", corpus, "--test-trials", pickled_list, "--dev-speakers", "2",
                        "--out", tmp_path / "out", "--workers", "0"], capsys)
    assert code == 2 and "trials.pkl" in err, err

    yaml_payload = f"!!python/object/apply:builtins.exec [\"open({str(marker)!r}, 'w').write('x')\"]"
    store = write_study_store(tmp_path / "runs", study="params", trials=DEMO_TRIALS[:2])
    MlflowClient(store.tracking_uri).log_param(next(iter(store.trial_runs.values())), "note", yaml_payload)
    code, _, err = cli(["report", "--study", "params", "--workdir", tmp_path / "runs", "--format", "md",
                        "--out", tmp_path / "report"], capsys)
    assert code == 0, err
    assert "python/object/apply" in "".join(f.read_text() for f in (tmp_path / "report").rglob("*.md")), \
        "the param is not shown as the text it is"
    assert not marker.exists(), "a trial list or an MLflow param was unpickled or YAML-loaded"


# ---------------------------------------------------------------- nothing escapes its folder

def test_trial_lists_cannot_name_files_outside_the_corpus(data, tmp_path):
    corpus, _ = data
    for bad in ("../secrets/key.wav", "/etc/passwd", "id10001/../../x.wav"):
        listing = tmp_path / "list.txt"
        listing.write_text(f"1 {bad} id10001/vid00/00001.wav\n")
        with pytest.raises(TrialListError, match=r"list\.txt:1: .*must be a path relative to the corpus root"):
            read_trials(listing, root=corpus)


@pytest.mark.parametrize("field", ["shard", "trials"])
def test_manifest_entries_cannot_name_files_outside_the_data_folder(field, data, tmp_path):
    _, prepared = data
    folder = tmp_path / "data"
    shutil.copytree(prepared, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    if field == "shard":
        manifest["splits"]["train"]["shards"][0]["file"] = "../elsewhere.parquet"
    else:
        manifest["trials"]["dev"] = "/etc/passwd"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"(?s)manifest\.json.*must be a file name inside the data folder"):
        read_manifest(folder)


# ---------------------------------------------------------------- servers bind 127.0.0.1

def _listening(port: int | None = None) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket on this machine (Linux /proc), optionally one port."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not Path(table).exists():
            continue
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            raw, hex_port = fields[1].split(":")
            words = bytes.fromhex(raw)  # host-order (little-endian) 32-bit words
            address = socket.inet_ntop(family, b"".join(words[i:i + 4][::-1] for i in range(0, len(words), 4)))
            if port is None or int(hex_port, 16) == port:
                found.add((address, int(hex_port, 16)))
    return found


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    with run_mlflow_server(tmp_path_factory.mktemp("server")) as url:
        yield url


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's socket table")
def test_the_test_mlflow_server_listens_on_loopback_only(mlflow_server):
    port = int(mlflow_server.rsplit(":", 1)[1])
    assert _listening(port) == {("127.0.0.1", port)}


def test_documented_mlflow_ui_commands_bind_loopback():
    import click
    from mlflow.cli import cli as mlflow_cli

    for command in ("ui", "server"):
        params = mlflow_cli.get_command(click.Context(mlflow_cli), command).params
        assert next(p.default for p in params if p.name == "host") == "127.0.0.1"
    documented = [line for doc in (REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "pipelines").glob("*.py"))
                  for line in doc.read_text().splitlines() if re.search(r"mlflow (ui|server)\b", line)]
    assert documented
    assert not [line for line in documented if re.search(r"--host[ =](0\.0\.0\.0|::|\[::\])", line)]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's socket table")
def test_init_ray_dashboard_listens_on_loopback_with_token_auth(tmp_path):
    """``mfcon study``'s private Ray, started as users get it: no RAY_AUTH_MODE (tests set it to disabled)."""
    script = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_security import _listening
        from mfcon.study.runner import init_ray
        import ray
        init_ray(None)
        url = ray._private.worker.global_worker.node.address_info["webui_url"]
        port = int(url.rsplit(":", 1)[1])
        print(json.dumps({{"url": url, "bound": sorted(_listening(port)), "auth": os.environ.get("RAY_AUTH_MODE")}}))
        ray.shutdown()
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path)  # Ray writes its generated token to ~/.ray/auth_token
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    port = int(facts["url"].rsplit(":", 1)[1])
    assert facts["url"].startswith("127.0.0.1:")
    assert [tuple(b) for b in facts["bound"]] == [("127.0.0.1", port)]
    assert facts["auth"] == "token", "the local Ray cluster runs without token authentication"


# ---------------------------------------------------------------- credentials stay out of everything

SECRETS = {"MLFLOW_URI_PASSWORD": "uri-Passw0rd-8f3a", "AWS_SECRET_ACCESS_KEY": "aws-Secret-2b7c9d",
           "PGPASSWORD": "pg-Passw0rd-41e6", "MFCON_DB_PASSWORD": "db-Passw0rd-77c1"}


class RayWouldStart(BaseException):
    """Raised instead of starting Ray: everything a study tracks before training has happened by then.
    (A BaseException: the CLI turns every Exception into a one-line error, and this one must reach the test.)"""


def _everything_in_mlflow(url: str, dest: Path) -> str:
    """Every experiment, run name, param, tag and metric key, and every artifact's bytes, as one text."""
    client = MlflowClient(url)
    chunks, folders = [], []
    for exp in client.search_experiments():
        chunks.append(json.dumps([exp.name, exp.artifact_location, exp.tags]))
        for run in client.search_runs([exp.experiment_id], max_results=1000):
            chunks.append(json.dumps([run.info.run_name, run.data.params, run.data.tags, sorted(run.data.metrics)]))
            folders.append(client.download_artifacts(run.info.run_id, "", str(dest / run.info.run_id)))
        for model in client.search_logged_models([exp.experiment_id]):  # MLflow 3 keeps models beside runs
            chunks.append(json.dumps([model.name, model.params, model.tags]))
            with use_tracking_uri(url):
                folders.append(mlflow.artifacts.download_artifacts(f"models:/{model.model_id}",
                                                                   dst_path=str(dest / model.model_id)))
    chunks += [f.read_bytes().decode("utf-8", "replace") for folder in folders for f in Path(folder).rglob("*")
               if f.is_file()]
    return "\n".join(chunks)


def test_credentials_never_reach_params_tags_artifacts_files_or_logs(mlflow_server, data, tmp_path, monkeypatch,
                                                                     capsys, caplog):
    _, prepared = data
    for name, value in SECRETS.items():
        if name != "MLFLOW_URI_PASSWORD":
            monkeypatch.setenv(name, value)
    uri = mlflow_server.replace("http://", f"http://alice:{SECRETS['MLFLOW_URI_PASSWORD']}@")
    caplog.set_level(logging.DEBUG)
    logging.getLogger("mlflow").addHandler(caplog.handler)  # mlflow's logger does not propagate
    import ray

    def ray_would_start(*args, **kwargs):
        raise RayWouldStart

    monkeypatch.setattr(ray, "init", ray_would_start)
    (tmp_path / "space.yaml").write_text(SPACE)
    workdir = tmp_path / "runs"
    try:
        with pytest.raises(RayWouldStart):  # the study's parent run, inputs and study.json are written by then
            main(["study", "--space", str(tmp_path / "space.yaml"), "--data", str(prepared), "--workdir",
                  str(workdir), "--tracking-uri", uri])
        assert main(["report", "--study", "secrets", "--workdir", str(workdir), "--tracking-uri", uri, "--format",
                     "md", "--out", str(tmp_path / "report")]) == 0
        assert main(["verify", "a.wav", "b.wav", "--model", "models:/mfcon-speaker@none", "--workdir", str(workdir),
                     "--tracking-uri", uri]) == 2
        assert main(["study", "--space", str(tmp_path / "space.yaml"), "--data", str(prepared), "--workdir",
                     str(workdir), "--tracking-uri", uri.replace(mlflow_server.rsplit(":", 1)[1], "1")]) == 2
        client = MlflowClient(mlflow_server)  # a trial's model, logged as the study callback logs it
        parent = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])[0]
        log_speaker_model(client, parent.info.run_id, export_micro_model(tmp_path / "best.pt"), FeatureConfig(),
                          tracking_uri=mlflow_server)
    finally:
        logging.getLogger("mlflow").removeHandler(caplog.handler)
    out, err = capsys.readouterr()

    tracked = _everything_in_mlflow(mlflow_server, tmp_path / "artifacts")
    assert "base.model_preset" in tracked and "mfcon.data_manifest_sha256" in tracked  # the study was tracked
    files = "\n".join(f.read_bytes().decode("utf-8", "replace") for folder in (workdir, tmp_path / "report")
                      for f in folder.rglob("*") if f.is_file())
    assert "tracking_uri" in files  # study.json
    for name, secret in SECRETS.items():
        for where, text in (("MLflow runs and artifacts", tracked), ("files the commands wrote", files),
                            ("stdout", out), ("stderr", err), ("logs", caplog.text)):
            assert secret not in text, f"{name} leaked into {where}"
    assert "alice:***@" in err or "alice" not in err  # a URI left in an error is masked, never printed whole
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ, "the command left the password in the environment"


def test_credentials_from_the_uri_still_reach_the_client(monkeypatch):
    """Moved, not dropped: MLflow's REST client builds its basic-auth header from these host credentials."""
    from argparse import Namespace

    from mlflow.tracking._tracking_service.utils import _get_store

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:env%20pw@tracking.example:443")
    args = Namespace(tracking_uri="http://alice:p%40ss@10.1.2.3:5000")
    with credentials_out_of_uris(args):
        creds = _get_store(args.tracking_uri).get_host_creds()
        assert (args.tracking_uri, creds.host, creds.username, creds.password) == (
            "http://10.1.2.3:5000", "http://10.1.2.3:5000", "alice", "p@ss")
        assert os.environ["MLFLOW_TRACKING_URI"] == "https://tracking.example:443"
    assert os.environ["MLFLOW_TRACKING_URI"] == "https://bob:env%20pw@tracking.example:443"
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ


# ---------------------------------------------------------------- study names stay inside the work dir

@pytest.mark.parametrize("name", [".", "..", "../outside", "a/b", "/abs", ".hidden", "-rf", ""])
def test_a_study_name_cannot_leave_the_workdir(name, data, tmp_path, capsys):
    """The space's ``name``, ``--name`` and a resume's name are validated before any file is written."""
    _, prepared = data
    space = tmp_path / "space.yaml"
    space.write_text(SPACE.replace("name: secrets", f"name: {json.dumps(name)}"))
    workdir = tmp_path / "work" / "runs"
    code, _, err = cli(["study", "--space", space, "--data", prepared, "--workdir", workdir], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "space.yaml" in err and "name" in err, err  # the space file's field (or its schema check) is named
    space.write_text(SPACE)
    for argv in (["study", "--space", space, "--data", prepared, "--workdir", workdir, "--name", name],
                 ["study", "--resume", "--name", name, "--workdir", workdir],
                 ["replicate", "--study", name, "--workdir", workdir],
                 ["report", "--study", name, "--workdir", workdir]):
        code, _, err = cli(argv, capsys)
        assert code == 2 and ("--name" in err or "--study" in err), err
    assert not (tmp_path / "work").exists(), "a refused study name wrote files"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]


def test_run_study_validates_the_name_itself(data, tmp_path):
    """Library callers get the same check as the CLI (mfcon.names.check_study_name)."""
    from mfcon.names import StudyNameError
    from mfcon.study.runner import run_study

    _, prepared = data
    (tmp_path / "space.yaml").write_text(SPACE)
    with pytest.raises(StudyNameError, match=r"--name '\.\.'"):
        run_study(tmp_path / "space.yaml", prepared, workdir=tmp_path / "runs", study_name="..")
    (tmp_path / "dots.yaml").write_text(SPACE.replace("name: secrets", "name: '..'"))
    with pytest.raises(ValueError, match=r"dots\.yaml.*name"):
        run_study(tmp_path / "dots.yaml", prepared, workdir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- every printed URI is masked

def test_printed_locations_and_tracking_uris_are_masked(capsys):
    from mfcon import storage
    from mfcon.cli.study import print_summary
    from mfcon.tracking.server import mask_uri

    assert storage.describe("s3://AKIAEXAMPLE:aws-Secret-2b7c9d@bucket/shards/") == "s3://AKIAEXAMPLE:***@bucket/shards"
    assert mask_uri("postgresql://mfcon:pg-Passw0rd@db:5432/mlflow") == "postgresql://mfcon:***@db:5432/mlflow"

    class Summary:  # what run_study returns, as far as the printer reads it
        study, num_trials, states, best_trial, best_metric, metric, best_params = "s", 1, {"completed": 1}, None, None, \
            "dev_eer", {}
        baseline_line = ""
        tracking_uri = f"http://alice:{SECRETS['MLFLOW_URI_PASSWORD']}@10.0.0.5:5000"

    print_summary(Summary())
    out = capsys.readouterr().out
    assert SECRETS["MLFLOW_URI_PASSWORD"] not in out and "http://alice:***@10.0.0.5:5000" in out
