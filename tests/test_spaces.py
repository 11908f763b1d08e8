"""Search spaces: every shipped file validates; each kind of bad YAML gets its own clear error."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mfcon.config import ConfigError, TrainConfig, load_train_config, resolve_blocks
from mfcon.study.spaces import (
    DefineByRun,
    SearchSpaceError,
    load_search_space,
    optuna_distributions,
    sampled_to_overrides,
    trial_config,
)

REPO = Path(__file__).resolve().parent.parent
GOOD = """
name: t
base: {model_preset: tiny, epochs: 2}
params:
  loss.mfcon_weight: {type: loguniform, low: 0.01, high: 1.0}
  loss.mfcon_temperature: {type: uniform, low: 0.03, high: 0.5}
  optim.lr: {type: categorical, choices: [0.001, 0.002]}
  data.utts_per_speaker: {type: int, low: 2, high: 4}
  loss.mfcon_blocks: {type: blocks, encoding: per_block}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_spaces_validate(path):
    space = load_search_space(path)
    assert space.name and space.base_config().epochs >= 1


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_train_configs_validate(path):
    assert isinstance(load_train_config(path), TrainConfig)


def test_baseline_space_has_no_mfcon():
    space = load_search_space(REPO / "search_spaces" / "baseline.yaml")
    assert space.params == {} and space.base_config().selected_blocks() == ()


@pytest.mark.parametrize("text, fragments", [
    (GOOD + "bogus: 1\n", ["bogus", "Extra inputs"]),
    (GOOD.replace("low: 0.03, high: 0.5", "low: 0.5, high: 0.03"), ["params.loss.mfcon_temperature", "low (0.5) must be < high"]),
    (GOOD.replace("low: 0.01, high: 1.0", "low: 0.0, high: 1.0"), ["params.loss.mfcon_weight", "loguniform needs low > 0"]),
    (GOOD.replace("choices: [0.001, 0.002]", "choices: []"), ["params.optim.lr", "at least 1 item"]),
    (GOOD.replace("encoding: per_block", "encoding: named, choices: [all, middle]"), ["loss.mfcon_blocks", "middle"]),
    (GOOD.replace("type: int", "type: integer"), ["params.data.utts_per_speaker", "type"]),
    (GOOD.replace("optim.lr:", "optim.learning_rate:"), ["params.optim.learning_rate", "not a valid training-config field"]),
    (GOOD.replace("epochs: 2", "epochs: two"), ["base", "epochs"]),
    ("name: t\nparams: [1, 2]\n", ["params", "dictionary"]),
    ("- just\n- a list\n", ["top level must be a mapping"]),
    ("name: t\nparams: {a: {type: uniform, low: 1\n", ["not valid YAML"]),
    (GOOD.replace("epochs: 2}", "epochs: 2, eval_every: 2}"), ["base.eval_every", "every epoch"]),
    (GOOD + "  eval_every: {type: int, low: 1, high: 3}\n", ["params.eval_every", "every epoch"]),
])
def test_bad_spaces_name_file_and_field(tmp_path, text, fragments):
    path = write(tmp_path, text)
    with pytest.raises(SearchSpaceError) as err:
        load_search_space(path)
    message = str(err.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        load_search_space(tmp_path / "nope.yaml")


def test_valid_space_round_trips_to_optuna(tmp_path):
    space = load_search_space(write(tmp_path, GOOD))
    dists = optuna_distributions(space)
    assert dists["loss.mfcon_weight"] == optuna.distributions.FloatDistribution(0.01, 1.0, log=True)
    assert dists["loss.mfcon_temperature"] == optuna.distributions.FloatDistribution(0.03, 0.5)
    assert dists["optim.lr"] == optuna.distributions.CategoricalDistribution([0.001, 0.002])
    assert dists["data.utts_per_speaker"] == optuna.distributions.IntDistribution(2, 4)
    assert [k for k in dists if k.startswith("loss.mfcon_blocks.")] == [f"loss.mfcon_blocks.b{i}" for i in (1, 2, 3)]
    # TPE samples it, and every sample becomes a valid TrainConfig.
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    define = DefineByRun(space)
    for _ in range(6):
        trial = study.ask()
        define(trial)
        cfg = trial_config(space, trial.params)
        assert set(trial.params) == set(dists)
        assert cfg.loss.mfcon_weight == trial.params["loss.mfcon_weight"]
        expected = [b for b in (1, 2, 3) if trial.params[f"loss.mfcon_blocks.b{b}"]]
        assert list(cfg.loss.mfcon_blocks) == expected
        study.tell(trial, 1.0)


def test_named_block_sets_resolve():
    assert resolve_blocks("all", 6) == (1, 2, 3, 4, 5, 6)
    assert resolve_blocks("shallow", 6) == (1, 2, 3)
    assert resolve_blocks("deep", 6) == (4, 5, 6)
    assert resolve_blocks("shallow", 3) == (1, 2) and resolve_blocks("deep", 3) == (3,)
    assert resolve_blocks("none", 6) == ()
    assert resolve_blocks([3, 1, 3], 6) == (1, 3)
    with pytest.raises(ValueError, match="out of range"):
        resolve_blocks([7], 6)


def test_named_encoding_overrides(tmp_path):
    text = GOOD.replace("encoding: per_block", "encoding: named, choices: [shallow, deep]")
    space = load_search_space(write(tmp_path, text))
    overrides = sampled_to_overrides(space, {"loss.mfcon_weight": 0.1, "loss.mfcon_temperature": 0.1, "optim.lr": 0.001,
                                             "data.utts_per_speaker": 2, "loss.mfcon_blocks": "deep"})
    assert overrides["loss.mfcon_blocks"] == "deep"
    assert trial_config(space, overrides).selected_blocks() == (3,)


def test_unknown_train_config_key_is_rejected(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("epochs: 2\nloss: {mfcon_wieght: 0.1}\n")
    with pytest.raises(ConfigError, match=r"loss\.mfcon_wieght"):
        load_train_config(path)


@pytest.mark.parametrize("param, message", [
    ("{type: categorical, choices: [aam, bogus]}", r"params.loss.margin_loss: not a valid training-config field or value: 'bogus'"),
    ("{type: uniform, low: 0.1, high: 5.0}", r"params.loss.margin: not a valid training-config field or value: 5.0"),
])
def test_every_choice_and_both_range_ends_are_applied_at_load(tmp_path, param, message):
    """A value the searcher may sample must not fail a trial at run time: the high end and later choices too."""
    key = "loss.margin_loss" if "categorical" in param else "loss.margin"
    path = tmp_path / "space.yaml"
    path.write_text(f"name: t\nbase: {{model_preset: tiny}}\nparams:\n  {key}: {param}\n")
    with pytest.raises(SearchSpaceError, match=message):
        load_search_space(path)


def test_choices_on_a_per_block_selection_are_refused_not_ignored(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("name: t\nbase: {model_preset: tiny}\n"
                    "params:\n  loss.mfcon_blocks: {type: blocks, encoding: per_block, choices: [deep]}\n")
    with pytest.raises(SearchSpaceError, match="choices apply to encoding: named only"):
        load_search_space(path)
