"""Remove the placement groups that this study's ASHA-stopped Ray Train runs leave behind.

Ray Train V2 creates each run's placement group inside its controller actor.
GCS removes a non-detached group only once both its creator actor *and* its
job are dead, so when Tune kills a stopped trial (and with it the controller)
the group keeps its CPUs for the rest of the study, and later trials hang on
"worker group startup timed out" (Ray issue 65881; Train's own
PlacementGroupCleaner needs the dashboard's State API and was seen to die).

The reaper reads the GCS placement-group table directly (an internal API:
Ray is pinned to 2.60.x and ``tests/test_reaper.py`` guards it) and removes
groups whose creator actor is dead, within a :class:`ReapScope`: groups created
by this driver's job (``creator_job_id``; every Tune trial, Train controller and
worker of a study belongs to the job of the driver that runs it) by an actor of
Train's controller class. On a shared cluster (``--address``) another job's
orphans are that job's to keep: Ray frees them itself once that job ends.
Groups created by a driver (Tune's own trial groups) have no creator actor and
are never touched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray
from ray.core.generated import gcs_pb2
from ray.tune import Callback
from ray.util.placement_group import PlacementGroup, remove_placement_group

log = logging.getLogger(__name__)

_NIL_ACTOR = b"\xff"
TRAIN_CONTROLLER = "TrainController"  # the actor class that creates a Ray Train V2 run's placement group


@dataclass(frozen=True)
class ReapScope:
    """Whose orphans a reaper may remove: groups created in job ``job_id`` (hex) by an actor of class
    ``creator_class`` (``None``: any class)."""

    job_id: str
    creator_class: str | None = TRAIN_CONTROLLER

    @classmethod
    def this_job(cls, creator_class: str | None = TRAIN_CONTROLLER) -> ReapScope:
        """The calling driver's own job (the default of every function here)."""
        return cls(ray.get_runtime_context().get_job_id(), creator_class)


@dataclass(frozen=True)
class ActorCreatedGroup:
    pg_id: ray.PlacementGroupID
    creator_actor_id: str  # hex
    creator_dead: bool


def _actor_created_groups(job_id: str) -> list[ActorCreatedGroup]:
    """Live, non-detached groups created by an actor of job ``job_id``."""
    accessor = ray._private.state.state._connect_and_get_accessor()
    groups = []
    for raw in accessor.get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        created_by_actor = pg.creator_actor_id and pg.creator_actor_id.strip(_NIL_ACTOR)
        if (pg.state != gcs_pb2.PlacementGroupTableData.REMOVED and not pg.is_detached and created_by_actor
                and pg.creator_job_id.hex() == job_id):
            groups.append(ActorCreatedGroup(ray.PlacementGroupID(pg.placement_group_id),
                                            pg.creator_actor_id.hex(), bool(pg.creator_actor_dead)))
    return groups


def _actor_class(actor_id: str) -> str | None:
    """The class name GCS keeps for an actor, dead ones included (None once GCS has evicted its record)."""
    info = ray._private.state.actors(actor_id=actor_id)
    return info.get("ActorClassName") if info else None


def _in_scope(groups: list[ActorCreatedGroup], scope: ReapScope) -> list[ActorCreatedGroup]:
    if scope.creator_class is None:
        return groups
    classes: dict[str, str | None] = {}
    for group in groups:
        if group.creator_actor_id not in classes:
            classes[group.creator_actor_id] = _actor_class(group.creator_actor_id)
    return [g for g in groups if classes[g.creator_actor_id] == scope.creator_class]


def orphaned_placement_groups(scope: ReapScope | None = None) -> list[ray.PlacementGroupID]:
    """Live, non-detached groups in ``scope`` (default: this job's Train controllers) whose creator has died."""
    scope = scope or ReapScope.this_job()
    dead = [g for g in _actor_created_groups(scope.job_id) if g.creator_dead]
    return [g.pg_id for g in _in_scope(dead, scope)]


def remove_orphaned_placement_groups(scope: ReapScope | None = None) -> int:
    """Remove every orphan in ``scope`` (default: this job's Train controllers); returns how many were removed."""
    removed = 0
    for pg_id in orphaned_placement_groups(scope):
        try:
            remove_placement_group(PlacementGroup(pg_id))
            removed += 1
        except Exception as e:  # noqa: BLE001 - already gone: another reaper or Ray itself won the race
            log.debug("placement group %s not removed: %s", pg_id.hex(), e)
    if removed:
        log.info("released %d placement group(s) left by stopped trials", removed)
    return removed


class PlacementGroupReaper(Callback):
    """Tune callback: reap after every finished/stopped/failed trial and every few seconds.

    ``scope`` None (the default) means the job of the driver running Tune at the
    time of each reap, so a study resumed by a new driver (a new job, the callback
    restored from the experiment state) reaps its own groups, not the old job's.
    """

    def __init__(self, interval_s: float = 5.0, scope: ReapScope | None = None):
        self.interval_s = interval_s
        self.scope = scope
        self.removed = 0
        self._last = 0.0

    def _reap(self, sweep_s: float = 0.0) -> None:
        """Never raises: Tune stops every trial over a callback's exception, and a GCS call that failed under
        load is simply made again at the next reap."""
        self._last = time.monotonic()
        try:
            self.removed += (sweep_orphans(sweep_s, scope=self.scope) if sweep_s
                             else remove_orphaned_placement_groups(self.scope))
        except Exception as e:  # noqa: BLE001
            log.warning("placement-group reaper: %s; the study goes on", e)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._reap()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._reap()

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self._last >= self.interval_s:
            self._reap()

    def on_experiment_end(self, trials, **info):
        """The last trials' controllers die after Tune has moved on: sweep until they are gone."""
        self._reap(sweep_s=10.0)


def sweep_orphans(settle_s: float = 10.0, poll_s: float = 0.5, scope: ReapScope | None = None) -> int:
    """Reap until no group of ``scope`` created by an actor is left, for at most ``settle_s`` seconds
    (actor deaths reach GCS asynchronously)."""
    scope = scope or ReapScope.this_job()
    removed, deadline = 0, time.monotonic() + settle_s
    while True:
        removed += remove_orphaned_placement_groups(scope)
        if not _in_scope(_actor_created_groups(scope.job_id), scope) or time.monotonic() >= deadline:
            return removed
        time.sleep(poll_s)
