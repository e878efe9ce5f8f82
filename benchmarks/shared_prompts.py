"""Sessions that share pages, one attention layer: shared pages read once per pass, or once per session.

S sessions of W workers decode in one pass (combined layout: common, the two headers,
each worker's current block). Two ways they share K/V pages, as the engine makes them:

* prompt: every session's prompt begins with the same P tokens (the collaboration system
  prompt, a few-shot preamble); each then has its own 512 tokens (the problem) and its
  workers' 256-token current blocks;
* fork: S forks of one session (forced-answer probes, best-of-S): every block's leading
  pages are the parent's (P tokens of common, the headers, 128 tokens of each current
  block); each fork then has 128 tokens of its own per worker.

Side by side in the same run, on the same K/V: the plan that reads the shared pages once for
every session (`build_plan(..., page_size)`), and the plan that reads them once per session
(blocks of different sessions kept apart), and which of the two the engine picks (it merges
where that saves at least half of the keys and 8192 of them: `plan.WORTH_MERGING`, set from
this benchmark's results; the shared units then run in a launch of their own with a row tile
wide enough for all their readers). Times are per layer, from CUDA graphs over
several layers' K/V (more than the L2 cache), as in `attention_kernels.py`. The floor is the
unique K/V bytes of the pass (each page once) over the device's bandwidth measured with
plain copies and reads (`bandwidth.py`); `pct_floor` above 100% would be a bug.

    python benchmarks/shared_prompts.py
    python benchmarks/shared_prompts.py --sessions 4,32 --prompts 4096 --modes prompt
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from bandwidth import measure as measure_bandwidth  # noqa: E402
from attention_kernels import L2_BYTES, SHAPES, bench  # noqa: E402
from hogwild_kernels import QueryGroup, Segment, TritonAttention  # noqa: E402

PAGE = 16
HEADERS = (12, 14)
OWN_PROMPT = 512  # a session's own prompt tokens after the shared part (prompt mode)
CUR = 256  # each worker's current block
MODES = ("prompt", "fork")


def build_case(mode: str, sessions: int, workers: int, prompt: int) -> tuple[list[QueryGroup], int, int]:
    """Every worker's segments for one decode pass of all sessions: (groups, pages in the pool,
    unique keys the pass reads)."""
    need = lambda n: -(-n // PAGE)  # noqa: E731
    bound = need(prompt) + sum(map(need, HEADERS)) + workers * need(CUR) + sessions * (
        need(prompt + OWN_PROMPT) + sum(map(need, HEADERS)) + workers * need(CUR))
    order = list(range(bound))  # the pool's pages, scattered as a running engine leaves them
    random.Random(0).shuffle(order)
    free = iter(order)

    def pages(n_tokens: int, start: list[int] | None = None) -> list[int]:
        have = list(start or [])
        return have + [next(free) for _ in range(need(n_tokens) - len(have))]

    shared_common = pages(prompt)
    shared_headers = [pages(n) for n in HEADERS]
    shared_cur = [pages(CUR // 2) for _ in range(workers)]
    groups, row, block_id, slots = [], 0, 0, set()
    for _ in range(sessions):
        if mode == "prompt":
            common = (pages(prompt + OWN_PROMPT, shared_common[: prompt // PAGE]), prompt + OWN_PROMPT)
            headers = [(pages(n), n) for n in HEADERS]
            cur = [(pages(CUR), CUR) for _ in range(workers)]
        else:
            common = (shared_common, prompt)
            headers = [(p, n) for p, n in zip(shared_headers, HEADERS)]
            cur = [(pages(CUR, shared_cur[w][: (CUR // 2) // PAGE]), CUR) for w in range(workers)]
        blocks = [common, *headers, *cur]
        ids = list(range(block_id, block_id + len(blocks)))
        block_id += len(blocks)
        for p, n in blocks:
            slots.update(p[k // PAGE] * PAGE + k % PAGE for k in range(n))
        for w in range(workers):
            segs, offset = [], 0
            for b in [0, 1] + [3 + o for o in range(workers) if o != w] + [2, 3 + w]:
                p, n = blocks[b]
                segs.append(Segment(torch.tensor(p), n, offset, block=ids[b]))
                offset += n
            groups.append(QueryGroup(row, 1, offset - 1, segs))
            row += 1
    return groups, bound, len(slots)


def measure(mode: str, sessions: int, workers: int, prompt: int, shape: str, device: torch.device,
            floor_bw: float) -> dict:
    hq, hkv, d = SHAPES[shape]
    groups, n_pages, unique_keys = build_case(mode, sessions, workers, prompt)
    for g in groups:
        for s in g.segments:
            s.pages = s.pages.to(device)
    pool_bytes = n_pages * PAGE * hkv * d * 2 * 2
    layers = max(1, min(8, -(-L2_BYTES // pool_bytes)))
    pools = [(torch.randn(n_pages, PAGE, hkv, d, dtype=torch.bfloat16, device=device),
              torch.randn(n_pages, PAGE, hkv, d, dtype=torch.bfloat16, device=device)) for _ in range(layers)]
    rows = len(groups)
    q = torch.randn(rows, hq, d, dtype=torch.bfloat16, device=device)
    slots = torch.zeros(rows, dtype=torch.int64, device=device)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=device).float() / d))
    tri = TritonAttention(inv_freq, 1.0, d**-0.5, kv_heads=hkv, q_per_kv=hq // hkv)
    unique_bytes = unique_keys * hkv * d * 2 * 2
    row = {"mode": mode, "shape": shape, "sessions": sessions, "workers": workers, "prompt": prompt,
           "unique_kv_MB": unique_bytes / 1e6}
    outs = {}
    for name, mode in (("once", "always"), ("per_session", "never")):
        tri.shared_reads = mode
        t0 = time.perf_counter()
        meta = tri.prepare(groups, slots, slots, page_size=PAGE)
        torch.cuda.synchronize(device)
        row[f"{name}_plan_ms"] = (time.perf_counter() - t0) * 1e3
        row[f"{name}_keys_read"] = int((meta.extra[0].unit_kend - meta.extra[0].unit_kstart).sum())
        seconds = bench([lambda k=k, v=v, m=meta: tri.attend(q, k, v, m) for k, v in pools])
        row[f"{name}_us"] = seconds * 1e6
        row[f"{name}_pct_floor"] = 100 * unique_bytes / floor_bw / seconds
        outs[name] = tri.attend(q, *pools[0], meta).float()
    tri.shared_reads = "auto"  # what the engine does: merge where plan.WORTH_MERGING says it pays
    auto = tri.prepare(groups, slots, slots, page_size=PAGE).extra[0]
    row["auto_merges"] = int((auto.unit_kend - auto.unit_kstart).sum()) == row["once_keys_read"]
    row["auto_us"] = row["once_us" if row["auto_merges"] else "per_session_us"]
    row["speedup"] = row["per_session_us"] / row["once_us"]
    row["auto_speedup"] = row["per_session_us"] / row["auto_us"]
    row["max_abs_diff"] = (outs["once"] - outs["per_session"]).abs().max().item()
    row["floor_GBps"] = floor_bw / 1e9
    del pools
    common.free_memory(device)
    return row


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for prompt in sorted({r["prompt"] for r in rows if r["mode"] == mode}):
            rs = sorted((r for r in rows if r["mode"] == mode and r["prompt"] == prompt), key=lambda r: r["sessions"])
            s = [r["sessions"] for r in rs]
            ax.plot(s, [r["once_us"] for r in rs], "o-", label=f"read once, P={prompt}")
            ax.plot(s, [r["per_session_us"] for r in rs], "x--", label=f"once per session, P={prompt}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sessions in the pass")
        ax.set_ylabel("µs per layer")
        ax.set_title(f"{mode}: shared pages")
        ax.legend(fontsize=7)
    common.save_figure(fig, path, title)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=",".join(MODES), help=f"any of {','.join(MODES)}")
    p.add_argument("--sessions", type=common.ints, default=[4, 16, 32], help="S values")
    p.add_argument("--workers", type=int, default=4, help="W, workers per session")
    p.add_argument("--prompts", type=common.ints, default=[1024, 4096], help="shared tokens P")
    p.add_argument("--shape", choices=tuple(SHAPES), default="qwen3-8b")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--date", default=common.today())
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if bad := [m for m in modes if m not in MODES]:
        p.error(f"--modes: unknown {', '.join(bad)}; choose from {', '.join(MODES)}")
    if not torch.cuda.is_available():
        p.error("this benchmark times the Triton kernel on a CUDA GPU and torch sees none")
    device = torch.device("cuda")
    floor = measure_bandwidth(device)
    rows = []
    for mode in modes:
        for prompt in args.prompts:
            for sessions in args.sessions:
                rows.append(measure(mode, sessions, args.workers, prompt, args.shape, device, floor.value))
    name = common.device_name(device)
    common.print_table(
        f"Shared pages read once vs once per session, one {args.shape} attention layer, bf16, {name}",
        ["mode", "S x W", "P", "unique MB", "once µs", "per-session µs", "speedup", "once % floor",
         "per-session % floor", "keys read once / per session", "engine merges", "engine speedup"],
        [[r["mode"], f"{r['sessions']}x{r['workers']}", str(r["prompt"]), f"{r['unique_kv_MB']:.0f}",
          f"{r['once_us']:.1f}", f"{r['per_session_us']:.1f}", f"{r['speedup']:.2f}x", f"{r['once_pct_floor']:.0f}%",
          f"{r['per_session_pct_floor']:.0f}%", f"{r['once_keys_read']} / {r['per_session_keys_read']}",
          "yes" if r["auto_merges"] else "no", f"{r['auto_speedup']:.2f}x"]
         for r in rows])
    if over := [r for r in rows if r["once_pct_floor"] > 100 or r["per_session_pct_floor"] > 100]:
        print(f"warning: {len(over)} rows above 100% of the floor: the measurement is wrong")
    stem = args.out / f"{args.date}-{common.file_tag(device)}-shared_prompts"
    meta = {"device": name, "date": args.date, **floor.meta(), "versions": common.versions(),
            "page_size": PAGE, "workers": args.workers, "shape": args.shape}
    common.write_results(stem, meta, rows)
    plot(rows, Path(f"{stem}.png"), f"Shared pages read once vs per session ({args.shape} layer, {name})")
    print(f"wrote {stem}.csv, .json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
