"""`hogwild-ray bench NAME`: the benchmark scripts of a source checkout, run as they are."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .common import FORMATTER, fail

# the others also run on the CPU (small shapes)
GPU_ONLY = ("attention_kernels", "attention_tuning", "shared_prompts", "skinny_gemm", "product_chain",
            "decode_profile")
BENCHMARKS = {
    "attention_kernels": "one attention layer: the Triton kernel against SDPA and naive re-rotation (GPU)",
    "attention_tuning": "sweep the Triton kernel's launch knobs on this GPU",
    "shared_prompts": "sessions sharing prompt pages or forked: shared pages read once per pass vs per session (GPU)",
    "skinny_gemm": "a decode pass's matrix products: cuBLAS against the skinny kernel, against the floor (GPU)",
    "product_chain": "a decode pass's products, norms and SiLU chained without the attention, against the floor "
                     "(GPU)",
    "decode_profile": "one decode step: wall, GPU and roofline time, and its kernels one by one (GPU)",
    "engine_steps": "engine step time against the number of workers (random-weight named shapes)",
    "overhead": "the share of a step spent outside the GPU, in process and through Ray",
    "host_work": "the host's part of a pass alone (the device taken out): what overlaps the pass and what the "
                 "device waits for, each pass launched when asked and ahead",
    "ray_overhead": "the Ray path's per-step control overhead and start-up time",
    "scaling": "step time, tokens/s and GB/s vs workers and view length, against the roofline and transformers",
    "throughput": "many sessions per pass: S problems x W workers batched vs one at a time vs transformers",
    "tensor_parallel": "multi-GPU: step time, tokens/s and all-reduce share vs tp (--check: tp=N tokens vs tp=1)",
    "workers_cpu": "forward passes and tokens/s of the default model with 1, 2, 4 workers on the CPU",
    "threads_cpu": "CPU threads (1 and the default) on a quiet machine and beside busy processes",
    "replicas": "many problems over 1, 2, ... engine replicas on Ray Serve vs one engine in process: "
                "problems/s, tokens/s, start-up, same answers",
    "serve": "the OpenAI-compatible server under load: requests/s, time to first token and inter-token latency "
             "at concurrency 1, 8, 32 vs one request at a time",
}


def checkout() -> Path:
    """The source tree this package was installed from (editable installs keep it)."""
    return Path(__file__).resolve().parents[2]


def register(sub) -> None:
    listing = "\n".join(f"  {name:<18} {what}" for name, what in BENCHMARKS.items())
    p = sub.add_parser(
        "bench", formatter_class=FORMATTER,
        help="run one of the benchmarks (needs a source checkout)",
        description="Run a benchmark script from benchmarks/ of the source checkout; the arguments after\n"
                    "NAME go to the script (`hogwild-ray bench NAME --help` lists them). Results are\n"
                    "written under benchmarks/results/ unless the script is told otherwise.",
        epilog=f"benchmarks:\n{listing}\n\nexamples:\n  hogwild-ray bench workers_cpu --workers 1,2,4\n"
               "  hogwild-ray bench attention_kernels --help",
    )
    p.add_argument("name", choices=tuple(BENCHMARKS), metavar="NAME", help=f"one of {', '.join(BENCHMARKS)}")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    p.set_defaults(execute=execute)


def execute(args: argparse.Namespace, engine=None) -> int:
    script = checkout() / "benchmarks" / f"{args.name}.py"
    if not script.is_file():
        return fail(f"the benchmarks ship with the source, not the installed package ({script} is missing); "
                    "clone the hogwild-ray repository and `pip install -e .` in it, then run "
                    f"`hogwild-ray bench {args.name}` again")
    if args.name in GPU_ONLY and not any(a in ("-h", "--help") for a in args.args):
        import torch

        if not torch.cuda.is_available():
            return fail(f"benchmark {args.name} needs a CUDA GPU and torch sees none; on the CPU, "
                        "`hogwild-ray bench workers_cpu` (or threads_cpu, scaling, overhead, throughput, replicas) runs")
    return subprocess.call([sys.executable, str(script), *args.args])
