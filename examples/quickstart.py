"""Quickstart: two workers of the built-in model solve one problem, sharing one KV cache."""

import argparse

import hogwild_ray as hw
from hogwild_ray.protocol import worker_name

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--max-tokens", type=int, default=64, help="tokens each worker may generate (default: 64)")
args = parser.parse_args()

engine = hw.HogwildEngine.from_pretrained()  # SmolLM2-135M-Instruct; or a local HF directory / .gguf file
problem = "Tom has 3 boxes with 12 apples each. He gives away 10 apples. How many apples does he have left?"
result = engine.solve(problem, workers=2, max_tokens=args.max_tokens,
                      sampling=hw.SamplingParams(temperature=0.6, top_p=0.95, seed=0))

for w, text in enumerate(result.worker_texts):
    print(f"--- {worker_name(w)} ---\n{text}\n")
print("answer:", result.answer)
s = result.stats
print(f"{s.forward_passes} forward passes in {s.seconds:.1f} s, {s.tokens_per_second:.1f} tokens/s, "
      f"stopped by: {s.stop_reason}")
