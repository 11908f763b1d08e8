"""The study callback: its choice of a trial's best checkpoint (ties, checkpoints Ray Train already deleted),
and its state across ``Tuner.restore`` (a resumed study keeps its true best)."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import pytest
from mfcon.study.callbacks import MLflowStudyCallback
from mfcon.study.spaces import load_search_space
from mfcon.tracking import find_runs, open_spool, spool_dir
from mfcon.tracking.spool_file import read_lines
from mfcon.train.checkpoint import RAY_CHECKPOINT_FILE
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parent.parent


def _checkpoint(tmp_path: Path, name: str, exists: bool = True) -> str:
    path = tmp_path / name
    if exists:
        path.mkdir()
        (path / RAY_CHECKPOINT_FILE).write_bytes(b"x")
    return str(path)


def _callback() -> MLflowStudyCallback:
    space = load_search_space(REPO / "search_spaces" / "demo.yaml")
    return MLflowStudyCallback("sqlite:///unused.db", "unused", space, {})


def test_best_existing_checkpoint_wins_and_ties_go_to_the_later_epoch(tmp_path):
    cb = _callback()
    cb._checkpoints["t"] = [(0.0, 1, _checkpoint(tmp_path, "e1", exists=False)),  # deleted by Train's num_to_keep
                            (0.0, 2, _checkpoint(tmp_path, "e2")), (0.0, 3, _checkpoint(tmp_path, "e3")),
                            (4.0, 4, _checkpoint(tmp_path, "e4"))]
    assert cb.best_checkpoint("t") == str(tmp_path / "e3")
    assert cb.best_checkpoint("unknown") is None


def test_the_exported_epoch_is_the_one_best_epoch_names(tmp_path):
    """Export, ranking and the report share one rule (mfcon.evaluation.selection): lowest value, ties to the later
    epoch; Ray Train's retention ranks by checkpoint_rank, which orders the epochs the same way."""
    from mfcon.evaluation.selection import best_epoch, checkpoint_rank

    history = {1: 7.0, 2: 5.0, 3: 6.0, 4: 5.0}
    cb = _callback()
    cb._checkpoints["t"] = [(v, e, _checkpoint(tmp_path, f"e{e}")) for e, v in history.items()]
    assert best_epoch(history) == 4
    assert cb.best_checkpoint("t") == str(tmp_path / "e4")
    kept_first = sorted(history, key=lambda e: checkpoint_rank(history[e], e))
    assert kept_first[0] == best_epoch(history) and kept_first[:2] == [4, 2]


def test_a_space_that_maximises_an_error_rate_is_refused(tmp_path):
    import yaml
    from mfcon.study.spaces import SearchSpaceError

    data = yaml.safe_load((REPO / "search_spaces" / "demo.yaml").read_text())
    path = tmp_path / "max.yaml"
    path.write_text(yaml.safe_dump({**data, "mode": "max"}))
    with pytest.raises(SearchSpaceError, match=r"max\.yaml: invalid configuration\n  mode: .*mode must be 'min'"):
        load_search_space(path)


def test_best_so_far_and_checkpoints_are_callback_state(tmp_path):
    """What Tune saves with the experiment (``get_state``) comes back whole in a fresh callback (``set_state``)."""
    cb = _callback()
    cb._study_best = 12.5
    cb._checkpoints["t"] = [(13.0, 1, _checkpoint(tmp_path, "e1")), (12.5, 2, _checkpoint(tmp_path, "e2"))]
    restored = pickle.loads(pickle.dumps(_callback()))  # as Tuner.restore rebuilds it: initial settings only
    assert restored._study_best is None and restored._checkpoints == {}
    restored.set_state(pickle.loads(pickle.dumps(cb.get_state())))
    assert restored._study_best == 12.5
    assert restored._checkpoints == cb._checkpoints
    assert restored.best_checkpoint("t") == str(tmp_path / "e2")


# ---------------------------------------------------------------- a real Tune experiment, failed and resumed

EERS = {0: (30.0, 10.0, 12.0, 11.0), 1: (40.0, 25.0, 24.0, 23.0)}  # x -> dev eer per epoch


def resumable_trial(config):
    """Reports ``EERS[x]`` epoch by epoch with a checkpoint; x=1 crashes once after epoch 1."""
    import ray.tune

    start = 0
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            start = int(Path(d, "epoch").read_text())
    for epoch in range(start + 1, len(EERS[config["x"]]) + 1):
        if config["x"] == 1 and epoch == 2 and not Path(config["crash_marker"]).exists():
            Path(config["crash_marker"]).write_text("crashed once")
            raise RuntimeError("worker lost")
        with tempfile.TemporaryDirectory() as d:
            Path(d, "epoch").write_text(str(epoch))
            ray.tune.report({"epoch": epoch, "dev_eer": EERS[config["x"]][epoch - 1], "train_loss": 1.0 / epoch},
                            checkpoint=ray.tune.Checkpoint.from_directory(d))


def x_param(config):
    return {"x": config["x"]}


@pytest.mark.slow
def test_a_resumed_study_keeps_its_true_best(ray_local_2cpu, tmp_path):
    """Trial x=0 sets the best (10.0); x=1 crashes; after Tuner.restore its results (25, 24, 23) are worse:
    none may become the study's best, and no new best is even written."""
    import sys

    from ray import cloudpickle, tune

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import a test module
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = load_search_space(REPO / "search_spaces" / "demo.yaml").model_copy(update={"name": "resume"})
    callback = MLflowStudyCallback(uri, str(tmp_path), space, {}, params_of=x_param)
    config = {"x": tune.grid_search([0, 1]), "crash_marker": str(tmp_path / "crashed")}
    tuner = tune.Tuner(resumable_trial, param_space=config,
                       tune_config=tune.TuneConfig(max_concurrent_trials=1),
                       run_config=tune.RunConfig(name="resume", storage_path=str(tmp_path / "tune"),
                                                 callbacks=[callback], verbose=0))
    first = tuner.fit()
    assert sorted(r.error is not None for r in first) == [False, True]
    restored = tune.Tuner.restore(str(tmp_path / "tune" / "resume"), trainable=resumable_trial, resume_errored=True)
    second = restored.fit()
    assert [r.error for r in second] == [None, None]
    assert open_spool(tmp_path, "resume", uri).close(60) == 0

    spooled = read_lines(next(spool_dir(tmp_path, "resume").glob("*.jsonl")))
    assert [e["value"] for e in spooled if e.get("op") == "best"] == [30.0, 10.0]  # nothing after the resume
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("resume")
    parent = find_runs(client, exp.experiment_id, **{"mfcon.role": "study"})[0]
    trials = {r.data.params["x"]: r for r in find_runs(client, exp.experiment_id, **{"mfcon.role": "trial"})}
    assert sorted(trials) == ["0", "1"]  # one run per trial, the resumed one re-attached
    assert parent.data.tags["best_trial"] == trials["0"].data.tags["mfcon.trial_id"]
    assert parent.data.metrics["best_dev_eer"] == 10.0
    for x, run in trials.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "dev_eer"))
        assert history == list(enumerate(EERS[int(x)], start=1))
        assert (run.info.status, run.data.tags["mfcon.trial_state"]) == ("FINISHED", "completed")
