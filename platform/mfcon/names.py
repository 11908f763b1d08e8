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


class RegistryError(ValueError):
    """A study, trial, model version or alias cannot be used; the message says which and why."""
