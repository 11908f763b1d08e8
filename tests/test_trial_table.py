"""The ranked trial table a finished study prints (mfcon.study.trial_table, mfcon.cli.study.print_summary)."""

from __future__ import annotations

from mfcon.study.runner import StudySummary
from mfcon.study.trial_table import BLOCKS, LAMBDA, TAU, TrialRow, ranked, trial_table


def _rows() -> list[TrialRow]:
    return [TrialRow("t3", "pruned", 1, 9.0, {LAMBDA: 0.3, TAU: 0.1, BLOCKS: "1"}),
            TrialRow("t1", "completed", 2, 6.5, {LAMBDA: 0.05, TAU: 0.2, BLOCKS: "1,2,3"}),
            TrialRow("t0", "failed", 0, None, {LAMBDA: 0.1, TAU: 0.3, BLOCKS: "2"}),
            TrialRow("t2", "completed", 2, 6.5, {LAMBDA: 0.0, BLOCKS: "none"}, baseline=True, seed=1)]


def test_rows_are_ranked_best_first_failed_last_ties_by_trial_id():
    assert [r.trial for r in ranked(_rows())] == ["t1", "t2", "t3", "t0"]


def test_each_row_says_lambda_tau_blocks_and_marks_the_baseline():
    lines = trial_table(_rows(), "dev_eer")
    assert lines[0].split() == ["rank", "trial", "state", "epochs", "dev_eer", "lambda", "tau", "blocks"]
    first, baseline, pruned, failed = lines[1:]
    assert first.split() == ["1", "t1", "completed", "2", "6.50%", "0.0500", "0.200", "1,2,3"]
    assert baseline.split()[:8] == ["2", "t2", "completed", "2", "6.50%", "0.0000", "-", "none"]
    assert baseline.endswith("(baseline, seed 1)") and "baseline" not in first
    assert pruned.split()[2] == "pruned" and failed.split()[4] == "-"
    # A metric that is not an EER prints without a percent sign.
    assert "9.00 " in trial_table(_rows(), "dev_min_dcf")[3] + " "


def test_a_trial_known_by_its_folder_shows_a_short_name():
    row = TrialRow("/runs/s/tune/s/run_trial_7f3a1_00003_3_lr=0.0010,weight=0.1000_2026-12-07_18-00-01", "failed",
                   0, None, {})
    name = trial_table([row], "dev_eer")[1].split()[1]
    assert name.startswith("run_trial_7f3a1_00003") and len(name) <= 24


def test_a_long_study_shows_its_best_rows_and_says_how_many_are_not_shown():
    rows = [TrialRow(f"t{i:02d}", "completed", 2, float(i), {LAMBDA: 0.1}) for i in range(25)]
    lines = trial_table(rows, "dev_eer", limit=10)
    assert len(lines) == 12 and lines[1].split()[1] == "t00" and lines[10].split()[1] == "t09"
    assert lines[-1].strip().startswith("... 15 more")


def test_the_study_summary_prints_the_ranked_table(capsys):
    from mfcon.cli.study import print_summary

    summary = StudySummary(study="s", tracking_uri="sqlite:///runs/mlflow.db", experiment_dir="runs/s/tune/s",
                           num_trials=4, states={"completed": 2, "pruned": 1, "failed": 1}, best_trial="t1",
                           best_metric=6.5, best_params={LAMBDA: 0.05}, metric="dev_eer", trials=_rows())
    print_summary(summary)
    out = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(out) if line.startswith("rank "))
    assert [line.split()[1] for line in out[header + 1:header + 5]] == ["t1", "t2", "t3", "t0"]
    assert '"trial": "t1"' in summary.to_json()  # the rows travel with the summary's JSON
