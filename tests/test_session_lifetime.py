"""Session lifetime and hangs: a session dropped without close() gives its pages back (in
process and through Ray), a hung coordinator or shard surfaces within a bounded time naming
exactly what hung, and nothing is left running afterwards."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import pytest
import torch

import hogwild_ray as hw
from hogwild_ray.errors import CacheFullError

pytestmark = pytest.mark.reliability

PROBLEM = "Compute 12 * 7 and explain."
GREEDY = hw.SamplingParams(temperature=0)


def all_free(allocator) -> bool:
    return allocator.free_pages == allocator.num_pages


# ----------------------------------------------------------------------------- in process

@pytest.fixture(scope="module")
def llama_path(random_model):
    return random_model("llama")[0]


def test_dropped_sessions_give_their_pages_back(llama_path):
    """Sessions (one stepped, one forked, one closed) dropped without close(): after a collection
    every page is free and a request that needs the whole pool runs."""
    engine = hw.HogwildEngine.from_pretrained(llama_path, cache_tokens=1024, page_size=16)
    pool = engine.allocator
    a = engine.start(PROBLEM, workers=2, max_tokens=40, sampling=GREEDY)
    b = engine.start(PROBLEM + " Twice.", workers=3, max_tokens=40, sampling=GREEDY)
    for _ in range(3):
        engine.step([a, b])
    twin = a.fork()
    twin.step()
    closed = engine.start("Compute 1 + 1.", workers=2, max_tokens=8)
    closed.close()  # closed, then dropped: its finalizer must not give its pages back twice
    refs = [weakref.ref(s) for s in (a, b, twin, closed)]
    assert pool.free_pages < pool.num_pages
    with pytest.raises(CacheFullError):  # what a leak does: the next big request is refused
        engine.start(PROBLEM, workers=2, max_tokens=200)
    del a, b, twin, closed
    gc.collect()
    assert all(r() is None for r in refs), "a finalizer keeps its session alive"
    assert all_free(pool) and len(set(pool._free)) == pool.num_pages
    result = engine.solve(PROBLEM, workers=2, max_tokens=200, max_steps=8, sampling=GREEDY)
    assert result.stats.forward_passes > 0 and all_free(pool)


def test_a_session_collected_during_an_operation_waits_for_its_end(llama_path):
    """A finalizer that runs inside an executor operation defers the release to the operation's end
    (the Ray executor's shards replay the coordinator's page operations in its order)."""
    engine = hw.HogwildEngine.from_pretrained(llama_path, cache_tokens=1024, page_size=16)
    session = engine.start(PROBLEM, workers=2, max_tokens=20)
    session.step()
    with engine.executor_operation():
        del session
        gc.collect()
        assert not all_free(engine.allocator)
    assert all_free(engine.allocator)


def test_open_sessions_at_interpreter_exit(llama_path):
    """A dropped session's pages come back in a fresh process too; sessions still open at exit
    neither fail nor print from their finalizers."""
    code = textwrap.dedent(f"""
        import gc
        import hogwild_ray as hw
        engine = hw.HogwildEngine.from_pretrained({str(llama_path)!r}, cache_tokens=1024)
        s = engine.start("Compute 2 + 2.", workers=2, max_tokens=8)
        s.step()
        del s
        gc.collect()
        assert engine.allocator.free_pages == engine.allocator.num_pages, "a dropped session kept its pages"
        kept = engine.start("Compute 3 + 3.", workers=2, max_tokens=8)  # open at exit, with its engine
        kept.step()
        print("ok")
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "error::ResourceWarning"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert "Exception ignored" not in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


# ----------------------------------------------------------------------------- through Ray

CPUS = 4
KW = dict(device="cpu", cache_tokens=4096, attention="torch")  # CPU shards, GPU or not


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tp2_engine(cluster, llama_path):
    """factory() -> a live tp=2 engine (step_timeout_s=3): the last one while it lives (engine starts
    cost seconds; the fault tests end theirs), else a new one. All are closed after the module."""
    made = []

    def get():
        if not made or made[-1].coordinator is None:
            made.append(hw.HogwildEngine.from_pretrained(str(llama_path), backend="ray", tp=2, step_timeout_s=3,
                                                         **KW))
        return made[-1]

    yield get
    for engine in made:
        engine.close()


def actor_pid(ray, actor) -> int:
    """The pid of an actor's worker process (from the GCS actor table)."""
    return int(ray._private.state.actors(actor_id=actor._actor_id.hex())["Pid"])


def resume(pid: int) -> None:
    """Undo a SIGSTOP (the process may be gone already: killed with its actor)."""
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def test_dropped_remote_sessions_give_the_coordinators_pages_back(tp2_engine):
    engine = tp2_engine()
    session = engine.start(PROBLEM, workers=2, max_tokens=40, sampling=GREEDY)
    for _ in range(3):
        session.step()
    ref = weakref.ref(session)
    assert not all_free(engine.allocator)
    del session
    gc.collect()
    assert ref() is None
    assert all_free(engine.allocator)  # the finalizer's close went first: one caller's calls keep their order
    older = engine.start(PROBLEM, workers=2, max_tokens=8)
    newer = engine.start("Compute 1 + 1.", workers=2, max_tokens=8)  # ends the older one in the coordinator
    newer.step()
    del older
    gc.collect()  # the older session's finalizer leaves the newer one alone
    newer.step()
    newer.close()
    result = engine.solve(PROBLEM, workers=2, max_tokens=12, sampling=GREEDY)
    assert result.stats.forward_passes > 0 and all_free(engine.allocator)


def test_hung_coordinator_during_solve_is_named_within_the_deadline(cluster, tp2_engine):
    """The coordinator's process is stopped while solve() runs: solve() raises within
    hang_timeout_s + a heartbeat, naming the coordinator, and the engine let go of everything."""
    from ray_state import assert_clean

    from hogwild_ray.runtime import CoordinatorFailedError

    ray = cluster
    engine = tp2_engine()
    engine.hang_timeout_s, engine.heartbeat_s = 3.0, 0.25
    coordinator = engine.coordinator
    pid = actor_pid(ray, coordinator)
    outcome: dict = {}

    def solve() -> None:
        try:
            outcome["result"] = engine.solve(PROBLEM, workers=2, max_tokens=1000, sampling=GREEDY)
        except BaseException as e:
            outcome["error"] = e

    beat = lambda: ray.get(coordinator.heartbeat.options(concurrency_group="health").remote(), timeout=10)  # noqa: E731
    before = beat()
    runner = threading.Thread(target=solve, daemon=True)
    try:
        runner.start()
        deadline = time.monotonic() + 30
        while beat() <= before + 5 and time.monotonic() < deadline:  # solve() is running passes
            time.sleep(0.05)
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        runner.join(timeout=3.0 + 0.25 + 10)
        assert not runner.is_alive(), "solve() still waits on a stopped coordinator"
        elapsed = time.monotonic() - stopped
    finally:
        resume(pid)
        if runner.is_alive():  # without the deadline: end the wait
            ray.kill(coordinator)
            runner.join(timeout=30)
        engine.close()
    err = outcome.get("error")
    assert isinstance(err, CoordinatorFailedError), outcome
    msg = str(err)
    assert elapsed < 3.0 + 0.25 + 5, elapsed
    assert "coordinator" in msg and coordinator._actor_id.hex() in msg and f"pid {pid}" in msg
    assert "did not answer a heartbeat" in msg and "during solve()" in msg and "open a new engine" in msg
    assert "\n" not in msg and engine.coordinator is None
    assert_clean()


def test_stopped_shard_rank_is_named_alone(cluster, tp2_engine):
    """Rank 1's process is stopped; rank 0 waits on it in a collective, so both miss the step's
    deadline: the error names rank 1 only (the one whose process does not answer a ping)."""
    from ray_state import assert_clean

    from hogwild_ray.runtime import ChannelTimeoutError

    ray = cluster
    engine = tp2_engine()
    session = engine.start(PROBLEM, workers=2, max_tokens=100)
    session.step()
    shard = engine.shard_actors()[1]
    pid = actor_pid(ray, shard)
    try:
        os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(ChannelTimeoutError) as err:
            session.step()
        elapsed = time.monotonic() - start
    finally:
        resume(pid)
        engine.close()
    msg = str(err.value)
    assert err.value.ranks == [1], msg
    assert "shard rank(s) [1] did not answer within 3 s" in msg and shard._actor_id.hex() in msg
    assert "rank(s) [0] are alive" in msg and "\n" not in msg
    assert 3 <= elapsed < 3 + 2 + 4, elapsed  # the step timeout, the pings, the release
    assert engine.coordinator is None and session.done
    assert_clean()


def test_threads_sharing_an_engine_take_turns_and_get_their_own_tokens():
    """Two threads on one engine: a prompt's pages are offered for sharing when its write is planned,
    so a second thread's session between that plan and the write would read empty pages. Each
    session's logits must be those it gets alone, however the threads interleave (the first thread
    is held inside its prompt's pass here, as a thread switch there would)."""
    engine = hw.HogwildEngine.from_pretrained("random:tiny", "cpu", "float32", cache_tokens=4096)
    first, second = "What is 2+2?", "Compute 17*23 please"
    alone = engine.start(second, 2, sampling=GREEDY)
    alone.step()
    expected = alone.last_logits.clone()
    alone.close()

    real_forward = engine.runner.forward

    def held(*args, **kwargs):
        if threading.current_thread().name == "first":
            time.sleep(0.5)
        return real_forward(*args, **kwargs)

    engine.runner.forward = held
    opened, errors = threading.Event(), []

    def run_first() -> None:
        try:
            opened.set()
            engine.start(first, 2, sampling=GREEDY).close()
        except BaseException as e:  # (reported below)
            errors.append(e)

    thread = threading.Thread(target=run_first, name="first")
    thread.start()
    opened.wait(10)
    time.sleep(0.2)  # the first thread is inside its prompt's pass
    both = engine.start(second, 2, sampling=GREEDY)
    both.step()
    thread.join(30)
    assert not errors and not thread.is_alive()
    assert torch.equal(both.last_logits, expected)
    both.close()
    assert all_free(engine.allocator)
