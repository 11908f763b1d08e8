"""The study's Optuna storage: where it is by default, the one-line errors for unusable URLs, what the searcher
writes there (states, values, params, Tune's trial ids), a resume that keeps the same Optuna study, and the real
``optuna-dashboard`` serving it. No Ray here: tests/test_study.py checks the same storage after a real study."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import optuna
import pytest
from mfcon.cli.common import credentials_out_of_uris, is_input_error
from mfcon.study import optuna_storage as ostore
from mfcon.study.optuna_storage import OptunaStorageError, open_storage, resolve_storage, study_storage
from optuna_fixtures import dashboard_study, free_port, optuna_dashboard

REPO = Path(__file__).resolve().parent.parent


def test_the_default_storage_sits_beside_mlflow_db_or_on_the_driver_for_a_bucket(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(ostore.OPTUNA_STORAGE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_storage(None, "runs") == f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}"
    assert resolve_storage(None, "runs").startswith("sqlite:////")  # absolute: a resume from elsewhere finds it
    assert resolve_storage("sqlite:///rel/o.db", "runs") == f"sqlite:///{tmp_path / 'rel' / 'o.db'}"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    on_driver = resolve_storage(None, "s3://bucket/runs", "s1")  # its own file: "s1" in another bucket is another
    assert re.fullmatch(f"sqlite:///{tmp_path}/data/mfcon/optuna/s1-\\d{{8}}T\\d{{6}}\\.db", on_driver), on_driver
    url, _ = study_storage(None, "s3://bucket/runs", "s1", True, {}, restoring=False)
    assert "on this driver's disk" in capsys.readouterr().out and ostore.on_driver_disk(url)
    monkeypatch.setenv(ostore.OPTUNA_STORAGE_ENV, "postgresql://mfcon@db:5432/optuna")
    assert resolve_storage(None, "s3://bucket/runs") == "postgresql+psycopg2://mfcon@db:5432/optuna"
    assert resolve_storage("sqlite:////x/o.db", "runs") == "sqlite:////x/o.db"  # the flag wins


def test_an_unusable_storage_url_is_one_readable_line(tmp_path):
    closed = free_port()  # nothing listens here
    (tmp_path / "file").write_text("")
    cases = {
        "s3://bucket/optuna.db": "not a database Optuna can keep a study in",
        "optuna.db": "not a database Optuna can keep a study in",
        "sqlite:///s3://bucket/optuna.db": "SQLite cannot live in an object store",
        f"sqlite:///{tmp_path}/file/sub/optuna.db": "cannot create its folder",
        f"postgresql+psycopg2://mfcon:pw@127.0.0.1:{closed}/optuna": fr"unusable \(.*127.0.0.1.*{closed}",
        f"mysql://mfcon@127.0.0.1:{closed}/optuna": r"unusable \(No module named",
    }
    for url, message in cases.items():
        with pytest.raises(OptunaStorageError, match=message) as err:
            open_storage(url)
        text = str(err.value)
        assert text.startswith("--optuna-storage ") and "\n" not in text and "pw@" not in text, text
        assert is_input_error(err.value)  # the CLI prints it as one `error:` line, exit 2


def test_a_new_study_never_lands_in_an_old_optuna_study_and_a_resume_needs_its_own(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    url_, rdb = study_storage(None, str(tmp_path), "s1", True, {}, restoring=False)
    assert url_ == url and "optuna-dashboard " + url in capsys.readouterr().out
    optuna.create_study(study_name="s1", storage=url).ask()  # a start that never got to Tune's first checkpoint
    assert study_storage(None, str(tmp_path), "s1", True, {}, restoring=False)[0] == url  # deleted: nothing learned
    assert optuna.get_all_study_summaries(url) == []
    old = optuna.create_study(study_name="s1", storage=url)
    old.tell(old.ask(), 1.0)
    with pytest.raises(OptunaStorageError, match=f"named 's1' already exists.*optuna delete-study --study-name s1"):
        study_storage(None, str(tmp_path), "s1", True, {}, restoring=False)
    with pytest.raises(OptunaStorageError, match="no study of that name"):
        study_storage(None, str(tmp_path), "s2", True, {"optuna_storage": url}, restoring=True)
    with pytest.raises(OptunaStorageError, match="cannot move them"):
        study_storage(f"sqlite:///{tmp_path / 'other.db'}", str(tmp_path), "s1", True, {"optuna_storage": url}, True)
    assert study_storage(None, str(tmp_path), "s1", True, {"optuna_storage": url}, restoring=True)[0] == url
    # nothing to search (a baseline space), or a study from before storages: nothing opened
    assert study_storage(None, str(tmp_path), "s3", False, {}, restoring=False) == (None, None)
    assert study_storage(None, str(tmp_path), "s1", True, {"tracking_uri": "x"}, restoring=True) == (None, None)


def test_a_password_in_the_storage_url_goes_to_pgpassword_never_to_the_study(monkeypatch):
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = argparse.Namespace(tracking_uri=None, optuna_storage="postgresql://mfcon:s3cret@db:5432/optuna")
    with credentials_out_of_uris(args):
        assert args.optuna_storage == "postgresql://mfcon@db:5432/optuna" and os.environ["PGPASSWORD"] == "s3cret"
    assert "PGPASSWORD" not in os.environ
    args = argparse.Namespace(tracking_uri="postgresql://a:one@db/mlflow", optuna_storage="postgresql://a:two@db/o")
    with pytest.raises(SystemExit) as exit_:
        with credentials_out_of_uris(args):
            pass
    assert exit_.value.code == 2


def _searcher(storage):
    from mfcon.study.runner import study_search
    from mfcon.study.spaces import load_search_space

    space = load_search_space(REPO / "search_spaces" / "demo.yaml")
    return space, study_search(space, seed=0, storage=storage)


def test_the_searcher_writes_states_values_and_trial_ids_and_a_resume_keeps_its_study(tmp_path):
    """Finished trials as Tune ended them; after a restore, the trial asked past the checkpoint (Tune never knew
    it) is failed, not left RUNNING, and new trials go on in the same Optuna study; the dashboard shows it."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    space, s = _searcher(open_storage(url))
    for trial_id in ("b0", "b1", "t0", "t1", "t2"):
        s.suggest(trial_id)
    for epoch in (1, 2, 3, 4):
        s.on_trial_result("b0", {"dev_eer": 20.0 - epoch, "epoch": epoch})
    s.on_trial_complete("b0", {"dev_eer": 16.5, "epoch": 4})  # completed: its best epoch's value
    s.on_trial_result("t0", {"dev_eer": 30.0, "epoch": 1})
    s.on_trial_complete("t0", {"dev_eer": 30.0, "epoch": 1})  # stopped by ASHA after epoch 1
    s.on_trial_complete("t1", {"epoch": 2}, error=True)
    s.save(str(tmp_path / "searcher.pkl"))
    s.suggest("t3")  # asked after the checkpoint: the driver dies before the next one
    _, resumed = _searcher(None)
    resumed.restore(str(tmp_path / "searcher.pkl"))
    resumed.on_trial_complete("t2", {"dev_eer": 25.0, "epoch": 4})  # the in-flight trial, resumed by Tune
    resumed.suggest("t4")
    resumed.on_trial_complete("t4", {"dev_eer": 28.0, "epoch": 2})

    (study,) = optuna.get_all_study_summaries(url)
    assert study.study_name == space.name
    trials = optuna.load_study(study_name=space.name, storage=url).trials  # b1 (a second seed) is not TPE's
    got = [(t.user_attrs["trial_id"], t.state.name, t.value if t.state.name == "COMPLETE" else None)
           for t in trials]
    assert got == [("b0", "COMPLETE", 16.0), ("t0", "PRUNED", None), ("t1", "FAIL", None), ("t2", "COMPLETE", 25.0),
                   ("t3", "FAIL", None), ("t4", "PRUNED", None)]
    assert "mfcon.orphaned" in trials[4].user_attrs
    assert all("loss.mfcon_weight" in t.params for t in trials)
    assert trials[1].intermediate_values == {1: 30.0}

    with optuna_dashboard(url, tmp_path / "dashboard.log") as base:
        served = dashboard_study(base, space.name)
    assert [t["state"] for t in served["trials"]] == ["Complete", "Pruned", "Fail", "Complete", "Fail", "Pruned"]
    assert {p["name"] for p in served["trials"][0]["params"]} >= {"loss.mfcon_weight", "loss.mfcon_temperature"}
