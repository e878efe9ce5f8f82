"""Shared fixtures: the default model's tokenizer, random-weight checkpoints, the real model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a fixed thread count: results must not depend on what else the machine runs (no thread governor)
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU interpreter in CI

from models import save_random_model  # noqa: E402


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
