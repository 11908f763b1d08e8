"""End to end on real synthetic speech: corpus -> shards -> local training -> EER well below chance."""

from __future__ import annotations

import json
import re

import pytest
from mfcon.cli import main as cli_main
from mfcon.config import TrainConfig, apply_overrides
from mfcon.data.local import LocalShardData, read_eval_set
from mfcon.models.mfa_conformer import build_model
from mfcon.evaluation.scoring import evaluate
from mfcon.train.checkpoint import load_checkpoint
from mfcon.train.local import LocalRunHooks, train_local
from mfcon.train.loop import fit

TINY = TrainConfig.model_validate({
    "model_preset": "tiny", "epochs": 4, "seed": 0,
    "loss": {"mfcon_weight": 0.1, "mfcon_temperature": 0.1, "mfcon_blocks": [1, 2]},
    "data": {"speakers_per_batch": 6, "utts_per_speaker": 2, "crop_seconds": 1.5},
    "optim": {"lr": 0.003, "schedule": "cosine", "warmup_steps": 5},
})


@pytest.fixture(scope="module")
def trained(demo_corpus_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    history = train_local(TINY, demo_corpus_data, out, echo=False)
    return out, history


def test_eer_falls_well_below_chance(trained, demo_corpus_data):
    out, history = trained
    eers = [h["dev_eer"] for h in history]
    assert len(eers) == TINY.epochs
    assert eers[-1] < 35.0, eers  # chance is 50%
    assert min(eers[1:]) < eers[0], eers
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # An untrained model of the same shape is near chance on the same trials.
    untrained = build_model(TINY.model_config_resolved())
    assert evaluate(untrained, read_eval_set(demo_corpus_data, "dev")).eer * 100 > eers[-1]


def test_checkpoints_load_weights_only_and_reproduce_the_eer(trained, demo_corpus_data):
    out, history = trained
    best = load_checkpoint(out / "best.pt")  # torch.load(weights_only=True)
    model = build_model(TINY.model_config_resolved())
    model.load_state_dict(best["model"])
    eer = evaluate(model, read_eval_set(demo_corpus_data, "dev")).eer * 100
    assert eer == pytest.approx(min(h["dev_eer"] for h in history), abs=1e-6)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1.0, 2.0, 3.0, 4.0]


class CrashAfter(LocalRunHooks):
    """Dies right after epoch ``n`` was checkpointed, like a killed process."""

    def __init__(self, out_dir, n):
        super().__init__(out_dir, echo=False)
        self.n = n

    def report(self, metrics, state):
        super().report(metrics, state)
        if metrics["epoch"] == self.n:
            raise KeyboardInterrupt


def test_resume_continues_exactly_where_it_stopped(small_data, tmp_path):
    cfg = apply_overrides(TINY, {"epochs": 3, "data.speakers_per_batch": 4})
    straight = train_local(cfg, small_data, tmp_path / "straight", echo=False)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, LocalShardData(small_data, seed=cfg.seed), CrashAfter(tmp_path / "split", 2))
    resumed = train_local(cfg, small_data, tmp_path / "split", echo=False)
    assert len(resumed) == 3  # history carried over, only epoch 3 trained
    assert [json.loads(x)["epoch"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    for key in ("train_loss", "dev_eer"):
        assert resumed[-1][key] == pytest.approx(straight[-1][key], rel=1e-5, abs=1e-6)


def test_baseline_objective_has_no_mfcon_term(small_data, tmp_path):
    cfg = apply_overrides(TINY, {"epochs": 1, "loss.mfcon_weight": 0.0, "data.speakers_per_batch": 4})
    history = train_local(cfg, small_data, tmp_path, echo=False)
    assert history[0]["mfcon_loss"] == 0.0 and history[0]["train_loss"] == history[0]["margin_loss"]
    state = load_checkpoint(tmp_path / "last.pt")
    assert not any(k.startswith("mfcon") for k in state["objective"])


def test_shard_rows_are_dealt_to_ranks_without_overlap(demo_corpus_data):
    seen = []
    for rank in range(2):
        data = LocalShardData(demo_corpus_data, seed=0, rank=rank, world_size=2)
        seen.append({f.tobytes()[:64] for f, _ in data.train_rows(epoch=1)})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_cli_train_prints_best_eer(small_data, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_preset: tiny\nepochs: 1\ndata: {speakers_per_batch: 4}\n")
    assert cli_main(["train", "--config", str(cfg), "--data", str(small_data), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"best dev EER \d+\.\d\d% at epoch 1 of 1: .*best\.pt", out), out  # was "best EER inf%"
    assert "inf" not in out and "next: score it on the held-out test list: mfcon score test" in out


def test_cli_reports_bad_config_clearly(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 1\nmodel_preset: huge\n")
    assert cli_main(["train", "--config", str(cfg), "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "c.yaml" in err and "model_preset" in err
