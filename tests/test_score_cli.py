"""``mfcon score`` and ``mfcon embed`` through the real command line, against a real SQLite MLflow store.

No training: the model is the untrained seeded micro MFA-Conformer of :mod:`registry_fixtures`
on a tone corpus (same-speaker utterances are near-identical recordings). It is
logged as a pyfunc and registered twice, as ``mfcon promote`` registers versions:
v1 with ``score_mean`` and ``eer_threshold`` (alias ``champion``), v2 also with an
AS-norm cohort (``score_norm=asnorm``, ``score_top_n=10``: the 5-speaker cohort used whole).
What is checked is arithmetic, not accuracy:

* ``mfcon score`` on a checkpoint gives exactly the scores of the evaluation code
  (``evaluate``), on a registered model with AS-norm exactly promotion's scorer,
  and with ``--center model`` exactly ``mfcon verify``'s scores;
* ``mfcon embed`` writes everything needed to get ``mfcon verify``'s scores from
  the Parquet file alone (checked with an independent NumPy reading of the
  documented formula);
* the intervals are seeded cluster bootstraps that contain their estimate.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from mfcon.data.local import read_cohort, read_eval_set
from mfcon.data.prepare import prepare_dataset
from mfcon.data.shards import read_manifest
from mfcon.evaluation.score_lists import (
    cluster_bootstrap_min_dcf,
    eer_interval,
    enrollment_speakers,
    read_embeddings,
    score_pairs,
)
from mfcon.evaluation.score_norm import speaker_cohort
from mfcon.evaluation.scoring import evaluate
from mfcon.promotion.evidence import score_embedder
from mfcon.serving import embedder_of, load_embedder, log_speaker_model, use_tracking_uri, verify_pairs
from mfcon.serving.verify import store_cohort
from mfcon.tracking import artifact_root_for, default_tracking_uri, ensure_experiment
from mlflow.tracking import MlflowClient
from mlflow_fixtures import gaussian_scores
from registry_fixtures import export_micro_model, make_tone_corpus, write_test_trials

NAME = "score-speaker"


def mfcon(*argv: object, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MFCON_PROGRESS="0", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "mfcon.cli", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    base = tmp_path_factory.mktemp("score")
    utts = make_tone_corpus(base / "wav", n_speakers=10, utts_per_speaker=4, seed=0)
    test_speakers = sorted(utts)[-3:]
    write_test_trials(base / "trials.txt", utts, test_speakers, seed=0)
    write_test_trials(base / "pair.txt", utts, test_speakers[:2], seed=1)  # a second named list, as -O beside -E
    data = base / "data"
    prepare_dataset(base / "wav", {"test": base / "trials.txt", "pair": base / "pair.txt"}, data, dev_speakers=2,
                    num_workers=0, progress=False)
    ckpt = export_micro_model(base / "ckpt" / "best.pt", seed=0)

    workdir = base / "runs"
    uri = default_tracking_uri(workdir)
    client = MlflowClient(uri, registry_uri=uri)
    exp = ensure_experiment(client, "score-test", artifact_root_for(uri, workdir))
    run_id = client.create_run(exp).info.run_id
    client.set_terminated(run_id)
    fcfg = read_manifest(data).feature_config
    model_uri = log_speaker_model(client, run_id, ckpt, fcfg)
    embedder = embedder_of(load_embedder(model_uri, uri, device="cpu"))
    test = read_eval_set(data, "test")
    mean = embedder.embed_features(test.features).mean(axis=0)
    cohort_set = read_cohort(data)
    cohort = speaker_cohort(embedder.embed_features(cohort_set.features), cohort_set.speakers)
    client.create_registered_model(NAME)
    common = {"score_mean": json.dumps([float(x) for x in mean]), "eer_threshold": repr(0.25)}
    with use_tracking_uri(uri):
        model_id = model_uri.split("/", 1)[1]
        v1 = client.create_model_version(NAME, source=model_uri, run_id=run_id, tags=common, model_id=model_id)
        v2 = client.create_model_version(NAME, source=model_uri, run_id=run_id, model_id=model_id,
                                         tags={**common, "score_norm": "asnorm", "score_top_n": "10"})
    store_cohort(client, NAME, str(v2.version), run_id, cohort)
    client.set_registered_model_alias(NAME, "champion", str(v1.version))

    # the test speakers' recordings, in the corpus layout (utt ids == the trial lists' ids)
    wavs = base / "test-wavs"
    for spk in test_speakers:
        shutil.copytree(base / "wav" / spk, wavs / spk)
    cwd = base / "cwd"
    cwd.mkdir()
    return SimpleNamespace(base=base, root=base / "wav", data=data, ckpt=ckpt, workdir=workdir, uri=uri,
                           client=client, run_id=run_id, wavs=wavs, cwd=cwd, embedder=embedder,
                           versions=(str(v1.version), str(v2.version)))


def _scores_file(path: Path) -> tuple[list[tuple[int, str, str]], np.ndarray]:
    rows = [line.split() for line in path.read_text().splitlines()]
    assert all(len(r) == 4 for r in rows)
    return [(int(r[0]), r[1], r[2]) for r in rows], np.array([float(r[3]) for r in rows])


def test_score_a_checkpoint_reproduces_the_evaluation_scores(env):
    out = env.base / "out-ckpt"
    stdout = ok(mfcon("score", "test", "dev", "--data", env.data, "--model", env.ckpt.parent, "--out", out,
                      "--n-boot", 200, "--device", "cpu", cwd=env.cwd))

    assert sorted(p.name for p in out.iterdir()) == ["dev.det.png", "dev.scores.txt", "summary.json",
                                                     "test.det.png", "test.scores.txt"]
    summary = {s["list"]: s for s in json.loads((out / "summary.json").read_text())["lists"]}
    import torch

    from mfcon.config import ModelConfig
    from mfcon.models.mfa_conformer import build_model
    from mfcon.train.checkpoint import load_checkpoint

    state = load_checkpoint(env.ckpt)
    model = build_model(ModelConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    for split in ("test", "dev"):
        eval_set = read_eval_set(env.data, split)
        with torch.no_grad():
            expected = evaluate(model.eval(), eval_set)
        trials, scores = _scores_file(out / f"{split}.scores.txt")
        assert trials == [(t.label, t.enroll, t.test) for t in eval_set.trials]  # list order, every trial
        np.testing.assert_allclose(scores, expected.scores, atol=2e-6)
        s = summary[split]
        assert s["eer_percent"] == pytest.approx(100 * expected.eer, abs=1e-9)
        assert s["min_dcf_0.01"] == pytest.approx(expected.min_dcf_01, abs=1e-9)
        assert s["min_dcf_0.05"] == pytest.approx(expected.min_dcf_05, abs=1e-9)
        assert s["eer_ci95"][0] <= s["eer_percent"] <= s["eer_ci95"][1]
        assert s["enrollment_speakers"] == len({t.enroll.split("/")[0] for t in eval_set.trials})
        assert (out / f"{split}.det.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "test " in stdout and "EER %" in stdout and "minDCF.01" in stdout
    assert "next: compare another model on the same lists" in stdout


def test_score_every_named_list_of_the_data_folder_or_the_ones_named(env):
    """No LIST: every list the folder names (dev and both test lists); --lists picks some. Both test lists are
    scored on the one test split, so each reproduces evaluate() on that list."""
    import torch

    from mfcon.config import ModelConfig
    from mfcon.models.mfa_conformer import build_model
    from mfcon.train.checkpoint import load_checkpoint

    out = env.base / "out-all"
    stdout = ok(mfcon("score", "--data", env.data, "--model", env.ckpt, "--out", out, "--n-boot", 50,
                      "--device", "cpu", cwd=env.cwd))
    summary = {s["list"]: s for s in json.loads((out / "summary.json").read_text())["lists"]}
    assert list(summary) == ["dev", "test", "pair"]
    assert [summary[n]["split"] for n in summary] == ["dev", "test", "test"]
    assert summary["pair"]["source"].endswith("trials-test-pair.txt") and "pair " in stdout
    state = load_checkpoint(env.ckpt)
    model = build_model(ModelConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    with torch.no_grad():
        expected = evaluate(model.eval(), read_eval_set(env.data, "test", list_name="pair"))
    trials, scores = _scores_file(out / "pair.scores.txt")
    assert len(trials) == len(expected.scores) < summary["test"]["trials"]
    np.testing.assert_allclose(scores, expected.scores, atol=2e-6)
    assert summary["pair"]["eer_percent"] == pytest.approx(100 * expected.eer, abs=1e-9)

    picked = env.base / "out-picked"
    ok(mfcon("score", "--lists", "pair,test", "--data", env.data, "--model", env.ckpt, "--out", picked,
             "--n-boot", 50, "--device", "cpu", cwd=env.cwd))
    assert [s["list"] for s in json.loads((picked / "summary.json").read_text())["lists"]] == ["pair", "test"]
    np.testing.assert_array_equal(_scores_file(picked / "pair.scores.txt")[1], scores)


def test_score_a_registered_model_with_asnorm_is_promotions_scorer_and_logs_to_the_run(env):
    eval_set = read_eval_set(env.data, "test")
    mine = env.base / "mine.txt"  # a user's own list over the test split: a few targets and non-targets
    picked = [t for t in eval_set.trials if t.label == 1][:4] + [t for t in eval_set.trials if t.label == 0][:5]
    mine.write_text("".join(f"{t.label} {t.enroll} {t.test}\n" for t in picked))
    out = env.base / "out-asnorm"
    stdout = ok(mfcon("score", "test", mine, "--data", env.data, "--model", f"models:/{NAME}@champion",
                      "--workdir", env.workdir, "--score-norm", "asnorm", "--top-n", 10, "--out", out,
                      "--n-boot", 100, "--log-to-run", env.run_id, "--device", "cpu", cwd=env.cwd))

    promotion = score_embedder(env.embedder, read_eval_set(env.data, "test", "asnorm", 10), env.data)
    _, scores = _scores_file(out / "test.scores.txt")
    np.testing.assert_allclose(scores, promotion.scores, atol=1e-5)
    by_pair = {(t.enroll, t.test): s for t, s in zip(eval_set.trials, scores)}
    _, own = _scores_file(out / "mine.scores.txt")
    np.testing.assert_allclose(own, [by_pair[t.enroll, t.test] for t in picked], atol=1e-6)
    assert f"model models:/{NAME}/{env.versions[0]}" in stdout and "asnorm(top_n=10)" in stdout

    run = env.client.get_run(env.run_id)
    summary = {s["list"]: s for s in json.loads((out / "summary.json").read_text())["lists"]}
    assert run.data.metrics["score_test_eer"] == pytest.approx(summary["test"]["eer_percent"])
    assert run.data.metrics["score_mine_min_dcf"] == pytest.approx(summary["mine"]["min_dcf_0.01"])
    logged = {Path(f.path).name for f in env.client.list_artifacts(env.run_id, "scores")}
    assert {"test.scores.txt", "mine.scores.txt", "test.det.png", "summary.json"} <= logged


def _pairs(env) -> list[tuple[str, str]]:
    trials = read_eval_set(env.data, "test").trials
    return [(t.enroll, t.test) for t in trials]


def test_score_centred_by_the_version_mean_equals_verify(env):
    out = env.base / "out-center"
    ok(mfcon("score", "test", "--data", env.data, "--model", f"models:/{NAME}/{env.versions[0]}", "--workdir",
             env.workdir, "--center", "model", "--out", out, "--n-boot", 50, "--device", "cpu", cwd=env.cwd))
    _, scores = _scores_file(out / "test.scores.txt")
    verified = verify_pairs([(env.root / a, env.root / b) for a, b in _pairs(env)],
                            model_uri=f"models:/{NAME}/{env.versions[0]}", tracking_uri=env.uri)
    np.testing.assert_allclose(scores, [v.score for v in verified], atol=1e-5)


def _documented_score(meta: dict[str, str], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """docs/evaluation.md, written out independently of mfcon's scorer."""
    m = np.asarray(json.loads(meta["mfcon.score_mean"]), dtype=np.float64)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    s = (unit(a - m) * unit(b - m)).sum(axis=1)
    if meta["mfcon.score_norm"] != "asnorm":
        return s
    cohort = np.asarray(json.loads(meta["mfcon.score_cohort"]), dtype=np.float64)
    n = min(int(meta["mfcon.score_top_n"]), len(cohort))

    def stats(x):
        top = np.sort(unit(x - m) @ unit(cohort - m).T, axis=1)[:, ::-1][:, :n]
        return top.mean(axis=1), np.maximum(top.std(axis=1), 1e-6)

    (mu_e, sd_e), (mu_t, sd_t) = stats(a), stats(b)
    return 0.5 * ((s - mu_e) / sd_e + (s - mu_t) / sd_t)


@pytest.mark.parametrize("which", ["mean", "asnorm"])
def test_embed_exports_what_reproduces_verify_scores(env, which):
    version = env.versions[0 if which == "mean" else 1]
    out = env.base / f"emb-{which}.parquet"
    stdout = ok(mfcon("embed", env.wavs, "--out", out, "--model", f"models:/{NAME}/{version}", "--workdir",
                      env.workdir, cwd=env.cwd))
    assert f"wrote 12 embeddings from models:/{NAME}/{version} to {out}" in stdout

    pairs = _pairs(env)
    verified = np.array([v.score for v in verify_pairs([(env.root / a, env.root / b) for a, b in pairs],
                                                       model_uri=f"models:/{NAME}/{version}", tracking_uri=env.uri)])
    table = pq.read_table(out)
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["mfcon.score_norm"] == which and "cos(e - m, t - m)" in meta["mfcon.score_formula"]
    assert ("mfcon.score_cohort" in meta) == (which == "asnorm")
    index = {u: i for i, u in enumerate(table.column("utt_id").to_pylist())}
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float64)
    a, b = emb[[index[x] for x, _ in pairs]], emb[[index[y] for _, y in pairs]]
    np.testing.assert_allclose(_documented_score(meta, a, b), verified, atol=1e-4)
    exported = read_embeddings(out)
    np.testing.assert_allclose(score_pairs(exported, pairs), verified, atol=1e-5)
    assert exported.threshold == 0.25


def test_intervals_are_seeded_cluster_bootstraps_around_the_estimate():
    scores, labels = gaussian_scores(n=400, seed=3, d_prime=1.5)
    groups = np.repeat(np.arange(20), 20)
    eer = eer_interval(scores, labels, groups, n_boot=300, seed=1)
    assert eer.low <= eer.estimate <= eer.high and eer.high - eer.low > 0
    assert eer == eer_interval(scores, labels, groups, n_boot=300, seed=1)
    dcf = cluster_bootstrap_min_dcf(scores, labels, groups, 0.05, n_boot=300, seed=1)
    assert dcf.low <= dcf.estimate <= dcf.high
    assert dcf == cluster_bootstrap_min_dcf(scores, labels, groups, 0.05, n_boot=300, seed=1)
    from mfcon.data.corpus.voxceleb import TrialPair

    assert list(enrollment_speakers([TrialPair(1, "id1/v/1.wav", "id1/v/2.wav"),
                                     TrialPair(0, "id2/v/1.wav", "id1/v/2.wav")])) == ["id1", "id2"]


def test_export_a_registered_version_gives_the_served_embeddings(env, tmp_path):
    """``mfcon export``'s loading is serving's (NAME@ALIAS pinned to its version, files checked); a fresh
    torch.jit.load of the file gives the embeddings the served model gives."""
    import torch

    from mfcon.serving.export import ATOL, RTOL, export_torchscript, load_for_export, model_uri_of, read_export_metadata

    net, feature_config, source = load_for_export(model_uri_of(f"{NAME}@champion"), env.uri)
    assert source == f"models:/{NAME}/{env.versions[0]}" and feature_config == read_manifest(env.data).feature_config
    exported = export_torchscript(net, tmp_path / "speaker.pt", feature_config, source=source)
    feats = [np.array(f) for f in read_eval_set(env.data, "test").features[:3]]
    scripted = torch.jit.load(str(exported.path))
    with torch.no_grad():
        got = np.concatenate([scripted(torch.from_numpy(f)[None]).numpy() for f in feats])
    np.testing.assert_allclose(got, env.embedder.embed_features(feats), atol=ATOL, rtol=RTOL)
    meta = read_export_metadata(exported.path)
    assert meta["feature_config"] == feature_config.model_dump(mode="json") and meta["source"] == source
