"""GPU memory after faults and refusals (on a GPU only): a round of bad inputs, sessions ended
mid-run, full caches, refused injections, forks and closed streams leaves the device's
allocated memory where the same round left it before (the first round may build graphs and
grow workspaces once); a Ray engine's GPU memory goes back to the device when it is closed or
when its shard dies."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

import hogwild_ray as hw
from hogwild_ray.errors import HogwildError

pytestmark = [pytest.mark.reliability,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU memory: needs a CUDA device")]
GREEDY = hw.SamplingParams(temperature=0)
SAMPLED = hw.SamplingParams(temperature=0.8, top_p=0.9, seed=3)


def refused(call) -> None:
    with pytest.raises(HogwildError):
        call()


def one_round(engine, tmp_path) -> None:
    """Every way a request can end early or be refused, once; seeded, so that every round runs
    the same passes (the same graph shapes)."""
    refused(lambda: engine.start("Compute 1 + 1.", workers=0))
    refused(lambda: engine.start("Compute 1 + 1.", workers=2, sampling=hw.SamplingParams(temperature=-1)))
    refused(lambda: engine.start("x " * 100_000, workers=2))  # too long for the cache
    session = engine.start("Compute 12 * 7.", workers=3, max_tokens=200, sampling=SAMPLED)
    for _ in range(5):
        session.step()
    refused(lambda: session.step(inject={7: "no such worker"}))
    refused(lambda: session.step(inject={0: "word " * 5000}))  # longer than the view can take
    fork = session.fork()
    fork.step()
    session.close()  # mid-run
    fork.step()
    fork.close()
    greedy = engine.start("Compute 3 * 9.", workers=2, max_tokens=4, sampling=GREEDY)
    while not greedy.done:
        greedy.step()
    greedy.close()
    events = engine.stream("Compute 5 + 8.", workers=2, max_tokens=50, sampling=SAMPLED)
    for _ in range(10):
        next(events)
    events.close()  # a stream closed mid-way
    records = engine.solve_many(["Compute 2 + 2.", "y " * 100_000, {"id": "ok", "problem": "Compute 4 * 4."}],
                                out=str(tmp_path / "out.jsonl"), workers=2, max_tokens=6, progress=False,
                                sampling=SAMPLED)
    assert [("error" in r) for r in records] == [False, True, False]
    (tmp_path / "out.jsonl").unlink()
    hogs = [engine.start(f"Compute {i} + 1.", workers=4, max_tokens=400, sampling=SAMPLED)  # more than the pool
            for i in range(8)]
    try:
        for _ in range(1_000):
            engine.step([s for s in hogs if not s.done])
            if all(s.done for s in hogs):
                break
    except HogwildError:
        pass
    finally:
        for s in hogs:
            s.close()
    engine.solve("Compute 1 + 1.", workers=2, max_tokens=3, sampling=GREEDY)  # the last pass's buffers: one shape


def allocated(device) -> int:
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "graphs"])
def test_faults_and_refusals_leave_no_gpu_memory_behind(random_model, tmp_path, cuda_graphs):
    path = random_model("llama")[0]
    engine = hw.HogwildEngine.from_pretrained(str(path), "cuda", cache_tokens=8192, cuda_graphs=cuda_graphs)
    try:
        one_round(engine, tmp_path)  # builds what is built once (graphs, workspaces)
        after = [allocated(engine.device)]
        for _ in range(3):
            one_round(engine, tmp_path)
            after.append(allocated(engine.device))
        assert engine.allocator.free_pages == engine.allocator.num_pages
        print(f"allocated after each round ({'graphs' if cuda_graphs else 'eager'}): {after}")
        assert after == [after[0]] * len(after), after
    finally:
        engine.close()


def device_free() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def test_a_ray_engines_gpu_memory_returns_when_closed_or_killed(random_model):
    """The coordinator holds the GPU in its own process: closing the engine, or its death,
    gives the memory back to the device (as seen by another process: this one)."""
    ray = pytest.importorskip("ray")
    path = random_model("llama")[0]
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        torch.cuda.init()
        before = device_free()
        for ending in ("close", "kill"):
            engine = hw.HogwildEngine.from_pretrained(str(path), "cuda", backend="ray", tp=1, cache_tokens=65536)
            engine.solve("Compute 2 + 2.", workers=2, max_tokens=8)
            assert device_free() < before - (256 << 20)  # the pool and the weights are on the device
            if ending == "kill":
                pid = int(ray._private.state.actors(actor_id=engine.shard_actors()[0]._actor_id.hex())["Pid"])
                os.kill(pid, signal.SIGKILL)
                with pytest.raises(HogwildError):
                    engine.solve("Compute 3 + 3.", workers=2, max_tokens=8)
            engine.close()
            deadline = time.monotonic() + 30
            while device_free() < before - (64 << 20) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert device_free() >= before - (64 << 20), (ending, before, device_free())
    finally:
        ray.shutdown()
