"""The scaling and overhead benchmarks end to end on random:tiny on the CPU (GPU sections skip)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from bench_files import saved_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_scaling_writes_consistent_results(tmp_path):
    import scaling

    out = scaling.main(["--shape", "tiny", "--device", "cpu", "--workers", "1,2", "--views", "24", "--steps", "3",
                        "--warmup", "1", "--hf-new-tokens", "3", "--hf-repeats", "1", "--out", str(tmp_path),
                        "--date", "2000-01-01", "--naive-max-view", "16"])
    stem = tmp_path / "2000-01-01-cpu-scaling"
    saved = saved_results(stem, out)
    assert {r["section"] for r in saved["rows"]} == {"eager", "independent", "transformers"}
    reasons = {(s["section"], s["workers"]): s["reason"] for s in saved["skipped"]}
    assert "CUDA" in reasons[("graphs", 1)] and "naive" in reasons[("naive", 2)]
    assert len(saved["targets"]) == 6 and all(t["status"] == "not measured" for t in saved["targets"])
    assert saved["floor_bandwidth_gbs"] > 0 and saved["bandwidth_method"] and saved["transformers"] and saved["torch"]
    for r in saved["rows"]:
        s = r["step_ms"] / 1e3
        assert r["tokens_per_s"] == pytest.approx(r["workers"] / s)
        assert r["tokens_per_s_per_worker"] == pytest.approx(1 / s)
        assert r["achieved_gbs"] == pytest.approx(r["gb_read_per_step"] / s)
        assert r["vs_roofline"] == pytest.approx(r["step_ms"] / r["roofline_ms"])
        assert r["active_workers"] == r["workers"] and r["view_tokens"] >= 24
    cell = {(r["section"], r["workers"]): r for r in saved["rows"]}
    # shared: the prompt is read once; independent: every worker reads its own copy
    assert cell[("eager", 2)]["kv_tokens_read"] < 1.5 * cell[("eager", 1)]["kv_tokens_read"]
    assert cell[("independent", 2)]["kv_tokens_read"] > 1.8 * cell[("independent", 1)]["kv_tokens_read"]
    eager_1, eager_2 = cell[("eager", 1)], cell[("eager", 2)]
    assert eager_2["vs_1_worker"] == pytest.approx(eager_2["step_ms"] / eager_1["step_ms"])
    assert cell[("transformers", 2)]["compiled"] is False


def test_overhead_writes_results(tmp_path):
    import overhead

    out = overhead.main(["--shape", "tiny", "--device", "cpu", "--workers", "1,2", "--view", "16", "--steps", "3",
                         "--warmup", "1", "--no-ray", "--out", str(tmp_path), "--date", "2000-01-01"])
    stem = tmp_path / "2000-01-01-cpu-overhead"
    saved = saved_results(stem)
    assert [(r["path"], r["workers"]) for r in saved["rows"]] == [("in process", 1), ("in process", 2)]
    assert all(r["wall_ms"] > 0 and r["gpu_ms"] is None and r["outside_pct"] is None for r in saved["rows"])
    assert saved["ray"] == "not run (--no-ray)" and out["targets"][0]["status"] == "not measured"
    # no graphs on the CPU: every timed pass is eager and timed; the torch reference compiles nothing
    assert all(r["eager_passes"] == 3 and r["eager_pass_ms"] > 0 for r in saved["rows"])
    assert all(r["triton_compiles"] == 0 for r in saved["rows"]) and saved["triton_compiled_while_timed"] == {}
    assert all(r["launched_ahead_pct"] == 0 for r in saved["rows"])  # the CPU engine's default
    assert all(r["steps_capturing"] == 0 and r["capture_ms"] is None for r in saved["rows"])  # no graphs
    assert all(r["mean_wall_uncaptured_ms"] == r["mean_wall_ms"] and r["eager_unfit"] is None for r in saved["rows"])


def test_overhead_runs_with_the_launch_ahead_off_and_on(tmp_path):
    import overhead

    out = overhead.main(["--shape", "tiny", "--device", "cpu", "--workers", "2", "--view", "16", "--steps", "6",
                         "--warmup", "2", "--no-ray", "--launch-ahead", "off,on", "--step-tokens", "4",
                         "--out", str(tmp_path), "--date", "2000-01-01"])
    rows = {r["path"]: r for r in out["rows"]}
    assert rows.keys() == {"in process", "in process, launched ahead"} and out["meta"]["launch_ahead"] == [False, True]
    ahead = rows["in process, launched ahead"]
    assert rows["in process"]["launched_ahead_pct"] == 0 and ahead["launched_ahead_pct"] >= 50
    assert ahead["steps_ended"] >= 2


@pytest.mark.parametrize("option", ["--launch-ahead", "--graph-padding"])
def test_overhead_refuses_an_unknown_on_off_setting_before_it_runs(option, capsys):
    import overhead

    with pytest.raises(SystemExit) as exit_:
        overhead.parse([option, "off,maybe"])
    assert exit_.value.code == 2
    assert f"argument {option}: unknown setting(s) ['maybe']; choose from on, off" in capsys.readouterr().err
    assert overhead.parse([option, "off,on"]).__dict__[option[2:].replace("-", "_")] == [False, True]


@pytest.mark.parametrize("bench", ["scaling", "throughput", "tensor_parallel"])
def test_a_list_of_integers_that_is_not_one_is_refused_naming_the_form(bench, capsys):
    """Every benchmark's comma-separated integers (common.ints): a one-line argparse error, not a traceback."""
    module = __import__(bench)

    with pytest.raises(SystemExit) as exit_:
        module.parse(["--workers", "1,four"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --workers: expected integers joined by commas (e.g. 1,4,16), got '1,four'" in err
    assert module.parse(["--workers", "1, 4,16,"]).workers == [1, 4, 16]


def test_compile_watch_counts_what_triton_reports_and_restores_the_hooks():
    import compile_watch
    from triton import knobs

    def outer(**kw):
        calls.append(kw["repr"])
        return False

    calls = []
    knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = outer, None
    try:
        with compile_watch.watch() as seen:
            for name in ("_merge_kernel", "_merge_kernel", "_other"):
                fn = type("Info", (), {"name": f"pkg.{name}"})()
                assert not knobs.runtime.jit_cache_hook(key=1, repr=f"{name}(x)", fn=fn, compile={})
                knobs.runtime.jit_post_compile_hook(key=1, repr=f"{name}(x)", fn=fn, compile={})
        assert seen.count == 3 and seen.kernels == {"_merge_kernel": 2, "_other": 1} and seen.seconds >= 0
        assert seen.signatures[-1] == "_other(x)" and calls == ["_merge_kernel(x)", "_merge_kernel(x)", "_other(x)"]
        assert knobs.runtime.jit_cache_hook is outer and knobs.runtime.jit_post_compile_hook is None
        assert "3 compiles" in seen.summary()
    finally:
        knobs.runtime.jit_cache_hook = knobs.runtime.jit_post_compile_hook = None


def test_overhead_ends_steps_as_real_text_does(tmp_path):
    """--step-tokens makes the workers end steps (the protocol's real path: a paragraph break fed,
    the step moved, a header next); without it random text ends none."""
    import overhead

    rows = {}
    for every in (0, 4):
        out = overhead.main(["--shape", "tiny", "--device", "cpu", "--workers", "2", "--view", "16", "--steps", "12",
                             "--warmup", "1", "--no-ray", "--out", str(tmp_path), "--date", "2000-01-01",
                             "--step-tokens", str(every)])
        rows[every] = out["rows"][0]
        assert out["meta"]["step_tokens"] == (every or None)
    assert rows[0]["steps_ended"] == 0 and rows[4]["steps_ended"] >= 4
    assert rows[4]["graphed_pct"] is None and rows[4]["mean_wall_ms"] > 0


def test_host_work_splits_what_overlaps_the_pass(tmp_path):
    """The host-work benchmark (the forward a stand-in): per pass, the part that overlaps the pass
    and the part the device waits for, with and without steps ending."""
    import host_work

    out = host_work.main(["--configs", "1x2,2x2", "--step-tokens", "0,3", "--steps", "8", "--warmup", "1",
                          "--prompt", "16", "--out", str(tmp_path), "--date", "2000-01-01"])
    saved = saved_results(tmp_path / "2000-01-01-cpu-host_work")
    assert [(r["sessions"], r["step_tokens"], r["heap"], r["launch_ahead"]) for r in saved["rows"]] == [
        (s, n, "settled", a) for n in (None, 3) for s in (1, 2) for a in ("off", "on")]
    for r in out["rows"]:
        assert 0 < r["overlapped_ms"] <= r["host_ms"]
        assert r["exposed_ms"] == pytest.approx(r["host_ms"] - r["overlapped_ms"])
        # launched ahead with no step ends, a pass is always queued behind the one being read
        assert (r["exposed_ms"] > 0) == (r["launch_ahead"] == "off") or r["step_tokens"] is not None, r
    rows = {(r["sessions"], r["step_tokens"], r["launch_ahead"]): r for r in out["rows"]}
    for (s, n, ahead), r in rows.items():  # the device waits less with the launch ahead
        assert ahead == "off" or r["exposed_ms"] < rows[s, n, "off"]["exposed_ms"]
        assert (r["steps_ended"] > 0) == (r["step_tokens"] is not None)
        # launched ahead: every timed pass with no step ends; most with (a header's pass too)
        assert r["launched_ahead_pct"] == (0 if r["launch_ahead"] == "off" else r["launched_ahead_pct"])
        assert r["launch_ahead"] == "off" or r["launched_ahead_pct"] >= (100 if r["step_tokens"] is None else 50)


def test_host_work_counts_the_device_idle_only_within_the_timed_steps(tmp_path, monkeypatch):
    """A pause before the timed steps (here the heap settling; on a loaded machine, the process
    descheduled) is in no step's wall, so it is not the device waiting on a step either."""
    import contextlib

    import host_work

    from hogwild_ray import heap

    @contextlib.contextmanager
    def slow_settle():
        time.sleep(0.3)
        yield

    monkeypatch.setattr(heap, "settled", slow_settle)
    out = host_work.main(["--configs", "1x2", "--step-tokens", "0", "--launch-ahead", "off", "--steps", "8",
                          "--warmup", "1", "--prompt", "16", "--out", str(tmp_path), "--date", "2000-01-01"])
    (row,) = out["rows"]
    assert 0 < row["exposed_ms"] < row["host_ms"] and row["overlapped_ms"] > 0, row


def test_gpu_time_weighs_the_graphs_the_steps_replayed():
    """An engine with decode graphs gives its GPU time by replaying each graph the timed steps
    ran, weighted by how many ran it (stand-ins here): three plain decode passes of 4 ms and a
    header's pass of 8 ms make 5 ms a step; a plain decode pass alone (the Ray rows') 4 ms."""
    import overhead

    class Graphs:
        uses = {"decode": 3, "header": 1}

        def replay_each(self, times):
            assert times == 5
            return [(3, True, 0.004), (1, False, 0.008)]

    class Engine:
        graphs = Graphs()

    (gpu, decode), method = overhead.gpu_seconds(Engine(), None, type("A", (), {"replays": 5})())
    assert gpu == pytest.approx(0.005) and decode == 0.004 and "weighted" in method


def test_the_attention_benchmarks_naive_baseline_attends_as_the_engine_does():
    """attention_kernels' naive path (each worker re-rotates its whole view, then SDPA) gives
    the engine's torch attention's output on the benchmark's own combined layout."""
    import torch

    from attention_kernels import NaiveRerotate, build_case

    from hogwild_kernels.backends import TorchAttention

    torch.manual_seed(0)
    hq, hkv, d = 4, 2, 16
    q, pools, groups, _ = build_case(3, 120, hq, hkv, d, torch.float32, torch.device("cpu"), page=8)
    k, v = pools[0]
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2).float() / d))
    slots = torch.zeros(3, dtype=torch.int64)
    got, want = (cls(inv_freq, 1.0, d**-0.5) for cls in (NaiveRerotate, TorchAttention))
    out = got.attend(q, k, v, got.prepare(groups, slots, slots))
    assert out.shape == q.shape
    torch.testing.assert_close(out, want.attend(q, k, v, want.prepare(groups, slots, slots)), rtol=1e-4, atol=1e-5)


def test_the_attention_benchmark_times_its_kernels_in_turn_and_takes_medians(monkeypatch):
    """attention_kernels --repeats: the kernel, each variant and SDPA timed one after the other,
    round after round, each its median; a cell's row has every column (no kernel runs here)."""
    import types

    import torch

    import attention_kernels

    order, times = [], {"t": [5.0, 1.0, 3.0], "a": [2.0, 2.0, 9.0], "s": [4.0, 6.0, 5.0]}

    def fake_bench(fns, **_):
        name = fns[0]
        order.append(name)
        return times[name][sum(n == name for n in order) - 1]

    monkeypatch.setattr(attention_kernels, "bench", fake_bench)
    got = attention_kernels.interleaved({"triton": ["t"], "a": ["a"], "sdpa": ["s"]}, 3)
    assert order == ["t", "a", "s"] * 3 and got == {"triton": 3.0, "a": 2.0, "sdpa": 5.0}

    calls, built = [], []
    monkeypatch.setattr(attention_kernels, "bench", lambda fns, **_: calls.append(len(fns)) or 1e-6 * len(calls))
    build = attention_kernels.build_case
    monkeypatch.setattr(attention_kernels, "build_case", lambda *a, **kw: built.append(build(*a, **kw)) or built[-1])
    args = types.SimpleNamespace(kernel={}, variants={"pps3": {"programs_per_sm": 3}, "p16": {"page": 16}},
                                 repeats=2, no_baselines=True, page=32)
    row = attention_kernels.measure(2, 64, "qwen3-8b", args, torch.device("cpu"), torch.float32)
    assert len(calls) == 8  # 2 rounds of the kernel, the two variants and SDPA
    # pools of --page tokens a page, and of the variant's own page size for it (the same keys)
    assert [b[1][0][0].shape[1] for b in built] == [32, 16] and built[0][3] == built[1][3]
    assert row["triton_us"] == pytest.approx(3.0) and row["pps3_us"] == pytest.approx(4.0)
    assert row["sdpa_us"] == pytest.approx(6.0) and row["pps3_x"] == pytest.approx(4.0 / 3.0)


@pytest.mark.parametrize("variants, named", [
    ('{"c": {"chained": 1}}', "variant 'c': chained is true or false, got 1"),
    ('{"c": {"bogus": 1}}', "unknown knob(s) ['bogus']; choose from"),
    ('{"sdpa": {"chained": true}}', "that name is a column of its own"),
    ('{"p": {"page": 0}}', "variant 'p': page is a whole number of tokens, at least 1; got 0"),
    ('{"p": {"page": 1.5}}', "variant 'p': page is a whole number of tokens, at least 1; got 1.5"),
])
def test_the_attention_benchmark_refuses_bad_variants_by_name(monkeypatch, variants, named):
    """Variants are checked before anything runs (no GPU needed to be refused); `chained` and
    `page_layout` are knobs of their own besides TritonAttention's arguments."""
    import attention_kernels

    monkeypatch.setattr(sys, "argv", ["attention_kernels.py", "--variants", variants])
    with pytest.raises(SystemExit) as stop:
        attention_kernels.main()
    assert named in str(stop.value)


def test_the_attention_benchmark_refuses_pages_of_no_tokens(monkeypatch):
    import attention_kernels

    monkeypatch.setattr(sys, "argv", ["attention_kernels.py", "--page", "0"])
    with pytest.raises(SystemExit, match="--page must be at least 1 token; got 0"):
        attention_kernels.main()


def test_overhead_counts_as_eager_only_the_calls_that_ran_a_pass_without_a_graph():
    """A call that takes the graphed pass launched by the call before it and launches none replays
    nothing itself, yet ran no eager pass: only calls where the runner ran one count."""
    import types

    import overhead

    runner = types.SimpleNamespace(eager_passes=0)
    graphs = types.SimpleNamespace(replays=0)

    def run(passes, while_running=None):
        if passes == "eager":
            runner.eager_passes += 1
        elif passes == "graphed, launching the next":
            graphs.replays += 1
        return passes

    engine = types.SimpleNamespace(executor=types.SimpleNamespace(run=run, runner=runner), graphs=graphs)
    walls = overhead.time_eager_passes(engine)
    for passes in ("graphed, launching the next", "graphed, launched before", "eager", "graphed, launched before"):
        assert engine.executor.run(passes) == passes
    assert len(walls) == 1 and walls[0] >= 0
