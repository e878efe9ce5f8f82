"""One bundle per shard in a placement group, reserved with a bounded wait.

Reserving all shards at once (STRICT_PACK: one node, for one tensor-parallel group)
means either every shard gets its device or none does; a cluster that is too small
gives a clear error after `timeout_s` instead of actors that wait forever.

Custom resources (`resources`, added to every shard's bundle) pin the shards to the nodes
that advertise them, e.g. `ray start --resources='{"gpu_node": 8}'` and
`resources={"gpu_node": 1}`: the way to keep shards off a head node or on a chosen one.
"""

from __future__ import annotations

from typing import Mapping

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from .errors import ClusterResourceError

Resources = Mapping[str, float]


def bundles(shards: int, use_gpu: bool, resources: Resources | None = None) -> list[dict[str, float]]:
    base = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
    return [{**base, **(resources or {})} for _ in range(shards)]


def reserve(shards: int, use_gpu: bool, timeout_s: float, strategy: str = "STRICT_PACK",
            resources: Resources | None = None) -> PlacementGroup:
    """A ready placement group with one bundle per shard, or ClusterResourceError after `timeout_s`."""
    pg = placement_group(bundles(shards, use_gpu, resources), strategy=strategy)
    if pg.wait(timeout_seconds=timeout_s):
        return pg
    remove_placement_group(pg)
    per = " + ".join(f"{v:g} {k}" for k, v in bundles(1, use_gpu, resources)[0].items())
    where = "on one node" if strategy.startswith("STRICT_PACK") else f"({strategy})"
    raise ClusterResourceError(
        f"could not reserve {shards} shard(s) of {per} each {where} within {timeout_s:g} s; "
        + cluster_summary(["CPU", "GPU", *(resources or {})])
        + ". Fix: lower the tensor-parallel degree (tp), add nodes or devices to the cluster"
        + (" (or nodes with the shards' custom resources)" if resources else "")
        + ", or raise the placement wait if resources are being freed"
    )


def cluster_summary(keys: list[str]) -> str:
    """'the cluster has {...} in all and {...} free, on N node(s)' for the resources `keys`."""
    total, free = ray.cluster_resources(), ray.available_resources()
    show = lambda r: {k: r.get(k, 0) for k in keys}  # noqa: E731
    return (f"the cluster has {show(total)} in all and {show(free)} free, "
            f"on {sum(n['Alive'] for n in ray.nodes())} node(s)")


def release(pg: PlacementGroup) -> None:
    """Remove the group (its actors die with it); safe to call twice."""
    try:
        remove_placement_group(pg)
    except Exception:  # already removed
        pass
