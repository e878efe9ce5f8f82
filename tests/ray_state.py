"""What a test cluster still holds: live actors, placement groups, our shared-memory segments."""

from __future__ import annotations

import os
import time

import ray

from hogwild_ray.runtime.channel import shm_prefix


def live_groups() -> list[dict]:
    return [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]


def alive_actors() -> list[dict]:
    """The GCS's record of each live actor of the cluster this process is connected to ("ActorID",
    "ActorClassName", "Name", "Pid", "Address"). Not the state API (ray.util.state): it asks a
    dashboard, and for a cluster started without one it asks whichever answers at the default port,
    another test worker's cluster's."""
    return [a for a in ray._private.state.actors().values() if a["State"] == "ALIVE"]


def cpu_seconds(pid: int) -> float:
    """CPU time a live process has used so far (user and system), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command's name, which may hold spaces
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_shares(pids: list[int], over_s: float = 0.5) -> dict[int, float]:
    """The share of one core each process used over the next `over_s` seconds: which replica is
    running a problem now (an idle one only wakes for its health checks)."""
    before = {pid: cpu_seconds(pid) for pid in pids}
    time.sleep(over_s)
    return {pid: (cpu_seconds(pid) - before[pid]) / over_s for pid in pids}


def busy_one(pids: list[int], at_least: float = 0.1, within_s: float = 120) -> int | None:
    """The busiest of `pids` once one of them uses `at_least` of a core over half a second (an idle
    replica uses 0-0.02), or None after `within_s`."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        shares = cpu_shares(pids)
        pid = max(shares, key=shares.get)
        if shares[pid] >= at_least:
            return pid
    return None


def live_actors() -> list[str]:
    return [a["ActorID"] for a in alive_actors()]


def our_segments() -> list[str]:
    """This test run's step-channel segments (each pytest-xdist worker names its own, see conftest)."""
    return [n for n in os.listdir("/dev/shm") if n.startswith(shm_prefix())]


def assert_clean(within_s: float = 30) -> None:
    """No actor, placement group or shared-memory segment left. Removal is asynchronous (a killed
    process's segments go with its exit), and slower on a loaded machine: up to `within_s` to go."""
    deadline = time.monotonic() + within_s
    while (live_actors() or live_groups() or our_segments()) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = {"actors": live_actors(), "placement groups": live_groups(), "segments": our_segments()}
    assert not any(left.values()), f"left after {within_s} s: {left}"
