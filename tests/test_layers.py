"""Imports flow one way: the pure logic imports no torch, Ray or Triton, the model knows nothing
of runners, the runner nothing of executors or sessions, the executor nothing of sessions or
engines, and no Ray shard builds an engine. Read from the source (an AST walk), so a new
import that breaks a layer fails here, not in a review."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hogwild_ray"
HEAVY = ("torch", "ray", "triton", "hogwild_kernels", "numpy")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, relative imports resolved, at any depth of the file."""
    here = module_name(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return found


def files_of(*names: str) -> list[Path]:
    out = []
    for name in names:
        p = PACKAGE / name
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p.with_suffix(".py")]
    return out


LAYERS = {  # files -> package modules they must never import
    ("model",): ("hogwild_ray.runner", "hogwild_ray.executor", "hogwild_ray.session", "hogwild_ray.engine",
                 "hogwild_ray.runtime", "hogwild_ray.cli"),
    ("runner",): ("hogwild_ray.executor", "hogwild_ray.session", "hogwild_ray.engine", "hogwild_ray.runtime",
                  "hogwild_ray.cli"),
    ("executor",): ("hogwild_ray.session", "hogwild_ray.engine", "hogwild_ray.runtime", "hogwild_ray.cli"),
    ("runtime/shard",): ("hogwild_ray.engine", "hogwild_ray.session"),
    ("engine", "session", "front", "executor", "runner", "core", "graph_warmup"): ("hogwild_ray.runtime",),
    ("engine", "session", "front", "executor", "runner", "core", "runtime", "model", "scheduler", "many",
     "graph_warmup"): ("hogwild_ray.serve",),
}


@pytest.mark.parametrize("layer, forbidden", list(LAYERS.items()), ids=["/".join(k) for k in LAYERS])
def test_imports_flow_one_way(layer, forbidden):
    bad = [(module_name(f), m) for f in files_of(*layer) for m in imports_of(f)
           if any(m == x or m.startswith(x + ".") for x in forbidden)]
    assert not bad, bad


def test_the_walk_sees_relative_imports():
    shard = imports_of(PACKAGE / "runtime" / "shard.py")
    assert "hogwild_ray.runner.ModelRunner" in shard and "hogwild_ray.executor.LocalExecutor" in shard


PURE = [*files_of("core"), *files_of("errors", "ray_address", "progress_lines", "batch", "serve/openai_protocol")]


@pytest.mark.parametrize("path", PURE, ids=lambda p: module_name(p))
def test_pure_logic_imports_nothing_heavy(path):
    heavy = [m for m in imports_of(path) if m.split(".")[0] in HEAVY]
    inside = [m for m in imports_of(path) if m.startswith("hogwild_ray.") and not m.startswith(
        ("hogwild_ray.core", "hogwild_ray.errors"))]
    assert not heavy and (path.parent.name not in ("core", "serve") or not inside), (heavy, inside)


# run first in a test's subprocess: any import of the heavy packages then fails
WITHOUT_HEAVY = ("import sys\n"
                 "for name in ('torch', 'triton', 'ray', 'numpy', 'transformers'):\n"
                 "    sys.modules[name] = None\n")


def test_the_package_and_its_options_load_without_torch_triton_or_ray():
    code = (WITHOUT_HEAVY +
            "import hogwild_ray as hw\n"
            "p = hw.SamplingParams(temperature=0.7, top_p=0.9, seed=1)\n"
            "o = hw.ProtocolOptions(redundancy_every=None)\n"
            "from hogwild_ray.core import events, layout, protocol\n"
            "print(p.temperature, o.enabled, hw.LAYOUTS)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("0.7 True")


def test_the_command_line_parses_and_answers_help_without_torch_triton_or_ray():
    """`hogwild-ray --help`, each command's --help and a bad flag's error answer without importing
    torch (seconds of CPU): the heavy modules load once a command runs."""
    code = (WITHOUT_HEAVY +
            "from hogwild_ray.cli import main\n"
            "for argv in (['--help'], ['run', '--help'], ['serve', '--help'], ['batch', '--help'],\n"
            "             ['eval', '--help'], ['serve', '--tp', '0']):\n"
            "    try:\n"
            "        code = main(argv)\n"
            "    except SystemExit as e:\n"
            "        code = e.code\n"
            "    print('exit:', argv[0], code)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    codes = [line for line in out.stdout.splitlines() if line.startswith("exit: ")]
    assert codes == [f"exit: {c}" for c in ("--help 0", "run 0", "serve 0", "batch 0", "eval 0", "serve 2")], codes
    assert "--dtype" in out.stdout and "bf16" in out.stdout


RAY_FREE_SERVING = ("serve/openai_protocol", "serve/metrics")  # testable without Ray


def test_only_the_ray_packages_import_ray():
    """runtime/ (the engine on Ray) and serve/ (the server on Ray Serve) import ray; nothing else,
    and not serve/'s request parsing, serving loop or metrics either."""
    outside = [f for f in PACKAGE.rglob("*.py") if not {"runtime", "serve"} & set(f.relative_to(PACKAGE).parts)]
    bad = [(module_name(f), m) for f in [*outside, *files_of(*RAY_FREE_SERVING)] for m in imports_of(f)
           if m == "ray" or m.startswith("ray.")]
    assert not bad, bad


def test_the_backend_is_picked_in_one_place():
    """Only api.py reaches for the Ray engine; no engine class inherits from another backend's."""
    users = [module_name(f) for f in PACKAGE.rglob("*.py") if "runtime" not in f.relative_to(PACKAGE).parts
             and any(m.startswith("hogwild_ray.runtime.engine") for m in imports_of(f))]
    assert users == ["hogwild_ray.api"], users
    from hogwild_ray.engine import HogwildEngine
    from hogwild_ray.front import EngineFront
    from hogwild_ray.runtime.engine import RayHogwildEngine

    assert issubclass(RayHogwildEngine, EngineFront) and not issubclass(RayHogwildEngine, HogwildEngine)
