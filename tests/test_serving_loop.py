"""The server's engine loop on a real tiny engine (CPU): a loop that broke refuses new requests at once,
naming why, and none it had queued waits for ever; a request cancelled while it is being submitted
ends (its pages come back), whatever order the cancel and the submission take."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

import hogwild_ray as hw
from hogwild_ray.errors import HogwildError
from hogwild_ray.scheduler import Failed

OPTIONS = {"max_tokens": 400, "protocol": False, "sampling": hw.SamplingParams(seed=1)}


def tiny_engine():
    return hw.HogwildEngine.from_pretrained("random:tiny", "cpu", "float32", cache_tokens=2048)


def collect(heard: list, done: threading.Event):
    def sink(item) -> None:
        heard.append(item)
        if isinstance(item, Failed) or type(item).__name__ == "Finished":
            done.set()

    return sink


def test_a_loop_that_broke_refuses_new_requests_naming_the_error_and_fails_those_queued():
    engine = tiny_engine()
    in_pass, release = threading.Event(), threading.Event()

    def broken_forward(*args, **kwargs):  # the device failing mid-pass, once a second request is queued
        in_pass.set()
        release.wait(30)
        raise RuntimeError("device lost")

    loop = engine.serving_loop()
    try:
        first, first_done = [], threading.Event()
        size = loop.size("Compute 2 + 2.", 2, OPTIONS)
        engine.runner.forward = broken_forward
        loop.submit("a", "Compute 2 + 2.", 2, OPTIONS, size.pages, collect(first, first_done))
        assert in_pass.wait(30)
        queued, queued_done = [], threading.Event()
        loop.submit("b", "Compute 3 + 3.", 2, OPTIONS, size.pages, collect(queued, queued_done))
        release.set()
        assert first_done.wait(30) and queued_done.wait(30)  # neither waits for ever
        for heard in (first, queued):
            assert isinstance(heard[-1], Failed) and "device lost" in str(heard[-1].error)
        assert not loop.alive
        started = time.monotonic()
        with pytest.raises(HogwildError, match="the engine stopped serving after an error: RuntimeError: device lost"):
            loop.submit("c", "Compute 4 + 4.", 2, OPTIONS, size.pages, lambda item: None)
        assert time.monotonic() - started < 1
    finally:
        release.set()
        loop.close()


def test_a_request_cancelled_while_it_is_submitted_ends_and_frees_its_pages():
    """The client goes away while the replica hands its request to the loop (a slow submission, as a
    busy thread makes it): the cancel must not overtake the submission, or the session would run to
    its whole budget with nobody listening."""
    pytest.importorskip("ray.serve")
    from hogwild_ray.serve.replica import EngineReplica

    replica = EngineReplica({"path": "random:tiny", "device": "cpu", "dtype": "float32", "cache_tokens": 32768},
                            graph_warmup=(2, 0))
    engine, loop = replica.engine, replica.loop
    real_submit = loop.submit

    submitting, submitted = threading.Event(), threading.Event()

    def slow_submit(*args, **kwargs):
        submitting.set()
        time.sleep(0.3)
        try:
            return real_submit(*args, **kwargs)
        finally:
            submitted.set()

    loop.submit = slow_submit

    async def client_goes_away() -> bool:
        """Whether the session ended within seconds; checked while the replica's event loop lives on
        (as a server's does), so that the session's events still find somewhere to go."""
        async def consume() -> None:
            long = {**OPTIONS, "max_tokens": 12000}  # minutes of passes: only a cancel ends it within seconds
            async with contextlib.aclosing(replica.generate("Compute 2 + 2.", 2, long)) as messages:
                async for _ in messages:
                    pass

        task = asyncio.ensure_future(consume())
        while not submitting.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # inside the submission
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        while not submitted.is_set():  # (the session cannot have run before it was submitted)
            await asyncio.sleep(0.01)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if not (loop.scheduler.running or loop.scheduler.waiting) and engine.allocator.free_pages == free:
                return True
            await asyncio.sleep(0.05)
        return False

    try:
        free = engine.allocator.free_pages
        assert asyncio.run(client_goes_away())
    finally:
        replica.__del__()
