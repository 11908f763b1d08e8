"""Names the CLI, the registry and serving share; importing this module loads neither MLflow nor torch.

The ``mfcon`` command builds its parser (defaults, choices) from these, so
``mfcon --help`` stays fast, and :mod:`mfcon.promotion.registry` and :mod:`mfcon.serving`
use the very same objects, so there is no copy to keep equal.
"""

from __future__ import annotations

import re

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


# A study's name becomes a folder under the work dir (<workdir>/<study>/...) and an MLflow experiment: one path
# component, never "." or ".." or hidden, never an option-looking "-x".
STUDY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


class StudyNameError(ValueError):
    """A study name that could not be a single folder under the work dir; the message names where it came from."""


def check_study_name(name: object, where: str = "study name") -> str:
    """``name`` if it is a safe study name, else :class:`StudyNameError` naming ``where`` (a file field or option).

    Letters, digits and ``_.-``, 1-128 characters, starting with a letter, digit or ``_``: so never ``.``,
    ``..``, a hidden folder, a path (``a/b``, ``/abs``) or something a shell or argparse reads as an option.
    """
    if not isinstance(name, str) or not STUDY_NAME.fullmatch(name):
        raise StudyNameError(f"{where} {name!r}: a study name is 1-128 letters, digits, '_', '.' or '-', starting "
                             "with a letter, digit or '_' (it names a folder under the work dir and an MLflow "
                             "experiment)")
    return name
