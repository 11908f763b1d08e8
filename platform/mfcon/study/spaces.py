"""Declarative search spaces (``search_spaces/*.yaml``) -> validated models -> Optuna.

A space names dotted ``TrainConfig`` paths, so a space can search anything the
trainer exposes. Block selection is its own kind: either one boolean per
Conformer block (TPE learns each block's effect separately) or a categorical
over named subsets.

Every mistake is a :class:`SearchSpaceError` naming the file and the field,
raised when the file is loaded, before Ray starts or anything is written:
unknown keys, ``low > high``, a key given twice (YAML would silently keep the
last one), parameters that overlap, ``eval_every > 1``, a field the trainer does
not have; :func:`check_fits_cluster` refuses workers the cluster cannot hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import optuna
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mfcon.config import (
    NAMED_BLOCK_SETS,
    ConfigError,
    TrainConfig,
    apply_overrides,
    format_validation_error,
    read_yaml,
)
from mfcon.names import BASELINE_KEY, SEED_KEY, SELECTION_METRICS


class _Param(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Uniform(_Param):
    type: Literal["uniform"]
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        return self


class LogUniform(Uniform):
    type: Literal["loguniform"]  # type: ignore[assignment]

    @model_validator(mode="after")
    def _positive(self):
        if self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low}")
        return self


class IntRange(_Param):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log int range needs low > 0")
        return self


class Categorical(_Param):
    type: Literal["categorical"]
    choices: list[str | int | float | bool | None] = Field(min_length=1)


class BlockSelection(_Param):
    """Which Conformer blocks get the MFCon loss."""

    type: Literal["blocks"]
    encoding: Literal["per_block", "named"] = "per_block"
    choices: list[str] = Field(default_factory=lambda: ["all", "shallow", "deep"])

    @model_validator(mode="after")
    def _known_names(self):
        if self.encoding == "per_block" and "choices" in self.model_fields_set:
            raise ValueError("choices apply to encoding: named only (per_block searches one boolean per block); "
                             "remove choices or set encoding: named")
        if self.encoding == "named":
            if not self.choices:
                raise ValueError("named block selection needs at least one choice")
            bad = [c for c in self.choices if c not in NAMED_BLOCK_SETS]
            if bad:
                raise ValueError(f"unknown block sets {bad}; known: {list(NAMED_BLOCK_SETS)}")
        return self


METRICS = SELECTION_METRICS  # what a study may optimise: dev error rates, lower is better

Param = Annotated[Uniform | LogUniform | IntRange | Categorical | BlockSelection, Field(discriminator="type")]


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    num_samples: int = Field(8, ge=1)
    max_concurrent_trials: int = Field(2, ge=1)
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    trial_time_budget_s: float | None = Field(None, gt=0)
    study_time_budget_s: float | None = Field(None, gt=0)
    seed: int = 0
    # The study's own reference: the lambda = 0 configuration of the base config, trained first and never
    # stopped by ASHA, at ``baseline_seeds`` seeds (base seed, +1, ...) so the study measures its seed-to-seed
    # noise floor. Only for spaces that search the MFCon loss; ``baseline: false`` opts out.
    baseline: bool = True
    baseline_seeds: int = Field(2, ge=1, le=5)


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: Literal["auto", True, False] = "auto"
    driver_cpus: float = Field(0.0, ge=0)
    max_failures: int = Field(0, ge=0)


class SearchSpace(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    metric: Literal[METRICS] = "dev_eer"  # always a dev metric: see below
    mode: str = "min"  # every metric is an error rate: lower is better (checked below)
    base: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Param] = Field(default_factory=dict)
    budget: Budget = Budget()
    resources: Resources = Resources()

    @field_validator("metric", mode="before")
    @classmethod
    def _dev_metric(cls, value: Any) -> Any:
        """A search only ever sees the dev list: ``eer``/``min_dcf`` (older spaces) mean their dev values."""
        return f"dev_{value}" if value in ("eer", "min_dcf", "min_dcf_005") else value

    @field_validator("mode")
    @classmethod
    def _min_only(cls, value: str) -> str:
        """Every selectable metric is an error rate; ``max`` would make TPE, ASHA and checkpoint retention chase
        the worst trial."""
        if value != "min":
            raise ValueError(f"mode must be 'min' (got {value!r}): {', '.join(METRICS)} are error rates, lower is "
                             "better; remove `mode` or set it to min")
        return value

    def base_config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.base)

    def searches_mfcon(self) -> bool:
        """Whether the space searches the MFCon loss (weight, temperature or blocks): then it has a baseline."""
        return any(key.startswith("loss.mfcon") for key in self.params)

    def baseline_trials(self) -> int:
        """How many lambda = 0 trials the study adds to ``num_samples`` (0 when it has no baseline)."""
        return self.budget.baseline_seeds if self.budget.baseline and self.searches_mfcon() else 0

    def num_blocks(self) -> int:
        return self.base_config().model_config_resolved().num_blocks


class SearchSpaceError(ConfigError):
    """An invalid search-space file; the message names the file and the field."""


def load_search_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    try:
        data = read_yaml(path)
    except ConfigError as e:
        raise SearchSpaceError(str(e)) from None
    _refuse_duplicate_keys(path)
    try:
        space = SearchSpace.model_validate(data)
    except ValidationError as e:
        raise SearchSpaceError(format_validation_error(e, str(path))) from None
    try:
        base = space.base_config()
    except ValidationError as e:
        raise SearchSpaceError(format_validation_error(e, f"{path}: base")) from None
    _refuse_overlapping_params(path, space)
    if base.eval_every != 1 or "eval_every" in space.params:
        field = "params.eval_every" if "eval_every" in space.params else "base.eval_every"
        raise SearchSpaceError(f"{path}: {field}: a study scores the dev list every epoch (ASHA stops trials and "
                               f"the searcher learns from each epoch's {space.metric}); remove it or set it to 1")
    for key, param in space.params.items():
        for value in _probe_values(param):  # every choice and both range ends: a sampled value never fails a trial
            try:
                apply_overrides(base, {key: value}, f"{path}: params.{key}")
            except ConfigError as e:
                raise SearchSpaceError(f"{path}: params.{key}: not a valid training-config field or value: {value!r} "
                                       f"(every choice and both range ends are checked)\n{e}") from None
    return space


def _refuse_duplicate_keys(path: Path) -> None:
    """A key given twice in one mapping: PyYAML keeps the last silently, so a search would not be what was written."""
    try:
        root = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        return  # read_yaml has already parsed this file; nothing to add
    stack, where = [root], []
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        if not isinstance(node, yaml.MappingNode):
            continue
        seen: dict[Any, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            line = key.start_mark.line + 1
            if name is not None and name in seen:
                text = (f"{path}:{line}: {name!r} is given twice in one mapping (first on line {seen[name]}); "
                        "YAML would keep only the last one")
                where.append((line, text))
            elif name is not None:
                seen[name] = line
            stack.append(value)
    if where:
        raise SearchSpaceError(min(where)[1])


def _refuse_overlapping_params(path: Path, space: SearchSpace) -> None:
    """Two parameters that set the same field: ``loss.mfcon_blocks`` (per-block booleans ``.b1``...) and
    ``loss.mfcon_blocks.b1``, or a section and one of its fields."""
    keys = sorted(space.params)
    for key in keys:
        inner = [other for other in keys if other.startswith(f"{key}.")]
        if inner:
            raise SearchSpaceError(f"{path}: params.{inner[0]}: overlaps params.{key}, which already sets it; "
                                   "search each field once")


def check_fits_cluster(space: SearchSpace, cpus: float, gpus: float, source: str | Path,
                       where: str = "the Ray cluster") -> None:
    """Refuse a trial that can never be scheduled (it would wait for workers until the start timeout).

    A trial needs ``num_workers * cpus_per_worker`` CPUs for its Train workers
    plus ``driver_cpus`` for its driver, all at once; ``use_gpu: true`` needs a
    GPU per worker. Call with the cluster's total CPUs and GPUs before anything trains.
    """
    r = space.resources
    need = r.num_workers * r.cpus_per_worker + r.driver_cpus
    if need > cpus:
        raise SearchSpaceError(
            f"{source}: resources.num_workers: {r.num_workers} workers x {r.cpus_per_worker:g} CPUs "
            f"(+ driver_cpus {r.driver_cpus:g}) need {need:g} CPUs per trial, but {where} has {cpus:g}; "
            "lower resources.num_workers or resources.cpus_per_worker")
    if r.use_gpu is True and r.num_workers > gpus:
        raise SearchSpaceError(f"{source}: resources.use_gpu: {r.num_workers} workers need a GPU each, but {where} "
                               f"has {gpus:g}; set use_gpu: auto or false, or lower resources.num_workers")


def _probe_values(param: Any) -> list[Any]:
    """Every value the searcher can hand a trial at the edges: each choice, or both ends of a range."""
    if isinstance(param, BlockSelection):
        return ["all", "none"] if param.encoding == "per_block" else list(param.choices)
    if isinstance(param, Categorical):
        return list(param.choices)
    return [param.low, param.high]


def block_param_name(key: str, block: int) -> str:
    return f"{key}.b{block}"


def optuna_distributions(space: SearchSpace) -> dict[str, optuna.distributions.BaseDistribution]:
    """The flat Optuna parameters this space samples (per-block booleans expanded)."""
    dists: dict[str, optuna.distributions.BaseDistribution] = {}
    for key, p in space.params.items():
        if isinstance(p, LogUniform):
            dists[key] = optuna.distributions.FloatDistribution(p.low, p.high, log=True)
        elif isinstance(p, Uniform):
            dists[key] = optuna.distributions.FloatDistribution(p.low, p.high)
        elif isinstance(p, IntRange):
            dists[key] = optuna.distributions.IntDistribution(p.low, p.high, step=p.step, log=p.log)
        elif isinstance(p, Categorical):
            dists[key] = optuna.distributions.CategoricalDistribution(p.choices)
        elif p.encoding == "per_block":
            for b in range(1, space.num_blocks() + 1):
                dists[block_param_name(key, b)] = optuna.distributions.CategoricalDistribution([True, False])
        else:
            dists[key] = optuna.distributions.CategoricalDistribution(p.choices)
    return dists


class DefineByRun:
    """Picklable define-by-run space for ``OptunaSearch`` (a closure would not pickle)."""

    def __init__(self, space: SearchSpace):
        self.distributions = optuna_distributions(space)

    def __call__(self, trial: optuna.Trial) -> None:
        for name, dist in self.distributions.items():
            suggest(trial, name, dist)


def suggest(trial: optuna.Trial, name: str, dist: optuna.distributions.BaseDistribution) -> Any:
    if isinstance(dist, optuna.distributions.FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log)
    if isinstance(dist, optuna.distributions.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_categorical(name, dist.choices)


def sampled_to_overrides(space: SearchSpace, sampled: dict[str, Any]) -> dict[str, Any]:
    """Flat sampled values -> dotted TrainConfig overrides (per-block booleans -> a block list).

    A trial's config may also carry ``BASELINE_KEY`` (train lambda = 0 whatever was sampled) and
    ``SEED_KEY`` (its own training seed): the study's baseline trials."""
    overrides: dict[str, Any] = {}
    for key, p in space.params.items():
        if isinstance(p, BlockSelection) and p.encoding == "per_block":
            overrides[key] = [b for b in range(1, space.num_blocks() + 1) if sampled[block_param_name(key, b)]]
        else:
            overrides[key] = sampled[key]
    if sampled.get(BASELINE_KEY):
        overrides["loss.mfcon_weight"] = 0.0
    if sampled.get(SEED_KEY) is not None:
        overrides["seed"] = int(sampled[SEED_KEY])
    return overrides


def baseline_sample(space: SearchSpace) -> tuple[dict[str, Any], bool]:
    """(sampled values of the baseline trial, whether they mean "no MFCon" to Optuna).

    When the space can express the baseline in its own distributions (every per-block boolean False, the
    named block set ``none``, or a weight range that holds 0), Optuna is told the baseline as a trial of its
    own, so TPE learns from it. Every other value is the base config's, clipped into its range."""
    base = space.base_config().model_dump(mode="json")
    sample, expressed = {}, False
    for name, dist in optuna_distributions(space).items():
        if name.rsplit(".", 1)[0] in space.params and name not in space.params:  # a per-block boolean
            sample[name], expressed = False, True
        elif isinstance(dist, optuna.distributions.CategoricalDistribution):
            if name.startswith("loss.mfcon_blocks") and "none" in dist.choices:
                sample[name], expressed = "none", True
            else:
                value = _dotted(base, name)
                sample[name] = value if value in dist.choices else dist.choices[0]
        elif name == "loss.mfcon_weight" and dist.low <= 0 <= dist.high and not dist.log:
            sample[name], expressed = 0.0, True
        else:
            value = _dotted(base, name)
            value = dist.low if not isinstance(value, (int, float)) else min(max(value, dist.low), dist.high)
            sample[name] = int(value) if isinstance(dist, optuna.distributions.IntDistribution) else float(value)
    return sample, expressed


def _dotted(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def trial_config(space: SearchSpace, sampled: dict[str, Any]) -> TrainConfig:
    return apply_overrides(space.base_config(), sampled_to_overrides(space, sampled), f"search space {space.name}")


def trial_params(space: SearchSpace, sampled: dict[str, Any]) -> dict[str, Any]:
    """Everything a person compares in the MLflow UI: raw samples plus what the trial really trains.

    A draw that trains no MFCon loss (weight 0, or no block selected) is logged as what it is, the
    baseline: weight 0 and blocks "none", whatever lambda and tau were sampled."""
    params = dict(sampled)
    for key, value in sampled_to_overrides(space, sampled).items():
        params[key] = ",".join(map(str, value)) if isinstance(value, list) else value
    if not trial_config(space, sampled).selected_blocks() and space.searches_mfcon():
        params.update({"loss.mfcon_weight": 0.0, "loss.mfcon_blocks": "none"})
        params.pop("loss.mfcon_temperature", None)  # not trained with: a tau would read as if it mattered
    elif params.get("loss.mfcon_blocks") == "":
        params["loss.mfcon_blocks"] = "none"
    return params
