"""One bundle per shard in a placement group, reserved with a bounded wait.

Reserving all shards at once (STRICT_PACK: one node, for one tensor-parallel group)
means either every shard gets its device or none does; a cluster that is too small
gives a clear error after `timeout_s` instead of actors that wait forever.
"""

from __future__ import annotations

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from .errors import ClusterResourceError


def bundles(shards: int, use_gpu: bool) -> list[dict[str, float]]:
    return [{"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1} for _ in range(shards)]


def reserve(shards: int, use_gpu: bool, timeout_s: float, strategy: str = "STRICT_PACK") -> PlacementGroup:
    """A ready placement group with one bundle per shard, or ClusterResourceError after `timeout_s`."""
    pg = placement_group(bundles(shards, use_gpu), strategy=strategy)
    if pg.wait(timeout_seconds=timeout_s):
        return pg
    remove_placement_group(pg)
    per = "1 GPU + 1 CPU" if use_gpu else "1 CPU"
    where = "on one node" if strategy.startswith("STRICT_PACK") else f"({strategy})"
    total, free = ray.cluster_resources(), ray.available_resources()
    show = lambda r: {k: r.get(k, 0) for k in ("CPU", "GPU")}  # noqa: E731
    raise ClusterResourceError(
        f"could not reserve {shards} shard(s) of {per} each {where} within {timeout_s:g} s; "
        f"the cluster has {show(total)} in all and {show(free)} free"
        + f", on {sum(n['Alive'] for n in ray.nodes())} node(s)"
        + ". Fix: lower the tensor-parallel degree (tp), add nodes or devices to the cluster, "
        "or raise the placement wait if resources are being freed"
    )


def release(pg: PlacementGroup) -> None:
    """Remove the group (its actors die with it); safe to call twice."""
    try:
        remove_placement_group(pg)
    except Exception:  # already removed
        pass
