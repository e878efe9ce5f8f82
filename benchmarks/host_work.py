"""The host's share of a pass, with the device taken out: what overlaps the pass and what the device waits for.

The runner's forward is replaced by a stand-in that lays out the pass's inputs as the runner
does and returns at once (fixed logits one column wide, random token ids, whose reading by
the executor is timed), and its page moves and copies by
nothing (device work, asynchronous on a GPU), so everything left is host work:
the protocol, the layout, the sampling tables, the executor. A pass's host work splits in
two: what a real device waits for (exposed) is, after a pass's tokens are read with no
pass queued behind it, the host's work until the next pass's forward returns (the sampled
tokens' part, the scheduler's bookkeeping, planning, the launch); the rest runs while the
device computes a pass (staging the next plan, taking what the fed tokens decide; with the
launch ahead, all of it while the next pass is already queued). Measured for S sessions x W
workers in shared passes, the protocol on,
with steps ending every ~N passes (--step-tokens, out of step across workers, as real text
does) or never (0), with the heap settled as the engine's own loops run their passes
(hogwild_ray.heap) or the collector left alone (--heap). Also the share of the sessions'
plans taken from a preview.

    python benchmarks/host_work.py                             # 1x1, 1x16, 32x4 on random:tiny
    python benchmarks/host_work.py --configs 1x16 --step-tokens 0,30

Writes DATE-DEVICE-host_work.{csv,json,png} under --out.
"""

from __future__ import annotations

import argparse
import contextlib
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
import hogwild_ray as hw  # noqa: E402
from overhead import end_steps_every  # noqa: E402
from scaling_runs import Model  # noqa: E402
from hogwild_ray.executor import local  # noqa: E402
from hogwild_ray.runner.model_runner import host_batch  # noqa: E402
from hogwild_ray.session import step_sessions  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--configs", type=lambda s: [tuple(int(x) for x in c.split("x")) for c in s.split(",")],
                   default=[(1, 1), (1, 16), (32, 4)], help="SESSIONSxWORKERS, comma-separated")
    p.add_argument("--step-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[30],
                   help="a step ends about every N passes of a worker (0: never), one run per value")
    p.add_argument("--heap", type=lambda s: s.split(","), default=["settled"],
                   help="settled: the passes run with the heap settled as the engine's own loops run them "
                        "(hogwild_ray.heap); as-is: the collector left alone; one run per value")
    p.add_argument("--launch-ahead", type=lambda s: s.split(","), default=["off", "on"],
                   help="on: the executor launches each pass right behind the last one, fed its samples on the "
                        "device, when every session foresaw it (what it does on a GPU); off: when the sessions "
                        "ask for it; one run per value, side by side")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens of each session")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--date", default=common.today())
    return p.parse_args(argv)


@contextlib.contextmanager
def timed_reads(clock: dict, executor):
    """The executor's reading of a pass's samples timed, where the host would wait for the
    device: unless a pass is queued behind it (launched ahead), the device idles from there
    until the next forward returns."""
    class Timed(local.HostCopy):
        def tolist(self) -> list[int]:
            if executor.launched is None:
                clock["idle_from"] = time.perf_counter()
            return super().tolist()

    real, local.HostCopy = local.HostCopy, Timed
    try:
        yield
    finally:
        local.HostCopy = real


def stand_in(clock: dict):
    """A forward that lays out the pass's inputs as the runner does (host_batch, and the samples
    a pass launched ahead takes on the device) and returns at once: one-column logits, ids drawn
    from a fixed range."""
    logits = torch.zeros(4096, 1)

    def forward(steps, table=None, staged=None, batch=None, feed=None):
        if batch is None:  # else laid out ahead, as the runner takes it then
            batch = host_batch(steps)
        if feed is not None:
            feed(torch.zeros(len(batch[1]), dtype=torch.int64))
        ids = torch.randint(100, 200, (len(steps),))
        if clock["idle_from"] is not None:
            clock["exposed"] += time.perf_counter() - clock["idle_from"]
            clock["idle_from"] = None
        return logits[: len(steps)], ids

    return forward


def measure(model: Model, sessions: int, workers: int, step_tokens: int, args, settle: str = "settled",
            ahead: str = "off") -> dict:
    engine = hw.HogwildEngine.from_pretrained(model.path, "cpu", torch.float32,
                                              cache_tokens=sessions * (workers * (args.steps + args.warmup + 64) * 2
                                                                       + args.prompt + 1024))
    engine.eos_ids = frozenset()  # every worker runs the whole time
    engine.executor.prelaunch = ahead == "on"
    clock = {"exposed": 0.0, "idle_from": None}
    engine.runner.forward = stand_in(clock)
    with timed_reads(clock, engine.executor):
        return _measure(engine, model, clock, sessions, workers, step_tokens, args, settle, ahead)


def _measure(engine, model: Model, clock: dict, sessions: int, workers: int, step_tokens: int, args, settle: str,
             ahead: str) -> dict:
    engine.runner.relocate = engine.runner.copy_pages = lambda *a: None  # device work too: page moves and copies
    runs = [engine.start(f"Problem {i}.\n{model.text(args.prompt)}", workers, max_tokens=None, stop_on_answer=False,
                         finisher=False, sampling=[hw.SamplingParams(temperature=1.0, seed=97 * i + w)
                                                   for w in range(workers)]) for i in range(sessions)]
    for st in engine.executor.sessions.values():
        st.last = torch.zeros(st.last.shape[0], 1)  # a row's copy is one launch on a device: keep it one column
    if step_tokens:
        end_steps_every(engine, runs[0], step_tokens)  # every session's workers
    for _ in range(args.warmup):
        step_sessions(runs)
    clock["exposed"] = 0.0
    launched = engine.executor.prelaunched
    previews = sum(s.layout.previews_used for s in runs)

    def step() -> None:  # the device's idle time counted within the timed steps only, as the walls are
        if clock["idle_from"] is not None:
            clock["idle_from"] = max(clock["idle_from"], time.perf_counter())
        step_sessions(runs)
        clock["last_end"] = time.perf_counter()

    walls = common.step_walls(step, 0, args.steps, settled=settle == "settled")
    if clock["idle_from"] is not None:  # the last step's samples read: idle to its end
        clock["exposed"] += max(0.0, clock["last_end"] - clock["idle_from"])
        clock["idle_from"] = None
    previews = sum(s.layout.previews_used for s in runs) - previews
    ended = sum(sum(s.stats.steps_per_worker) for s in runs)
    launched = engine.executor.prelaunched - launched
    for s in runs:
        s.close()
    host = statistics.fmean(walls) * 1e3
    exposed = clock["exposed"] / args.steps * 1e3
    return {"sessions": sessions, "workers": workers, "step_tokens": step_tokens or None, "heap": settle,
            "launch_ahead": ahead, "launched_ahead_pct": 100 * launched / args.steps, "host_ms": host,
            "overlapped_ms": host - exposed, "exposed_ms": exposed, "steps_ended": ended,
            "previewed_pct": 100 * previews / (args.steps * sessions)}


def plot(meta: dict, rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.2))
    labels = [f"{r['sessions']}x{r['workers']}, " + (f"a step ends every ~{r['step_tokens']}" if r["step_tokens"]
                                                     else "no step ends") + f", heap {r['heap']}"
              + (", launched ahead" if r.get("launch_ahead") == "on" else "") for r in rows]
    ax.barh(labels, [r["exposed_ms"] for r in rows], label="exposed: the device waits", color="C3")
    ax.barh(labels, [r["overlapped_ms"] for r in rows], left=[r["exposed_ms"] for r in rows],
            label="overlaps the pass", color="C0")
    ax.set(xlabel="host ms per pass")
    ax.legend(fontsize=8)
    common.save_figure(fig, path, f"hogwild-ray host work per pass: {meta['model']} on {meta['device_name']}")


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    device = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = Model(args.model, device, torch.float32)
        rows = [measure(model, s, w, n, args, settle, ahead) for settle in args.heap for n in args.step_tokens
                for s, w in args.configs for ahead in args.launch_ahead]
    finally:
        torch.set_num_threads(threads)
    meta = {"benchmark": "host_work", "date": args.date, "device": "cpu", "device_name": common.device_name(device),
            **common.versions(), "model": args.model, "prompt": args.prompt, "steps": args.steps,
            "warmup": args.warmup, "method": "forward replaced by a stand-in that returns at once, page moves and "
                                             "copies by nothing; exposed = from the reading of a pass's tokens "
                                             "with no pass queued behind it to the next forward's return; "
                                             "overlapped = the rest of a step"}
    stem = args.out / f"{args.date}-{common.file_tag(device)}-host_work"
    common.write_results(stem, meta, rows)
    plot(meta, rows, Path(f"{stem}.png"))
    common.print_table(f"host work per pass, {args.model}, protocol on, on {meta['device_name']}",
                       ["sessions x workers", "step ends every", "heap", "launch ahead", "host ms", "overlapped ms",
                        "exposed ms", "steps ended", "plans previewed", "passes launched ahead"],
                       [[f"{r['sessions']} x {r['workers']}", str(r["step_tokens"] or "never"), r["heap"],
                         r["launch_ahead"], f"{r['host_ms']:.3f}",
                         f"{r['overlapped_ms']:.3f}", f"{r['exposed_ms']:.3f}", str(r["steps_ended"]),
                         f"{r['previewed_pct']:.0f}%", f"{r['launched_ahead_pct']:.0f}%"] for r in rows])
    print(f"wrote {stem}.csv, .json, .png")
    return {"meta": meta, "rows": rows, "stem": stem}


if __name__ == "__main__":
    main()
