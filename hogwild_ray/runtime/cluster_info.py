"""What a Ray cluster has: its nodes and resources, for `hogwild-ray info`."""

from __future__ import annotations

from typing import Any


def ray_cluster(address: str | None) -> dict[str, Any] | None:
    """The cluster's nodes and resources; None when no address is given and none is running."""
    import ray

    from .ray_init import init_ray

    was_connected = ray.is_initialized()
    if not was_connected:
        try:  # init_ray: a local instance started here ('local') writes no token file (ray_init's docstring)
            init_ray(address or "auto", log_to_driver=False, logging_level="ERROR")
        except ConnectionError:
            if address is None:
                return None
            raise
    try:
        nodes = [{"node_ip": n["NodeManagerAddress"], "alive": n["Alive"], "resources": n["Resources"]}
                 for n in ray.nodes()]
        return {"address": ray.get_runtime_context().gcs_address, "resources": ray.cluster_resources(),
                "available": ray.available_resources(), "nodes": nodes}
    finally:
        if not was_connected:
            ray.shutdown()
