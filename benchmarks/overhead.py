"""Time a decode step spends outside the GPU: Python, layout planning, the Ray channel, the sampling sync.

Per step: the wall time of session.step() against the GPU time of the same steps. The GPU
time is each CUDA graph the timed steps replayed, replayed back to back with no host work
in between (`engine.graphs.replay_each`), weighted by the steps that ran it (passes that
feed a header are longer than plain decode passes); without graphs, the CUDA kernel time
per step summed by torch.profiler. Outside-GPU fraction = (wall - GPU) / wall, of the
median step and of the mean (the target's, where steps end and passes differ), in process
and through Ray (backend="ray", tp=1): the coordinator's own loop (what solve() runs) and
one driver `step()` call per step; those steps do not end (the rewriting of samples that
ends them runs in process only), so their GPU time is a plain decode pass's. Targets:
under 3% in process, under 5% through Ray.
On the CPU there is no GPU time to split off: only the wall times are reported.

    python benchmarks/overhead.py                       # qwen3-8b, 4k-token prompt on CUDA; tiny on the CPU
    python benchmarks/overhead.py --workers 1,8,16 --view 16384
    python benchmarks/overhead.py --workers 16 --step-tokens 30 --no-ray   # steps end as in real text
    python benchmarks/overhead.py --workers 16 --step-tokens 30 --graph-chunks 1,32 --no-ray
    python benchmarks/overhead.py --workers 1,16 --step-tokens 30 --launch-ahead off,on --no-ray
    python benchmarks/overhead.py --workers 16 --step-tokens 30 --steps 400 --graph-padding off,on --no-ray

Writes DATE-DEVICE-overhead[-SUFFIX].{csv,json,png} under --out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import compile_watch  # noqa: E402
import hogwild_ray as hw  # noqa: E402
from scaling_runs import Model  # noqa: E402
from hogwild_ray.model.graphs import MAX_CHUNK  # noqa: E402
from hogwild_ray.transfer import to_device  # noqa: E402

TARGETS = {"in process": 3.0, "Ray: coordinator loop": 5.0}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model path (default: the random shape of --shape)")
    p.add_argument("--shape", default=None, help="random shape (default: qwen3-8b on cuda, tiny on cpu)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--view", type=int, default=None, help="prompt tokens (default: 4096 on cuda, 64 on cpu)")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--replays", type=int, default=50, help="graph replays for the GPU time")
    p.add_argument("--step-tokens", type=int, default=0,
                   help="in process: every worker ends a step about every N of its passes, as real text does "
                        "(its sample is rewritten to a paragraph break): headers, moved steps and the passes "
                        "that feed a header count too (default 0: random text, no step ever ends)")
    p.add_argument("--graph-chunks", type=lambda s: [int(x) for x in s.split(",")], default=[MAX_CHUNK],
                   help="in process, with CUDA graphs: the longest chunk (a header, an injection) a graphed pass "
                        "may feed, one in-process row per value, side by side (default: the engine's, "
                        f"{MAX_CHUNK}; 1: decode passes only)")
    p.add_argument("--launch-ahead", type=common.on_off_list,
                   default=None, help="launch each pass as soon as the last one's samples are read (on) or "
                                      "when the sessions ask for it (off), one row per value, side by side, in "
                                      "process and through Ray (default: the engine's, on with CUDA)")
    p.add_argument("--graph-padding", type=common.on_off_list,
                   default=[True], help="in process, with CUDA graphs: pad each pass to one of a few graph sizes "
                                        "(on, the engine's) or capture a graph per exact size (off), one row per "
                                        "value, side by side (default: on)")
    p.add_argument("--no-ray", action="store_true", help="in process only")
    p.add_argument("--host-profile", action="store_true",
                   help="in process, also profile the host's work over --steps more steps (cProfile; printed)")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--date", default=common.today())
    p.add_argument("--suffix", default="")
    return p.parse_args(argv)


def open_session(engine, model: Model, workers: int):
    """The protocol on (the real host work), nothing that stops a worker early."""
    return engine.start(model.text(model.view), workers, max_tokens=None, stop_on_answer=False, finisher=False,
                        sampling=[hw.SamplingParams(temperature=1.0, seed=w) for w in range(workers)])


def in_process(engine, model: Model, workers: int, args, chunk: int = MAX_CHUNK, ahead: bool | None = None,
               padded: bool = True) -> dict:
    """ahead: launch each pass ahead (see LocalExecutor.run) or not; None: the engine's default;
    padded: graphs of a few padded sizes (DecodeGraphs.padded) or one per exact size."""
    session = open_session(engine, model, workers)
    graphs = getattr(engine, "graphs", None)
    default_padded = graphs is not None and graphs.padded
    if graphs is not None:
        graphs.max_chunk, graphs.padded = chunk, padded
    executor = engine.executor
    real_run, real_forward, default_ahead = executor.run, executor.runner.forward, executor.prelaunch
    executor.prelaunch = default_ahead if ahead is None else ahead
    try:
        if args.step_tokens:
            end_steps_every(engine, session, args.step_tokens)
        for _ in range(args.warmup):
            session.step()
        passes, replays, staged = session.stats.forward_passes, *graph_counts(graphs)
        launched = executor.prelaunched
        host = common.host_profile(session.step, args.steps) if args.host_profile else None
        eager = time_eager_passes(engine)
        if graphs is not None:
            graphs.uses.clear()  # the graphs the timed steps replay, and how often
        captured: list[bool] = []  # per timed step: did it capture a graph (a new pass shape's one-time cost)
        capture_s = 0.0 if graphs is None else graphs.capture_seconds
        unfit = 0 if graphs is None else graphs.unfit

        def timed_step() -> None:
            before = 0 if graphs is None else graphs.captures
            session.step()
            captured.append(graphs is not None and graphs.captures > before)

        with compile_watch.watch() as compiles:
            walls = common.step_walls(timed_step, 0, args.steps)
        uncaptured = [w for w, c in zip(walls, captured) if not c]
        capture_s = 0.0 if graphs is None else graphs.capture_seconds - capture_s
        unfit = None if graphs is None else graphs.unfit - unfit
        passes = session.stats.forward_passes - passes
        launched = executor.prelaunched - launched
        replays, staged = (now - then for now, then in zip(graph_counts(graphs), (replays, staged)))
        steps_ended = sum(session.stats.steps_per_worker)
        engine.executor.run = real_run
        (gpu, decode_gpu), method = gpu_seconds(engine, session, args)
    finally:
        executor.run, executor.runner.forward, on = real_run, real_forward, executor.prelaunch
        executor.prelaunch = default_ahead
        if graphs is not None:
            graphs.padded = default_padded
        session.close()
    path = ("in process" if chunk == MAX_CHUNK else "in process, decode passes only graphed" if chunk == 1
            else f"in process, chunks of <= {chunk} graphed")
    if on != default_ahead:
        path += ", launched ahead" if on else ", launched when asked"
    if graphs is not None and not padded:
        path += ", a graph per exact size"
    return {"path": path, "workers": workers, "wall_ms": statistics.median(walls) * 1e3,
            "mean_wall_ms": statistics.fmean(walls) * 1e3, "steps_capturing": sum(captured),
            "capture_ms": capture_s * 1e3 / sum(captured) if any(captured) else None,
            "mean_wall_uncaptured_ms": statistics.fmean(uncaptured) * 1e3 if uncaptured else None,
            "gpu_ms": None if gpu is None else gpu * 1e3,
            "decode_gpu_ms": None if decode_gpu is None else decode_gpu * 1e3, "gpu_method": method,
            "steps_ended": steps_ended,
            "graphed_pct": None if graphs is None else 100 * replays / max(passes, 1),
            "staged_pct": None if graphs is None else 100 * staged / max(passes, 1),
            "launched_ahead_pct": 100 * launched / max(passes, 1),
            "eager_passes": len(eager), "eager_unfit": unfit,
            "eager_pass_ms": statistics.fmean(eager) * 1e3 if eager else None,
            "eager_pass_max_ms": max(eager) * 1e3 if eager else None,
            "triton_compiles": compiles.count if compiles.supported else None,
            "compile_s": compiles.seconds if compiles.supported else None, "compiled": compiles.signatures,
            "host_top": host}


def time_eager_passes(engine) -> list[float]:
    """Wall seconds of each call of the executor's `run` (up to its tokens) in which a pass ran
    without a graph (the runner's count; with no graphs, every pass), filled in as the steps
    run. Not "no replay in the call": with passes launched ahead, a call that takes a graphed
    pass launched by the call before it and launches none replays nothing itself."""
    run, runner, walls = engine.executor.run, engine.executor.runner, []

    def timed(passes, while_running=None):
        eager, t = runner.eager_passes, time.perf_counter()
        out = run(passes, while_running)
        if runner.eager_passes > eager:
            walls.append(time.perf_counter() - t)
        return out

    engine.executor.run = timed
    return walls


def graph_counts(graphs) -> tuple[int, int]:
    """Passes replayed from graphs so far, and those whose plan was staged ahead."""
    return (0, 0) if graphs is None else (graphs.replays, graphs.staged_hits)


def end_steps_every(engine, session, tokens: int) -> None:
    """Make every worker end a step about every `tokens` of its passes: its samples there are
    rewritten to the tokens of a paragraph break, which the protocol then feeds, ends the step
    on, moves, and follows with a header, as in real text. The runner's samples are rewritten
    (before any host work reads them), each write's once, by the worker's count of writes: a
    pass the executor launches ahead and then drops, run again on request, is rewritten alike."""
    brk = session.encode("\n\n")
    executor = engine.executor
    forward = executor.runner.forward
    counts: dict[tuple[int, int], int] = {}  # (session, worker) -> its writes so far, out of step across workers
    decided: dict[tuple[int, int], tuple[object, int | None]] = {}  # (block, end) -> (the block, rewritten id)

    whose: dict[int, tuple] = {}  # id(a worker's block) -> (the block, session, worker, its workers)

    def owner(block) -> tuple[int, int, int]:
        if whose.get(id(block), (None,))[0] is not block:  # a block opened since (after a moved step)
            whose.update({id(b): (b, sid, w, st.layout.workers) for sid, st in executor.sessions.items()
                          for w, b in enumerate(st.layout.cur)})
        return whose[id(block)][1:]

    def ending(steps, table=None, staged=None, batch=None, feed=None):
        logits, sampled = forward(steps, table, staged, batch, feed)
        if sampled is None:
            return logits, sampled
        rewrite = {}
        for i, s in enumerate(steps):
            if s.worker is None:
                continue
            key = (id(s.block), s.local_start + len(s.tokens))
            if key not in decided:
                sid, w, workers = owner(s.block)
                n = counts[sid, w] = counts.get((sid, w), w * tokens // workers) + 1
                k = n % tokens - (tokens - len(brk))
                decided[key] = (s.block, brk[k] if k >= 0 else None)
            if decided[key][1] is not None:
                rewrite[i] = decided[key][1]
        if rewrite:  # one asynchronous copy (setting items one by one would wait for the device)
            rows, ids = to_device(list(rewrite) + list(rewrite.values()), sampled.device).split(len(rewrite))
            sampled = sampled.index_put((rows,), ids.to(sampled.dtype))
        return logits, sampled

    executor.runner.forward = ending


def gpu_seconds(engine, session, args) -> tuple[tuple[float | None, float | None], str]:
    """GPU seconds of one step of the timed ones without host work, and of a plain decode pass
    (every worker feeds one token: what the Ray rows run, whose steps do not end), and how they
    were measured. With graphs: each graph the timed steps replayed, replayed back to back,
    weighted by its share of those steps (passes that feed headers are longer)."""
    graphs = getattr(engine, "graphs", None)
    if graphs is not None and graphs.uses:
        return (common.replayed_seconds(graphs, args.replays),
                "graph replays (forward and sampling), weighted by the passes the steps ran")
    if engine.device.type != "cuda":
        return (None, None), "no GPU"
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    steps = min(args.steps, 16)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            session.step()
    kernels = [e for e in prof.events() if getattr(e, "device_type", None) == DeviceType.CUDA]
    total_us = sum(getattr(e, "device_time", None) or getattr(e, "cuda_time", 0) for e in kernels)
    return (total_us / 1e6 / steps, None), "kernel time summed by torch.profiler"


def through_ray(model: Model, workers: list[int], args, gpu: dict[int, float | None]) -> tuple[list[dict], str]:
    try:
        import ray
    except ImportError as e:
        return [], f"Ray is not installed ({e})"
    ray.init(log_to_driver=False)
    engine = hw.HogwildEngine.from_pretrained(model.path, model.device, model.dtype, backend="ray", tp=1,
                                              cache_tokens=pool_tokens(model, workers, args))
    rows = []
    try:
        default = engine.launch_ahead()[0]
        for n in workers:
            for ahead in args.launch_ahead or [default]:
                engine.launch_ahead(ahead)
                rows += ray_rows(engine, model, n, args, gpu.get(n),
                                 "" if ahead == default else ", launched ahead" if ahead else ", launched when asked")
    finally:
        engine.close()
        ray.shutdown()
    return rows, ""


def ray_rows(engine, model: Model, workers: int, args, gpu: float | None, label: str) -> list[dict]:
    """The coordinator's own loop and the driver's step() calls, with the shards launching passes
    ahead or not as set."""
    session = open_session(engine, model, workers)
    try:
        session.run_steps(args.warmup)
        passes, launched = session.stats.forward_passes, engine.launch_ahead()[1]
        loop = session.run_steps(args.steps)
        walls = []
        for _ in range(args.steps):
            t = time.perf_counter()
            session.step()
            walls.append(time.perf_counter() - t)
        passes, launched = session.stats.forward_passes - passes, engine.launch_ahead()[1] - launched
    finally:
        session.close()
    return [{"path": path + label, "workers": workers, "wall_ms": statistics.median(s) * 1e3,
             "mean_wall_ms": statistics.fmean(s) * 1e3,
             "gpu_ms": None if gpu is None else gpu * 1e3, "launched_ahead_pct": 100 * launched / max(passes, 1),
             "gpu_method": "a plain decode pass's, from the in-process run (same model; no step ends here)"}
            for path, s in (("Ray: coordinator loop", loop), ("Ray: driver step()", walls))]


def pool_tokens(model: Model, workers: list[int], args) -> int:
    return model.view + 2048 + max(workers) * (args.warmup + 2 * args.steps + 512)


def plot(meta: dict, rows: list[dict], path: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    paths = list(dict.fromkeys(r["path"] for r in rows))
    workers = sorted({r["workers"] for r in rows})
    width = 0.8 / max(len(paths), 1)
    for i, p in enumerate(paths):
        cells = {r["workers"]: r for r in rows if r["path"] == p}
        xs = [j + i * width for j, n in enumerate(workers) if n in cells]
        a.bar(xs, [cells[n]["wall_ms"] for n in workers if n in cells], width, label=f"{p}: wall", color=f"C{i}")
        gpu = [cells[n]["gpu_ms"] or 0 for n in workers if n in cells]
        a.bar(xs, gpu, width, color="none", edgecolor="k", hatch="//", lw=0.5)
        pct = [cells[n]["outside_mean_pct"] for n in workers if n in cells]
        if all(v is not None for v in pct):
            b.plot([n for n in workers if n in cells], pct, "o-", color=f"C{i}", label=p)
    for (p, limit), ls in zip(TARGETS.items(), ("--", ":")):
        b.axhline(limit, ls=ls, lw=1, color="gray", label=f"target, {p}: {limit:g}%")
    a.set(xticks=[j + 0.4 - width / 2 for j in range(len(workers))], xticklabels=[str(n) for n in workers],
          xlabel="workers", ylabel="ms per step", title="step wall time (hatched: GPU time)")
    a.legend(fontsize=7)
    b.set(xlabel="workers", ylabel="% of the step outside the GPU", title="time outside the GPU")
    b.legend(fontsize=7)
    common.save_figure(fig, path, f"hogwild-ray overhead: {meta['model']} ({meta['dtype']}), {meta['view']}-token "
                       f"prompt, on {meta['device_name']}")


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    device = torch.device(args.device) if args.device else common.default_device()
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    path = args.model or f"random:{args.shape or ('qwen3-8b' if device.type == 'cuda' else 'tiny')}"
    model = Model(path, device, dtype)
    model.view = args.view or (4096 if device.type == "cuda" else 64)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # as in the Ray shard, so both paths compute alike
    try:
        return run(args, device, dtype, path, model)
    finally:
        torch.set_num_threads(threads)


def run(args, device: torch.device, dtype: torch.dtype, path: str, model: Model) -> dict:
    engine = hw.HogwildEngine.from_pretrained(path, device, dtype, cache_tokens=pool_tokens(model, args.workers, args))
    engine.eos_ids = frozenset()
    graphs = getattr(engine, "graphs", None) is not None
    rows = [in_process(engine, model, n, args, chunk, ahead, padded)
            for chunk in (args.graph_chunks if graphs else [MAX_CHUNK]) for ahead in (args.launch_ahead or [None])
            for padded in (args.graph_padding if graphs else [True]) for n in args.workers]
    del engine
    common.free_memory(device)
    ray_note = "not run (--no-ray)"
    if not args.no_ray:
        decode = {r["workers"]: r["decode_gpu_ms"] / 1e3 for r in rows if r.get("decode_gpu_ms") is not None}
        ray_rows, ray_note = through_ray(model, args.workers, args, decode)
        rows += ray_rows
    for r in rows:
        gpu = r["gpu_ms"]
        r["outside_ms"] = None if gpu is None else r["wall_ms"] - gpu
        r["outside_pct"] = None if gpu is None else 100 * (r["wall_ms"] - gpu) / r["wall_ms"]
        mean = r.get("mean_wall_ms")  # passes are not alike once steps end: the mean counts the slow ones
        r["outside_mean_pct"] = None if gpu is None or mean is None else 100 * (mean - gpu) / mean
        rest = r.get("mean_wall_uncaptured_ms")  # the same without the steps that captured a graph
        r["outside_mean_uncaptured_pct"] = None if gpu is None or rest is None else 100 * (rest - gpu) / rest
    targets = []
    for p, limit in TARGETS.items():
        got = [r["outside_mean_pct"] for r in rows if r["path"] == p and r["outside_mean_pct"] is not None]
        targets.append({"target": f"{p}: under {limit:g}% of a step outside the GPU",
                        "status": "not measured" if not got else ("met" if max(got) < limit else "missed"),
                        **({"value": round(max(got), 2), "limit": limit} if got else {})})
    meta = {"benchmark": "overhead", "date": args.date, "device": device.type,
            "device_name": common.device_name(device), **common.versions(), "model": path,
            "dtype": str(dtype).removeprefix("torch."), "view": model.view, "workers": args.workers,
            "steps": args.steps, "warmup": args.warmup, "cuda_graphs": graphs, "ray": ray_note or "run",
            "step_tokens": args.step_tokens or None, "graph_chunks": args.graph_chunks if graphs else None,
            "graph_padding": args.graph_padding if graphs else None,
            "launch_ahead": args.launch_ahead}
    stem = args.out / f"{args.date}-{common.file_tag(device)}-overhead{'-' + args.suffix if args.suffix else ''}"
    compiled = {f"{r['path']}, {r['workers']} workers": r.pop("compiled") for r in rows if r.get("compiled")}
    common.write_results(stem, meta, rows, {"targets": targets, "triton_compiled_while_timed": compiled})
    plot(meta, rows, Path(f"{stem}.png"))

    def ms(v):
        return "-" if v is None else f"{v:.3f}"

    def pct(v):
        return "-" if v is None else f"{v:.1f}%"

    def compiled(r):
        return "-" if r.get("triton_compiles") is None else f"{r['triton_compiles']} ({r['compile_s']:.2f})"

    ends = f", a step ends every ~{args.step_tokens} passes" if args.step_tokens else ""
    common.print_table(f"{path} ({meta['dtype']}) on {meta['device_name']}, {model.view}-token prompt, "
                       f"CUDA graphs: {graphs}{ends}",
                       ["path", "workers", "wall ms", "mean wall ms", "GPU ms", "outside ms", "outside %",
                        "outside % of mean", "steps capturing a graph", "capture ms",
                        "outside % of mean, other steps",
                        "steps ended", "graphed", "staged", "launched ahead", "eager passes",
                        "of them, plan too big for a graph", "eager pass ms", "Triton compiles (s)"],
                       [[r["path"], str(r["workers"]), ms(r["wall_ms"]), ms(r.get("mean_wall_ms")), ms(r["gpu_ms"]),
                         ms(r["outside_ms"]), pct(r["outside_pct"]), pct(r.get("outside_mean_pct")),
                         str(r.get("steps_capturing", "-")), ms(r.get("capture_ms")),
                         pct(r.get("outside_mean_uncaptured_pct")),
                         str(r.get("steps_ended", "-")), pct(r.get("graphed_pct")), pct(r.get("staged_pct")),
                         pct(r.get("launched_ahead_pct")), str(r.get("eager_passes", "-")),
                         "-" if r.get("eager_unfit") is None else str(r["eager_unfit"]),
                         ms(r.get("eager_pass_ms")), compiled(r)]
                        for r in rows])
    for t in targets:
        print(f"target {t['status']:>12}: {t['target']}" + (f" (worst {t['value']}%)" if "value" in t else ""))
    for r in rows:
        if r.get("host_top"):
            print(f"host, {r['path']}, {r['workers']} workers, {args.steps} steps:", *r["host_top"], sep="\n")
    print(f"wrote {stem}.csv, .json, .png")
    return {"meta": meta, "rows": rows, "targets": targets, "stem": stem}


if __name__ == "__main__":
    main()
