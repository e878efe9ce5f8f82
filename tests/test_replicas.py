"""Many problems over engine replicas on a real local Ray with Ray Serve (hogwild_ray.solve_many
with replicas=R): every id exactly once when a replica is killed mid-run, the resume, progress
per replica, a replica that cannot start as a one-line error, and nothing left running after.
The two-node cases (a node's raylet killed, eval across nodes) are in test_cluster.py."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

pytestmark = pytest.mark.serve
ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
from ray_state import alive_actors, assert_clean, busy_one  # noqa: E402

import hogwild_ray as hw  # noqa: E402
from hogwild_ray.serve.pool import NoReplicaError  # noqa: E402

PROBLEMS = [{"id": f"q{i}", "problem": f"Compute {i} + {i + 3}."} for i in range(16)]


@pytest.fixture(scope="module")
def local_ray():
    """This process as the driver of a local Ray (so that what the pool leaves can be seen)."""
    ray.init(num_cpus=3, include_dashboard=True, log_to_driver=False)
    yield
    ray.shutdown()


def live_replicas() -> list[tuple[int, str]]:
    """(pid, the replica's id as progress lines show it) of each live Serve replica."""
    return [(a["Pid"], a["Name"].rsplit("#", 1)[-1][:8]) for a in alive_actors()
            if a["ActorClassName"].startswith("ServeReplica:")]


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_replica_killed_mid_run_loses_nothing_and_the_rerun_resumes(local_ray, random_model, tmp_path, capfd):
    model = random_model("llama", "default")[0]
    out = tmp_path / "out.jsonl"
    killed = []

    def kill_one_replica_after_the_first_results():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (out.exists() and len(out.read_text().splitlines()) >= 4):
            time.sleep(0.05)
        replicas = dict(live_replicas())
        pid = busy_one(list(replicas), within_s=60) if replicas else None
        if pid:  # a busy one: Serve may have sent both problems in flight to one, and the other idles
            os.kill(pid, signal.SIGKILL)
            killed.append(replicas[pid])

    killer = threading.Thread(target=kill_one_replica_after_the_first_results)
    killer.start()
    records = hw.solve_many(PROBLEMS, out, replicas=2, model=model, cache_tokens=4096, workers=2, max_tokens=48,
                            sampling=hw.SamplingParams(temperature=0), max_concurrent=2)  # in waves: work to the end
    killer.join()
    assert killed, "no replica was running to kill"
    err = capfd.readouterr().err
    written = lines(out)
    assert sorted(r["id"] for r in written) == sorted(p["id"] for p in PROBLEMS)  # every id exactly once
    assert [r["id"] for r in records] == [p["id"] for p in PROBLEMS] and all("answer" in r for r in records)
    done = [line for line in err.splitlines() if line.startswith("batch: 16/16 problems done in")]
    assert done and " 0 failed, " in done[0]
    retried = int(done[0].split(" retried")[0].rsplit(" ", 1)[1])
    assert retried >= 1 and err.count("running it again") == retried  # the killed replica's problems ran again
    # progress names the replica that ran each problem: the killed one only for what it finished before it
    # died (perhaps nothing: the other may have taken the first problems), another for its problems run again
    named = {line.split("(replica ")[1].rstrip(")") for line in err.splitlines() if "(replica " in line}
    assert named - set(killed), (named, killed)
    # greedy: a problem run again (on the other replica) gives what one engine gives
    engine = hw.HogwildEngine.from_pretrained(model, cache_tokens=4096)
    try:
        alone = engine.solve(PROBLEMS[0]["problem"], 2, max_tokens=48, sampling=hw.SamplingParams(temperature=0))
    finally:
        engine.close()
    assert records[0]["worker_texts"] == alone.worker_texts
    assert_clean()  # the pool deleted its replicas, its lease and the Serve it started
    again = hw.solve_many(PROBLEMS, out, replicas=2, model=model, cache_tokens=4096, max_tokens=48)
    assert again == records and lines(out) == written  # all there: nothing runs, no replica starts
    assert "starting" not in capfd.readouterr().err


def test_replicas_that_cannot_start_are_one_clear_error_and_leave_nothing(local_ray, random_model, tmp_path):
    model = random_model("llama", "default")[0]
    with pytest.raises(NoReplicaError) as caught:  # far beyond this machine's memory: refused on the replica
        hw.solve_many(PROBLEMS[:2], tmp_path / "out.jsonl", replicas=1, model=model, cache_tokens=2**30)
    assert "cache" in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out.jsonl").exists() or not (tmp_path / "out.jsonl").read_text()
    assert_clean()


def test_more_replicas_than_the_cluster_holds_is_refused_before_anything_starts(local_ray, random_model):
    model = random_model("llama", "default")[0]
    with pytest.raises(hw.InvalidRequestError, match="replicas=5 needs 5 CPUs .* the Ray cluster has 3"):
        hw.solve_many(PROBLEMS[:2], replicas=5, model=model)
    with pytest.raises(hw.InvalidRequestError, match="replicas must be an integer >= 1"):
        hw.solve_many(PROBLEMS[:2], replicas=0, model=model)
    assert_clean()


def test_replicas_with_no_free_cpu_are_one_clear_error_within_the_bound_and_leave_nothing(local_ray, random_model):
    """The cluster holds CPUs enough in total, but another actor holds them all: serve.run waited for ever;
    the pool gives up after no_replica_timeout_s, naming what a replica asks and what is free."""
    from hogwild_ray.serve.app import ServeSettings
    from hogwild_ray.serve.pool import ReplicaPool

    hog = ray.remote(num_cpus=3)(type("Hog", (), {"ping": lambda self: True})).remote()
    ray.get(hog.ping.remote())  # placed: every CPU of the cluster held
    try:
        start = time.monotonic()
        with pytest.raises(NoReplicaError) as caught:
            with ReplicaPool(ServeSettings(model=str(random_model("llama", "default")[0]), device="cpu"), 1,
                             no_replica_timeout_s=5, quiet=True):
                pass
        assert time.monotonic() - start < 60  # the bound, and the deletion after it
        message = str(caught.value)
        assert "asks 1 CPU" in message and "0 CPU free" in message and "\n" not in message, message
        from ray import serve

        assert not serve.status().applications or not any(a.startswith("hogwild-batch") for a in
                                                           serve.status().applications)
    finally:
        ray.kill(hog)
    assert_clean()  # no replica, no lease, no Serve controller (the pool started Serve)


def test_the_replicas_benchmark_compares_one_engine_with_one_and_two_replicas(local_ray, tmp_path):
    import sys
    from pathlib import Path

    from bench_files import saved_results

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import replicas

    out = replicas.main(["--model", "random:tiny", "--device", "cpu", "--problems", "6", "--tokens", "4",
                         "--cache-tokens", "2048", "--out", str(tmp_path), "--date", "2000-01-01"])
    saved = saved_results(tmp_path / "2000-01-01-cpu-replicas", out)
    assert saved["benchmark"] == "replicas" and saved["device_name"] and saved["tokens_per_worker"] == 4
    rows = {r["replicas"]: r for r in saved["rows"]}
    assert sorted(rows) == [0, 1, 2]  # one engine in process, then 1 and 2 replicas
    for r in rows.values():
        assert r["problems"] == 6 and 0 < r["tokens"] == rows[0]["tokens"] <= 6 * 2 * 4  # the same work
        assert r["same_as_engine"] is True  # greedy: every worker's text equals the in-process engine's
        assert r["problems_per_s"] == pytest.approx(6 / r["run_s"], rel=0.01)
        assert r["x_engine"] == pytest.approx(r["problems_per_s"] / rows[0]["problems_per_s"], rel=0.01)
    assert rows[0]["x_engine"] == 1 and rows[0]["x_1_replica"] is None and rows[1]["x_1_replica"] == 1
    assert rows[2]["x_1_replica"] == pytest.approx(rows[2]["problems_per_s"] / rows[1]["problems_per_s"], rel=0.01)
    assert_clean()  # each row's replicas were deleted
