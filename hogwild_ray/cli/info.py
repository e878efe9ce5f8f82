"""`hogwild-ray info`: versions, devices and the Ray cluster's resources, for bug reports and checks."""

from __future__ import annotations

import argparse
import json
import platform
from importlib import metadata
from typing import Any

from ..devices import cpu_cores, cpu_name
from .common import FORMATTER

PACKAGES = ("torch", "triton", "transformers", "ray")


def register(sub) -> None:
    p = sub.add_parser(
        "info", formatter_class=FORMATTER,
        help="versions, devices (CUDA GPUs or the CPU) and the Ray cluster's resources",
        description="Print the versions of hogwild-ray and what it runs on, the devices torch sees, and\n"
                    "the resources of a Ray cluster: the one --address names, else one already running\n"
                    "(RAY_ADDRESS or started on this machine); no cluster is started unless asked.",
        epilog="examples:\n  hogwild-ray info\n  hogwild-ray info --address ray://head:10001 --json\n"
               "  hogwild-ray info --address local     # start a local Ray instance to see what it would get",
    )
    p.add_argument("--address", metavar="ADDR", default=None,
                   help="Ray cluster to ask ('local' starts a new local one; default: a running cluster, if any)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(execute=execute)


def versions() -> dict[str, str | None]:
    """Python's and the packages' versions; hogwild-ray's is the running code's (a checkout on the path
    may be no installed distribution, or not the one installed)."""
    from .. import __version__

    found: dict[str, str | None] = {"python": platform.python_version(), "hogwild-ray": __version__}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def devices() -> list[dict[str, Any]]:
    import torch

    if torch.cuda.is_available():
        return [{"type": "cuda", "index": i, "name": torch.cuda.get_device_name(i),
                 "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                for i in range(torch.cuda.device_count())]
    return [{"type": "cpu", "name": cpu_name(), "cores": cpu_cores()}]


def execute(args: argparse.Namespace, engine=None) -> int:
    from ..errors import HogwildError, InvalidRequestError
    from ..ray_address import check_reachable

    check_reachable(args.address)
    from ..runtime.cluster_info import ray_cluster

    try:
        cluster = ray_cluster(args.address)
    except ConnectionError as e:
        if isinstance(e, HogwildError):  # a cluster that answered but refused us: its own line says why
            raise
        raise InvalidRequestError(f"no Ray cluster at --address {args.address} ({e}); check the address, "
                                  "or start one with `ray start --head`") from e
    report = {"versions": versions(), "devices": devices(), "ray_cluster": cluster}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    show(report)
    return 0


def show(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title="versions", show_header=False, title_justify="left")
    for name, v in report["versions"].items():
        t.add_row(name, v or "[dim]not installed")
    console.print(t)
    t = Table(title="devices", title_justify="left")
    for col in ("device", "name", "memory / cores"):
        t.add_column(col)
    for d in report["devices"]:
        size = f"{d['memory_gib']} GiB" if d["type"] == "cuda" else f"{d['cores']} cores"
        t.add_row(f"{d['type']}:{d['index']}" if d["type"] == "cuda" else "cpu", d["name"], size)
    console.print(t)
    cluster = report["ray_cluster"]
    if cluster is None:
        console.print("ray cluster: none running (give --address, or --address local to start one)")
        return
    t = Table(title=f"ray cluster at {cluster['address']} ({len(cluster['nodes'])} nodes)", title_justify="left")
    for col in ("resource", "total", "available"):
        t.add_column(col)
    for k, v in sorted(cluster["resources"].items()):
        if not k.startswith("node:"):
            t.add_row(k, amount(k, v), amount(k, cluster["available"].get(k, 0)))
    console.print(t)


def amount(resource: str, v: float) -> str:
    return f"{v / 2**30:.1f} GiB" if "memory" in resource else f"{v:g}"
