"""A study's own baseline and noise floor, from hand-made study histories: clearly better, within noise, worse.

The numbers are chosen so the verdict follows from the formula in mfcon.evaluation.noise_floor: the baseline's
seed-to-seed sd ``s`` over ``k`` seeds gives a noise floor of 2 * s * sqrt(1 + 1/k) around the baseline mean.
"""

from __future__ import annotations

import math

import pytest
from mfcon.evaluation.noise_floor import compare_with_baseline
from mfcon.report import WITHIN_NOISE, write_report
from mfcon.tracking import load_study
from mlflow.tracking import MlflowClient
from mlflow_fixtures import TrialSpec, write_study_store

BLOCKS_ON = {"loss.mfcon_weight": 0.1, "loss.mfcon_temperature": 0.07, "loss.mfcon_blocks.b1": True,
             "loss.mfcon_blocks.b2": False, "loss.mfcon_blocks.b3": True}
BASELINE = {"loss.mfcon_weight": 0.1, "loss.mfcon_temperature": 0.07, "loss.mfcon_blocks.b1": False,
            "loss.mfcon_blocks.b2": False, "loss.mfcon_blocks.b3": False}
BASE_SEEDS = (10.0, 10.4)  # best dev EER of the baseline at seeds 0 and 1: mean 10.2, sd 0.2828
FLOOR = 2 * 0.2828427 * math.sqrt(1 + 1 / 2)  # 0.6928

CASES = {  # study -> best dev EER per epoch of its searched trials
    "clearly-better": {"t-a": (12.0, 8.5), "t-b": (11.0, 9.9), "t-c": (13.0, 12.0)},  # 8.5 - 10.2 = -1.70
    "within-noise": {"t-a": (12.0, 9.8), "t-b": (11.0, 10.1), "t-c": (13.0, 12.0)},  # -0.40: inside +-0.69
    "worse": {"t-a": (12.0, 11.5), "t-b": (13.0, 11.8), "t-c": (14.0, 13.0)},  # +1.30
}
EXPECTED = {"clearly-better": "better", "within-noise": "within noise", "worse": "worse"}


def history(study: str) -> tuple[TrialSpec, ...]:
    trials = [TrialSpec(f"{study}-base{seed}", BASELINE, (12.0, value), "completed", baseline_seed=seed)
              for seed, value in enumerate(BASE_SEEDS)]
    trials += [TrialSpec(f"{study}-{t}", BLOCKS_ON, eers, "completed") for t, eers in CASES[study].items()]
    return tuple(trials)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("floor")
    return {study: write_study_store(workdir, study, history(study)) for study in CASES}


@pytest.mark.parametrize("study", list(CASES))
def test_pure_comparison_follows_the_formula(study):
    best = {t: min(e) for t, e in CASES[study].items()}
    c = compare_with_baseline(study, "dev_eer", best, BASE_SEEDS)
    assert c.baseline_mean == pytest.approx(10.2) and c.seed_sd == pytest.approx(0.2828427, abs=1e-6)
    assert c.noise_floor == pytest.approx(FLOOR, abs=1e-5)
    assert c.difference == pytest.approx(min(best.values()) - 10.2)
    assert c.verdict == EXPECTED[study]


@pytest.mark.parametrize("study", list(CASES))
def test_the_study_record_and_its_report_answer_the_question(stores, study, tmp_path):
    store = stores[study]
    record = load_study(MlflowClient(store.tracking_uri), study)
    assert len(record.baseline_trials) == 2 and {t.seed for t in record.baseline_trials} == {0, 1}
    c = record.baseline_comparison()
    assert c.verdict == EXPECTED[study] and c.n_trials == 3  # the baseline is not one of the searched trials
    line = c.line()
    assert line.startswith(f"best vs baseline on dev: {c.difference:+.2f} EER points")
    assert f"noise floor +-{FLOOR:.2f}" in line
    words = {"better": "beyond noise on dev, but chosen as the best of 3", "within noise": "within noise: replicate",
             "worse": "worse than the baseline"}
    assert words[c.verdict] in line and (f"`mfcon replicate --study {study}`" in line) == (c.verdict != "worse")
    page = write_report(store.tracking_uri, study, tmp_path, fmt="html").read_text()
    assert "Did the search beat its baseline?" in page and line.replace(">", "&gt;") in page
    assert page.count("baseline (seed ") == 2
    near = [t for t, e in CASES[study].items() if min(e) - c.best_value <= FLOOR and f"{study}-{t}" != c.best_trial]
    assert page.count(WITHIN_NOISE) == len(near)  # the trials the noise floor cannot tell from the best


def test_without_a_second_seed_the_floor_is_unknown_and_without_baseline_the_study_says_so():
    one = compare_with_baseline("s", "dev_eer", {"t": 9.0}, [10.0])
    assert one.verdict == "unknown" and "noise floor unknown (1 baseline seed)" in one.line()
    none = compare_with_baseline("s", "dev_eer", {"t": 9.0}, [])
    assert none.verdict == "unknown" and none.line().startswith("no finished lambda = 0 baseline trial")
    dcf = compare_with_baseline("s", "dev_min_dcf", {"t": 0.40}, [0.50, 0.52])
    assert dcf.line().startswith("best vs baseline on dev: -0.1100 dev_min_dcf")
