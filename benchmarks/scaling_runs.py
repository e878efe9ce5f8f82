"""The cells of the scaling benchmark: our engine's sections, transformers, and the targets."""

from __future__ import annotations

import inspect
import statistics
import time

import torch

import common
import hogwild_ray as hw
from hogwild_ray.model import locate, spec_from_config
from hogwild_ray.model.loader import load_config, load_tokenizer

GIB = 1 << 30
PIECE = 2048  # tokens fed to each worker per pass while filling its private context
TEXT = ("The committee met on a grey Tuesday morning to review the harbour accounts. Seven ships had "
        "arrived since spring, each carrying timber, salt, copper wire and crates of dried figs; the "
        "ledger showed 4,812 crowns collected in fees, 317 spent on repairs to the northern pier, and a "
        "dispute over whether the lighthouse keeper should be paid in coin or in grain. ")
NOTES = {
    "step_ms": "median wall time of session.step() (the one host sync included) over the timed steps",
    "view_tokens": "mean tokens a worker attends to during the timed steps",
    "kv_tokens_read": "distinct K/V tokens a step reads (a block shared by several views counted once; "
                      "independent sequences and transformers: the sum of all views)",
    "weight_bytes": "every matrix once per step; of an untied embedding table only the fed rows (ignored)",
    "roofline_ms": "(weight bytes + K/V bytes read) / the bandwidth of this run (bandwidth.py)",
    "transformers": "generate(), static cache, SDPA, greedy, min_new_tokens forced; "
                    "step = (t(K new) - t(1 new)) / (K - 1), best of --hf-repeats",
}
ENGINE_SECTIONS = {  # section -> (from_pretrained keywords, shared cache)
    "graphs": ({"cuda_graphs": True}, True),
    "eager": ({"cuda_graphs": False}, True),
    "independent": ({}, False),
    "naive": ({"cuda_graphs": False, "attention": "torch"}, True),
}


class Model:
    """What every section needs to know of the model before loading it."""

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype) -> None:
        self.path, self.device, self.dtype = path, device, dtype
        self.config = load_config(locate(path))
        self.spec = spec_from_config(self.config)
        self.weight_bytes = common.weight_bytes_read(self.config, dtype)
        self.held_bytes = common.model_bytes(self.config, dtype)
        self.kv_per_token = self.spec.kv_bytes_per_token(dtype)
        self.tokenizer = load_tokenizer(locate(path))
        self._texts: dict[int, list[int]] = {}

    def ids(self, n: int) -> list[int]:
        """n token ids of plain prose (decoded, they tokenize back to about n tokens)."""
        if n not in self._texts:
            text = TEXT * (n // 40 + 2)
            self._texts[n] = self.tokenizer(text, add_special_tokens=False)["input_ids"][:n]
        return self._texts[n]

    def text(self, n: int) -> str:
        return self.tokenizer.decode(self.ids(n))

    def activations(self, tokens: int) -> int:
        """Rough bytes of one pass over `tokens` tokens (MLP and attention projections, logits)."""
        s = self.spec
        width = 2 * s.intermediate_size + 4 * s.hidden_size + (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
        return tokens * width * 4 + 8 * s.vocab_size * 4


def has_graphs_option() -> bool:
    return "cuda_graphs" in inspect.signature(hw.HogwildEngine.from_pretrained).parameters


def engine_section(section: str, model: Model, args) -> tuple[list[dict], list[dict]]:
    """Every (workers, view) cell of one of our engine's sections, on one engine."""
    options, shared = ENGINE_SECTIONS[section]
    cells = [(n, v) for v in args.views for n in args.workers]
    if section == "graphs" and (model.device.type != "cuda" or not has_graphs_option()):
        why = "CUDA graphs need a CUDA device" if model.device.type != "cuda" else "this engine has no cuda_graphs"
        return [], [skip(section, n, v, why) for n, v in cells]
    options = {k: v for k, v in options.items() if k != "cuda_graphs" or has_graphs_option()}
    budget = common.memory_budget(model.device, args.cpu_memory_gib) - model.held_bytes - 2 * GIB
    extra = args.warmup + args.steps + 64
    run, skipped, pool = [], [], 0
    for n, v in cells:
        if section == "naive" and v > args.naive_max_view:
            skipped.append(skip(section, n, v, f"naive re-rotation above {args.naive_max_view}-token views takes "
                                               "too long (and its prefill holds every score)"))
            continue
        tokens = (v + n * extra if shared else n * (v + extra)) + 64 * n + 256
        need = tokens * model.kv_per_token + model.activations(v if shared else n * min(v, PIECE))
        if need > budget:
            skipped.append(skip(section, n, v, f"needs {need / GIB:.1f} GiB of K/V and activations, "
                                               f"{max(budget, 0) / GIB:.1f} GiB free beside the weights"))
            continue
        run.append((n, v))
        pool = max(pool, tokens)
    if not run:
        return [], skipped
    engine = hw.HogwildEngine.from_pretrained(model.path, model.device, model.dtype, cache_tokens=pool,
                                              **options)
    engine.eos_ids = frozenset()  # a real checkpoint must not stop a worker mid-measurement either
    rows = []
    try:
        for n, v in run:
            try:
                rows.append({"section": section, "workers": n, "view": v,
                             **time_cell(engine, model, n, v, shared, args)})
                print(f"  {section} workers={n} view={v}: {rows[-1]['step_ms']:.2f} ms", flush=True)
            except Exception as e:  # out of memory, a full cache, a kernel's failure: the other cells still run
                skipped.append(skip(section, n, v, f"{type(e).__name__}: {str(e)[:200]}"))
                print(f"  {section} workers={n} view={v}: skipped ({type(e).__name__})", flush=True)
            common.free_memory(model.device)
    finally:
        del engine
        common.free_memory(model.device)
    return rows, skipped


def time_cell(engine, model: Model, n: int, view: int, shared: bool, args) -> dict:
    sampling = [hw.SamplingParams(temperature=1.0, seed=w) for w in range(n)]
    opts = dict(protocol=False, chat_template=False, stop_on_answer=False, finisher=False, redundancy_every=None, max_tokens=None)
    if shared:
        session = engine.start(model.text(view), n, layout="combined", sampling=sampling, **opts)
    else:
        session = engine.start("Continue the text.", n, layout="interleaved", sampling=sampling, **opts)
        ids = model.ids(view)
        for i in range(0, len(ids), PIECE):
            piece = model.tokenizer.decode(ids[i:i + PIECE])
            session.step(inject={w: piece for w in range(n)})
        for ws in session.workers:  # the session decodes a worker's whole step text each pass: not what we time
            ws.step_ids.clear()
    try:
        for _ in range(args.warmup):
            session.step()
        kv_before, view_before = read_per_step(session)
        graphs = getattr(engine, "graphs", None)
        replays = getattr(graphs, "replays", 0)
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            session.step()
            times.append(time.perf_counter() - t)
        kv_after, view_after = read_per_step(session)
        active = sum(ws.status == "active" for ws in session.workers)
        replayed = (getattr(graphs, "replays", 0) - replays) / args.steps if graphs is not None else 0.0
    finally:
        session.close()
    return {"step_ms": statistics.median(times) * 1e3, "step_ms_mean": statistics.fmean(times) * 1e3,
            "view_tokens": round((view_before + view_after) / 2), "kv_tokens_read": round((kv_before + kv_after) / 2),
            "active_workers": active, "graph_replay_fraction": round(replayed, 3)}


def read_per_step(session) -> tuple[int, float]:
    """(distinct K/V tokens the last pass read, mean view length) from the layout's record."""
    seen: dict[int, int] = {}
    views = []
    for step in session.last_steps.values():
        views.append(sum(s.length for s in step.segments))
        for s in step.segments:
            seen[id(s.block)] = max(seen.get(id(s.block), 0), s.length)
    return sum(seen.values()), statistics.fmean(views) if views else 0.0


def transformers_section(section: str, model: Model, args) -> tuple[list[dict], list[dict]]:
    """transformers generate() with its static cache at batch 1 and batch N for every view."""
    from transformers import AutoModelForCausalLM

    k = args.hf_new_tokens
    budget = common.memory_budget(model.device, args.cpu_memory_gib) - model.held_bytes - 2 * GIB
    batches = sorted({1, *args.workers})
    rows, skipped = [], []
    compile_ = model.device.type == "cuda" and not args.no_compile
    if compile_:
        import torch._dynamo.config as dynamo

        for name in ("cache_size_limit", "recompile_limit"):  # one compile per (batch, view): many shapes
            if hasattr(dynamo, name):
                setattr(dynamo, name, 256)
    with torch.device(model.device):
        hf = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype, attn_implementation="sdpa").eval()
    try:
        for v in args.views:
            for b in batches:
                need = b * (v + k) * model.kv_per_token + model.activations(b * v)
                if need > budget:
                    skipped.append(skip(section, b, v, f"needs {need / GIB:.1f} GiB of static cache and "
                                                       f"activations, {max(budget, 0) / GIB:.1f} GiB free"))
                    continue
                try:
                    ms, compiled, note = hf_step_ms(hf, model, b, v, k, args.hf_repeats, compile_)
                except Exception as e:  # out of memory, or generate failing eagerly too
                    skipped.append(skip(section, b, v, f"{type(e).__name__}: {str(e)[:200]}"))
                    continue
                finally:
                    if compile_:
                        torch._dynamo.reset()  # each shape's compiled graphs and their memory pools
                    common.free_memory(model.device)
                rows.append({"section": section, "workers": b, "view": v, "step_ms": ms, "view_tokens": v + k // 2,
                             "kv_tokens_read": b * (v + k // 2), "active_workers": b, "compiled": compiled,
                             **({"note": note} if note else {})})
                print(f"  transformers batch={b} view={v}: {ms:.2f} ms (compiled: {compiled})", flush=True)
    finally:
        del hf
        common.free_memory(model.device)
    return rows, skipped


def hf_step_ms(hf, model: Model, batch: int, view: int, k: int, repeats: int, compile_: bool) -> tuple[float, bool, str]:
    ids = torch.tensor([model.ids(view)] * batch, device=model.device)

    def generate(new: int, compiled: bool) -> float:
        common.sync(model.device)
        t = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                    do_sample=False, cache_implementation="static", pad_token_id=0, disable_compile=not compiled)
        common.sync(model.device)
        return time.perf_counter() - t

    note = ""
    try:
        generate(k, compile_)  # compiles, sizes the static cache for the K-token run
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # compilation failed: measure eager, and say why
        if not compile_:
            raise
        compile_, note = False, f"torch.compile failed ({type(e).__name__}: {str(e)[:160]}); eager"
        generate(k, False)
    one = min(generate(1, compile_) for _ in range(repeats))
    many = min(generate(k, compile_) for _ in range(repeats))
    if many <= one:  # the difference is lost in the noise (a loaded CPU): the whole run per token, an upper bound
        note = (note + "; " if note else "") + "step = the K-token run / K (its difference to the 1-token run was lost in noise)"
        return many / k * 1e3, compile_, note
    return (many - one) / (k - 1) * 1e3, compile_, note


def skip(section: str, workers: int, view: int, reason: str) -> dict:
    return {"section": section, "workers": workers, "view": view, "reason": reason}


def add_rates(r: dict, model: Model, bandwidth: float) -> None:
    """Tokens/s, bytes, achieved bandwidth and the roofline of one measured cell."""
    s = r["step_ms"] / 1e3
    nbytes = model.weight_bytes + r["kv_tokens_read"] * model.kv_per_token
    r["tokens_per_s"] = r["workers"] / s if s else float("inf")
    r["tokens_per_s_per_worker"] = 1 / s if s else float("inf")
    r["gb_read_per_step"] = nbytes / 1e9
    r["achieved_gbs"] = nbytes / s / 1e9 if s else float("inf")
    r["roofline_ms"] = nbytes / bandwidth * 1e3
    r["vs_roofline"] = r["step_ms"] / r["roofline_ms"]


def add_ratios(rows: list[dict]) -> None:
    """Each cell's step time against one worker (batch 1) at the same view in the same section."""
    one = {(r["section"], r["view"]): r["step_ms"] for r in rows if r["workers"] == 1}
    for r in rows:
        base = one.get((r["section"], r["view"]))
        r["vs_1_worker"] = r["step_ms"] / base if base else None


def targets(rows: list[dict]) -> list[dict]:
    """The speed targets (H100, Qwen3-8B shape, bf16): met, missed, or not measured."""
    cell = {(r["section"], r["workers"], r["view"]): r for r in rows}
    ours = "graphs" if any(r["section"] == "graphs" for r in rows) else "eager"

    def get(section, n, v, key="step_ms"):
        r = cell.get((section, n, v))
        return None if r is None else r[key]

    def check(name: str, value: float | None, limit: float, below: bool, what: str) -> dict:
        if value is None:
            return {"target": name, "status": "not measured", "detail": what}
        met = value <= limit if below else value >= limit
        return {"target": name, "status": "met" if met else "missed", "value": round(value, 3), "limit": limit,
                "detail": what}

    def ratio(a, b):
        return None if a is None or b is None or not b else a / b

    return [
        check("1 worker, 4k view: step within 1.15x of the roofline", get(ours, 1, 4096, "vs_roofline"), 1.15, True,
              f"{ours}: step / roofline"),
        check("8 workers, 4k: step within 1.25x of 1 worker", ratio(get(ours, 8, 4096), get(ours, 1, 4096)), 1.25,
              True, f"{ours}: step(8) / step(1)"),
        check("16 workers, 4k: step within 1.5x of 1 worker", ratio(get(ours, 16, 4096), get(ours, 1, 4096)), 1.5,
              True, f"{ours}: step(16) / step(1)"),
        check("8 workers, 32k: step within 1.5x of 1 worker at 32k", ratio(get(ours, 8, 32768), get(ours, 1, 32768)),
              1.5, True, f"{ours}: step(8, 32k) / step(1, 32k)"),
        check("8 workers: tokens/s >= 3x transformers static batch 8 (4k)",
              ratio(get(ours, 8, 4096, "tokens_per_s"), get("transformers", 8, 4096, "tokens_per_s")), 3.0, False,
              f"{ours} tokens/s / transformers tokens/s"),
        check("single stream: tokens/s >= 1.6x transformers static batch 1 (4k)",
              ratio(get(ours, 1, 4096, "tokens_per_s"), get("transformers", 1, 4096, "tokens_per_s")), 1.6, False,
              f"{ours} tokens/s / transformers tokens/s"),
    ]
