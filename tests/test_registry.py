"""Promotion, rollback, serving and verification against a real SQLite MLflow store, with no training.

The models' order is known by construction (:mod:`registry_fixtures`): a tone
corpus where same-speaker utterances are near-identical recordings, so an
untrained seeded micro MFA-Conformer ("good") scores the test list at EER ~0,
and the same weights with the embedding layer zeroed ("bad") give one constant
embedding, EER exactly 50%. Both are checked before any test uses them. They are
logged exactly as a study writes trials (StudyTracker / TrialRuns,
``checkpoint/best.pt``, hand-made ``dev_eer`` histories) into studies: ``weak``
(the bad trial only), ``main`` (good best by dev among trials with a model, bad
pruned, a failed and a running trial that must be ignored, and a completed one
without a checkpoint that must be skipped), ``unfinished``, ``rep`` (bad is the
best trial by dev, but a replication of three "seeds" of the good model,
written as study/replicate.py writes it, is the evidence) and ``nobest`` (a
replication without an MFCon configuration). Nothing depends on timing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from mfcon.promotion import registry
from mfcon.cli import build_parser
from mfcon.cli.registry import format_promotion
from mfcon.config import ModelConfig
from mfcon.data.audio import load_audio
from mfcon.data.local import read_eval_set
from mfcon.data.prepare import prepare_dataset
from mfcon.data.shards import manifest_hash, read_manifest
from mfcon.evaluation.metrics import equal_error_rate
from mfcon.models.mfa_conformer import build_model
from mfcon.promotion.registry import RegistryError, finished_trials, promote, rollback
from mfcon.evaluation.scoring import evaluate, extract_embeddings, score_trials
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
from mlflow.tracking import MlflowClient
from registry_fixtures import export_micro_model, make_tone_corpus, write_test_trials

CODE_VERSION = "0.1.0+test"
PARAMS = {"good": {"optim.lr": 0.005, "epochs": 8, "loss.mfcon_blocks": "none"},
          "bad": {"optim.lr": 3.0, "epochs": 1, "loss.mfcon_blocks": "none"}}
# Hand-made per-epoch dev EER (%) of each trial: the best trial by dev is known.
DEV_EER = {"good": [30.0, 12.0, 9.0], "bad": [48.0, 45.0], "lost": [5.0], "none": [50.0],
           "rep-good": [10.0, 11.0], "rep-bad": [8.0, 6.0]}
SEED_DEV_EER = ([12.0, 8.0], [11.0, 6.0], [13.0, 7.0])  # replicas of top1: seed 1 has the lowest dev EER
TEST_SPEAKERS = 3


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core machine: extra OpenMP threads only wait on each other."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> SimpleNamespace:
    """10 tone speakers x 4 utterances; test list over the last 3 (and a second named list, ``pair``, over 2 of
    them, reported beside it), dev = 2 held-out speakers, train = 5."""
    base = tmp_path_factory.mktemp("registry_corpus")
    utts = make_tone_corpus(base / "wav", n_speakers=10, utts_per_speaker=4, seed=0)
    test_trials = write_test_trials(base / "trials.txt", utts, sorted(utts)[-TEST_SPEAKERS:], seed=0)
    write_test_trials(base / "pair.txt", utts, sorted(utts)[-2:], seed=1)
    prepare_dataset(base / "wav", {"test": base / "trials.txt", "pair": base / "pair.txt"}, base / "data",
                    dev_speakers=2, num_workers=0, progress=False)
    return SimpleNamespace(root=base / "wav", data=base / "data", n_test=len(test_trials))


def _model(file: Path) -> torch.nn.Module:
    state = load_checkpoint(file)
    model = build_model(ModelConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(corpus, tmp_path_factory, one_thread) -> dict[str, SimpleNamespace]:
    """good / bad and three "seeds" of good (its weights plus tiny seeded noise), as exported ``best.pt``."""
    out = tmp_path_factory.mktemp("registry_models")
    files = {"good": export_micro_model(out / "good" / "best.pt", seed=0),
             "bad": export_micro_model(out / "bad" / "best.pt", seed=0, degenerate=True)}
    for s in range(3):
        files[f"seed{s}"] = export_micro_model(out / f"seed{s}" / "best.pt", seed=0, perturb=1e-3, perturb_seed=s)
    test = read_eval_set(corpus.data, "test")
    eers = {name: 100 * evaluate(_model(f), test).eer for name, f in files.items()}
    # The construction must give the known order, or every test below would be meaningless: fail loudly.
    assert eers["bad"] == 50.0, f"the degenerate model should score EER exactly 50%, got {eers}"
    assert all(eers[n] < 5.0 for n in ("good", "seed0", "seed1", "seed2")), f"good models should score EER ~0: {eers}"
    return {name: SimpleNamespace(file=f, params=PARAMS["bad" if name == "bad" else "good"], test_eer=eers[name])
            for name, f in files.items()}


def _history(dev_eers: list[float]) -> list[dict[str, float]]:
    return [{"epoch": float(e), "train_loss": 5.0 / e, "dev_eer": v, "dev_min_dcf": v / 50, "dev_min_dcf_005": v / 60}
            for e, v in enumerate(dev_eers, start=1)]


def _write_study(uri: str, workdir: Path, name: str, data_dir: Path, trials: list[tuple]) -> dict[str, str]:
    """What ``mfcon study`` leaves in MLflow: parent run + one child run per trial; returns trial -> run id.

    ``trials``: (trial id, checkpoint or None, state, dev EER history key)."""
    tracker = StudyTracker(uri, name, workdir)
    space = workdir / f"{name}.yaml"
    space.write_text(f"name: {name}\n")
    tracker.log_study_inputs(space, {"epochs": 8}, manifest_hash(data_dir))
    tracker.client.set_tag(tracker.parent_run_id, "mfcon.code_version", CODE_VERSION)
    runs = TrialRuns(tracker)
    for trial_id, ckpt, state, history in trials:
        runs.start(trial_id, ckpt.params if ckpt else {"optim.lr": 0.1})
        for h in _history(DEV_EER[history]):
            runs.log_epoch(trial_id, h, 1_700_000_000_000 + int(h["epoch"]))
        if state != "running":
            runs.finish(trial_id, state, str(ckpt.file) if ckpt else None)
    tracker.finish()
    return dict(runs.run_ids)


def _write_replication(uri: str, workdir: Path, study: str, configs: dict[str, list[tuple]], best: str | None,
                       feature_config) -> SimpleNamespace:
    """A replication as study/replicate.py leaves it: a ``replication`` parent run, ``replica`` child runs
    (params ``replica.*``, dev histories, ``checkpoint/best.pt``, a logged model unless told not to) and
    ``replication.json``. ``configs``: label -> [(checkpoint, dev EER history, log a model?)] in seed order."""
    tracker = StudyTracker(uri, study, workdir, role="replication")
    runs, index, table = TrialRuns(tracker), 0, {}
    for label, replicas in configs.items():
        run_ids = []
        for seed, (ckpt, history, hooked) in enumerate(replicas):
            trial_id = f"replica-{index:05d}"
            run_id = runs.start(trial_id, {"loss.mfcon_weight": 0.0 if label == "baseline" else 0.5,
                                           "replica.index": index, "replica.label": label, "replica.seed": seed})
            for h in _history(history):
                runs.log_epoch(trial_id, h, 1_700_000_000_000 + int(h["epoch"]))
            runs.finish(trial_id, "completed", str(ckpt.file))
            if hooked:
                log_speaker_model(tracker.client, run_id, ckpt.file, feature_config)
            run_ids.append(run_id)
            index += 1
        table[label] = {"params": {"loss.mfcon_weight": "0.0" if label == "baseline" else "0.5"},
                        "seeds": list(range(len(replicas))), "runs": run_ids,
                        "test_eer": [c.test_eer / 100 for c, _, _ in replicas], "test_min_dcf": [0.0] * len(replicas),
                        "delta_eer": None}
    tracker.client.log_dict(tracker.parent_run_id, {
        "study": study, "best": best, "verdict": "made by hand", "n_trials": 0, "n_speakers": TEST_SPEAKERS,
        "epochs": 2, "configs": table}, "replication.json")
    tracker.finish()
    return SimpleNamespace(run_id=tracker.parent_run_id, configs=table)


@pytest.fixture(scope="module")
def store(checkpoints, corpus, tmp_path_factory):
    """The studies in a fresh SQLite store; the cwd and environment are isolated so a leak to MLflow's
    default store (``./mlflow.db``) would show up in ``cwd``."""
    workdir = tmp_path_factory.mktemp("registry_runs")
    cwd = tmp_path_factory.mktemp("registry_cwd")
    data = corpus.data
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        uri = default_tracking_uri(workdir)
        good, bad = checkpoints["good"], checkpoints["bad"]
        fcfg = read_manifest(data).feature_config
        _write_study(uri, workdir, "weak", data, [("bad", bad, "completed", "bad")])
        main = _write_study(uri, workdir, "main", data, [
            ("good", good, "completed", "good"), ("bad", bad, "pruned", "bad"), ("crashed", None, "failed", "none"),
            ("busy", None, "running", "none"), ("lost", None, "completed", "lost")])
        _write_study(uri, workdir, "unfinished", data, [("crashed", None, "failed", "none"),
                                                        ("busy", None, "running", "none")])
        rep_trials = _write_study(uri, workdir, "rep", data, [("t-good", good, "completed", "rep-good"),
                                                               ("t-bad", bad, "completed", "rep-bad")])
        seeds = [(checkpoints[f"seed{s}"], SEED_DEV_EER[s], s != 2) for s in range(3)]  # seed 2: promote logs it
        rep = _write_replication(uri, workdir, "rep", {"baseline": [(bad, [50.0], False), (bad, [50.0], False)],
                                                       "top1": seeds}, "top1", fcfg)
        _write_study(uri, workdir, "nobest", data, [("good", good, "completed", "good")])
        nobest = _write_replication(uri, workdir, "nobest", {"baseline": [(bad, [50.0], False), (bad, [50.0], False)]},
                                    None, fcfg)
        client = MlflowClient(uri, registry_uri=uri)
        before = client.get_run(main["good"]).info
        # The hook a study calls when a trial ends (the bad trial gets none: promote logs it itself).
        hooked = log_speaker_model(client, main["good"], good.file, fcfg)
        yield SimpleNamespace(uri=uri, workdir=workdir, cwd=cwd, client=client, main=main, hooked=hooked,
                              before=before, data=data, rep=rep, rep_trials=rep_trials, nobest=nobest)


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


def test_selection_uses_only_completed_or_pruned_trials(store):
    _, trials = finished_trials(store.client, "main")
    assert [t.trial_id for t in trials] == ["lost", "good", "bad"]  # failed / running trials are ignored
    assert trials[1].value == min(DEV_EER["good"])  # the default selection metric is dev_eer
    _, by_dcf = finished_trials(store.client, "main", "dev_min_dcf")
    assert by_dcf[1].value == pytest.approx(min(DEV_EER["good"]) / 50)
    _, rep = finished_trials(store.client, "rep")  # replica runs (role=replica) are not study trials
    assert [t.trial_id for t in rep] == ["t-bad", "t-good"]


def test_promotion_picks_by_the_metric_the_study_optimised(store):
    """One metric everywhere: without --metric, promotion ranks by the study run's mfcon.metric."""
    from mfcon.promotion.registry import study_selection_metric
    from mfcon.tracking import METRIC_TAG, ROLE_TAG, find_runs

    assert study_selection_metric(store.client, "main") == "dev_eer"  # no tag: the default
    exp = store.client.get_experiment_by_name("weak")
    parent = find_runs(store.client, exp.experiment_id, **{ROLE_TAG: "study"})[0]
    store.client.set_tag(parent.info.run_id, METRIC_TAG, "dev_min_dcf")
    try:
        assert study_selection_metric(store.client, "weak") == "dev_min_dcf"
    finally:
        store.client.set_tag(parent.info.run_id, METRIC_TAG, "dev_eer")


def test_first_promotion_becomes_champion(ladder, store):
    first = ladder.results[0]
    assert (first.version, first.promoted, first.forced, first.champion) == ("1", True, False, None)
    assert first.reason == "no champion yet"
    assert ladder.aliases[0] == {"champion": "1"}
    assert first.notes[0].startswith("logged the checkpoint of bad as pyfunc model")  # the weak run had none yet
    assert "champion_version" not in _tags(store, "1")


def test_significantly_better_challenger_takes_over(ladder, store):
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
    assert json.loads(tags["params"]) == {k: str(v) for k, v in PARAMS["good"].items()}
    assert float(tags["eer_threshold"]) == r.challenger.threshold  # exact round trip
    assert np.array_equal(np.asarray(json.loads(tags["score_mean"]), dtype=np.float32), r.challenger.mean)
    assert r.challenger.eer_ci[0] <= r.challenger.eer <= r.challenger.eer_ci[1]
    assert float(tags["trial_dev_eer"]) == min(DEV_EER["good"]) and tags["selection_metric"] == "dev_eer"
    assert (r.challenger.eer, r.champion.eer) == (pytest.approx(0.0, abs=5.0), 50.0)
    assert "significantly better on the test list (" in r.reason and "seeds" not in r.reason
    # Every named test list is reported; the gate decided on `test`.
    assert r.decided_on == tags["decided_on"] == "test" and [c.name for c in r.lists] == ["test", "pair"]
    on_test, on_pair = r.lists
    assert (on_test.challenger_eer, on_test.champion_eer, on_test.delta) == (r.challenger.eer, r.champion.eer, r.delta)
    pair = read_eval_set(store.data, "test", list_name="pair")
    assert on_pair.n_trials == len(pair.trials) < r.n_trials and on_pair.n_speakers == 2
    assert (on_pair.challenger_eer, on_pair.champion_eer) == (pytest.approx(0.0, abs=5.0), 50.0)
    assert on_pair.delta.high < 0 and 0.0 <= on_pair.challenger_min_dcf <= 1.0
    assert {k: tags[k] for k in ("list.pair.eer", "list.pair.delta_eer", "list.test.eer")} == {
        "list.pair.eer": f"{on_pair.challenger_eer:.4f}", "list.pair.delta_eer": f"{on_pair.delta.estimate:.4f}",
        "list.test.eer": tags["eer"]}
    shown = format_promotion(r)
    assert "every test list (the gate decided on test):" in shown and "test*" in shown and "\n  pair " in shown


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


def test_promotion_without_replication_judges_the_best_dev_trial_on_the_test_list(ladder, store, checkpoints):
    r = ladder.results[1]
    test, dev = read_eval_set(store.data, "test"), read_eval_set(store.data, "dev")
    assert len(test.trials) != len(dev.trials) and not {t.enroll for t in test.trials} & {t.enroll for t in dev.trials}
    assert (r.evidence, r.replication_run_id, r.n_trials, r.n_groups) == ("study_trial", None, len(test.trials), 3)
    assert r.evidence_detail == f"best trial good by dev_eer, re-scored on the test list of {len(test.trials)} trials"
    assert r.seed_eers == [r.challenger.eer]
    # The scores are the registered model's on the TEST list, exactly as score_trials gives them with the
    # serving settings fitted on DEV: the mean dev embedding as centre, the EER threshold of the dev trials.
    model = _model(checkpoints["good"].file)
    dev_emb = extract_embeddings(model, dev.features)
    centre = dev_emb.mean(axis=0)
    expected = score_trials(test.utt_ids, extract_embeddings(model, test.features), test.trials, centre=centre)[0]
    served_on_cuda = torch.cuda.is_available()  # promote embeds with the pyfunc, on cuda where present (TF32)
    tol = 5e-3 if served_on_cuda else 1e-5
    np.testing.assert_allclose(r.challenger.scores, expected, atol=tol)
    tags = _tags(store, "2")
    assert tags["serving_fit"] == "dev"
    np.testing.assert_allclose(json.loads(tags["score_mean"]), centre, atol=tol)
    dev_scores, dev_labels = score_trials(dev.utt_ids, dev_emb, dev.trials, centre=centre)
    assert float(tags["eer_threshold"]) == pytest.approx(equal_error_rate(dev_scores, dev_labels)[1], abs=tol)
    assert {k: tags[k] for k in ("evidence", "evidence_detail", "eval_split", "n_trials", "n_speakers")} == {
        "evidence": "study_trial", "evidence_detail": r.evidence_detail, "eval_split": "test",
        "n_trials": str(len(test.trials)), "n_speakers": "3"}
    assert "replication_run_id" not in tags


def test_promotion_with_a_replication_gates_every_seed_and_registers_the_best_by_dev(store):
    name = "mfcon-replicated"
    promote("weak", store.uri, model_name=name, data_dir=store.data, n_boot=200)  # the bad model is champion
    r = promote("rep", store.uri, model_name=name, data_dir=store.data, n_boot=200)
    top1 = store.rep.configs["top1"]
    # Without the replication the best trial by dev would be the bad one; the replication's best config wins.
    assert finished_trials(store.client, "rep")[1][0].trial_id == "t-bad"
    assert (r.evidence, r.replication_run_id, r.version) == ("replication", store.rep.run_id, "2")
    assert r.trial.run_id == top1["runs"][1] and r.trial.value == min(SEED_DEV_EER[1])  # seed 1: lowest dev EER
    assert r.evidence_detail == (f"replication {store.rep.run_id}: config top1, 3 seeds, test list of 36 trials; "
                                 "registered seed 1, the lowest dev_eer (6)")
    assert len(r.seed_eers) == 3 and max(r.seed_eers) < 5.0 and r.champion.eer == 50.0
    assert r.delta.estimate == pytest.approx(np.mean(r.seed_eers) - 50.0) and r.delta.high < 0
    assert r.promoted and not r.forced and "with 3 seeds of top1" in r.reason
    assert registry._aliases(store.client, name) == {"champion": "2", "previous": "1"}
    assert any(n.startswith("logged the checkpoint of replica-00004") for n in r.notes)  # seed 2 had no model
    tags = _tags(store, "2", name)
    assert {k: tags[k] for k in ("evidence", "evidence_detail", "replication_run_id", "replication_config",
                                 "n_seeds", "run_id", "eval_split")} == {
        "evidence": "replication", "evidence_detail": r.evidence_detail, "replication_run_id": store.rep.run_id,
        "replication_config": "top1", "n_seeds": "3", "run_id": top1["runs"][1], "eval_split": "test"}
    assert tags["model_uri"] == store.client.get_run(top1["runs"][1]).data.tags[MODEL_URI_TAG]
    assert json.loads(tags["seed_eers"]) == [round(e, 4) for e in r.seed_eers]
    # The serving tags are the registered replica's own test scores.
    assert float(tags["eer_threshold"]) == r.challenger.threshold and r.challenger.eer == r.seed_eers[1]
    assert equal_error_rate(r.challenger.scores, r.challenger.labels)[0] * 100 == r.challenger.eer
    shown = format_promotion(r).splitlines()
    assert shown[0] == f"study rep: evidence replication: {r.evidence_detail}"
    assert any(line.split()[:1] == ["seeds"] and "mean of" in line for line in shown)
    assert any(line.split()[:1] == ["difference"] and "(seed mean - champion)" in line for line in shown)


def test_promotion_decides_on_the_named_list_it_is_given(store):
    r = promote("main", store.uri, model_name="mfcon-pair", data_dir=store.data, n_boot=200, decide_on="pair")
    pair = read_eval_set(store.data, "test", list_name="pair")
    assert r.decided_on == "pair" and r.n_trials == len(pair.trials) and r.n_groups == 2
    assert [c.name for c in r.lists] == ["pair", "test"] and r.lists[0].challenger_eer == r.challenger.eer
    assert _tags(store, r.version, "mfcon-pair")["decided_on"] == "pair"
    assert "scored on test list pair:" in format_promotion(r)
    with pytest.raises(ValueError, match="--decide-on H: the data folder has no test list of that name "
                                         r"\(its test lists: test, pair\)"):
        promote("main", store.uri, model_name="mfcon-pair", data_dir=store.data, n_boot=200, decide_on="H")


def test_a_replication_without_an_mfcon_configuration_falls_back_to_the_best_trial(store):
    r = promote("nobest", store.uri, model_name="mfcon-nobest", data_dir=store.data, n_boot=200)
    assert (r.evidence, r.trial.trial_id, r.replication_run_id) == ("study_trial", "good", None)
    assert any(f"replication {store.nobest.run_id} has no MFCon configuration" in n for n in r.notes)


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


def test_champion_pyfunc_reproduces_checkpoint_embeddings(ladder, store, checkpoints, corpus):
    eval_set = read_eval_set(store.data, "test")
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
    wavs = [load_audio(corpus.root / u) for u in eval_set.utt_ids[:3]]
    np.testing.assert_allclose(served.predict(pd.DataFrame({"waveform": wavs})), expected[:3], atol=1e-5)
    np.testing.assert_allclose(served.predict({"waveform": wavs[0]}), expected[:1], atol=1e-5)
    with pytest.raises(Exception, match="exactly one of"):
        served.predict(pd.DataFrame({"waveform": [wavs[0]], "fbank": [eval_set.features[0]]}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_served_model_on_cuda_matches_cpu(ladder, store):
    feats = read_eval_set(store.data, "test").features
    cpu = embedder_of(load_embedder("models:/mfcon-speaker/2", store.uri, device="cpu"))
    gpu = embedder_of(load_embedder("models:/mfcon-speaker/2", store.uri))  # cuda is the default where present
    assert gpu.device.type == "cuda"
    np.testing.assert_allclose(gpu.embed_features(feats), cpu.embed_features(feats), atol=5e-3)  # cuDNN TF32 convs


def test_verify_scores_the_trial_list_exactly_as_promotion_did(ladder, store, corpus):
    promoted = ladder.results[1]  # v2, the champion after the rollback
    eval_set = read_eval_set(store.data, "test")
    pairs = [(corpus.root / t.enroll, corpus.root / t.test) for t in eval_set.trials]
    results = verify_pairs(pairs, tracking_uri=store.uri)
    scores = np.array([r.score for r in results])
    labels = promoted.challenger.labels
    np.testing.assert_allclose(scores, promoted.challenger.scores, atol=1e-5)
    assert {r.threshold for r in results} == {promoted.challenger.threshold}
    assert {r.model_uri for r in results} == {"models:/mfcon-speaker/2"}
    # Scoring contract: centred cosine with the version's dev-fitted centre (score_mean) on the served embeddings.
    emb = embedder_of(load_embedder("models:/mfcon-speaker/2", store.uri)).embed_features(eval_set.features)
    np.testing.assert_allclose(score_trials(eval_set.utt_ids, emb, eval_set.trials,
                                            centre=promoted.challenger.mean)[0], scores, atol=1e-5)
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


def test_embed_writes_a_readable_parquet(ladder, store, corpus, tmp_path):
    picked = sorted(corpus.root.glob("*/*/*.wav"))[:3]
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
    for old_name in ("accuracy", "eer"):  # per-epoch trial metrics are dev_* now
        with pytest.raises(RegistryError, match="unknown selection metric"):
            promote("main", store.uri, data_dir=store.data, metric=old_name)
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


def test_cli_promote_verify_embed(store, corpus, capsys, tmp_path):
    store_args = ["--workdir", str(store.workdir)]  # the default URI: <workdir>/mlflow.db
    _cli(["promote", "--study", "main", "--data", str(store.data), "--model-name", "cli-model", "--n-boot", "200",
          *store_args])
    out = capsys.readouterr().out
    assert "challenger" in out and "PROMOTED: cli-model@champion -> v1 (no champion yet)" in out
    assert "study main: evidence study_trial: best trial good by dev_eer, re-scored on the test list of 36 trials" in out
    assert "scored on the test list: 36 trials, 3 enrollment speakers" in out
    _cli(["promote", "--study", "weak", "--data", str(store.data), "--model-name", "cli-model", "--n-boot", "200",
          *store_args])
    out = capsys.readouterr().out
    assert "champion" in out and "difference" in out and "not promoted: cli-model@champion stays v1" in out
    a, b = sorted(corpus.root.glob("*/*/*.wav"))[:2]
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


def test_asnorm_promotion_stores_its_cohort_and_verify_scores_exactly_as_promotion_did(ladder, store, corpus):
    """AS-norm end to end: promote scores the test list with a training-speaker cohort, the version carries the
    cohort (checksummed .npy), and verify applies it: the same scores, pair by pair."""
    name = "mfcon-asnorm"
    r = promote("main", store.uri, model_name=name, data_dir=store.data, n_boot=200, score_norm="asnorm", top_n=10)
    tags = _tags(store, r.version, name)
    assert tags["score_norm"] == "asnorm" and tags["score_top_n"] == "10" and tags["score_cohort"].startswith("runs:/")
    assert r.challenger.cohort.shape == (len(read_manifest(store.data).speakers), r.challenger.mean.shape[0])
    plain = promote("main", store.uri, model_name="mfcon-plain", data_dir=store.data, n_boot=200)
    assert not np.allclose(plain.challenger.scores, r.challenger.scores)  # the cohort changed the scores
    eval_set = read_eval_set(store.data, "test")
    pairs = [(corpus.root / t.enroll, corpus.root / t.test) for t in eval_set.trials]
    served = verify_pairs(pairs, model_uri=f"models:/{name}@champion", tracking_uri=store.uri)
    np.testing.assert_allclose([v.score for v in served], r.challenger.scores, atol=1e-4)
    assert {v.threshold for v in served} == {r.challenger.threshold}
    # A cohort changed after promotion is refused, not silently used.
    store.client.set_model_version_tag(name, r.version, "score_cohort_sha256", "0" * 64)
    with pytest.raises(RegistryError, match="does not match its sha256"):
        verify_pairs(pairs[:1], model_uri=f"models:/{name}/{r.version}", tracking_uri=store.uri)
