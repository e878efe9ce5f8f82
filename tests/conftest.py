"""Shared fixtures: the default model's tokenizer, random-weight checkpoints, the real model."""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a fixed thread count: results must not depend on what else the machine runs (no thread governor);
# under pytest-xdist the cores are shared out among the workers: OpenMP threads beyond the cores
# spin while they wait and take the other worker's time (two workers of two threads each on two
# cores ran a CPU-bound third of the suite 3.8x slower than of one thread each)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _WORKERS)))
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU interpreter in CI

from models import save_random_model  # noqa: E402

# `make test` runs the suite in three pytest-xdist workers (-n 3 --dist loadgroup). The tests that
# start Ray clusters, Ray Serve, servers, subprocess clusters or torch.distributed process groups,
# or bind ports, are of two groups; each group's tests run one after another on one worker, so no
# test finds another's cluster in its own group, and the two groups' clusters stand apart: each
# worker names its shared-memory segments (HOGWILD_SHM_PREFIX, inherited by the Ray nodes it
# starts) so a leak check counts its own, live actors are read from the GCS table of the test's own
# cluster, Serve's HTTP ports are picked free, and the two-node cluster's ports lie below the
# ephemeral range. `info` with no address (ray.init "auto", which looks for running clusters) may
# find the other group's cluster, or several: its tests accept any answer. The CPU-bound rest runs
# beside them.
RAY_GROUP = "ray"  # Ray engines and shards, torch.distributed
SERVE_GROUP = "serve"  # Ray Serve (servers, replicas), the two-node cluster of cluster/local.sh
GROUP_MODULES = {  # about the same time each (~12 and ~13 minutes of tests in three workers on 2 cores)
    RAY_GROUP: {"test_channel_security", "test_fault_sweep", "test_gpu_leaks", "test_own_ray", "test_ray_backend",
                "test_runtime_infra", "test_session_lifetime", "test_stream", "test_tensor_parallel",
                "test_tensor_parallel_bench"},
    SERVE_GROUP: {"test_bench_serve", "test_cluster", "test_replicas", "test_serve"},
}
# single tests of otherwise local modules: `info` asks a cluster running on this machine, and a
# port found free must stay free until the test has seen it refuse
GROUP_TESTS = {
    RAY_GROUP: {"test_cli.py::test_info_json", "test_first_hour.py::test_info_names_the_cpu_model",
                "test_first_hour.py::test_a_dead_cluster_address_is_an_error_within_seconds"},
}
if os.environ.get("PYTEST_XDIST_WORKER"):  # before any import of hogwild_ray's channel (ray_state, the tests)
    os.environ["HOGWILD_SHM_PREFIX"] = f"hogwild-{os.environ['PYTEST_XDIST_WORKER']}-"


def group_of(nodeid: str) -> str | None:
    """The group of the test "tests/test_x.py::[Class::]test_y[params]", None for a local test."""
    path, _, name = nodeid.partition("::")
    single = f"{Path(path).name}::{name.split('[')[0]}"
    for group, modules in GROUP_MODULES.items():
        if Path(path).stem in modules or single in GROUP_TESTS.get(group, ()):
            return group
    return None


# Local modules are units too (a module's fixtures are made once, not once on each worker that runs
# one of its tests: the GPU compile's fixture alone took 40-50 s of CPU a worker). Units are handed
# out in the items' order: the two groups first (the longest chains), then the slowest local
# modules, so the run does not end on a long one; the rest in collection order.
SLOW_FIRST = ("test_makefile", "test_engine", "test_gpu_compile", "test_oracle", "test_eval", "test_cli",
              "test_triton_kernels", "test_first_hour", "test_batched_exactness", "test_eval_kills")


def scope_of(nodeid: str) -> str:
    """The unit a test is scheduled with: its group, or its module."""
    return group_of(nodeid) or nodeid.partition("::")[0]


def schedule_rank(nodeid: str) -> int:
    group = group_of(nodeid)
    if group:
        return [SERVE_GROUP, RAY_GROUP].index(group)
    stem = Path(nodeid.partition("::")[0]).stem
    return 2 + (SLOW_FIRST.index(stem) if stem in SLOW_FIRST else len(SLOW_FIRST))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadgroup, the units read from the test ids here (pytest 9 ignores the group suffix
    that xdist (3.8) writes into each test's id, so xdist_group marks alone group nothing), handed
    out in the items' order (see schedule_rank) rather than the largest first."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class GroupScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

    config.option.loadscopereorder = False
    return GroupScheduling(config, log)


def pytest_collection_modifyitems(items):
    for item in items:  # the mark says so to the test itself (and to an xdist that reads marks)
        group = group_of(item.nodeid)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the order units are handed out in; a module's own order kept
        items.sort(key=lambda item: schedule_rank(item.nodeid))


_first_test = True
SHARED = "shared-"  # made_once's directories: removed when the run ends (pytest_sessionfinish)


def pytest_sessionfinish(session):
    """The run's shared directories (made_once: the oracle's de-quantized model is half a gigabyte)
    go when the run ends, in the process that owns the temp root (not an xdist worker): pytest keeps
    the last three runs' temp dirs, and these would fill a small disk."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    root = getattr(factory, "_basetemp", None)  # None: no test asked for a temp dir
    if root is None or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    for path in root.glob(SHARED + "*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def pytest_runtest_setup(item):
    """An xdist worker whose first test is of no group (the groups are handed out first,
    schedule_rank) runs at a lower priority: the cluster tests, whose timeouts are real, get the cores
    when they want them, and the CPU-bound tests take what they leave."""
    global _first_test
    if _first_test and os.environ.get("PYTEST_XDIST_WORKER"):
        _first_test = False
        if item.get_closest_marker("xdist_group") is None:
            # 10: below the cluster tests' own process, above Ray's workers (niceness 15). With those at 0
            # too the groups ended sooner and the CPU-bound share starved (one 2 s test took 261 s), for
            # the same run's time: the two cores are busy throughout, so only less work shortens it
            os.nice(10)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """SmolLM2's tokenizer (from the default model's GGUF), saved as a plain HF tokenizer."""
    from hogwild_ray.model.loader import default_checkpoint, load_tokenizer

    if os.environ.get("HOGWILD_TEST_TOKENIZER"):  # a saved copy, where the default model is not installed
        return Path(os.environ["HOGWILD_TEST_TOKENIZER"])
    d = tmp_path_factory.mktemp("tokenizer")
    load_tokenizer(default_checkpoint()).save_pretrained(d)  # the GGUF parsed once, by the first worker to ask
    return d


@pytest.fixture(scope="session")
def random_model(tmp_path_factory, tokenizer_dir):
    """factory(family, rope, **config) -> (directory, HF model); cached per arguments."""
    made = {}

    def make(family: str = "llama", rope: str = "default", **overrides):
        key = (family, rope, tuple(sorted(overrides.items())))
        if key not in made:
            d = tmp_path_factory.mktemp(f"{family}-{rope}")
            made[key] = (d, save_random_model(d, tokenizer_dir, family, rope, **overrides))
        return made[key]

    return make


def default_checkpoint_or_skip():
    """The built-in default model; a skip where the machine says it lacks it (HOGWILD_TEST_TOKENIZER
    set, as on a GPU machine given only a saved tokenizer), an error everywhere else (CI installs it)."""
    from hogwild_ray.errors import ModelNotFoundError
    from hogwild_ray.model.loader import default_checkpoint

    try:
        return default_checkpoint()
    except ModelNotFoundError as e:
        if os.environ.get("HOGWILD_TEST_TOKENIZER"):
            pytest.skip(f"the built-in default model is not installed here (HOGWILD_TEST_TOKENIZER is set): {e}")
        raise


@pytest.fixture(scope="session")
def builtin_model():
    """The built-in default model's checkpoint, for tests that read it: skipped where the machine says
    it lacks the model (default_checkpoint_or_skip)."""
    return default_checkpoint_or_skip()


@pytest.fixture(scope="session")
def default_engine():
    import hogwild_ray as hw

    default_checkpoint_or_skip()
    return hw.HogwildEngine.from_pretrained()


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """A directory `make` fills once for the whole run, every xdist worker's (their temp dirs share a
    parent), by whichever worker asks first; the others wait for it and read it."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    name = SHARED + name
    done = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            partial = root / f"{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            try:
                make(partial)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)  # nothing half-written left behind
                raise
            partial.rename(done)
    return done


@pytest.fixture(scope="session")
def default_hf_model(tmp_path_factory):
    """transformers' own model of the built-in checkpoint, fp32. Read from its GGUF (de-quantized:
    about 11 s of CPU) once for the run, kept as safetensors that every worker loads in a second."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    ckpt = default_checkpoint_or_skip()

    def from_gguf(d: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(str(ckpt.directory), gguf_file=ckpt.gguf_file,
                                                     dtype=torch.float32)
        d.mkdir(parents=True)
        model.config.save_pretrained(d)
        model.generation_config.save_pretrained(d)
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            del tensors["lm_head.weight"]  # the embedding's, tied again at load
        save_file(tensors, str(d / "model.safetensors"))

    return AutoModelForCausalLM.from_pretrained(str(made_once(tmp_path_factory, "default-hf-model", from_gguf)),
                                                dtype=torch.float32).eval()
