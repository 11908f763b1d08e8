"""Typed configuration: every YAML the user writes is parsed into these models.

Unknown keys and wrong types are rejected (``extra="forbid"``), and load errors
name the file and the dotted field, so a typo never silently falls back to a
default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal, Sequence, Union, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConfigError(ValueError):
    """A config file or field is invalid; the message names both."""


class FeatureConfig(Strict):
    """Kaldi-compatible log-Mel fbank as in MFA-Conformer (25 ms / 10 ms, 80 bins)."""

    sample_rate: int = 16000
    num_mel_bins: int = Field(80, ge=8, le=256)
    frame_length_ms: float = Field(25.0, gt=0)
    frame_shift_ms: float = Field(10.0, gt=0)
    dither: float = Field(0.0, ge=0)
    mean_norm: bool = True


class ModelConfig(Strict):
    """MFA-Conformer. Defaults are the paper's: 6 blocks x 256, 4 heads, FFN 2048, kernel 15."""

    n_mels: int = 80
    d_model: int = Field(256, ge=8)
    num_blocks: int = Field(6, ge=1)
    num_heads: int = Field(4, ge=1)
    ffn_dim: int = Field(2048, ge=8)
    conv_kernel: int = Field(15, ge=3)
    subsampling: Literal[2, 4, 8] = 2
    pos_enc: Literal["rel", "abs"] = "rel"
    dropout: float = Field(0.1, ge=0, lt=1)
    embed_dim: int = Field(192, ge=8)
    pooling: Literal["asp", "stats"] = "asp"

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd, got {self.conv_kernel}")
        return self


def paper_model_config(**overrides: Any) -> ModelConfig:
    """MFA-Conformer (Zhang et al. 2022): 6 blocks x 256, FFN 2048, kernel 15, 1/2 subsampling."""
    return ModelConfig(**overrides)


def tiny_model_config(**overrides: Any) -> ModelConfig:
    """CPU-sized for demos and tests: 3 blocks x 96, 1/4 subsampling, 64-d embedding (under 1M parameters)."""
    return ModelConfig(**{"d_model": 96, "num_blocks": 3, "num_heads": 4, "ffn_dim": 192, "conv_kernel": 7,
                          "embed_dim": 64, "subsampling": 4, "dropout": 0.0, **overrides})


MODEL_PRESETS: dict[str, Callable[..., ModelConfig]] = {"paper": paper_model_config, "tiny": tiny_model_config}
ModelPreset = Literal["paper", "tiny"]

BlockSetName = Literal["all", "shallow", "deep", "none"]
NAMED_BLOCK_SETS: tuple[str, ...] = get_args(BlockSetName)
BlockSpec = Union[BlockSetName, Sequence[int]]


def resolve_blocks(spec: BlockSpec, num_blocks: int) -> tuple[int, ...]:
    """Named subset or explicit list -> sorted 1-based block numbers.

    ``shallow`` is the first half (rounded up), ``deep`` the rest, as in the
    MFCon authors' layer ablations.
    """
    if isinstance(spec, str):
        half = (num_blocks + 1) // 2
        named = {
            "all": range(1, num_blocks + 1),
            "shallow": range(1, half + 1),
            "deep": range(half + 1, num_blocks + 1),
            "none": range(0),
        }
        assert set(named) == set(NAMED_BLOCK_SETS)
        if spec not in named:
            raise ValueError(f"unknown block set {spec!r}; use one of {NAMED_BLOCK_SETS} or a list of block numbers")
        return tuple(named[spec])
    blocks = tuple(sorted(set(int(b) for b in spec)))
    bad = [b for b in blocks if not 1 <= b <= num_blocks]
    if bad:
        raise ValueError(f"block numbers {bad} out of range 1..{num_blocks}")
    return blocks


class LossConfig(Strict):
    """Main margin loss + lambda * MFCon (SupCon over pooled block outputs)."""

    margin_loss: Literal["aam", "am"] = "aam"
    margin: float = Field(0.2, ge=0, le=1)
    scale: float = Field(30.0, gt=0)
    margin_warmup_epochs: int = Field(0, ge=0)
    mfcon_weight: float = Field(0.0, ge=0)
    mfcon_temperature: float = Field(0.07, gt=0)
    mfcon_blocks: Union[BlockSetName, list[int]] = "all"
    mfcon_pooling: Literal["asp", "stats"] = "stats"
    mfcon_proj_dim: int = Field(128, ge=2)


def mfcon_blocks(loss: LossConfig, num_blocks: int) -> tuple[int, ...]:
    """The blocks that get MFCon heads: none at all when its weight is 0, so lambda=0 is the plain baseline."""
    if loss.mfcon_weight == 0:
        return ()
    return resolve_blocks(loss.mfcon_blocks, num_blocks)


class SpecAugmentConfig(Strict):
    """Time and frequency masking of training crops (SpecAugment, Park et al. 2019, without time warping).

    Counts and widths are WeSpeaker's (one time mask of up to 10 frames, one
    frequency band of up to 8 bins; WeSpeaker uses prob 0.6 when it turns it
    on). ``prob`` 0 (the default) is off: no crop changes and no random number
    is drawn, so configs without it train exactly as before.
    """

    prob: float = Field(0.0, ge=0, le=1)
    num_time_masks: int = Field(1, ge=0)
    max_time_width: int = Field(10, ge=0)
    num_freq_masks: int = Field(1, ge=0)
    max_freq_width: int = Field(8, ge=0)


Positives = Literal["utterances", "views"]


class DataConfig(Strict):
    """Speaker-balanced P x K batches of fixed-length random crops.

    ``positives``: a speaker's K crops come from K different utterances
    (``utterances``) or are K random crops of one utterance (``views``, two
    views of one recording as in the MFCon authors' training set).

    ``reader``: how a study's Ray Train workers get their rows: ``files`` (each
    worker reads its share of the shards directly; no pipeline to start) or
    ``ray_data`` (a Ray Data split of the shards). Local training reads files.
    """

    speakers_per_batch: int = Field(16, ge=2)
    utts_per_speaker: int = Field(2, ge=2)
    crop_seconds: float = Field(2.0, gt=0)
    eval_max_seconds: float | None = Field(None, gt=0)
    shuffle_buffer_rows: int = Field(2048, ge=1)
    reader: Literal["files", "ray_data"] = "files"
    positives: Positives = "utterances"
    spec_augment: SpecAugmentConfig = SpecAugmentConfig()
    # Batches built ahead of the step by a background thread (pinned host memory on a GPU); 0: synchronous.
    prefetch_batches: int = Field(2, ge=0, le=64)
    # Node-local copies of shards read from an object store (never of local shards); cache_bytes 0: off.
    cache_dir: str | None = None  # None: <system temp dir>/mfcon-shard-cache
    cache_bytes: int = Field(8 << 30, ge=0)


class OptimConfig(Strict):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-7, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    step_epochs: int = Field(4, ge=1)
    step_gamma: float = Field(0.5, gt=0, le=1)
    grad_clip: float | None = Field(5.0, gt=0)


class CheckpointConfig(Strict):
    """What a study trial uploads to the bucket after each epoch (local ``mfcon train`` writes ``last.pt`` every
    epoch regardless). The full training state (model, objective, AdamW's two moments: ~3x the weights) every
    ``full_every`` epochs and after the last; a resumed trial restarts from the latest full state, so it retrains
    up to ``full_every - 1`` epochs (1, the default: none). ``best_weights``: the exported weights of each new best
    epoch (~1/3 of a full state), which the study driver logs instead of exporting a full state itself.
    Bytes per trial-epoch of each preset: docs/performance.md."""

    full_every: int = Field(1, ge=1)
    best_weights: bool = True


class TrainConfig(Strict):
    """Everything one training run needs; a study trial overrides dotted fields of it."""

    model_preset: ModelPreset = "tiny"
    model: dict[str, Any] = Field(default_factory=dict)
    loss: LossConfig = LossConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    epochs: int = Field(10, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    eval_every: int = Field(1, ge=1)
    checkpoint: CheckpointConfig = CheckpointConfig()

    @field_validator("model")
    @classmethod
    def _model_fields_known(cls, value: dict[str, Any]) -> dict[str, Any]:
        ModelConfig(**value)  # validates names and types early
        return value

    def model_config_resolved(self) -> ModelConfig:
        return MODEL_PRESETS[self.model_preset](**self.model)

    def selected_blocks(self) -> tuple[int, ...]:
        return mfcon_blocks(self.loss, self.model_config_resolved().num_blocks)


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def parse_model(cls: type[BaseModel], data: dict[str, Any], source: str) -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_train_config(path: str | Path) -> TrainConfig:
    return parse_model(TrainConfig, read_yaml(path), str(path))


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Return a copy of nested ``data`` with ``a.b.c`` set to ``value``."""
    out = dict(data)
    head, _, rest = dotted.partition(".")
    if rest:
        child = out.get(head, {})
        if hasattr(child, "model_dump"):
            child = child.model_dump()
        out[head] = set_dotted(dict(child), rest, value)
    else:
        out[head] = value
    return out


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any], source: str = "overrides") -> TrainConfig:
    data = cfg.model_dump()
    for key, value in overrides.items():
        data = set_dotted(data, key, value)
    return parse_model(TrainConfig, data, source)
