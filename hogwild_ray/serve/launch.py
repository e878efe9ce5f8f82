"""Run the server until told to stop: start (or join) Ray, start Serve on the address given,
deploy the application, wait for Ctrl-C or SIGTERM, shut Serve down gracefully."""

from __future__ import annotations

import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Callable

from ..errors import HogwildError
from ..ray_address import check_reachable
from .app import ServeSettings, build_app, serve_running


APP = "hogwild"


class ServeConflictError(HogwildError, RuntimeError):
    """Serve already runs on the cluster with HTTP settings other than the ones asked for."""


def serve_forever(settings: ServeSettings, host: str, port: int, address: str | None,
                  on_ready: Callable[[str], None], on_stop: Callable[[], None]) -> None:
    """Serve at http://host:port until SIGINT or SIGTERM; on_ready(url) once it answers. On the way out only
    our application is deleted, and Serve shut down only when this process started it (a shared cluster's
    other applications stay)."""
    check_reachable(address)
    import ray
    from ray import serve

    from ..runtime.ray_init import init_ray

    if not ray.is_initialized():
        init_ray(address, log_to_driver=True)
    own_serve, deployed = not serve_running(), False
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        if not own_serve:
            check_http(host, port)
        deployed = True
        serve.run(build_app(settings), name=APP, route_prefix="/")
        on_ready(f"http://{host}:{port}")
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if deployed:
            on_stop()
        leave(own_serve, deployed)


def check_http(host: str, port: int) -> None:
    """Serve ignores the HTTP settings of a start that finds it running: refuse where ours would not be
    listened on (the URL printed would answer nothing)."""
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    running = client.http_config
    location = str(ray.get(client._controller.get_proxy_location.remote()) or "")
    if location.endswith("Disabled"):
        raise ServeConflictError("Ray Serve already runs on this cluster without an HTTP proxy; use a cluster "
                                 "without Serve running (or `serve shutdown` its applications first)")
    if running.port != port or running.host not in (host, "0.0.0.0", "::"):  # a wildcard host listens on ours
        raise ServeConflictError(f"Ray Serve already runs on this cluster on {running.host}:{running.port}, not "
                                 f"{host}:{port}; pass --host {running.host} --port {running.port}, or use a "
                                 "cluster without Serve running")


def leave(own_serve: bool, deployed: bool) -> None:
    """Delete our application, and Serve itself only where this process started it."""
    from ray import serve

    if own_serve and set(serve.status().applications) <= {APP}:
        serve.shutdown()
    elif deployed:
        serve.delete(APP)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (for tests and benchmarks that start a server)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 300.0) -> None:
    """Wait until GET `url` answers 200 (the server's /health), or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(url, timeout=10).status == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f} s")
