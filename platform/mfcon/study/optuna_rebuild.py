"""An in-memory ``optuna.Study`` rebuilt from a study's MLflow runs, for its figures and report.

The study's own Optuna storage (:mod:`mfcon.study.optuna_storage`) may sit on a driver's
disk that the reader of a tracking server never sees, and studies from before it have
none; so the figures and report read MLflow alone (docs/ARCHITECTURE.md, "Study outputs"): each
run's best ``eer`` is the trial value, per-epoch ``eer`` the intermediate values,
``mfcon.trial_state`` the state. Distributions come from the study's own search
space where every logged value fits it, and are inferred from the values otherwise.
Optuna is imported on first use, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mfcon.plots import METRIC_LABEL, quiet_optuna

if TYPE_CHECKING:
    from mfcon.tracking.records import StudyRecord

logger = logging.getLogger(__name__)


def _derived_keys(keys) -> set[str]:
    """Resolved ``loss.mfcon_blocks`` is derived when per-block booleans ``loss.mfcon_blocks.bN`` exist."""
    keys = set(keys)
    return {k for k in keys if any(o.startswith(k + ".b") and o[len(k) + 2:].isdigit() for o in keys)}


def parse_param(value: str, dist) -> Any:
    """MLflow param string -> value of ``dist``; ValueError if it does not belong to it."""
    import optuna.distributions as od

    if isinstance(dist, od.CategoricalDistribution):
        for choice in dist.choices:
            if str(choice) == value:
                return choice
        raise ValueError(value)
    parsed = int(value) if isinstance(dist, od.IntDistribution) else float(value)
    if not dist._contains(dist.to_internal_repr(parsed)):
        raise ValueError(value)
    return parsed


def infer_distribution(values: list[str]):
    """A distribution covering logged param strings: bool, int, float (log when it spans >= 10x) or categorical."""
    import optuna.distributions as od

    if set(values) <= {"True", "False"}:
        return od.CategoricalDistribution([True, False])
    for kind in (int, float):
        try:
            nums = [kind(v) for v in values]
        except ValueError:
            continue
        lo, hi = min(nums), max(nums)
        if kind is int:
            return od.IntDistribution(lo, hi)
        return od.FloatDistribution(lo, hi, log=bool(lo > 0 and hi >= 10 * lo))
    return od.CategoricalDistribution(sorted(set(values)))


def searched_trials(record: StudyRecord) -> list:
    """The trials the search sampled, without the baseline's: a weight of 0 lies outside any loguniform range."""
    return [t for t in record.trials if not t.baseline]


def _fitting_params(params: dict[str, str], dists: dict[str, Any]) -> dict[str, Any]:
    """The trial's values that belong to their distributions (a no-block draw logs weight 0: left out)."""
    out = {}
    for key, dist in dists.items():
        if key in params:
            try:
                out[key] = parse_param(params[key], dist)
            except ValueError:
                continue
    return out


def study_distributions(record: StudyRecord, space=None) -> dict[str, Any]:
    """Distributions of the sampled params: the space's where every logged value fits, inferred otherwise."""
    from mfcon.study.spaces import optuna_distributions

    logged: dict[str, list[str]] = {}
    for trial in searched_trials(record):
        no_mfcon = trial.params.get("loss.mfcon_blocks") == "none"  # logged as weight 0: not a sampled value
        for key, value in trial.params.items():
            if not (no_mfcon and key.startswith("loss.mfcon_")):
                logged.setdefault(key, []).append(value)
    declared = optuna_distributions(space) if space is not None else {}
    keys = [k for k in declared if k in logged] if declared else [k for k in logged if k not in _derived_keys(logged)]
    dists = {}
    for key in sorted(keys):
        dist = declared.get(key)
        try:
            for value in logged[key] if dist is not None else ():
                parse_param(value, dist)
        except ValueError:
            dist = None  # the space changed since these trials ran
        dists[key] = dist if dist is not None else infer_distribution(logged[key])
    return dists


def load_space(record: StudyRecord):
    """The study's SearchSpace from its ``search_space/`` artifact, or None when missing or invalid."""
    if record.space_yaml is None:
        return None
    from mfcon.study.spaces import SearchSpaceError, load_search_space

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / (record.space_file or "space.yaml")
        path.write_text(record.space_yaml)
        try:
            return load_search_space(path)
        except SearchSpaceError as e:
            logger.warning("search space of study %s does not load (%s); inferring distributions", record.name, e)
            return None


def build_optuna_study(record: StudyRecord, space=None, metric_name: str = METRIC_LABEL):
    """An in-memory ``optuna.Study`` with one trial per searched run (the baseline's are not sampled): COMPLETE
    (its best value of the study's metric), PRUNED, FAIL or RUNNING."""
    import optuna
    from optuna.trial import TrialState, create_trial

    dists = study_distributions(record, space)
    states = {"completed": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}
    with quiet_optuna():
        study = optuna.create_study(study_name=record.name, direction="minimize")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([metric_name])
        for t in searched_trials(record):
            state = states.get(t.state, TrialState.RUNNING)
            if state == TrialState.COMPLETE and t.best_value is None:
                state = TrialState.FAIL  # finished without ever being evaluated
            params = _fitting_params(t.params, dists)
            study.add_trial(create_trial(
                state=state, value=t.best_value if state == TrialState.COMPLETE else None, params=params,
                distributions={k: dists[k] for k in params}, intermediate_values=dict(t.history),
                user_attrs={"trial_id": t.trial_id, "run_id": t.run_id}))
    return study
