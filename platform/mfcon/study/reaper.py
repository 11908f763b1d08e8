"""Remove the placement groups that ASHA-stopped Ray Train runs leave behind.

Ray Train V2 creates each run's placement group inside its controller actor.
GCS removes a non-detached group only once both its creator actor *and* its
job are dead, so when Tune kills a stopped trial (and with it the controller)
the group keeps its CPUs for the rest of the study, and later trials hang on
"worker group startup timed out" (Ray issue 65881; Train's own
PlacementGroupCleaner needs the dashboard's State API and was seen to die).

The reaper reads the GCS placement-group table directly (an internal API:
Ray is pinned to 2.60.x and ``tests/test_reaper.py`` guards it) and removes
groups whose creator actor is dead. Groups created by a driver (Tune's own
trial groups) have no creator actor and are never touched.
"""

from __future__ import annotations

import logging
import time

import ray
from ray.core.generated import gcs_pb2
from ray.tune import Callback
from ray.util.placement_group import PlacementGroup, remove_placement_group

log = logging.getLogger(__name__)

_NIL_ACTOR = b"\xff"


def _actor_created_groups() -> list[tuple[ray.PlacementGroupID, bool]]:
    """Live, non-detached groups created by an actor, with whether that actor has died."""
    accessor = ray._private.state.state._connect_and_get_accessor()
    groups = []
    for raw in accessor.get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        created_by_actor = pg.creator_actor_id and pg.creator_actor_id.strip(_NIL_ACTOR)
        if pg.state != gcs_pb2.PlacementGroupTableData.REMOVED and not pg.is_detached and created_by_actor:
            groups.append((ray.PlacementGroupID(pg.placement_group_id), bool(pg.creator_actor_dead)))
    return groups


def orphaned_placement_groups() -> list[ray.PlacementGroupID]:
    """Live, non-detached groups whose creating actor has died."""
    return [pg_id for pg_id, creator_dead in _actor_created_groups() if creator_dead]


def remove_orphaned_placement_groups() -> int:
    """Remove every orphaned group; returns how many were removed."""
    removed = 0
    for pg_id in orphaned_placement_groups():
        try:
            remove_placement_group(PlacementGroup(pg_id))
            removed += 1
        except Exception as e:  # already gone: another reaper or Ray itself won the race
            log.debug("placement group %s not removed: %s", pg_id.hex(), e)
    if removed:
        log.info("released %d placement group(s) left by stopped trials", removed)
    return removed


class PlacementGroupReaper(Callback):
    """Tune callback: reap after every finished/stopped/failed trial and every few seconds."""

    def __init__(self, interval_s: float = 5.0):
        self.interval_s = interval_s
        self.removed = 0
        self._last = 0.0

    def _reap(self) -> None:
        self._last = time.monotonic()
        self.removed += remove_orphaned_placement_groups()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._reap()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._reap()

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self._last >= self.interval_s:
            self._reap()

    def on_experiment_end(self, trials, **info):
        """The last trials' controllers die after Tune has moved on: sweep until they are gone."""
        self.removed += sweep_orphans(settle_s=10.0)


def sweep_orphans(settle_s: float = 10.0, poll_s: float = 0.5) -> int:
    """Reap until no actor-created group is left, for at most ``settle_s`` seconds
    (actor deaths reach GCS asynchronously; another study's live groups only cost the wait)."""
    removed, deadline = 0, time.monotonic() + settle_s
    while True:
        removed += remove_orphaned_placement_groups()
        if not _actor_created_groups() or time.monotonic() >= deadline:
            return removed
        time.sleep(poll_s)
