"""The placement-group reaper against a real local Ray: what ASHA-stopped Train runs leak, it frees."""

from __future__ import annotations

import time

import ray
from mfcon.study.reaper import (
    orphaned_placement_groups,
    remove_orphaned_placement_groups,
)
from ray.util.placement_group import placement_group


@ray.remote(num_cpus=0)
class PlacementGroupOwner:
    """Stands in for a Train controller: creates a placement group, then is killed."""

    def create(self):
        pg = placement_group([{"CPU": 1}])
        ray.get(pg.ready(), timeout=60)
        return pg.id.hex()


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_group_of_a_killed_actor_is_leaked_and_then_reaped(ray_local_2cpu):
    owner = PlacementGroupOwner.remote()
    pg_hex = ray.get(owner.create.remote())
    assert ray.available_resources().get("CPU", 0) <= 1  # the group holds a CPU
    assert pg_hex not in {p.hex() for p in orphaned_placement_groups()}  # owner alive: not an orphan
    ray.kill(owner)
    # Ray itself keeps the group (its job is alive): this is the leak that hangs later trials.
    assert wait_until(lambda: pg_hex in {p.hex() for p in orphaned_placement_groups()})
    assert ray.util.placement_group_table()[pg_hex]["state"] == "CREATED"
    assert remove_orphaned_placement_groups() >= 1
    assert wait_until(lambda: ray.util.placement_group_table()[pg_hex]["state"] == "REMOVED")
    assert wait_until(lambda: ray.available_resources().get("CPU", 0) == 2)


def test_driver_owned_and_live_groups_are_never_touched(ray_local_2cpu):
    mine = placement_group([{"CPU": 1}])  # created by the driver: no creator actor
    ray.get(mine.ready(), timeout=60)
    try:
        assert mine.id.hex() not in {p.hex() for p in orphaned_placement_groups()}
        remove_orphaned_placement_groups()
        assert ray.util.placement_group_table()[mine.id.hex()]["state"] == "CREATED"
    finally:
        ray.util.remove_placement_group(mine)
