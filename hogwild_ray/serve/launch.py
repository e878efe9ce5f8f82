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

from ..ray_address import check_reachable
from .app import ServeSettings, build_app


def serve_forever(settings: ServeSettings, host: str, port: int, address: str | None,
                  on_ready: Callable[[str], None], on_stop: Callable[[], None]) -> None:
    """Serve at http://host:port until SIGINT or SIGTERM; on_ready(url) once it answers."""
    check_reachable(address)
    import ray
    from ray import serve

    from ..runtime.ray_init import init_ray

    if not ray.is_initialized():
        init_ray(address, log_to_driver=True)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(settings), name="hogwild", route_prefix="/")
        on_ready(f"http://{host}:{port}")
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        on_stop()
        serve.shutdown()


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
