"""Faults at random moments: each actor kind (the coordinator, each shard rank) killed and stopped
after a random number of forward passes, inside solve(), a step loop or a batched solve_many();
the driver killed mid-run (connected to a cluster, or owning the Ray it started) and stopped
between steps. Each fault must surface as its own clear error within its bound, and nothing may
be left behind (actors, placement groups, shared memory, Ray processes).

The moments come from a seeded generator (`HOGWILD_FAULT_SEED` picks another sweep); the time
each fault took to surface is printed at the end of the module (`pytest -s`).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import hogwild_ray as hw

pytestmark = pytest.mark.reliability
ray = pytest.importorskip("ray")

from ray_state import assert_clean  # noqa: E402

from hogwild_ray.runtime import (  # noqa: E402
    ChannelTimeoutError, CoordinatorFailedError, ShardFailedError,
)

ROOT = Path(__file__).resolve().parents[1]
CPUS = 4
STEP_TIMEOUT_S = 3.0
# the driver's bound on a coordinator call that makes no progress: above a shard's step timeout and
# its pings (2 s), so that a stopped shard is named by the coordinator, not taken for a hung coordinator
HANG_S, BEAT_S = STEP_TIMEOUT_S + 4, 0.25
KW = dict(device="cpu", cache_tokens=4096, attention="torch", step_timeout_s=STEP_TIMEOUT_S)  # CPU shards, GPU or not
PROBLEM = "Compute 12 * 7 and explain."
GREEDY = hw.SamplingParams(temperature=0)
SEED = int(os.environ.get("HOGWILD_FAULT_SEED", "18"))

# every actor kind killed and stopped once, each inside a random way of driving it, at a random pass
ENTRIES = ("solve", "steps", "solve_many")
RNG = random.Random(SEED)
SWEEP = [(actor, fault, RNG.choice(ENTRIES), RNG.randint(1, 12)) for actor in ("coordinator", "rank 0", "rank 1")
         for fault in ("kill", "stop")]
FIGURES: list[tuple[str, float]] = []


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if FIGURES:
        print("\nfault                                            surfaced after (s)")
        for name, seconds in FIGURES:
            print(f"{name:<48} {seconds:8.2f}")


@pytest.fixture(scope="module")
def llama_path(random_model):
    return random_model("llama")[0]


def actor_pid(actor) -> int:
    return int(ray._private.state.actors(actor_id=actor._actor_id.hex())["Pid"])


def passes(engine) -> int:
    """The coordinator's finished shard steps (its heartbeat count), asked on its health thread."""
    return ray.get(engine.coordinator.heartbeat.options(concurrency_group="health").remote(), timeout=10)


def drive(engine, entry: str) -> None:
    """Run long enough for any fault to land mid-run (the model is random: no early end)."""
    if entry == "solve":
        engine.solve(PROBLEM, workers=2, max_tokens=1000, sampling=GREEDY)
    elif entry == "solve_many":
        list(engine.solve_many([f"Compute {i} * 7." for i in range(4)], workers=2, max_tokens=400,
                               sampling=GREEDY, progress=False))
    else:
        session = engine.start(PROBLEM, workers=2, max_tokens=1000, sampling=GREEDY)
        while not session.done:
            session.step()


def expected(actor: str, fault: str) -> tuple[type, str]:
    """The error class and words a fault must surface as."""
    if actor == "coordinator":
        return CoordinatorFailedError, "the coordinator"
    rank = int(actor[-1])
    if fault == "kill":
        return ShardFailedError, f"shard rank {rank} failed"
    return ChannelTimeoutError, f"shard rank(s) [{rank}] did not answer within"


@pytest.mark.parametrize("actor,fault,entry,at_pass", SWEEP, ids=[f"{a}-{f}-{e}-pass{p}" for a, f, e, p in SWEEP])
def test_a_fault_at_a_random_pass_surfaces_clearly_and_leaves_nothing(cluster, llama_path, actor, fault, entry,
                                                                        at_pass):
    engine = hw.HogwildEngine.from_pretrained(str(llama_path), backend="ray", tp=2, **KW)
    engine.hang_timeout_s, engine.heartbeat_s = HANG_S, BEAT_S
    target = engine.coordinator if actor == "coordinator" else engine.shard_actors()[int(actor[-1])]
    pid, where = actor_pid(target), target._actor_id.hex()
    outcome: dict = {}

    def run() -> None:
        try:
            drive(engine, entry)
        except BaseException as e:
            outcome["error"] = e

    runner = threading.Thread(target=run, daemon=True)
    start = passes(engine)
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while passes(engine) < start + at_pass and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runner.is_alive(), f"the run ended before pass {at_pass}: {outcome}"
        os.kill(pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        injected = time.monotonic()
        bound = (HANG_S + BEAT_S if actor == "coordinator" and fault == "stop" else STEP_TIMEOUT_S) + 6
        runner.join(timeout=bound + 10)
        surfaced = time.monotonic() - injected
        assert not runner.is_alive(), f"{actor} {fault}: still waiting after {surfaced:.1f} s"
    finally:
        if fault == "stop":
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if runner.is_alive():
            ray.kill(engine.coordinator)
            runner.join(timeout=30)
        engine.close()
    FIGURES.append((f"{actor} {fault} in {entry} at pass {at_pass}", surfaced))
    kind, words = expected(actor, fault)
    err = outcome.get("error")
    assert isinstance(err, kind), repr(err)
    msg = str(err)
    assert words in msg and "\n" not in msg, msg
    if actor == "coordinator" or fault == "stop":
        assert where in msg, msg  # the failed actor named by its id (ray logs actor --id ...)
    assert surfaced < bound, surfaced
    assert engine.coordinator is None
    with pytest.raises(CoordinatorFailedError, match="engine is closed"):
        engine.start(PROBLEM)
    assert_clean()


# ----------------------------------------------------------------------------- the driver

DRIVER = textwrap.dedent("""
    import sys, time, ray
    import hogwild_ray as hw
    address, path, entry = sys.argv[1], sys.argv[2], sys.argv[3]
    ray.init(address=None if address == "own" else address, log_to_driver=False)
    print("session", ray._private.worker._global_node.get_session_dir_path(), flush=True)
    engine = hw.HogwildEngine.from_pretrained(path, backend="ray", tp=2, device="cpu", cache_tokens=4096,
                                              attention="torch", step_timeout_s=3)

    def run(pause):
        session = engine.start("Compute 12 * 7 and explain.", workers=2, max_tokens=1000,
                               sampling=hw.SamplingParams(temperature=0))
        tokens = []
        for i in range(int(sys.argv[4])):
            tokens.append(session.step())
            if i == 1:
                print("running", flush=True)
            if pause and i == 3:
                print("pause", flush=True)
                time.sleep(0.5)  # stopped here by the test
        session.close()
        return tokens

    if entry == "pause":  # first a run nobody stops, on the same engine
        print("reference", run(False), flush=True)
    print("tokens", run(entry == "pause"), flush=True)
""")


def start_driver(address: str, path: Path, entry: str, steps: int = 400) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", DRIVER, address, str(path), entry, str(steps)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(proc: subprocess.Popen, word: str, timeout: float = 120) -> str:
    """The first stdout line starting with `word` (the driver is killed if it never comes)."""
    result: dict = {}

    def read() -> None:
        for line in proc.stdout:
            if line.startswith(word):
                result["line"] = line.strip()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if "line" not in result:
        proc.kill()
        raise AssertionError(f"the driver never printed {word!r}: {proc.stderr.read()[-2000:]}")
    return result["line"]


def processes_of(session_dir: str) -> list[int]:
    """Pids of live processes whose command line names a Ray session (its GCS, raylet, workers)."""
    name = os.path.basename(session_dir)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if name.encode() in cmd and state != "Z":
            pids.append(int(entry))
    return pids


def test_a_driver_killed_mid_run_leaves_nothing_on_the_cluster(cluster, llama_path):
    """The driver (another process, connected to this cluster) is killed with SIGKILL at a random
    moment of its step loop: Ray ends its job, and with it the coordinator, the shards, the
    placement group and the shared memory."""
    address = ray.get_runtime_context().gcs_address
    driver = start_driver(address, llama_path, "steps")
    try:
        wait_for(driver, "running")
        time.sleep(random.Random(SEED).uniform(0.0, 1.5))
        assert driver.poll() is None
        driver.kill()
        killed = time.monotonic()
        driver.wait(timeout=30)
    finally:
        driver.kill()
    assert_clean()
    FIGURES.append(("driver (connected) kill: cluster clean", time.monotonic() - killed))


def test_a_driver_that_started_its_own_ray_killed_leaves_no_process(llama_path):
    """A driver that started Ray itself (no address) is killed mid-run: its GCS, raylet and
    workers (the coordinator and shards among them) end with it."""
    driver = start_driver("own", llama_path, "steps")
    try:
        session_dir = wait_for(driver, "session").split(" ", 1)[1]
        wait_for(driver, "running")
        assert len(processes_of(session_dir)) >= 4  # GCS, raylet, the coordinator, the shards (at least)
        time.sleep(random.Random(SEED + 1).uniform(0.0, 1.5))
        driver.kill()
        killed = time.monotonic()
        driver.wait(timeout=30)
    finally:
        driver.kill()
    deadline = time.monotonic() + 30
    while processes_of(session_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = processes_of(session_dir)
    assert left == [], [Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in left]
    FIGURES.append(("driver (own Ray) kill: processes gone", time.monotonic() - killed))


def test_a_driver_stopped_between_steps_goes_on_where_it_was(cluster, llama_path):
    """The driver is stopped (SIGSTOP) between two steps for longer than the step timeout: the
    shards wait for it without failing, and once it continues the run ends with the tokens of a
    run nobody stopped."""
    address = ray.get_runtime_context().gcs_address
    driver = start_driver(address, llama_path, "pause", 12)  # a run nobody stops first, then the one stopped
    try:
        reference = wait_for(driver, "reference").removeprefix("reference")
        wait_for(driver, "pause")
        os.kill(driver.pid, signal.SIGSTOP)
        time.sleep(STEP_TIMEOUT_S * 2)
        os.kill(driver.pid, signal.SIGCONT)
        assert wait_for(driver, "tokens", timeout=120).removeprefix("tokens") == reference
        driver.wait(timeout=60)
    finally:
        os.kill(driver.pid, signal.SIGCONT) if driver.poll() is None else None
        driver.kill()
    assert driver.returncode == 0, driver.stderr.read()[-2000:]
    assert_clean()
