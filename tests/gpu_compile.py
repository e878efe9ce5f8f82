"""Compile every Triton kernel of hogwild_kernels for a GPU on a machine without one, as the
package launches them, and print a JSON line (after RECORD) for each launch compiled: for
Hopper (sm_90, the default) every configuration; for the A100 (`--arch 80`) those the engine
runs there, none chained (programmatic dependent launches need Hopper; pdl.supported).

The CPU tests run the kernels under Triton's interpreter, which accepts code the GPU
compiler refuses (an `elif` whose branch returns early) and skips what only the compiler
does (pipelining, tensor-descriptor copies, the chain's waits and which GPUs have them,
register allocation). Here the package's own calls run with CPU tensors
through a driver that compiles each launch for the target and launches nothing, so a kernel
that would not build on the GPU fails on any machine; ptxas reports each one's registers and
spills. Run as a script, without TRITON_INTERPRET.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET: the interpreter compiles nothing")

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))  # the benchmark's decode layout

# the launch's constexprs worth reporting (which paths of a kernel a configuration took)
REPORTED = ("BLOCK_N", "BLOCK_M", "BLOCK_M2", "AHEAD", "TMA", "PAGES_AHEAD", "CHAINED", "PREFETCH_KEYS", "PREFETCH",
            "NEXT_LINES", "PHASES", "GLU", "NORM_ROWS", "HAS_DELTA", "IEEE", "num_stages")
# instructions whose presence in the PTX shows that a path was compiled as meant
MARKERS = {"chain_wait": "griddepcontrol.wait", "tensor_copy": "cp.async.bulk.tensor",
           "l2_prefetch": "prefetch.global.L2"}
RECORD = "gpu_compile: "  # begins each record's line (the compiler prints to stdout too)


def resources(ptx: str, arch: int) -> dict[str, int]:
    """Registers a thread and bytes spilled to local memory, as ptxas reports them for the PTX."""
    from triton import knobs

    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # as Triton names them
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        log = subprocess.run([knobs.nvidia.ptxas.path, "-v", f"--gpu-name={gpu}", str(src), "-o",
                              str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True, check=True).stderr
    registers = max(int(n) for n in re.findall(r"Used (\d+) registers", log))
    spilled = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return {"registers": registers, "spill_bytes": spilled}


class CompileOnly:
    """A Triton driver for one target that compiles what is launched and runs nothing."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


def configurations(arch: int) -> list[tuple[str, object]]:
    """(label, call) for each configuration worth compiling for the arch: the attention's tiles
    (narrow and wide rows, long units, chained, tensor-descriptor pages, fp32/fp16/bf16), the
    K/V appends, the norms, SiLU, sampling's noise and the skinny products (plain, chained,
    normed, GLU); chained ones (and those marked Hopper) only from Hopper on."""
    from attention_kernels import build_case

    from hogwild_kernels import TritonAttention, fused, gumbel, mlp, skinny

    cpu = torch.device("cpu")

    def attention(label, workers, q_heads, dtype, page=16, view=4096, chained=False, **knobs):
        def call():  # one decode step of the benchmark's combined layout (8 KV heads of 128)
            q, [(k_pool, v_pool)], groups, _ = build_case(workers, view, q_heads, 8, 128, dtype, cpu, page=page)
            inv_freq = 1.0 / (10000 ** (torch.arange(0, 128, 2).float() / 128))
            tri = TritonAttention(inv_freq, 1.0, 128**-0.5, kv_heads=8, q_per_kv=q_heads // 8, **knobs)
            tri.chained = chained
            slots = torch.zeros(workers, dtype=torch.int64)
            meta = tri.prepare(groups, slots, slots)
            tri.attend(q, k_pool, v_pool, meta)
            k = torch.zeros(workers, 8, 128, dtype=dtype)
            tri.append(k_pool, v_pool, k, k, meta)
            norm = torch.ones(128, dtype=dtype)
            qkv = torch.zeros(workers, (q_heads + 16) * 128, dtype=dtype)
            tri.append_normed(k_pool, v_pool, qkv, norm, norm, 1e-6, q_heads, meta)
        return label, call

    def norms_and_products(label, dtype, rows, chained):
        def call():
            x = torch.zeros(rows, 4096, dtype=dtype)
            w = torch.zeros(4096, dtype=dtype)
            fused.add_rms_norm(x, x, w, 1e-6, chained=chained)
            fused.add_rms_norm(x, None, w, 1e-6, chained=chained)
            qkv = torch.zeros(rows, (32 + 16) * 128, dtype=dtype)
            fused.qk_rms_norm(qkv, w[:128], w[:128], 32, 8, 128, 1e-6, chained=chained)
            fused.silu_mul(torch.zeros(rows, 2 * 12288, dtype=dtype), chained=chained)
            weight = torch.zeros(6144, 4096, dtype=dtype)
            skinny.skinny_linear(x, weight, chained=chained)
            skinny.skinny_linear(x, torch.zeros(2 * 1024, 4096, dtype=dtype), chained=chained, glu=True)
            skinny.skinny_linear(x, weight, torch.zeros(6144, dtype=dtype), chained=chained)
            # the next product's weight (gate/up's [gate; up], 24576 rows) asked for as the programs end
            skinny.skinny_linear(x, weight, chained=chained, next_weight=torch.empty(24576, 4096, dtype=dtype),
                                 next_bytes=2048)
            if rows > skinny.MAX_ROWS:  # every wide launch shape the engine may time
                for config in skinny.WIDE_CANDIDATES:
                    skinny.skinny_linear(x, weight, config=config, chained=chained)
            if rows <= skinny.NORM_ROWS:
                skinny.skinny_norm_linear(x, x.clone(), w, 1e-6, weight, chained=chained)
            if rows <= mlp.MAX_ROWS:  # the MLP block in one launch (an H100's SMs), and in two
                gate_up, down = torch.empty(2 * 12288, 4096, dtype=dtype), torch.empty(4096, 12288, dtype=dtype)
                mlp.glu_down(x, gate_up, down, chained=chained, programs=132)
                mlp.glu_down(x, gate_up, down, chained=chained, one_launch=False)
        return label, call

    def sampling():
        rows = 4
        gumbel.gumbel_scores(torch.zeros(rows, 151936), torch.ones(rows), torch.zeros(rows, dtype=torch.int64),
                             torch.zeros(rows, dtype=torch.int64), interpret=True)

    every = [
        attention("attention, 1 worker at 4k (narrow rows), bf16", 1, 32, torch.bfloat16),
        attention("attention, 1 worker at 16k (long units: 128-key tiles), bf16", 1, 32, torch.bfloat16, view=16384),
        attention("attention, 16 workers (wide rows: prefetch ahead), bf16", 16, 32, torch.bfloat16),
        # (Hopper: compiled for an A100, 80-row tiles spill registers, 764 bytes in one 128-row tile, 352 in two)
        attention("attention, 16 workers of 5 query heads (two row tiles, 64 + 16; Hopper), bf16", 16, 40,
                  torch.bfloat16),
        attention("attention, 4 workers chained, bf16", 4, 32, torch.bfloat16, chained=True),
        attention("attention, 1 worker chained at 1k (64-key tiles), bf16", 1, 32, torch.bfloat16, view=1024,
                  chained=True),
        attention("attention, 16 workers chained, bf16", 16, 40, torch.bfloat16, chained=True),
        attention("attention, tensor-descriptor pages, bf16", 1, 32, torch.bfloat16, tma_pages=True),
        attention("attention, tensor-descriptor 64-token pages, fp16", 8, 32, torch.float16, page=64, tma_pages=True),
        attention("attention, 1 worker, pages a tile ahead, 3 stages", 1, 32, torch.bfloat16, view=16384,
                  pages_ahead=True, block_n=64, num_stages=3),
        attention("attention, 16 workers, pages a tile ahead, 3 stages", 16, 32, torch.bfloat16, pages_ahead=True,
                  num_stages=3),
        attention("attention, fp16", 2, 32, torch.float16),
        attention("attention, fp32 (exact)", 2, 32, torch.float32, view=1024),
        norms_and_products("norms, SiLU and products, 1 row, bf16", torch.bfloat16, 1, False),
        norms_and_products("norms, SiLU and products, 1 row, chained, bf16", torch.bfloat16, 1, True),
        norms_and_products("norms, SiLU and products, 16 rows, chained, fp16", torch.float16, 16, True),
        norms_and_products("norms, SiLU and products, 128 rows (a wide row tile), bf16", torch.bfloat16, 128, False),
        norms_and_products("norms, SiLU and products, 128 rows (a wide row tile), chained, bf16", torch.bfloat16, 128,
                           True),
        ("sampling noise", sampling),
    ]
    return [(label, call) for label, call in every if arch >= 90 or not ("chained" in label or "Hopper" in label)]


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    arch = int(args[args.index("--arch") + 1]) if "--arch" in args else 90
    driver.set_active(CompileOnly(GPUTarget("cuda", arch, 32)))
    label = ""

    def compile_only(self, grid):
        def launch(*args, **kwargs):
            kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
            ptx = kernel.asm["ptx"]
            markers = {name for name, text in MARKERS.items() if text in ptx}
            if re.search(r"cp\.async\.wait_group\s+[1-9]", ptx):  # a wait that leaves copies in flight
                markers.add("pipelined")
            print(RECORD + json.dumps({"arch": arch, "config": label, "kernel": self.fn.__name__,
                              "constexprs": {k: kwargs[k] for k in REPORTED if k in kwargs},
                              "markers": sorted(markers),
                              "shared_bytes": kernel.metadata.shared, **resources(ptx, arch)}), flush=True)
        return launch

    JITFunction.__getitem__ = compile_only
    failed = 0
    for label, call in configurations(arch):
        try:
            call()
        except Exception as e:  # a kernel the GPU compiler refuses: named with the configuration
            failed += 1
            print(RECORD + json.dumps({"arch": arch, "config": label, "error": f"{type(e).__name__}: {e}"[:2000],
                              "trace": traceback.format_exc()[-2000:]}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
