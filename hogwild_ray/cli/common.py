"""What the commands share: the parser class, the model/session/sampling flags, the checks made
before anything heavy starts, loading an engine, and errors that name flags as flags."""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import Any

from ..core.dtypes import DTYPE_NAMES
from ..errors import InvalidRequestError
from ..core.layout import LAYOUTS
from ..core.sampling_params import SamplingParams

FORMATTER = argparse.RawDescriptionHelpFormatter
MAX_STEPS_HELP = ("at most N forward passes in all, the finisher's included: without an answer by then, the "
                  "workers stop early enough for it to answer by pass N (default: no limit)")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one `error: ...` line, like HogwildError's."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")

    def unknown_flags(self, extras: list[str]) -> str:
        """One line for arguments this (sub)command does not take, with a guess for a mistyped flag."""
        flags = sorted({o for a in self._actions for o in a.option_strings if o.startswith("--")})
        parts = []
        for arg in extras:
            name = arg.split("=", 1)[0]
            guess = difflib.get_close_matches(name, flags, n=1, cutoff=0.6) if name.startswith("-") else []
            parts.append(f"{arg} (did you mean {guess[0]}?)" if guess else arg)
        return f"error: unrecognized argument{'s' if len(extras) > 1 else ''}: {', '.join(parts)} " \
               f"(see `{self.prog} --help`)"


def at_least(lo: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = None
        if v is None or v < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {s!r}")
        return v

    return parse


def add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and where it runs")
    g.add_argument("--model", metavar="PATH", default=None,
                   help="a local Hugging Face model directory or .gguf file, or random:NAME for random "
                        "weights of a named shape such as random:qwen3-8b "
                        "(default: the built-in SmolLM2-135M-Instruct)")
    g.add_argument("--device", default=None,
                   help="torch device to run on: cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")
    g.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None, metavar="DTYPE",
                   help=f"weight and cache dtype: {', '.join(sorted(DTYPE_NAMES))} "
                        "(default: float32 on cpu, bfloat16 on cuda)")
    g.add_argument("--backend", choices=("local", "ray"), default=None,
                   help="local: this process; ray: tensor-parallel shard actors on a Ray cluster "
                        "(default: ray when --tp > 1 or --address is given, else local)")
    g.add_argument("--tp", type=at_least(1), default=1, metavar="N",
                   help="tensor-parallel ranks (one device each) for backend ray (default: %(default)s)")
    g.add_argument("--address", metavar="ADDR", default=None,
                   help="Ray cluster to run on, e.g. ray://head:10001 or head:6379; 'local' starts a new one "
                        "(default for backend ray: RAY_ADDRESS, a cluster running on this machine, else a new "
                        "local one)")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_const", const=False, default=None,
                   help="launch every pass from Python (default on CUDA: decode passes replay CUDA graphs)")
    g.add_argument("--threads", type=at_least(1), default=None, metavar="N",
                   help="CPU threads for torch in this process (default: OMP_NUM_THREADS when set, else the "
                        "cores other processes leave free, re-decided every second)")


def add_replica_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", type=at_least(1), default=None, metavar="R",
                   help="R engine replicas placed by Ray (the cluster of --address, else a new local one), "
                        "each batching its share, a problem lost with its replica run again elsewhere "
                        "(default: on a Ray cluster with GPUs, one replica per --tp GPUs; otherwise one "
                        "engine in this process)")


def replicas_for(args: argparse.Namespace) -> int | None:
    """The replicas the flags ask for (hogwild_ray.replicated.default_replicas when none); None: one engine."""
    from ..replicated import default_replicas

    if args.backend == "local" and args.address:
        raise InvalidRequestError("--address names a Ray cluster: add --backend ray (or drop --address)")
    if args.backend == "local" and args.replicas is not None:
        raise InvalidRequestError("--replicas runs engines on Ray: drop --backend local")
    if args.replicas is not None:
        return args.replicas
    return default_replicas(args.address, args.device, args.tp)


def add_session_flags(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("the run")
    g.add_argument("--workers", type=at_least(1), default=2, metavar="N",
                   help="number of workers sharing the cache (default: %(default)s)")
    g.add_argument("--max-tokens", type=at_least(1), default=max_tokens, metavar="N",
                   help="tokens each worker may generate before it stops (default: %(default)s)")
    g.add_argument("--max-steps", type=at_least(1), default=None, metavar="N",
                   help=MAX_STEPS_HELP)
    g.add_argument("--layout", choices=LAYOUTS, default="combined",
                   help="how workers see each other: combined (shared history + everyone's step in "
                        "progress), contiguous (each worker's whole trace is one block), interleaved "
                        "(only finished steps are shared) (default: %(default)s)")
    red = g.add_mutually_exclusive_group()
    red.add_argument("--redundancy-every", type=at_least(1), default=128, metavar="N",
                     help="every N tokens a worker's next step opens with a forced question: is "
                          "another worker already doing this? (default: %(default)s)")
    red.add_argument("--no-redundancy", action="store_true", help="never ask the redundancy question")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.6, metavar="T",
                   help="sampling temperature; 0 is greedy (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample among the K most likely tokens only; 0 turns it off (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=0.95, metavar="P",
                   help="nucleus sampling: the smallest set of tokens with probability >= P, in (0, 1]; "
                        "1 turns it off (default: %(default)s)")
    g.add_argument("--seed", type=int, default=None, metavar="S",
                   help="random seed (worker w uses S + w) for a reproducible run (default: random)")


def session_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of engine.solve/stream the flags ask for (sampling checked here, before any load)."""
    return dict(workers=args.workers, max_tokens=args.max_tokens, max_steps=args.max_steps, layout=args.layout,
                sampling=SamplingParams(args.temperature, args.top_k, args.top_p, args.seed),
                redundancy_every=None if args.no_redundancy else args.redundancy_every)


def preflight(args: argparse.Namespace):
    """The engine's EngineConfig, and everything the model's files and config can tell, in seconds
    and before any load: the options (EngineConfig.create's checks), the model's path and
    architecture, the tensor-parallel split, and whether a named Ray cluster answers."""
    import torch

    from ..config import EngineConfig
    from ..model.loader import quick_spec
    from ..model.parallel import shard_plan
    from ..ray_address import check_reachable

    backend = args.backend or ("ray" if args.tp > 1 or args.address else "local")
    if backend == "local" and args.address:
        raise InvalidRequestError("--address names a Ray cluster: add --backend ray (or drop --address)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = EngineConfig.create(args.model, device, args.dtype, check_device=args.device is not None or
                                 backend == "local", backend=backend, tp=args.tp, ray_address=args.address,
                                 cuda_graphs=getattr(args, "cuda_graphs", None))
    spec = quick_spec(args.model)
    if config.tp > 1:
        shard_plan(spec, 0, config.tp)
    if config.backend == "ray":
        check_reachable(config.ray_address)
    return config


def load_engine(args: argparse.Namespace, quiet: bool = False):
    """The engine the model flags describe (checked by `preflight` first); the caller closes it."""
    from rich.console import Console

    from ..engine import HogwildEngine
    from ..threads import set_threads

    config = preflight(args)
    set_threads(getattr(args, "threads", None))
    if quiet:  # transformers' GGUF conversion bars too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    else:
        where = f" on Ray (tp={config.tp})" if config.backend == "ray" else ""
        Console(stderr=True).print(f"loading {args.model or 'the built-in SmolLM2-135M-Instruct'} on "
                                   f"{config.device}{where} ...", style="dim", highlight=False)
    return HogwildEngine.from_pretrained(args.model, config.device, config.dtype, backend=config.backend,
                                         tp=config.tp, ray_address=config.ray_address, cuda_graphs=config.cuda_graphs)


# library argument names -> the flags that set them, for errors shown on the command line
FLAG_NAMES = {
    "workers": "--workers", "max_tokens": "--max-tokens", "max_steps": "--max-steps", "layout": "--layout",
    "redundancy_every": "--redundancy-every", "temperature": "--temperature", "top_k": "--top-k",
    "top_p": "--top-p", "seed": "--seed", "device": "--device", "dtype": "--dtype", "backend": "--backend",
    "tp": "--tp", "ray_address": "--address", "threads": "--threads",
}
_ASSIGNED = re.compile(r"\b(" + "|".join(FLAG_NAMES) + r")=(['\"]?)([^'\"\s,;)]*)\2")
# names with an underscore are never English words; plain ones only where they start a rule
_BARE = re.compile(r"(?<![-\w.])(" + "|".join(n for n in FLAG_NAMES if "_" in n) + r")\b(?![=(])")
_RULE = re.compile(r"(?<![-\w.])(" + "|".join(n for n in FLAG_NAMES if "_" not in n) + r")(?= must )")


def as_flags(message: str) -> str:
    """A library error in the command line's words: `device='cpu'` -> `--device cpu`, `top_p` -> `--top-p`."""
    flag = lambda m: FLAG_NAMES[m.group(1)]  # noqa: E731
    message = _ASSIGNED.sub(lambda m: f"{FLAG_NAMES[m.group(1)]} {m.group(3)}", message)
    return _RULE.sub(flag, _BARE.sub(flag, message))


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
