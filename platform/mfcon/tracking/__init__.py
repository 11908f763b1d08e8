"""MLflow at the edge: the store (``store``), the runs a study writes (``runs``), and reading them back (``records``).

Writers and readers live side by side so the run layout (tags, artifact folders)
is defined once; see docs/ARCHITECTURE.md, "Study outputs". Writes go through a
durable spool (``spool``, applied idempotently by ``replay``; ``sync`` replays a
leftover one), so an unreachable tracking server delays them but never blocks
or stops a study.
"""

from mfcon.tracking.records import StudyNotFound, StudyRecord, TrialRecord, load_study, read_replication
from mfcon.tracking.runs import TRIAL_METRICS, StudyTracker, TrialRuns, flatten
from mfcon.tracking.spool import PendingWrites, TrackingWriteError, open_spool
from mfcon.tracking.spool_file import SpoolBusy, spool_dir
from mfcon.tracking.store import (
    BASELINE_TAG,
    METRIC_TAG,
    PLOTS_DIR,
    REPLICATION_FILE,
    ROLE_TAG,
    SPACE_DIR,
    STATE_TAG,
    STUDY_TAG,
    TRIAL_TAG,
    TrackingUnavailable,
    artifact_root_for,
    check_tracking_uri,
    code_version,
    default_tracking_uri,
    ensure_experiment,
    find_runs,
    no_artifact_progress_bars,
    resolve_tracking_uri,
)

__all__ = [
    "BASELINE_TAG", "METRIC_TAG", "PLOTS_DIR", "REPLICATION_FILE", "ROLE_TAG", "SPACE_DIR", "STATE_TAG", "STUDY_TAG", "TRIAL_METRICS", "TRIAL_TAG",
    "PendingWrites", "SpoolBusy", "StudyNotFound", "StudyRecord", "StudyTracker", "TrackingUnavailable",
    "TrackingWriteError", "TrialRecord", "TrialRuns", "artifact_root_for", "check_tracking_uri", "code_version",
    "default_tracking_uri", "ensure_experiment", "find_runs", "flatten", "load_study", "no_artifact_progress_bars",
    "open_spool", "read_replication", "resolve_tracking_uri", "spool_dir",
]
