"""Shared fixtures: the default model's tokenizer, random-weight checkpoints, the real model."""

from __future__ import annotations

import os
import sys
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

# `make test` runs the suite in two pytest-xdist workers (-n 2 --dist loadgroup). The tests that
# start Ray clusters, Ray Serve, servers, subprocess clusters or torch.distributed process groups,
# bind ports, or look at what the whole machine holds (shared memory, processes, placement groups,
# live actors, a running cluster) share one group: they run one after another on one worker, so
# no leak check sees the other worker's things and no test finds another's cluster.
CLUSTER_GROUP = "cluster"
CLUSTER_MODULES = {
    "test_bench_serve", "test_channel_security", "test_cluster", "test_fault_sweep", "test_gpu_leaks",
    "test_own_ray", "test_ray_backend", "test_replicas", "test_runtime_infra", "test_serve",
    "test_session_lifetime", "test_stream", "test_tensor_parallel", "test_tensor_parallel_bench",
}
# single tests of otherwise local modules: `info` asks a cluster running on this machine, and a
# port found free must stay free until the test has seen it refuse
CLUSTER_TESTS = {
    "test_cli.py::test_info_json",
    "test_first_hour.py::test_a_dead_cluster_address_is_an_error_within_seconds",
    "test_first_hour.py::test_info_names_the_cpu_model",
}


def in_cluster_group(nodeid: str) -> bool:
    """Whether the test "tests/test_x.py::[Class::]test_y[params]" is of the cluster group."""
    path, _, name = nodeid.partition("::")
    return Path(path).stem in CLUSTER_MODULES or f"{Path(path).name}::{name.split('[')[0]}" in CLUSTER_TESTS


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadgroup, the group read from the test ids here: pytest 9 ignores the group suffix
    that xdist (3.8) writes into each test's id, so xdist_group marks alone group nothing."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class ClusterGroupScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return CLUSTER_GROUP if in_cluster_group(nodeid) else super()._split_scope(nodeid)

    return ClusterGroupScheduling(config, log)


def pytest_collection_modifyitems(items):
    for item in items:  # the mark says so to the test itself (and to an xdist that reads marks)
        if in_cluster_group(item.nodeid):
            item.add_marker(pytest.mark.xdist_group(CLUSTER_GROUP))


_first_test = True


def pytest_runtest_setup(item):
    """An xdist worker whose first test is not of the cluster group (xdist hands the largest unit,
    the group, out first) runs at a lower priority: the cluster tests, whose timeouts are real, get
    the cores when they want them, and the CPU-bound tests take what they leave."""
    global _first_test
    if _first_test and os.environ.get("PYTEST_XDIST_WORKER"):
        _first_test = False
        if item.get_closest_marker("xdist_group") is None:
            # 10: below the cluster tests' own process, above Ray's workers (niceness 15); 19, below
            # those too, ran the suite slower (30m05s against 28m01s): the CPU-bound share then ends last
            os.nice(10)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """SmolLM2's tokenizer (from the default model's GGUF), saved as a plain HF tokenizer."""
    from transformers import AutoTokenizer

    from hogwild_ray.model.loader import default_checkpoint

    if os.environ.get("HOGWILD_TEST_TOKENIZER"):  # a saved copy, where the default model is not installed
        return Path(os.environ["HOGWILD_TEST_TOKENIZER"])
    ckpt = default_checkpoint()
    d = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(str(ckpt.directory), gguf_file=ckpt.gguf_file).save_pretrained(d)
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
def default_engine():
    import hogwild_ray as hw

    default_checkpoint_or_skip()
    return hw.HogwildEngine.from_pretrained()


@pytest.fixture(scope="session")
def default_hf_model():
    import torch
    from transformers import AutoModelForCausalLM

    ckpt = default_checkpoint_or_skip()
    return AutoModelForCausalLM.from_pretrained(
        str(ckpt.directory), gguf_file=ckpt.gguf_file, dtype=torch.float32
    ).eval()
