"""Many sessions per forward pass: S problems x W workers in shared passes, against one
session at a time and against transformers.

For every cell (S sessions, W workers each, a P-token prompt per session), in one run on one
engine (`--sections`):

* batched: all S problems through `engine.solve_many` at once (the scheduler admits them and
  writes their prompts in the shared passes, 2048 prompt tokens per pass); every worker
  generates exactly --tokens tokens (plain prompts, no finisher, no stop on an answer, no
  end-of-text token, each count checked). Reported: wall time, generated tokens/s end to end
  (prompts included), and from the differences of `engine.metrics()` the passes, ms per pass
  and rows (query tokens) per pass. Then the decode probe: the S sessions started with their
  prompts written, stepped together by `engine.step(sessions)` (warm-up passes, then timed
  passes, median kept): the steady-state pass with every session decoding, its tokens/s and
  its roofline.
* sequential: the same problems one session at a time through `engine.solve`; --sequential
  all solves each of the S problems in turn and times them all, --sequential one solves one
  and counts S times its time (S identical sessions take S times as long). The decode probe
  of one session alone gives its steady-state pass.
* transformers: `generate` with its static cache (SDPA; compiled on CUDA where it works) at
  batch S*W on a P-token prompt each (nothing shared), random weights of the same shape;
  a decode step = (time with K new tokens - time with 1) / (K - 1), as in scaling.py (where
  that difference is lost in the prefill's noise, on a loaded CPU, the median gap between the
  tokens generate streams is used instead, and a note says so). When the one-shot prefill
  would not fit, the prefill is chunked (`prefill_chunk_size`).

Roofline of a pass: (weight bytes + unique K/V bytes read in the pass) / the device's
bandwidth measured in the same run by bandwidth.py (the largest of a plain copy and
read-only kernels, no CUDA graph; sampled at the start and after each section, the best
kept). Unique K/V: every page a pass reads counted once (a session's prompt is shared
by its workers, and every worker sees every other's tokens), per session its prompt plus all
its workers' tokens, each token layers x 2 x kv_heads x head_dim x dtype bytes. `pct_roofline` = roofline time /
measured pass time; above 100% the measurement would be wrong (a warning is printed).

Ratios: batched tokens/s over sequential (end to end, and decode), and batched decode
tokens/s over transformers at batch S*W. The targets are printed as met or missed, never
asserted. Writes DATE-DEVICE-throughput[-SUFFIX].{csv,json,png} under --out.

    python benchmarks/throughput.py                       # CUDA: random:qwen3-8b; CPU: the built-in model
    python benchmarks/throughput.py --quick               # the target cells only
    python benchmarks/throughput.py --sessions 1,32 --workers 4 --prompts 4096 --tokens 64
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from bandwidth import Bandwidth  # noqa: E402
from bandwidth import measure as measure_bandwidth  # noqa: E402
import scaling_runs  # noqa: E402

import hogwild_ray as hw  # noqa: E402
from hogwild_ray.core.scheduling import PREFILL_CHUNK, session_pages  # noqa: E402

SECTIONS = ("batched", "sequential", "transformers")
GIB = 1 << 30
# Plain prompts, every worker to its budget: no protocol, no finisher, no stop on an answer.
PLAIN = dict(protocol=False, chat_template=False, finisher=False, stop_on_answer=False, redundancy_every=None)
DEFAULTS = {  # device type -> option defaults (--quick: the target cells only)
    "cuda": dict(model="random:qwen3-8b", sessions=[1, 4, 16, 32, 64], workers=[1, 4, 8], prompts=[1024, 4096],
                 tokens=128, temperature=1.0, sequential="one", probe_warmup=8, probe_steps=16, hf_new_tokens=33,
                 hf_repeats=3, hf_batches=None),
    "cpu": dict(model=None, sessions=[1, 4, 8], workers=[1, 2], prompts=[256], tokens=16, temperature=0.0,
                sequential="all", probe_warmup=2, probe_steps=6, hf_new_tokens=9, hf_repeats=2, hf_batches=None),
}
QUICK = {
    "cuda": dict(sessions=[1, 32], workers=[4], prompts=[4096], tokens=64, probe_warmup=6, probe_steps=12,
                 hf_repeats=1, hf_batches=[128]),
    "cpu": dict(sessions=[1, 8], workers=[2], prompts=[128], tokens=16, probe_steps=4),
}
NOTES = {
    "tokens_per_s": "generated tokens / wall time of the whole run (prompts written in it); sequential with "
                    "--sequential one: S x one session's wall time",
    "ms_per_pass": "engine.metrics() differences: pass seconds / passes over the run (prompt chunks included)",
    "rows_per_pass": "engine.metrics() differences: query tokens / passes over the run",
    "decode_ms": "median wall time of engine.step(sessions) with every session decoding (one token per worker), "
                 "after warm-up passes (CUDA graphs captured there)",
    "kv_tokens_read": "distinct K/V tokens the probe's passes read (mean of its first and last timed pass): "
                      "per session its prompt and all its workers' tokens, every page once (the problems differ "
                      "from their first token, so no prompt page is shared between sessions: prefix_pages_reused)",
    "roofline_ms": "(weight bytes + kv_tokens_read x K/V bytes per token) / the bandwidth of this run (bandwidth.py: "
                   "the largest of a plain copy and read-only kernels, best sample)",
    "pct_roofline": "roofline_ms / decode_ms (transformers: / step_ms) x 100; never above 100 if measured right",
    "decode_gpu_ms": "CUDA graphs: the probe's last pass replayed 10 times back to back (forward and sampling, no "
                     "host work between replays): the pass's GPU time; decode_ms - decode_gpu_ms is host time",
    "transformers": "generate(), static cache, SDPA, sampling off, min_new_tokens forced; step = (t(K new) - "
                    "t(1 new)) / (K - 1), best of --hf-repeats (the median gap between streamed tokens where "
                    "the difference is lost in noise, see note); batch S*W, each row its own P-token prompt",
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    p.add_argument("--model", default=None,
                   help="a model path or random:NAME; 'builtin' for the built-in SmolLM2-135M (default: "
                        "random:qwen3-8b on cuda, the built-in model on cpu)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--sessions", type=common.ints, default=None, help="S values (cuda: 1,4,16,32,64; cpu: 1,4,8)")
    p.add_argument("--workers", type=common.ints, default=None, help="W values (cuda: 1,4,8; cpu: 1,2)")
    p.add_argument("--prompts", type=common.ints, default=None, help="prompt tokens P (cuda: 1024,4096; cpu: 256)")
    p.add_argument("--tokens", type=int, default=None, help="tokens every worker generates (cuda 128, cpu 16)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: 1.0 on cuda, sampled inside the CUDA graph; 0, greedy, on "
                        "cpu, where drawing the Gumbel noise in torch costs more than the small model's pass)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"any of {','.join(SECTIONS)}")
    p.add_argument("--sequential", choices=("all", "one"), default=None,
                   help="all: solve the S problems one after another; one: time one and count it S times "
                        "(default: one on cuda, all on cpu)")
    p.add_argument("--warmup-tokens", type=int, default=None,
                   help="tokens of the untimed warm-up run of each cell (default: --tokens on cuda, where the "
                        "CUDA graphs of every pass shape are captured; 4 on cpu)")
    p.add_argument("--probe-warmup", type=int, default=None, help="decode probe: passes before timing")
    p.add_argument("--probe-steps", type=int, default=None, help="decode probe: timed passes (median kept)")
    p.add_argument("--hf-new-tokens", type=int, default=None, help="K of the transformers timing")
    p.add_argument("--hf-repeats", type=int, default=None, help="transformers timings per cell (best kept)")
    p.add_argument("--hf-batches", type=common.ints, default=None,
                   help="transformers: only these batches S*W (default: every cell's; --quick on cuda: 128)")
    p.add_argument("--no-compile", action="store_true", help="transformers without torch.compile")
    p.add_argument("--cpu-memory-gib", type=float, default=8.0, help="memory budget on the CPU")
    p.add_argument("--quick", action="store_true",
                   help="the target cells only (cuda: S=1,32 W=4 P=4096, 64 tokens; cpu: S=1,8 W=2 P=128, "
                        "16 tokens); explicit options still win")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--date", default=common.today())
    p.add_argument("--suffix", default="", help="added to the file names")
    args = p.parse_args(argv)
    args.device = torch.device(args.device) if args.device else common.default_device()
    kind = "cuda" if args.device.type == "cuda" else "cpu"
    given = {k for k, v in vars(args).items() if v is not None}
    for k, v in {**DEFAULTS[kind], **(QUICK[kind] if args.quick else {})}.items():
        if k not in given:
            setattr(args, k, v)
    if args.model == "builtin":
        args.model = None
    if args.warmup_tokens is None:
        args.warmup_tokens = args.tokens if kind == "cuda" else 4
    args.sampling = hw.SamplingParams(temperature=args.temperature, seed=0)  # seeds 0..W-1, one per worker
    args.sections = [s for s in args.sections.split(",") if s]
    bad = set(args.sections) - set(SECTIONS)
    if bad:
        p.error(f"unknown sections {', '.join(sorted(bad))}; choose from {', '.join(SECTIONS)}")
    for name in ("sessions", "workers", "prompts"):
        if not getattr(args, name) or min(getattr(args, name)) < 1:
            p.error(f"--{name} needs positive integers")
    if args.tokens < 1 or args.probe_steps < 1 or args.hf_new_tokens < 2:
        p.error("--tokens and --probe-steps must be >= 1, --hf-new-tokens >= 2")
    return args


# ---- problems and sizes ----------------------------------------------------------------------
def problems(model: scaling_runs.Model, sessions: int, prompt: int) -> list[str]:
    """`sessions` distinct texts of about `prompt` tokens (a numbered opening, then plain prose)."""
    return [model.tokenizer.decode(model.tokenizer(f"Report {i}. ", add_special_tokens=False)["input_ids"]
                                   + model.ids(prompt)[: max(prompt - 4, 1)]) for i in range(sessions)]


def prompt_tokens(engine, text: str) -> int:
    """Tokens of a plain prompt as a session writes it."""
    from hogwild_ray.engine import protocol_from
    from hogwild_ray.prompt_text import prompt_ids

    return len(prompt_ids(engine.tokenizer, text, 1, protocol_from("combined", PLAIN)))


def probe_tokens(args) -> int:
    """Tokens a worker generates in the decode probe."""
    return args.probe_warmup + args.probe_steps + 1


def budget_tokens(args) -> int:
    """The most tokens a worker may generate in any run of a cell (its max_tokens)."""
    return max(args.tokens, args.warmup_tokens, probe_tokens(args))


def context_for(args, spec) -> int:
    """The longest view served: the longest prompt and every worker's budget (combined layout)."""
    t = budget_tokens(args)
    return min(max(args.prompts) + 8 + max(args.workers) * (t + t // 4 + 64) + 256, spec.max_positions)


def cell_pages(sessions: int, workers: int, prompt: int, tokens: int, context: int, page_size: int = 16) -> int:
    """Pages the scheduler reserves for `sessions` sessions at once (each: hogwild_ray's session_pages)."""
    return sessions * session_pages("combined", workers, prompt + 8, tokens, context, page_size)


def fit_cells(model: scaling_runs.Model, args, context: int) -> tuple[list[tuple[int, int, int]], list[dict], int]:
    """The cells whose sessions (all at once) and pass activations fit beside the weights; the pool in tokens."""
    budget = common.memory_budget(model.device, args.cpu_memory_gib) - model.held_bytes - 2 * GIB
    run, skipped, pool = [], [], 0
    for p in args.prompts:
        for w in args.workers:
            for s in args.sessions:
                tokens = cell_pages(s, w, p, budget_tokens(args), context) * 16
                need = tokens * model.kv_per_token + model.activations(max(s * w, PREFILL_CHUNK, p))
                if need > budget:
                    skipped.append(skip("batched", s, w, p, f"needs {need / GIB:.1f} GiB of K/V and activations, "
                                                            f"{max(budget, 0) / GIB:.1f} GiB free beside the weights"))
                    continue
                run.append((s, w, p))
                pool = max(pool, tokens)
    return run, skipped, pool


def skip(section: str, sessions: int, workers: int, prompt: int, reason: str) -> dict:
    return {"section": section, "sessions": sessions, "workers": workers, "prompt": prompt, "reason": reason}


# ---- our engine ------------------------------------------------------------------------------
def counters(engine) -> dict:
    """Cumulative pass counters as totals (metrics() gives means: multiplied back)."""
    m = engine.metrics()
    n = m["passes"]
    return {"passes": n, "rows": round(m["rows_per_pass"] * n), "sessions": round(m["sessions_per_pass"] * n),
            "generated": m["tokens_generated"], "prompt": m["prompt_tokens"], "seconds": m["pass_ms_mean"] * n / 1e3,
            "reused": getattr(engine.allocator, "prefix_reused", 0)}


def run_stats(before: dict, after: dict, wall: float) -> dict:
    d = {k: after[k] - before[k] for k in before}
    n = max(d["passes"], 1)
    return {"wall_s": wall, "generated": d["generated"], "tokens_per_s": d["generated"] / wall if wall else 0.0,
            "passes": d["passes"], "ms_per_pass": 1e3 * d["seconds"] / n, "rows_per_pass": d["rows"] / n,
            "sessions_per_pass": d["sessions"] / n, "prompt_tokens_written": d["prompt"],
            "prefix_pages_reused": d["reused"],
            "pass_share_of_wall": d["seconds"] / wall if wall else 0.0}


def solve_batched(engine, texts: list[str], workers: int, tokens: int, sampling) -> tuple[dict, list[int]]:
    """All problems through solve_many at once: run stats and each worker's generated count."""
    common.sync(engine.device)
    before, t = counters(engine), time.perf_counter()
    records = engine.solve_many(texts, workers=workers, max_tokens=tokens, sampling=sampling, progress=False,
                                **PLAIN)
    common.sync(engine.device)
    wall = time.perf_counter() - t
    errors = [r["error"] for r in records if "error" in r]
    if errors:
        raise RuntimeError(f"solve_many: {len(errors)} problems failed: {errors[0]}")
    counts = [g for r in records for g in r["stats"]["generated_per_worker"]]
    return run_stats(before, counters(engine), wall), counts


def solve_sequential(engine, texts: list[str], workers: int, tokens: int, sampling) -> tuple[dict, list[int]]:
    """The problems one session at a time through solve."""
    common.sync(engine.device)
    before, t = counters(engine), time.perf_counter()
    counts = []
    for text in texts:
        result = engine.solve(text, workers, max_tokens=tokens, sampling=sampling, **PLAIN)
        counts += result.stats.generated_per_worker
    common.sync(engine.device)
    return run_stats(before, counters(engine), time.perf_counter() - t), counts


def decode_probe(engine, texts: list[str], workers: int, args) -> dict:
    """The steady-state pass: the sessions' prompts written, every worker decoding, stepped together."""
    sessions = []
    reused = getattr(engine.allocator, "prefix_reused", 0)
    try:
        for text in texts:
            sessions.append(engine.start(text, workers, sampling=args.sampling, max_tokens=budget_tokens(args),
                                         **PLAIN))
        for _ in range(args.probe_warmup):
            engine.step(sessions)
        kv_before = kv_read(sessions)
        graphs = getattr(engine, "graphs", None)
        replays = getattr(graphs, "replays", 0)
        times = []
        for _ in range(args.probe_steps):
            common.sync(engine.device)
            t = time.perf_counter()
            engine.step(sessions)
            times.append(time.perf_counter() - t)
        kv_after = kv_read(sessions)
        active = sum(ws.status == "active" for s in sessions for ws in s.workers)
        replayed = (getattr(graphs, "replays", 0) - replays) / args.probe_steps if graphs is not None else 0.0
        gpu_ms = None
        if replayed == 1 and getattr(graphs, "last", None) is not None:  # the same pass again, no host work
            gpu_ms = graphs.replay_last(10) * 1e3
    finally:
        for s in sessions:
            s.close()
    ms = statistics.median(times) * 1e3
    return {"decode_ms": ms, "decode_ms_mean": statistics.fmean(times) * 1e3,
            "decode_tokens_per_s": len(texts) * workers / ms * 1e3,
            "decode_gpu_ms": gpu_ms, "kv_tokens_read": round((kv_before + kv_after) / 2),
            "probe_active_workers": active, "graph_replay_fraction": round(replayed, 3),
            "probe_prefix_pages_reused": getattr(engine.allocator, "prefix_reused", 0) - reused}


def kv_read(sessions) -> int:
    """Distinct K/V tokens the last pass read, over all the sessions: every page of every worker's
    view counted once, however many views (workers, sessions sharing a prompt page) read it."""
    seen: dict[int, int] = {}
    for session in sessions:
        size = session.layout.page_size
        for step in session.last_steps.values():
            for seg in step.segments:
                for i, page in enumerate(seg.block.pages[: -(-seg.length // size)]):
                    seen[page] = max(seen.get(page, 0), min(size, seg.length - i * size))
    return sum(seen.values())


def check_counts(counts: list[int], expected: int, where: str) -> str:
    """'' when every worker generated `expected` tokens, else what went wrong (also printed)."""
    bad = [c for c in counts if c != expected]
    if not bad:
        return ""
    msg = f"{where}: {len(bad)} of {len(counts)} workers generated {sorted(set(bad))} tokens, not {expected}"
    print(f"  WARNING {msg}", flush=True)
    return msg


def engine_cells(model: scaling_runs.Model, args, cells: list[tuple[int, int, int]], pool: int, context: int
                 ) -> tuple[list[dict], list[dict]]:
    """The batched and sequential rows of every cell, on one engine."""
    options = {"cuda_graphs": True} if model.device.type == "cuda" and scaling_runs.has_graphs_option() else {}
    engine = hw.HogwildEngine.from_pretrained(model.path, model.device, model.dtype, cache_tokens=pool,
                                              max_context=context, **options)
    engine.eos_ids = frozenset()  # a real checkpoint must not stop a worker before its budget either
    rows, skipped = [], []
    try:
        warm = problems(model, 1, min(args.prompts))
        engine.solve(warm[0], 1, max_tokens=2, sampling=args.sampling, **PLAIN)  # first-call costs out of every cell
        for s, w, p in cells:
            texts = problems(model, s, p)
            ptoks = statistics.fmean(prompt_tokens(engine, t) for t in texts)
            base = {"sessions": s, "workers": w, "prompt": p, "prompt_tokens": round(ptoks, 1),
                    "tokens": args.tokens, "rows": s * w}
            for section in ("batched", "sequential"):
                if section not in args.sections:
                    continue
                try:
                    row = engine_cell(engine, section, texts, w, args)
                except Exception as e:  # out of memory, a full cache: the other cells still run
                    skipped.append(skip(section, s, w, p, f"{type(e).__name__}: {str(e)[:200]}"))
                    print(f"  {section} S={s} W={w} P={p}: skipped ({type(e).__name__}: {str(e)[:120]})", flush=True)
                    common.free_memory(model.device)
                    continue
                rows.append({"section": section, **base, **row})
                print(f"  {section:<10} S={s:<3} W={w} P={p}: {row['tokens_per_s']:8.1f} tok/s end to end, "
                      f"{row['ms_per_pass']:7.2f} ms/pass, {row['rows_per_pass']:6.1f} rows/pass; decode "
                      f"{row['decode_ms']:7.2f} ms/pass, {row['decode_tokens_per_s']:8.1f} tok/s", flush=True)
            common.free_memory(model.device)
    finally:
        engine.close()
        del engine
        common.free_memory(model.device)
    return rows, skipped


def engine_cell(engine, section: str, texts: list[str], workers: int, args) -> dict:
    s, t = len(texts), args.tokens
    if section == "batched":
        solve_batched(engine, texts, workers, args.warmup_tokens, args.sampling)  # warm-up: this cell's pass shapes
        stats, counts = solve_batched(engine, texts, workers, t, args.sampling)
        row = {**stats, "mode": "solve_many"}
        probe = decode_probe(engine, texts, workers, args)
    else:
        one = args.sequential == "one"
        solve_sequential(engine, texts[:1], workers, args.warmup_tokens, args.sampling)
        stats, counts = solve_sequential(engine, texts[:1] if one else texts, workers, t, args.sampling)
        if one and s > 1:  # S identical sessions take S times as long
            stats["wall_s"] *= s
            stats["generated"] *= s
            counts = counts * s
        row = {**stats, "mode": f"one session timed, x{s}" if one and s > 1 else "each solved in turn"}
        probe = decode_probe(engine, texts[:1], workers, args)
    row["generated_expected"] = s * workers * t
    row["count_issue"] = check_counts(counts, t, f"{section} S={s} W={workers}")
    if row["generated"] != row["generated_expected"] and not row["count_issue"]:
        row["count_issue"] = f"metrics counted {row['generated']} generated tokens, not {row['generated_expected']}"
    return {**row, **probe}


# ---- transformers ----------------------------------------------------------------------------
def transformers_cells(model: scaling_runs.Model, args, cells: list[tuple[int, int, int]]
                       ) -> tuple[list[dict], list[dict]]:
    """generate() with a static cache at batch S*W on P-token prompts, one row per (S, W, P) cell."""
    from transformers import AutoModelForCausalLM

    k = args.hf_new_tokens
    budget = common.memory_budget(model.device, args.cpu_memory_gib) - model.held_bytes - 2 * GIB
    compile_ = model.device.type == "cuda" and not args.no_compile
    if compile_:
        import torch._dynamo.config as dynamo

        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo, name):
                setattr(dynamo, name, 256)
    rows, skipped, measured = [], [], {}
    with torch.device(model.device):
        hf = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype, attn_implementation="sdpa").eval()
    try:
        for s, w, p in cells:
            b = s * w
            if args.hf_batches and b not in args.hf_batches:
                continue
            if (b, p) not in measured:
                cache = b * (p + k) * model.kv_per_token
                chunk = prefill_chunk(model, b, p, budget - cache)
                if chunk == 0:
                    measured[(b, p)] = f"needs {(cache + model.activations(b)) / GIB:.1f} GiB of static cache " \
                                       f"and activations, {max(budget, 0) / GIB:.1f} GiB free"
                else:
                    try:
                        measured[(b, p)] = hf_step_ms(hf, model, b, p, k, args.hf_repeats, compile_,
                                                      None if chunk >= p else chunk)
                        print(f"  transformers batch={b} P={p}: {measured[(b, p)][0]:.2f} ms/step "
                              f"(compiled: {measured[(b, p)][1]})", flush=True)
                    except Exception as e:  # out of memory, or generate failing eagerly too
                        measured[(b, p)] = f"{type(e).__name__}: {str(e)[:200]}"
                        print(f"  transformers batch={b} P={p}: skipped ({type(e).__name__})", flush=True)
                    finally:
                        if compile_:
                            torch._dynamo.reset()
                        common.free_memory(model.device)
            got = measured[(b, p)]
            if isinstance(got, str):
                skipped.append(skip("transformers", s, w, p, got))
                continue
            ms, compiled, note, chunk, streamed = got
            rows.append({"section": "transformers", "sessions": s, "workers": w, "prompt": p, "rows": b,
                         "batch": b, "step_ms": ms, "streamed_step_ms": streamed, "decode_ms": ms,
                         "decode_tokens_per_s": b / ms * 1e3 if ms else 0.0,
                         "kv_tokens_read": b * (p + k // 2), "compiled": compiled, "prefill_chunk": chunk,
                         **({"note": note} if note else {})})
    finally:
        del hf
        common.free_memory(model.device)
    return rows, skipped


def prefill_chunk(model: scaling_runs.Model, batch: int, prompt: int, room: int) -> int:
    """The longest prefill piece (prompt, else a power of two) whose activations fit in `room` bytes; 0: none."""
    piece = prompt
    while piece >= 16:
        if model.activations(batch * piece) <= room:
            return piece
        piece = 1 << (piece.bit_length() - 1) if piece & (piece - 1) else piece // 2
    return 0


class StepClock:
    """A generate() streamer that stamps every token generate hands it (the prompt first): the
    gaps after the first generated token are the decode steps, prefill excluded."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def put(self, value) -> None:
        common.sync(self.device)
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def step_s(self) -> float:
        gaps = [b - a for a, b in zip(self.stamps[1:], self.stamps[2:])]
        return statistics.median(gaps) if gaps else float("nan")


def hf_step_ms(hf, model: scaling_runs.Model, batch: int, prompt: int, k: int, repeats: int, compile_: bool,
               chunk: int | None) -> tuple[float, bool, str, int | None, float]:
    """(decode step ms, compiled, note, prefill chunk, the median streamed step ms). The step is
    (t(K new) - t(1 new)) / (K - 1) as in scaling.py, unless that difference is lost in the
    prefill's noise (not positive, or off the streamed steps by more than 1.5x; a loaded CPU):
    then the median gap between the tokens streamed in the K-token runs, said in the note."""
    ids = torch.tensor([model.ids(prompt)] * batch, device=model.device)
    extra = {"prefill_chunk_size": chunk} if chunk else {}
    streamed: list[float] = []

    def generate(new: int, compiled: bool, clock: StepClock | None = None) -> float:
        common.sync(model.device)
        t = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                    do_sample=False, cache_implementation="static", pad_token_id=0, disable_compile=not compiled,
                    streamer=clock, **extra)
        common.sync(model.device)
        if clock is not None:
            streamed.append(clock.step_s())
        return time.perf_counter() - t

    notes = [f"prefill in chunks of {chunk} tokens (one piece would not fit)"] if chunk else []
    try:
        generate(k, compile_)  # compiles; sizes the static cache for the K-token run
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # compilation failed: measure eager, and say why
        if not compile_:
            raise
        compile_ = False
        notes.append(f"torch.compile failed ({type(e).__name__}: {str(e)[:160]}); eager")
        generate(k, False)
    one = min(generate(1, compile_) for _ in range(repeats))
    try:
        many = min(generate(k, compile_, StepClock(model.device)) for _ in range(repeats))
    except Exception as e:  # a generate that takes no streamer: the difference alone
        notes.append(f"no streamed steps ({type(e).__name__})")
        many = min(generate(k, compile_) for _ in range(repeats))
    step, gap = (many - one) / (k - 1) * 1e3, (min(streamed) if streamed else float("nan")) * 1e3
    if streamed and not gap / 1.5 <= step <= gap * 1.5:
        notes.append(f"t(K) - t(1) gave {step:.2f} ms a step, lost in the prefill's noise: the median streamed "
                     "step is used")
        step = gap
    return step, compile_, "; ".join(notes), chunk, gap


def roofline_bandwidth(device: torch.device, model: scaling_runs.Model) -> Bandwidth:
    """bandwidth.py's measurement; on the CPU over about the bytes a pass streams (1 MiB to 256 MiB:
    a model whose weights sit in the cache is held to the cache's speed)."""
    nbytes = None if device.type == "cuda" else min(max(model.weight_bytes, 1 << 20), 256 << 20)
    return measure_bandwidth(device, nbytes)


# ---- rates, ratios, targets ------------------------------------------------------------------
def add_rates(r: dict, model: scaling_runs.Model, bandwidth: float) -> None:
    """Bytes a decode pass reads, its roofline time, the achieved bandwidth and % of the roofline."""
    nbytes = model.weight_bytes + r["kv_tokens_read"] * model.kv_per_token
    s = r["decode_ms"] / 1e3
    r["gb_read_per_pass"] = nbytes / 1e9
    r["achieved_gbs"] = nbytes / s / 1e9 if s else float("inf")
    r["roofline_ms"] = nbytes / bandwidth * 1e3
    r["pct_roofline"] = 100 * r["roofline_ms"] / r["decode_ms"] if r["decode_ms"] else float("inf")
    gpu = r.get("decode_gpu_ms")
    r["gpu_pct_roofline"] = 100 * r["roofline_ms"] / gpu if gpu else None


def add_ratios(rows: list[dict]) -> None:
    """On each batched row: x sequential (end to end and decode) and x transformers (decode)."""
    cell = {(r["section"], r["sessions"], r["workers"], r["prompt"]): r for r in rows}
    for r in rows:
        if r["section"] != "batched":
            continue
        key = (r["sessions"], r["workers"], r["prompt"])
        seq, hf = cell.get(("sequential", *key)), cell.get(("transformers", *key))
        r["x_sequential"] = r["tokens_per_s"] / seq["tokens_per_s"] if seq and seq["tokens_per_s"] else None
        r["x_sequential_decode"] = (r["decode_tokens_per_s"] / seq["decode_tokens_per_s"]
                                    if seq and seq["decode_tokens_per_s"] else None)
        r["x_transformers"] = (r["decode_tokens_per_s"] / hf["decode_tokens_per_s"]
                               if hf and hf["decode_tokens_per_s"] else None)


def targets(rows: list[dict], device: str) -> list[dict]:
    """The speed targets: met, missed, or not measured."""
    cell = {(r["section"], r["sessions"], r["workers"], r["prompt"]): r for r in rows}

    def get(s, w, p, key, section="batched"):
        r = cell.get((section, s, w, p))
        return None if r is None else r.get(key)

    def check(name: str, value, limit: float, below: bool, what: str) -> dict:
        if value is None:
            return {"target": name, "status": "not measured", "detail": what}
        met = value <= limit if below else value >= limit
        return {"target": name, "status": "met" if met else "missed", "value": round(value, 3), "limit": limit,
                "detail": what}

    if device == "cuda":
        e2e = get(32, 4, 4096, "x_sequential")
        return [
            check("32 sessions x 4 workers, 4k prompts: >= 12x one 4-worker session at a time",
                  get(32, 4, 4096, "x_sequential_decode"), 12.0, False,
                  "decode tokens/s, batched / one session" + (f"; end to end (prompts included) x{e2e:.2f}"
                                                              if e2e is not None else "")),
            check("32 x 4, 4k: >= 2.5x transformers static cache at batch 128",
                  get(32, 4, 4096, "x_transformers"), 2.5, False, "decode tokens/s, batched / transformers"),
            check("32 x 4, 4k: each pass within 1.3x of the roofline",
                  None if get(32, 4, 4096, "decode_ms") is None
                  else get(32, 4, 4096, "decode_ms") / get(32, 4, 4096, "roofline_ms"), 1.3, True,
                  "batched decode pass / roofline"),
        ]
    prompts = sorted({r["prompt"] for r in rows}) or [None]
    out = []
    for p in prompts:
        dec = get(8, 2, p, "x_sequential_decode")
        out.append(check(f"8 problems x 2 workers{f', {p}-token prompts' if p else ''}: solve_many >= 3x sequential",
                         get(8, 2, p, "x_sequential"), 3.0, False,
                         "end-to-end tokens/s, solve_many / solve one after another"
                         + (f"; decode passes x{dec:.2f}" if dec is not None else "")))
    return out


# ---- output ----------------------------------------------------------------------------------
def fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(meta: dict, rows: list[dict], skipped: list[dict], target_rows: list[dict]) -> None:
    cols = ["section", "S", "W", "prompt", "tok/s e2e", "ms/pass", "rows/pass", "decode ms", "GPU ms",
            "decode tok/s", "roofline ms", "% roofline", "x seq e2e", "x seq decode", "x hf"]
    body = [[r["section"], str(r["sessions"]), str(r["workers"]), str(r["prompt"]), fmt(r.get("tokens_per_s")),
             fmt(r.get("ms_per_pass"), ".2f"), fmt(r.get("rows_per_pass")), fmt(r["decode_ms"], ".2f"),
             fmt(r.get("decode_gpu_ms"), ".2f"), fmt(r["decode_tokens_per_s"]), fmt(r["roofline_ms"], ".2f"),
             fmt(r["pct_roofline"], ".0f"), fmt(r.get("x_sequential"), ".2f"), fmt(r.get("x_sequential_decode"), ".2f"),
             fmt(r.get("x_transformers"), ".2f")] for r in rows]
    common.print_table(f"{meta['model']} ({meta['dtype']}) on {meta['device_name']}, {meta['tokens']} tokens per "
                       f"worker, temperature {meta['temperature']}, bandwidth {meta['floor_bandwidth_gbs']:.0f} "
                       f"GB/s; sequential: {meta['sequential']}", cols, body)
    for s in skipped:
        print(f"skipped {s['section']} S={s['sessions']} W={s['workers']} P={s['prompt']}: {s['reason']}")
    for r in rows:
        if r.get("count_issue"):
            print(f"WARNING {r['section']} S={r['sessions']} W={r['workers']} P={r['prompt']}: {r['count_issue']}")
    for r in rows:
        for key in ("pct_roofline", "gpu_pct_roofline"):
            if (r.get(key) or 0) > 100:
                print(f"WARNING {r['section']} S={r['sessions']} W={r['workers']} P={r['prompt']}: {key} "
                      f"{r[key]:.0f}%, above the roofline: the measurement is wrong")
    for t in target_rows:
        value = f" ({t['value']} vs {t['limit']})" if "value" in t else ""
        print(f"target {t['status']:>12}: {t['target']}{value}; {t['detail']}")


def plot(meta: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    prompts = sorted({r["prompt"] for r in rows}) or meta["prompts"]
    workers = sorted({r["workers"] for r in rows})
    ticks = sorted({r["sessions"] for r in rows})
    fig, axes = plt.subplots(1, len(prompts) + 1, figsize=(5.2 * (len(prompts) + 1), 4.8), squeeze=False)
    lines = [("batched", "decode_tokens_per_s", "o-", 1.0, "batched, decode"),
             ("sequential", "decode_tokens_per_s", "s:", 1.0, "one at a time, decode"),
             ("transformers", "decode_tokens_per_s", "x--", 1.0, "transformers static, batch S*W"),
             ("batched", "tokens_per_s", "^-", 0.4, "solve_many, end to end"),
             ("sequential", "tokens_per_s", "v:", 0.4, "one at a time, end to end")]

    def axis(ax, ylabel, title, log_y=True):
        ax.set(xscale="log", xlabel="sessions S", ylabel=ylabel, title=title)
        if log_y:
            ax.set_yscale("log")
        if ticks:
            ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)

    for ax, p in zip(axes[0], prompts):
        for i, w in enumerate(workers):
            for section, key, style, alpha, label in lines:
                pts = sorted((r["sessions"], r[key]) for r in rows
                             if r["section"] == section and r["workers"] == w and r["prompt"] == p and r.get(key))
                if pts:
                    ax.plot(*zip(*pts), style, color=f"C{i}", ms=4, alpha=alpha, label=f"W={w}: {label}")
        axis(ax, "generated tokens/s (all sessions)", f"{p}-token prompts")
    ax = axes[0][-1]
    for i, w in enumerate(workers):
        for j, p in enumerate(prompts):
            pts = sorted((r["sessions"], r["pct_roofline"]) for r in rows
                         if r["section"] == "batched" and r["workers"] == w and r["prompt"] == p)
            if pts:
                ax.plot(*zip(*pts), "o-" if j == len(prompts) - 1 else "o:", color=f"C{i}", ms=4,
                        label=f"W={w}, P={p}")
    ax.axhline(100, color="k", lw=0.8)
    ax.set_ylim(0, 105)
    axis(ax, "% of roofline (decode pass)", "batched decode pass vs roofline", log_y=False)
    common.save_figure(fig, path, f"hogwild-ray throughput: {meta['model']} ({meta['dtype']}) on "
                                  f"{meta['device_name']}\n{meta['tokens']} tokens per worker, temperature "
                                  f"{meta['temperature']}, roofline at {meta['floor_bandwidth_gbs']:.0f} GB/s")


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model = scaling_runs.Model(args.model, device, dtype)
    label = args.model or "built-in SmolLM2-135M-Instruct"
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    bw = roofline_bandwidth(device, model)
    bandwidth = bw.value
    context = context_for(args, model.spec)
    cells, skipped, pool = fit_cells(model, args, context)
    print(f"{label} ({dtype}) on {common.device_name(device)}: bandwidth {bandwidth / 1e9:.0f} GB/s, weights "
          f"read per pass {model.weight_bytes / 1e9:.2f} GB, K/V {model.kv_per_token} bytes per token; "
          f"{len(cells)} cells, pool {pool} tokens, context {context}", flush=True)
    rows: list[dict] = []
    t0 = time.perf_counter()
    if cells and {"batched", "sequential"} & set(args.sections):
        s = time.perf_counter()
        got, miss = engine_cells(model, args, cells, pool, context)
        rows += got
        skipped += miss
        print(f"[engine] {len(got)} rows, {len(miss)} skipped, {time.perf_counter() - s:.0f} s", flush=True)
        bw.sample()
    if cells and "transformers" in args.sections:
        s = time.perf_counter()
        got, miss = transformers_cells(model, args, cells)
        rows += got
        skipped += miss
        print(f"[transformers] {len(got)} rows, {len(miss)} skipped, {time.perf_counter() - s:.0f} s", flush=True)
        bw.sample()
    bandwidth = bw.value
    for r in rows:
        add_rates(r, model, bandwidth)
    add_ratios(rows)
    target_rows = targets(rows, device.type)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    meta = {"benchmark": "throughput", "date": args.date, "device": device.type,
            "device_name": common.device_name(device), **common.versions(), "model": label,
            "dtype": str(dtype).removeprefix("torch."), **bw.meta(),
            "weight_bytes_read_per_pass": model.weight_bytes, "kv_bytes_per_token": model.kv_per_token,
            "sessions": args.sessions, "workers": args.workers, "prompts": args.prompts, "tokens": args.tokens,
            "sequential": args.sequential, "warmup_tokens": args.warmup_tokens, "probe_warmup": args.probe_warmup,
            "probe_steps": args.probe_steps, "hf_new_tokens": args.hf_new_tokens, "hf_repeats": args.hf_repeats,
            "sections": args.sections, "quick": args.quick, "pool_tokens": pool, "max_context": context,
            "temperature": args.temperature, "options": PLAIN,
            "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
            "load_average": [round(x, 2) for x in (load or ())[:1] + (load_after or ())[:1]],
            "max_pct_roofline": max((r["pct_roofline"] for r in rows), default=None),
            "seconds": round(time.perf_counter() - t0, 1), "notes": NOTES}
    stem = args.out / f"{args.date}-{common.file_tag(device)}-throughput{'-' + args.suffix if args.suffix else ''}"
    common.write_results(stem, meta, rows, {"skipped": skipped, "targets": target_rows})
    plot(meta, rows, Path(f"{stem}.png"))
    table(meta, rows, skipped, target_rows)
    print(f"wrote {stem}.csv, .json, .png")
    return {"meta": meta, "rows": rows, "skipped": skipped, "targets": target_rows, "stem": stem}


if __name__ == "__main__":
    main()
