"""The OpenAI-compatible server under load: requests/s, time to first token and inter-token
latency at several concurrencies, against one request at a time.

One run starts the server in this process (a local Ray, Ray Serve on a free localhost port,
`build_app(ServeSettings(...))` as `hogwild-ray serve` builds it), warms it up with 2 requests
(not recorded), then for each concurrency C of --concurrency sends --requests streaming chat
requests (default max(2C, 8)) with the real `openai` client, at most C in flight: a pool of C
threads, each sending its requests one after another. Request i is the same problem with the
same seed (temperature 0.6) at every C, so the phases are comparable.

Per request: time to first token (the first chunk carrying reasoning_content), inter-token
latencies (gaps between consecutive text chunks of the same worker, the worker read from the
chunk's `hogwild.worker` extension), end-to-end latency, and completion tokens (the usage of
the last chunk, stream_options.include_usage). Per C: requests/s and generated tokens/s over
the phase's wall time, TTFT p50/p90/p99, ITL p50/p90/p99, e2e p50/p99, and from the server's
own /metrics (differences over the phase, read 1.5 s after it: the replicas report every
0.5 s) the forward passes, mean sessions per pass and rows (query tokens) per pass.

With `--graph-warmup 0,32` an app with each warm-up setting (the decode graphs it captures at
start) runs the same phases, one after the other, each row marked with its setting, on the one
Ray Serve the run starts: each app is deployed, measured and deleted (its replicas and their
device memory gone) before the next. `startup_s` is each app's start (replicas up, the model
loaded, its graphs warmed up, /health answering); `serve_start_s` the Ray and Serve start before.

Side by side: C=1 (one request at a time) is the baseline; every C's requests/s and tokens/s
are also given as a ratio to it (`x_requests_per_s`, `x_tokens_per_s`: the speed-up vs one at
a time). C=1 is added to --concurrency when missing. Writes DATE-DEVICE-serve[-SUFFIX].
{csv,json,png} under --out.

    python benchmarks/serve.py                                     # the built-in model on the CPU
    python benchmarks/serve.py --quick                             # a smoke test: C=1,4, 4 requests, 8 tokens
    python benchmarks/serve.py --model random:qwen3-8b --device cuda
    python benchmarks/serve.py --model random:qwen3-8b --device cuda --graph-warmup 0,32
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

TEMPERATURE = 0.6
SEED = 1234  # request i: seed SEED + 1000 * i (the server moves it on per worker)
WARMUP_REQUESTS = 2
REPORT_WAIT_S = 1.5  # the replicas report their counters to the front every 0.5 s
DEFAULTS = {  # device type -> option defaults
    "cuda": dict(max_tokens=128, concurrency=[1, 8, 32]),
    "cpu": dict(max_tokens=64, concurrency=[1, 8, 32]),
}
QUICK = dict(concurrency=[1, 4], requests=4, max_tokens=8)
COUNTERS = ("hogwild:forward_passes_total", "hogwild:pass_sessions_total", "hogwild:pass_rows_total",
            "hogwild:generation_tokens_total", "hogwild:request_success_total", "hogwild:request_failure_total",
            "hogwild:cuda_graph_captures_total", "hogwild:cuda_graph_capture_seconds_total")
NOTES = {
    "requests_per_s": "requests finished / wall time of the phase (first request sent to last stream ended)",
    "tokens_per_s": "completion tokens (usage of each stream's last chunk, all workers) / wall time of the phase",
    "ttft_ms": "request sent to the first chunk carrying reasoning_content, percentiles over the phase's requests",
    "itl_ms": "gaps between consecutive reasoning_content chunks of the same worker of a request, all requests "
              "pooled (a chunk carries one pass's text of one worker)",
    "e2e_s": "request sent to the end of its stream (after the usage chunk)",
    "sessions_per_pass": "the server's /metrics over the phase: d(hogwild:pass_sessions_total) / "
                         "d(hogwild:forward_passes_total)",
    "rows_per_pass": "d(hogwild:pass_rows_total) / d(hogwild:forward_passes_total): query tokens per pass",
    "x_requests_per_s": "requests/s over that of C=1 (one request at a time): the speed-up of concurrency",
    "x_tokens_per_s": "tokens/s over that of C=1",
    "server_tokens": "d(hogwild:generation_tokens_total) over the phase; equals the clients' completion tokens",
    "graph_captures": "d(hogwild:cuda_graph_captures_total) over the phase: CUDA graphs captured inside its passes "
                      "(a new pass shape's one-time cost; 0 without graphs); graph_capture_s: the host's seconds "
                      "in them (d(hogwild:cuda_graph_capture_seconds_total))",
    "client": "the load generator runs in the benchmark's process (C threads, the openai client): on a small "
              "CPU it competes with the server for the cores",
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="a model path or random:NAME; 'builtin' for the built-in SmolLM2-135M (default)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when there is one")
    p.add_argument("--workers", type=int, default=2, help="Hogwild! workers per request (default: 2)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per worker (default: 64 on cpu, 128 on cuda)")
    p.add_argument("--concurrency", type=common.ints, default=None,
                   help="requests in flight, a comma list (default: 1,8,32)")
    p.add_argument("--requests", type=int, default=None, help="requests per concurrency C (default: max(2C, 8))")
    p.add_argument("--replicas", type=int, default=1, help="engine replicas (default: 1)")
    p.add_argument("--cache-tokens", type=int, default=None, help="each replica's K/V pool in tokens (default: "
                                                                   "the engine's)")
    p.add_argument("--graph-warmup", type=common.ints, default=[32],
                   help="the server's --graph-warmup (decode graphs captured at start for batches of up to N "
                        "sessions; 0: none); several, comma-separated: a server each, in turn (default: 32)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: concurrency 1,4, 4 requests, 8 tokens per worker; explicit options still win")
    p.add_argument("--out", type=Path, default=common.RESULTS, help="directory for the results")
    p.add_argument("--date", default=common.today())
    p.add_argument("--suffix", default="", help="added to the file names")
    args = p.parse_args(argv)
    args.device = torch.device(args.device) if args.device else common.default_device()
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA GPU")
    given = {k for k, v in vars(args).items() if v is not None}
    for k, v in {**DEFAULTS[args.device.type], **(QUICK if args.quick else {})}.items():
        if k not in given:
            setattr(args, k, v)
    if args.model == "builtin":
        args.model = None
    if not args.concurrency or min(args.concurrency) < 1:
        p.error("--concurrency needs positive integers")
    args.concurrency = sorted(set(args.concurrency) | {1})  # C=1 is the baseline
    for name in ("workers", "max_tokens", "replicas"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.requests is not None and args.requests < 1:
        p.error("--requests must be >= 1")
    if args.cache_tokens is not None and args.cache_tokens < 1:
        p.error("--cache-tokens must be >= 1")
    if not args.graph_warmup or min(args.graph_warmup) < 0:
        p.error("--graph-warmup needs integers >= 0")
    return args


def requests_for(args, c: int) -> int:
    return args.requests if args.requests is not None else max(2 * c, 8)


# ---- the server ------------------------------------------------------------------------------
APP = "hogwild-bench"


def start_serve(args) -> str:
    """A local Ray and Ray Serve on a free localhost port, once for the run; the base URL."""
    from ray import serve

    from hogwild_ray.runtime.ray_init import init_ray
    from hogwild_ray.serve.launch import free_port

    cpus = max(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
               args.replicas + 1)  # a replica takes one CPU, the front 0.1
    init_ray(None, num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def start_app(args, base: str, graph_warmup: int) -> str:
    """The app at / with one warm-up setting, as `hogwild-ray serve` builds it, answering /health;
    the served model's name."""
    from ray import serve

    from hogwild_ray.serve.app import ServeSettings, build_app
    from hogwild_ray.serve.launch import wait_healthy

    settings = ServeSettings(model=args.model, device=args.device.type, cache_tokens=args.cache_tokens,
                             workers=args.workers, max_tokens=args.max_tokens, replicas=args.replicas,
                             max_waiting=max(256, 2 * max(args.concurrency)), graph_warmup=graph_warmup)
    serve.run(build_app(settings), name=APP, route_prefix="/")
    wait_healthy(f"{base}/health", timeout=900)
    return settings.model_name


def stop_app() -> None:
    """The app's replicas gone (and their device memory with them) before the next one starts."""
    from ray import serve

    serve.delete(APP)


def stop_serve() -> None:
    """Serve and Ray down, each whatever the other did."""
    import ray

    try:
        from ray import serve

        serve.shutdown()
    except Exception as e:  # noqa: BLE001 - Ray still goes down
        print(f"serve.shutdown failed: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        if ray.is_initialized():
            ray.shutdown()


def server_counters(base: str) -> dict[str, float]:
    """The server's counters from /metrics (labels dropped, values of one name summed)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"{base}/metrics", timeout=60).read().decode()
    out: dict[str, float] = {name: 0.0 for name in COUNTERS}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in out:
                out[sample.name] += sample.value
    return out


# ---- the load --------------------------------------------------------------------------------
def problem(i: int) -> str:
    a, b = 12 + (37 * i) % 89, 7 + (53 * i) % 61
    return f"What is {a} * {b}? Show the steps."


def one_request(client, model: str, args, i: int) -> dict:
    """Stream request i; its times, token count and inter-token gaps (or its error)."""
    t0 = time.perf_counter()
    first = None
    last: dict[int, float] = {}
    gaps: list[float] = []
    tokens = None
    try:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": problem(i)}], max_tokens=args.max_tokens,
            temperature=TEMPERATURE, seed=SEED + 1000 * i, stream=True, stream_options={"include_usage": True},
            extra_body={"workers": args.workers})
        for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                text = (choice.delta.model_extra or {}).get("reasoning_content")
                if not text:
                    continue
                if first is None:
                    first = now
                worker = ((choice.model_extra or {}).get("hogwild") or {}).get("worker")
                if worker is not None:
                    if worker in last:
                        gaps.append(now - last[worker])
                    last[worker] = now
        end = time.perf_counter()
    except Exception as e:  # noqa: BLE001 - counted as a failed request
        return {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0], "t0": t0, "end": time.perf_counter()}
    return {"ok": tokens is not None, "error": None if tokens is not None else "no usage chunk", "t0": t0, "end": end,
            "ttft": None if first is None else first - t0, "e2e": end - t0, "tokens": tokens or 0, "gaps": gaps}


def send(client, model: str, args, ids: list[int], concurrency: int) -> tuple[list[dict], float]:
    """Requests `ids`, at most `concurrency` in flight; their records and the wall time."""
    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="client") as pool:
        records = list(pool.map(lambda i: one_request(client, model, args, i), ids))
    return records, time.perf_counter() - t


def pct(xs: list[float], q: float, scale: float = 1.0) -> float | None:
    return float(np.percentile(np.asarray(xs), q)) * scale if xs else None


def phase_row(c: int, records: list[dict], wall: float, before: dict, after: dict) -> dict:
    ok = [r for r in records if r["ok"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    e2e = [r["e2e"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    d = {k: after[k] - before[k] for k in COUNTERS}
    passes = d["hogwild:forward_passes_total"]
    return {
        "concurrency": c, "requests": len(records), "ok": len(ok), "failed": len(records) - len(ok),
        "wall_s": wall, "requests_per_s": len(ok) / wall if wall else 0.0, "completion_tokens": tokens,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "ttft_p50_ms": pct(ttft, 50, 1e3), "ttft_p90_ms": pct(ttft, 90, 1e3), "ttft_p99_ms": pct(ttft, 99, 1e3),
        "itl_p50_ms": pct(gaps, 50, 1e3), "itl_p90_ms": pct(gaps, 90, 1e3), "itl_p99_ms": pct(gaps, 99, 1e3),
        "e2e_p50_s": pct(e2e, 50), "e2e_p99_s": pct(e2e, 99),
        "passes": int(passes), "sessions_per_pass": d["hogwild:pass_sessions_total"] / passes if passes else None,
        "rows_per_pass": d["hogwild:pass_rows_total"] / passes if passes else None,
        "server_tokens": int(d["hogwild:generation_tokens_total"]),
        "server_failures": int(d["hogwild:request_failure_total"]),
        "graph_captures": int(d["hogwild:cuda_graph_captures_total"]),
        "graph_capture_s": d["hogwild:cuda_graph_capture_seconds_total"],
        "errors": "; ".join(sorted({r["error"] for r in records if r["error"]}))[:500] or None,
    }


def add_ratios(rows: list[dict]) -> None:
    base = next(r for r in rows if r["concurrency"] == 1)
    for r in rows:
        for key in ("requests_per_s", "tokens_per_s"):
            r[f"x_{key}"] = r[key] / base[key] if base[key] else None


def measure(args, base: str, model: str) -> tuple[list[dict], dict]:
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=1800)
    t = time.perf_counter()
    warm, _ = send(client, model, args, [10_000 + k for k in range(WARMUP_REQUESTS)], WARMUP_REQUESTS)
    bad = [r["error"] for r in warm if not r["ok"]]
    if bad:
        raise RuntimeError(f"the warm-up requests failed: {bad[0]}")
    warmup = time.perf_counter() - t
    print(f"warm-up: {WARMUP_REQUESTS} requests in {warmup:.1f} s", flush=True)
    rows = []
    time.sleep(REPORT_WAIT_S)
    before = server_counters(base)
    for c in args.concurrency:
        n = requests_for(args, c)
        records, wall = send(client, model, args, list(range(n)), c)
        time.sleep(REPORT_WAIT_S)
        after = server_counters(base)
        row = phase_row(c, records, wall, before, after)
        rows.append(row)
        before = after
        print(f"C={c}: {n} requests in {wall:.1f} s, {row['requests_per_s']:.2f} req/s, {row['tokens_per_s']:.1f} "
              f"tok/s, TTFT p50 {fmt(row['ttft_p50_ms'], '.0f')} ms, {row['failed']} failed", flush=True)
    add_ratios(rows)
    return rows, {"warmup_s": round(warmup, 1), "measure_s": round(time.perf_counter() - t - warmup, 1)}


# ---- output ----------------------------------------------------------------------------------
def fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(meta: dict, rows: list[dict]) -> None:
    cols = ["warm-up", "C", "requests", "failed", "req/s", "x req/s", "tok/s", "x tok/s", "TTFT p50 ms", "p90", "p99",
            "ITL p50 ms", "p90", "p99", "e2e p50 s", "p99", "sessions/pass", "rows/pass", "graphs captured (s)"]
    body = [[str(r["graph_warmup"]), str(r["concurrency"]), str(r["requests"]), str(r["failed"]),
             fmt(r["requests_per_s"], ".2f"), fmt(r["x_requests_per_s"], ".2f"), fmt(r["tokens_per_s"]),
             fmt(r["x_tokens_per_s"], ".2f"),
             fmt(r["ttft_p50_ms"], ".0f"), fmt(r["ttft_p90_ms"], ".0f"), fmt(r["ttft_p99_ms"], ".0f"),
             fmt(r["itl_p50_ms"], ".1f"), fmt(r["itl_p90_ms"], ".1f"), fmt(r["itl_p99_ms"], ".1f"),
             fmt(r["e2e_p50_s"], ".2f"), fmt(r["e2e_p99_s"], ".2f"), fmt(r["sessions_per_pass"], ".2f"),
             fmt(r["rows_per_pass"], ".1f"), f"{r['graph_captures']} ({r['graph_capture_s']:.2f})"] for r in rows]
    common.print_table(f"hogwild-ray serve: {meta['model']} on {meta['device_name']}, {meta['workers']} workers x "
                       f"{meta['max_tokens']} tokens per request, temperature {meta['temperature']}, "
                       f"{meta['replicas']} replica(s); x = vs one request at a time (C=1)", cols, body)
    for r in rows:
        if r["failed"]:
            print(f"WARNING C={r['concurrency']}: {r['failed']} of {r['requests']} requests failed: {r['errors']}")
        if r["server_tokens"] != r["completion_tokens"] and not r["failed"]:
            print(f"note C={r['concurrency']}: the server counted {r['server_tokens']} generated tokens, the "
                  f"clients' usage {r['completion_tokens']}")


def plot(meta: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(10.4, 4.6))
    settings = list(dict.fromkeys(r["graph_warmup"] for r in rows))
    top = 1e-9
    for k, warmup in enumerate(settings):
        mine = [r for r in rows if r["graph_warmup"] == warmup]
        name = f"graph warm-up {warmup}" if len(settings) > 1 else "measured"
        cs, rps = [r["concurrency"] for r in mine], [r["requests_per_s"] for r in mine]
        top = max(top, max(rps) * 1.3)
        left.plot(cs, rps, "o-", color=f"C{2 * k}", label=name)
        base = next(r["requests_per_s"] for r in mine if r["concurrency"] == 1)
        left.plot(cs, [base * c for c in cs], ":", color=f"C{2 * k}", alpha=0.4, label=f"{name}: C x one at a time")
        for c, y, r in zip(cs, rps, mine):
            left.annotate(f"x{fmt(r['x_requests_per_s'], '.1f')}", (c, y), textcoords="offset points",
                          xytext=(4, -10), fontsize=7)
        ttft = [(r["concurrency"], r["ttft_p50_ms"], r["ttft_p90_ms"]) for r in mine if r["ttft_p50_ms"] is not None]
        if ttft:
            right.plot([t[0] for t in ttft], [t[1] for t in ttft], "o-", color=f"C{2 * k + 1}", label=f"{name}: p50")
            right.plot([t[0] for t in ttft], [t[2] for t in ttft], "x:", color=f"C{2 * k + 1}", alpha=0.5,
                       label=f"{name}: p90")
    left.set(xlabel="concurrency C (requests in flight)", ylabel="requests/s", title="throughput")
    left.set_ylim(0, top)
    cs = sorted({r["concurrency"] for r in rows})
    right.set(xlabel="concurrency C (requests in flight)", ylabel="time to first token (ms)",
              title="time to first token")
    right.set_ylim(bottom=0)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.1)
        ax.legend(fontsize=7)
    common.save_figure(fig, path, f"hogwild-ray serve: {meta['model']} on {meta['device_name']}\n{meta['workers']} "
                                  f"workers x {meta['max_tokens']} tokens per request, {meta['replicas']} replica(s)")


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    device = args.device
    label = args.model or "built-in SmolLM2-135M-Instruct"
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"hogwild-ray serve benchmark: {label} on {common.device_name(device)}, {args.workers} workers x "
          f"{args.max_tokens} tokens, concurrency {','.join(map(str, args.concurrency))}", flush=True)
    t0 = time.perf_counter()
    rows, startup, phases = [], {}, {}
    try:
        base = start_serve(args)
        serve_start = round(time.perf_counter() - t0, 1)
        print(f"Ray Serve up at {base} in {serve_start:.0f} s", flush=True)
        for warmup in args.graph_warmup:
            t = time.perf_counter()
            try:
                model = start_app(args, base, warmup)
                startup[str(warmup)] = round(time.perf_counter() - t, 1)
                print(f"app up in {startup[str(warmup)]:.0f} s (graph warm-up {warmup})", flush=True)
                measured, phases[str(warmup)] = measure(args, base, model)
            finally:
                stop_app()
            rows += [{"graph_warmup": warmup, **r} for r in measured]
    finally:
        stop_serve()
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    meta = {"benchmark": "serve", "date": args.date, "device": device.type, "device_name": common.device_name(device),
            **common.versions(), "model": label, "served_model_name": model, "workers": args.workers,
            "max_tokens": args.max_tokens, "temperature": TEMPERATURE, "seed": SEED,
            "concurrency": args.concurrency, "requests": {str(c): requests_for(args, c) for c in args.concurrency},
            "replicas": args.replicas, "cache_tokens": args.cache_tokens, "quick": args.quick,
            "graph_warmup": args.graph_warmup, "warmup_requests": WARMUP_REQUESTS, "serve_start_s": serve_start,
            "startup_s": startup,
            "phases_s": phases,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "load_average": [round(x, 2) for x in (load or ())[:1] + (load_after or ())[:1]],
            "seconds": round(time.perf_counter() - t0, 1), "notes": NOTES}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.date}-{common.file_tag(device)}-serve{'-' + args.suffix if args.suffix else ''}"
    common.write_results(stem, meta, rows)
    plot(meta, rows, Path(f"{stem}.png"))
    table(meta, rows)
    print(f"wrote {stem}.csv, .json, .png")
    return {"meta": meta, "rows": rows, "stem": stem}


if __name__ == "__main__":
    main()
