"""Names the CLI, the registry and serving share; importing this module loads neither MLflow nor torch.

The ``mfcon`` command builds its parser (defaults, choices) from these, so
``mfcon --help`` stays fast, and :mod:`mfcon.promotion.registry` and :mod:`mfcon.serving`
use the very same objects, so there is no copy to keep equal.
"""

from __future__ import annotations

DEFAULT_MODEL = "mfcon-speaker"  # the registered model `mfcon promote` writes and serving reads
CHAMPION, PREVIOUS = "champion", "previous"  # registry aliases: the model in use, the one it replaced
DEFAULT_MODEL_URI = f"models:/{DEFAULT_MODEL}@{CHAMPION}"
# Per-epoch dev-list metrics that pick a study's best trial (lower is better); the first is the default.
SELECTION_METRICS = ("dev_eer", "dev_min_dcf", "dev_min_dcf_005")
# A study trial's Tune config may carry these beside its sampled values (logged as params of the same name):
BASELINE_KEY = "baseline"  # True: the study's lambda = 0 reference trial (its run is tagged mfcon.baseline=true)
SEED_KEY = "seed"  # the trial's training seed, when it is not the space's base seed (the baseline's extra seeds)


class RegistryError(ValueError):
    """A study, trial, model version or alias cannot be used; the message says which and why."""
