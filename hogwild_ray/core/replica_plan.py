"""How many engine replicas a run gets on a Ray cluster, and whether the cluster can hold them.
Pure: the caller reads the cluster's resources."""

from __future__ import annotations

from ..errors import InvalidRequestError


def plan_replicas(asked: int | None, device: str, tp: int, cluster_gpus: float, cluster_cpus: float,
                  cpus_per_replica: float = 1.0) -> int:
    """`asked`, checked against the cluster, or (None) what the cluster holds: on GPUs one replica
    per `tp` GPUs, on the CPU one (torch already spreads a pass over the cores)."""
    gpus = int(cluster_gpus)
    if device.startswith("cuda"):
        if gpus < tp:
            raise InvalidRequestError(f"the Ray cluster has {gpus} GPU(s) and one engine replica with tp={tp} needs "
                                      f"{tp}; lower tp, add GPU nodes, or run on the CPU (device='cpu')")
        most = gpus // tp
        if asked is None:
            return most
        if asked > most:
            raise InvalidRequestError(f"replicas={asked} with tp={tp} needs {asked * tp} GPUs and the Ray cluster has "
                                      f"{gpus}; lower replicas to {most} or less (the default is as many as fit)")
        return asked
    replicas = 1 if asked is None else asked
    if replicas * cpus_per_replica > cluster_cpus:
        raise InvalidRequestError(f"replicas={replicas} needs {replicas * cpus_per_replica:g} CPUs (one per replica) "
                                  f"and the Ray cluster has {cluster_cpus:g}; lower replicas or add nodes")
    return replicas
