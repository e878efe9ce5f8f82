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


@pytest.fixture(scope="session")
def default_engine():
    import hogwild_ray as hw

    return hw.HogwildEngine.from_pretrained()


@pytest.fixture(scope="session")
def default_hf_model():
    import torch
    from transformers import AutoModelForCausalLM

    from hogwild_ray.model.loader import default_checkpoint

    ckpt = default_checkpoint()
    return AutoModelForCausalLM.from_pretrained(
        str(ckpt.directory), gguf_file=ckpt.gguf_file, dtype=torch.float32
    ).eval()
