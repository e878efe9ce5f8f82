"""Quickstart: two workers of the built-in model solve one problem, sharing one KV cache."""

from __future__ import annotations

import argparse

import hogwild_ray as hw
from hogwild_ray.core.protocol import worker_name

PROBLEM = "Tom has 3 boxes with 12 apples each. He gives away 10 apples. How many apples does he have left?"


def main(engine: hw.HogwildEngine | None = None, max_tokens: int = 64) -> hw.SolveResult:
    engine = engine or hw.HogwildEngine.from_pretrained()  # SmolLM2-135M-Instruct; or a HF directory / .gguf file
    result = engine.solve(PROBLEM, workers=2, max_tokens=max_tokens,
                          sampling=hw.SamplingParams(temperature=0.6, top_p=0.95, seed=0))
    for w, text in enumerate(result.worker_texts):
        print(f"--- {worker_name(w)} ---\n{text}\n")
    print("answer:", result.answer)
    s = result.stats
    print(f"{s.forward_passes} forward passes in {s.seconds:.1f} s, {s.tokens_per_second:.1f} tokens/s, "
          f"stopped by: {s.stop_reason}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens each worker may generate (default: 64)")
    main(max_tokens=parser.parse_args().max_tokens)
