"""Promotion, rollback, serving and verification against a real SQLite MLflow store and real tiny checkpoints.

Two checkpoints are trained on the shared synthetic corpus: a decent one and a
deliberately broken one (one epoch at a huge learning rate, near-chance EER).
They are logged exactly as a study writes trials (StudyTracker / TrialRuns,
``checkpoint/best.pt``) into two studies: ``weak`` (the broken trial only) and
``main`` (both, plus a failed and a running trial that must be ignored, and a
completed one without a checkpoint that must be skipped).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from mfcon import registry
from mfcon.cli import build_parser
from mfcon.config import ModelConfig, TrainConfig, apply_overrides
from mfcon.data.audio import load_audio
from mfcon.data.local import read_eval_set
from mfcon.data.shards import manifest_hash, read_manifest
from mfcon.models.mfa_conformer import build_model
from mfcon.registry import RegistryError, finished_trials, promote, rollback
from mfcon.scoring import extract_embeddings, score_trials
from mfcon.serving import (
    MODEL_URI_TAG,
    embed,
    embedder_of,
    load_embedder,
    log_speaker_model,
    use_tracking_uri,
    verify,
    verify_pairs,
)
from mfcon.tracking import (
    StudyTracker,
    TrackingUnavailable,
    TrialRuns,
    default_tracking_uri,
)
from mfcon.train.checkpoint import load_checkpoint
from mfcon.train.local import train_local
from mlflow.tracking import MlflowClient

MICRO = {"d_model": 32, "num_blocks": 2, "num_heads": 2, "ffn_dim": 64, "embed_dim": 32, "conv_kernel": 5}
GOOD = TrainConfig.model_validate({
    "model_preset": "tiny", "model": MICRO, "epochs": 8, "seed": 0,
    "data": {"speakers_per_batch": 8, "utts_per_speaker": 2, "crop_seconds": 1.0},
    "optim": {"lr": 0.005, "warmup_steps": 2},
})
# Adam's step is ~lr whatever the gradient: weights are thrown far off but stay finite.
BAD = apply_overrides(GOOD, {"epochs": 1, "optim.lr": 3.0, "optim.grad_clip": None, "optim.warmup_steps": 0})
CODE_VERSION = "0.1.0+test"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core machine: extra OpenMP threads only wait on each other."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def checkpoints(small_data, tmp_path_factory, one_thread) -> dict[str, SimpleNamespace]:
    """Train both models; keep what a study exports: weights + configs as ``best.pt``."""
    out = tmp_path_factory.mktemp("registry_train")
    trained = {}
    for name, cfg in (("good", GOOD), ("bad", BAD)):
        history = train_local(cfg, small_data, out / name, echo=False)
        state = load_checkpoint(out / name / "best.pt")
        export = out / name / "export" / "best.pt"
        export.parent.mkdir()
        keep = ("model", "model_config", "config", "epoch", "metrics", "num_classes")  # as study/callbacks.py
        torch.save({k: state[k] for k in keep}, export)
        trained[name] = SimpleNamespace(file=export, history=history, params={
            "optim.lr": cfg.optim.lr, "epochs": cfg.epochs, "loss.mfcon_blocks": "none"})
    return trained


def _write_study(uri: str, workdir: Path, name: str, data_dir: Path, trials: list[tuple]) -> dict[str, str]:
    """What ``mfcon study`` leaves in MLflow: parent run + one child run per trial; returns trial -> run id."""
    tracker = StudyTracker(uri, name, workdir)
    space = workdir / f"{name}.yaml"
    space.write_text(f"name: {name}\n")
    tracker.log_study_inputs(space, {"epochs": 8}, manifest_hash(data_dir))
    tracker.client.set_tag(tracker.parent_run_id, "mfcon.code_version", CODE_VERSION)
    runs = TrialRuns(tracker)
    for trial_id, ckpt, state in trials:
        runs.start(trial_id, ckpt.params if ckpt else {"optim.lr": 0.1})
        history = ckpt.history if ckpt else [{"epoch": 1.0, "train_loss": 1.0, "eer": 0.5}]  # "best" EER: ignored
        for h in history:
            runs.log_epoch(trial_id, h, int(time.time() * 1000))
        if state != "running":
            runs.finish(trial_id, state, str(ckpt.file) if ckpt else None)
    tracker.finish()
    return dict(runs.run_ids)


@pytest.fixture(scope="module")
def store(checkpoints, small_data, tmp_path_factory):
    """The studies in a fresh SQLite store; the cwd and environment are isolated so a leak to MLflow's
    default store (``./mlflow.db``) would show up in ``cwd``."""
    workdir = tmp_path_factory.mktemp("registry_runs")
    cwd = tmp_path_factory.mktemp("registry_cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        uri = default_tracking_uri(workdir)
        good, bad = checkpoints["good"], checkpoints["bad"]
        _write_study(uri, workdir, "weak", small_data, [("bad", bad, "completed")])
        main = _write_study(uri, workdir, "main", small_data, [
            ("good", good, "completed"), ("bad", bad, "pruned"), ("crashed", None, "failed"),
            ("busy", None, "running"), ("lost", None, "completed")])
        _write_study(uri, workdir, "unfinished", small_data, [("crashed", None, "failed"), ("busy", None, "running")])
        client = MlflowClient(uri, registry_uri=uri)
        before = client.get_run(main["good"]).info
        # The hook a study calls when a trial ends (the bad trial gets none: promote logs it itself).
        hooked = log_speaker_model(client, main["good"], good.file, read_manifest(small_data).feature_config)
        yield SimpleNamespace(uri=uri, workdir=workdir, cwd=cwd, client=client, main=main, hooked=hooked,
                              before=before, data=small_data)


@pytest.fixture(scope="module")
def ladder(store):
    """weak -> champion; main (significantly better) takes over; main again and weak: no move;
    weak forced: moves; rollback. Aliases are recorded after every step."""
    steps = [("weak", False), ("main", False), ("main", False), ("weak", False), ("weak", True)]
    results, aliases = [], []
    for study, force in steps:
        results.append(promote(study, store.uri, data_dir=store.data, force=force, n_boot=500))
        aliases.append(registry._aliases(store.client, "mfcon-speaker"))
    rolled = rollback(store.uri)
    return SimpleNamespace(results=results, aliases=aliases, rolled=rolled,
                           after_rollback=registry._aliases(store.client, "mfcon-speaker"))


def _tags(store, version: str, name: str = "mfcon-speaker") -> dict[str, str]:
    return store.client.get_model_version(name, version).tags


def test_trial_end_hook_logs_a_model_without_disturbing_the_run(store):
    run = store.client.get_run(store.main["good"])
    assert store.hooked.startswith("models:/m-") and run.data.tags[MODEL_URI_TAG] == store.hooked
    assert (run.info.status, run.info.end_time) == (store.before.status, store.before.end_time) == \
        ("FINISHED", store.before.end_time)
    assert run.data.tags["mfcon.trial_state"] == "completed"
    assert mlflow.active_run() is None


def test_selection_uses_only_completed_or_pruned_trials(store, checkpoints):
    _, trials = finished_trials(store.client, "main")
    assert [t.trial_id for t in trials] == ["lost", "good", "bad"]  # failed / running trials are ignored
    assert trials[1].value == min(h["eer"] for h in checkpoints["good"].history)


def test_first_promotion_becomes_champion(ladder, store):
    first = ladder.results[0]
    assert (first.version, first.promoted, first.forced, first.champion) == ("1", True, False, None)
    assert first.reason == "no champion yet"
    assert ladder.aliases[0] == {"champion": "1"}
    assert "logged the trial's checkpoint" in first.notes[0]  # the weak run had no model yet
    assert "champion_version" not in _tags(store, "1")


def test_significantly_better_challenger_takes_over(ladder, store, checkpoints):
    r = ladder.results[1]
    assert r.promoted and not r.forced and r.delta.high < 0 and r.champion_version == "1"
    assert r.challenger.eer < r.champion.eer and r.trial.trial_id == "good"
    assert any(n.startswith("skipped: trial lost") and "checkpoint/best.pt" in n for n in r.notes)
    assert ladder.aliases[1] == {"champion": "2", "previous": "1"}
    tags = _tags(store, "2")
    expected = {
        "study": "main", "trial_id": "good", "run_id": store.main["good"], "promoted": "true", "forced": "false",
        "champion_version": "1", "replaced_version": "1", "model_uri": store.hooked,
        "data_manifest_sha256": manifest_hash(store.data), "code_version": CODE_VERSION,
        "eer": f"{r.challenger.eer:.4f}", "eer_ci_low": f"{r.challenger.eer_ci[0]:.4f}",
        "eer_ci_high": f"{r.challenger.eer_ci[1]:.4f}", "delta_eer": f"{r.delta.estimate:.4f}",
        "delta_ci_high": f"{r.delta.high:.4f}", "champion_eer": f"{r.champion.eer:.4f}",
    }
    assert {k: tags.get(k) for k in expected} == expected
    assert json.loads(tags["params"]) == {k: str(v) for k, v in checkpoints["good"].params.items()}
    assert float(tags["eer_threshold"]) == r.challenger.threshold  # exact round trip
    assert np.array_equal(np.asarray(json.loads(tags["score_mean"]), dtype=np.float32), r.challenger.mean)
    assert r.challenger.eer_ci[0] <= r.challenger.eer <= r.challenger.eer_ci[1]
    assert float(tags["trial_eer"]) == pytest.approx(min(h["eer"] for h in checkpoints["good"].history))


def test_equal_or_worse_challenger_does_not_move_champion(ladder, store):
    same, worse = ladder.results[2], ladder.results[3]
    assert not same.promoted and same.delta.estimate == 0.0 and same.trial.run_id == ladder.results[1].trial.run_id
    assert not worse.promoted and worse.delta.low > 0
    assert ladder.aliases[2] == ladder.aliases[3] == {"champion": "2", "previous": "1"}
    for version in ("3", "4"):
        tags = _tags(store, version)
        assert (tags["promoted"], tags["forced"], tags["champion_version"]) == ("false", "false", "2")
        assert "replaced_version" not in tags


def test_force_moves_champion_and_is_recorded(ladder, store):
    forced = ladder.results[4]
    assert forced.promoted and forced.forced and forced.delta.low > 0 and "forced" in forced.reason
    assert ladder.aliases[4] == {"champion": "5", "previous": "2"}
    tags = _tags(store, "5")
    assert (tags["promoted"], tags["forced"], tags["replaced_version"]) == ("true", "true", "2")


def test_rollback_restores_previous(ladder, store):
    assert (ladder.rolled.champion, ladder.rolled.rolled_back, ladder.rolled.previous) == ("2", "5", "1")
    assert ladder.after_rollback == {"champion": "2", "previous": "1"}  # previous: what v2 had replaced
    assert _tags(store, "5")["rolled_back"] == "true"


def test_rollback_walks_history_then_stops(store):
    name = "mfcon-rollback"
    promote("main", store.uri, model_name=name, data_dir=store.data, n_boot=200)
    promote("weak", store.uri, model_name=name, data_dir=store.data, force=True, n_boot=200)
    assert registry._aliases(store.client, name) == {"champion": "2", "previous": "1"}
    result = rollback(store.uri, name)
    assert (result.champion, result.previous) == ("1", None)
    assert registry._aliases(store.client, name) == {"champion": "1"}
    with pytest.raises(RegistryError, match="no 'previous' version"):
        rollback(store.uri, name)


def test_champion_pyfunc_reproduces_checkpoint_embeddings(ladder, store, checkpoints, small_corpus):
    eval_set = read_eval_set(store.data)
    state = torch.load(checkpoints["good"].file, weights_only=True)
    model = build_model(ModelConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    expected = extract_embeddings(model, eval_set.features)
    with use_tracking_uri(store.uri):
        served = mlflow.pyfunc.load_model("models:/mfcon-speaker@champion")  # v2 after the rollback
    assert embedder_of(served).device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    got = served.predict(pd.DataFrame({"fbank": eval_set.features}))
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # Raw audio goes through the training front end: same embeddings as the prepared features.
    wavs = [load_audio(small_corpus.root / u) for u in eval_set.utt_ids[:3]]
    np.testing.assert_allclose(served.predict(pd.DataFrame({"waveform": wavs})), expected[:3], atol=1e-5)
    np.testing.assert_allclose(served.predict({"waveform": wavs[0]}), expected[:1], atol=1e-5)
    with pytest.raises(Exception, match="exactly one of"):
        served.predict(pd.DataFrame({"waveform": [wavs[0]], "fbank": [eval_set.features[0]]}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_served_model_on_cuda_matches_cpu(ladder, store):
    feats = read_eval_set(store.data).features
    cpu = embedder_of(load_embedder("models:/mfcon-speaker/2", store.uri, device="cpu"))
    gpu = embedder_of(load_embedder("models:/mfcon-speaker/2", store.uri))  # cuda is the default where present
    assert gpu.device.type == "cuda"
    np.testing.assert_allclose(gpu.embed_features(feats), cpu.embed_features(feats), atol=5e-3)  # cuDNN TF32 convs


def test_verify_scores_the_trial_list_exactly_as_promotion_did(ladder, store, small_corpus):
    promoted = ladder.results[1]  # v2, the champion after the rollback
    eval_set = read_eval_set(store.data)
    pairs = [(small_corpus.root / t.enroll, small_corpus.root / t.test) for t in eval_set.trials]
    results = verify_pairs(pairs, tracking_uri=store.uri)
    scores = np.array([r.score for r in results])
    labels = promoted.challenger.labels
    np.testing.assert_allclose(scores, promoted.challenger.scores, atol=1e-5)
    assert {r.threshold for r in results} == {promoted.challenger.threshold}
    assert {r.model_uri for r in results} == {"models:/mfcon-speaker/2"}
    # Scoring contract: centred cosine == score_trials(subtract_mean=True) on the served embeddings.
    emb = embedder_of(load_embedder("models:/mfcon-speaker/2", store.uri)).embed_features(eval_set.features)
    np.testing.assert_allclose(score_trials(eval_set.utt_ids, emb, eval_set.trials)[0], scores, atol=1e-5)
    # Accuracy of verify over the list == 1 - error rate of the promotion scores at the stored threshold.
    errors = int(((promoted.challenger.scores >= promoted.challenger.threshold) != labels.astype(bool)).sum())
    correct = sum(r.accepted == bool(y) for r, y in zip(results, labels))
    assert correct == len(labels) - errors
    assert errors / len(labels) == pytest.approx(promoted.challenger.eer / 100, abs=0.1)
    # The clearest pairs: highest-scoring target accepted, lowest-scoring non-target rejected.
    target = int(np.flatnonzero(labels == 1)[np.argmax(scores[labels == 1])])
    nontarget = int(np.flatnonzero(labels == 0)[np.argmin(scores[labels == 0])])
    assert verify(*pairs[target], tracking_uri=store.uri).accepted
    rejected = verify(*pairs[nontarget], tracking_uri=store.uri)
    assert not rejected.accepted and rejected.score < rejected.threshold
    assert verify(*pairs[target], tracking_uri=store.uri, threshold=1.01).accepted is False


def test_embed_writes_a_readable_parquet(ladder, store, small_corpus, tmp_path):
    picked = sorted(small_corpus.root.glob("*/*/*.wav"))[:3]
    folder = tmp_path / "in"
    for p in picked:
        (folder / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, folder / p.parent.name / p.name)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two files\n{picked[0]}\n\n{picked[1]}\n")
    out = tmp_path / "out" / "emb.parquet"
    assert embed(folder, out, model_uri="models:/mfcon-speaker/2", tracking_uri=store.uri) == 3
    table = pq.read_table(out)
    assert str(table.schema.field("embedding").type) == "list<element: float>"
    assert table.column("utt_id").to_pylist() == sorted(f"{p.parent.name}/{p.name}" for p in picked)
    assert table.schema.metadata[b"mfcon.model_uri"] == b"models:/mfcon-speaker/2"
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    served = embedder_of(load_embedder("models:/mfcon-speaker/2", store.uri))
    by_name = {f"{p.parent.name}/{p.name}": p for p in picked}
    expected = served.embed_waveforms([load_audio(by_name[u]) for u in table.column("utt_id").to_pylist()])
    np.testing.assert_allclose(emb, expected, atol=1e-5)
    assert embed(listing, tmp_path / "l.parquet", model_uri="models:/mfcon-speaker/2", tracking_uri=store.uri) == 2
    assert pq.read_table(tmp_path / "l.parquet").column("utt_id").to_pylist() == [str(picked[0]), str(picked[1])]
    assert sorted(p.name for p in out.parent.iterdir()) == ["emb.parquet"]  # no temp file left


def test_clear_errors(store, tmp_path):
    with pytest.raises(RegistryError, match=r"unknown study 'nope'.*'main'"):
        promote("nope", store.uri, data_dir=store.data)
    with pytest.raises(RegistryError, match=r"no finished trials.*'failed': 1.*'running': 1"):
        promote("unfinished", store.uri, data_dir=store.data)
    with pytest.raises(RegistryError, match="unknown selection metric"):
        promote("main", store.uri, data_dir=store.data, metric="accuracy")
    with pytest.raises(TrackingUnavailable, match="unreachable"):
        promote("main", "http://127.0.0.1:9", data_dir=store.data)
    missing = tmp_path / "nowhere" / "mlflow.db"
    with pytest.raises(TrackingUnavailable, match="does not exist"):
        promote("main", f"sqlite:///{missing}", data_dir=store.data)
    assert not missing.parent.exists()
    with pytest.raises(RegistryError, match="no such registered model version"):
        verify(tmp_path / "a.wav", tmp_path / "b.wav", model_uri="models:/nope@champion", tracking_uri=store.uri)


def _cli(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


def test_cli_promote_verify_embed(store, small_corpus, capsys, tmp_path):
    store_args = ["--workdir", str(store.workdir)]  # the default URI: <workdir>/mlflow.db
    _cli(["promote", "--study", "main", "--data", str(store.data), "--model-name", "cli-model", "--n-boot", "200",
          *store_args])
    out = capsys.readouterr().out
    assert "challenger" in out and "PROMOTED: cli-model@champion -> v1 (no champion yet)" in out
    _cli(["promote", "--study", "weak", "--data", str(store.data), "--model-name", "cli-model", "--n-boot", "200",
          *store_args])
    out = capsys.readouterr().out
    assert "champion" in out and "difference" in out and "not promoted: cli-model@champion stays v1" in out
    a, b = sorted(small_corpus.root.glob("*/*/*.wav"))[:2]
    _cli(["verify", str(a), str(b), "--model", "models:/cli-model@champion", *store_args])
    out = capsys.readouterr().out
    assert "threshold" in out and "models:/cli-model/1" in out and ("accepted" in out or "rejected" in out)
    _cli(["embed", str(a.parent), "--out", str(tmp_path / "e.parquet"), "--model", "models:/cli-model@champion",
          *store_args])
    assert "from models:/cli-model/1" in capsys.readouterr().out and (tmp_path / "e.parquet").is_file()
    with pytest.raises(RegistryError, match="no 'previous'"):
        _cli(["promote", "--rollback", "--model-name", "cli-model", *store_args])
    with pytest.raises(RegistryError, match="--study NAME and --data DIR"):
        _cli(["promote", "--study", "main", *store_args])


def test_use_tracking_uri_restores_globals_and_environment(monkeypatch, tmp_path):
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)  # as in a fresh process: the env var decides
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    with use_tracking_uri(f"sqlite:///{tmp_path}/other.db"):
        assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == f"sqlite:///{tmp_path}/other.db"
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/env.db"  # mlflow alone would unset the variable
    assert "MLFLOW_REGISTRY_URI" not in os.environ


def test_no_default_store_was_touched(ladder, store):
    """Every call went to the store it was given: MLflow's default ./mlflow.db was never created."""
    assert not (store.cwd / "mlflow.db").exists() and not (store.cwd / "mlruns").exists()
    assert mlflow.active_run() is None
