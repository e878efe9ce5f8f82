"""A batch of problems: one JSON line per result in a file; run it again and it resumes.

The same from the shell: `hogwild-ray batch --input problems.jsonl --output results.jsonl`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import hogwild_ray as hw

PROBLEMS = [
    {"id": "apples", "problem": "Tom has 3 boxes of 12 apples and gives away 10. How many are left?"},
    {"id": "train", "problem": "A train covers 180 km in 2 hours. What is its average speed in km/h?"},
    "What is 17 * 23?",  # a plain string gets its position (2) as id
]


def main(engine: hw.HogwildEngine | None = None, out: Path = Path("results.jsonl"), max_tokens: int = 64) -> list:
    engine = engine or hw.HogwildEngine.from_pretrained()
    records = engine.solve_many(PROBLEMS, out=out, workers=2, max_tokens=max_tokens,
                                sampling=hw.SamplingParams(temperature=0))
    for rec in records:
        print(f"{rec['id']}: {rec['answer']}")
    print(f"{len(out.read_text().splitlines())} results in {out}; first line:",
          json.dumps(json.loads(out.read_text().splitlines()[0]))[:120], "...")
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("results.jsonl"), help="results file (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens each worker may generate (default: 64)")
    args = parser.parse_args()
    main(out=args.out, max_tokens=args.max_tokens)
