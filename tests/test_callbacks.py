"""The study callback's choice of a trial's best checkpoint: ties and checkpoints Ray Train already deleted."""

from __future__ import annotations

from pathlib import Path

from mfcon.study.callbacks import MLflowStudyCallback
from mfcon.study.spaces import load_search_space
from mfcon.train.checkpoint import RAY_CHECKPOINT_FILE

REPO = Path(__file__).resolve().parent.parent


def _checkpoint(tmp_path: Path, name: str, exists: bool = True) -> str:
    path = tmp_path / name
    if exists:
        path.mkdir()
        (path / RAY_CHECKPOINT_FILE).write_bytes(b"x")
    return str(path)


def _callback(mode: str = "min") -> MLflowStudyCallback:
    space = load_search_space(REPO / "search_spaces" / "demo.yaml").model_copy(update={"mode": mode})
    return MLflowStudyCallback("sqlite:///unused.db", "unused", space, {})


def test_best_existing_checkpoint_wins_and_ties_go_to_the_later_epoch(tmp_path):
    cb = _callback()
    cb._checkpoints["t"] = [(0.0, 1, _checkpoint(tmp_path, "e1", exists=False)),  # deleted by Train's num_to_keep
                            (0.0, 2, _checkpoint(tmp_path, "e2")), (0.0, 3, _checkpoint(tmp_path, "e3")),
                            (4.0, 4, _checkpoint(tmp_path, "e4"))]
    assert cb.best_checkpoint("t") == str(tmp_path / "e3")
    assert cb.best_checkpoint("unknown") is None


def test_mode_max_prefers_the_highest_value(tmp_path):
    cb = _callback("max")
    cb._checkpoints["t"] = [(1.0, 1, _checkpoint(tmp_path, "a")), (3.0, 2, _checkpoint(tmp_path, "b"))]
    assert cb.best_checkpoint("t") == str(tmp_path / "b")
