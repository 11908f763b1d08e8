"""The placement-group reaper against a real local Ray: what this study's stopped Train runs leak, it frees;
another job's groups on the same cluster, and groups of other actors, it leaves alone."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import ray
from mfcon.study.reaper import (
    PlacementGroupReaper,
    ReapScope,
    orphaned_placement_groups,
    remove_orphaned_placement_groups,
    sweep_orphans,
)
from ray.util.placement_group import placement_group


@ray.remote(num_cpus=0)
class TrainController:
    """Stands in for Ray Train V2's controller (the reaper knows it by its class name): creates a placement group
    and is then killed, as Tune kills an ASHA-stopped trial's controller."""

    def create(self, cpus: float) -> str:
        pg = placement_group([{"CPU": cpus}])
        ray.get(pg.ready(), timeout=60)
        return pg.id.hex()


@ray.remote(num_cpus=0)
class SomeOtherActor:
    """Any other actor of the same job that creates a placement group."""

    def create(self, cpus: float) -> str:
        pg = placement_group([{"CPU": cpus}])
        ray.get(pg.ready(), timeout=60)
        return pg.id.hex()


# A second driver (its own Ray job) on the same cluster: its "controller" creates a group and is killed, so the
# group is orphaned the way a stopped trial's is; the driver stays connected until the test closes its stdin.
OTHER_JOB = """
import sys, ray
from ray.util.placement_group import placement_group
ray.init(address=sys.argv[1], log_to_driver=False)

@ray.remote(num_cpus=0)
class TrainController:
    def create(self):
        pg = placement_group([{"CPU": 0.5}])
        ray.get(pg.ready(), timeout=60)
        return pg.id.hex()

owner = TrainController.remote()
pg_hex = ray.get(owner.create.remote())
ray.kill(owner)
print(ray.get_runtime_context().get_job_id(), pg_hex, flush=True)
sys.stdin.read()
"""


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def pg_state(pg_hex: str) -> str:
    return ray.util.placement_group_table()[pg_hex]["state"]


def orphan_of(actor_cls, cpus: float = 0.5) -> str:
    """A group whose creator (an actor of ``actor_cls`` in this job) was killed; waits until GCS knows."""
    owner = actor_cls.remote()
    pg_hex = ray.get(owner.create.remote(cpus))
    ray.kill(owner)
    assert wait_until(lambda: pg_hex in {p.hex() for p in orphaned_placement_groups(ReapScope.this_job(None))})
    return pg_hex


def test_group_of_a_killed_controller_is_leaked_and_then_reaped(ray_local_2cpu):
    owner = TrainController.remote()
    pg_hex = ray.get(owner.create.remote(1))
    assert ray.available_resources().get("CPU", 0) <= 1  # the group holds a CPU
    assert pg_hex not in {p.hex() for p in orphaned_placement_groups()}  # owner alive: not an orphan
    ray.kill(owner)
    # Ray itself keeps the group (its job is alive): this is the leak that hangs later trials.
    assert wait_until(lambda: pg_hex in {p.hex() for p in orphaned_placement_groups()})
    assert pg_state(pg_hex) == "CREATED"
    assert remove_orphaned_placement_groups() >= 1
    assert wait_until(lambda: pg_state(pg_hex) == "REMOVED")
    assert wait_until(lambda: ray.available_resources().get("CPU", 0) == 2)


def test_driver_owned_and_live_groups_are_never_touched(ray_local_2cpu):
    mine = placement_group([{"CPU": 1}])  # created by the driver: no creator actor
    ray.get(mine.ready(), timeout=60)
    try:
        assert mine.id.hex() not in {p.hex() for p in orphaned_placement_groups(ReapScope.this_job(None))}
        remove_orphaned_placement_groups(ReapScope.this_job(None))
        assert pg_state(mine.id.hex()) == "CREATED"
    finally:
        ray.util.remove_placement_group(mine)


def test_another_jobs_orphan_survives_and_this_studys_orphan_is_removed(ray_local_2cpu, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    gcs = ray.get_runtime_context().gcs_address
    with open(tmp_path / "other-job.log", "w") as err:
        other = subprocess.Popen([sys.executable, "-c", OTHER_JOB, gcs], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=err, text=True, env=env)
    try:
        line = other.stdout.readline().split()  # blocks until the other job's group is orphaned
        assert len(line) == 2, (tmp_path / "other-job.log").read_text()[-3000:]
        other_job, other_pg = line
        assert other_job != ray.get_runtime_context().get_job_id()
        mine = orphan_of(TrainController)
        # Both are orphans of a "TrainController" and both hold a CPU share; only this job's is ours to free.
        assert wait_until(lambda: other_pg in {p.hex() for p in orphaned_placement_groups(ReapScope(other_job))})
        assert {p.hex() for p in orphaned_placement_groups()} == {mine}

        reaper = PlacementGroupReaper()
        reaper.on_trial_complete(0, [], None)  # what Tune calls after each stopped trial
        assert reaper.removed == 1
        assert sweep_orphans(settle_s=2.0) == 0  # nothing of this job is left to wait for
        assert wait_until(lambda: pg_state(mine) == "REMOVED")
        assert pg_state(other_pg) == "CREATED"  # still the other job's, while that job runs
        assert wait_until(lambda: ray.available_resources().get("CPU", 0) == pytest.approx(1.5))
    finally:
        other.stdin.close()  # the other driver exits: its job ends
        other.wait(timeout=60)
        other.stdout.close()
    # Ray frees a group once its creator actor and its job are both dead: leaving it was safe.
    assert wait_until(lambda: pg_state(other_pg) == "REMOVED", timeout=60)
    assert wait_until(lambda: ray.available_resources().get("CPU", 0) == 2)


def test_orphans_of_other_actor_classes_are_kept_unless_the_scope_names_no_class(ray_local_2cpu):
    other = orphan_of(SomeOtherActor)
    assert other not in {p.hex() for p in orphaned_placement_groups()}  # default scope: Train controllers only
    assert remove_orphaned_placement_groups() == 0
    assert pg_state(other) == "CREATED"
    assert remove_orphaned_placement_groups(ReapScope.this_job(creator_class=None)) == 1
    assert wait_until(lambda: pg_state(other) == "REMOVED")
    assert wait_until(lambda: ray.available_resources().get("CPU", 0) == 2)
