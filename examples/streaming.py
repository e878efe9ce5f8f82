"""Streaming: watch the workers write, event by event (the same events on the Ray backend).

Each event is a plain dataclass; `event.to_json()` is what you would send to a browser or a log.
"""

from __future__ import annotations

import argparse

import hogwild_ray as hw
from hogwild_ray.core.events import Answer, Done, StepFinished, WorkerText
from hogwild_ray.core.protocol import worker_name

PROBLEM = "A shop sells pens at $2 and notebooks at $5. Ann buys 3 pens and 2 notebooks. How much does she pay?"


def main(engine: hw.HogwildEngine | None = None, max_tokens: int = 64) -> hw.SolveResult:
    engine = engine or hw.HogwildEngine.from_pretrained()
    for event in engine.stream(PROBLEM, workers=2, max_tokens=max_tokens, sampling=hw.SamplingParams(temperature=0)):
        if isinstance(event, WorkerText):  # a worker's new text, as soon as it is decoded
            print(f"[{worker_name(event.worker)}] {event.text!r}")
        elif isinstance(event, StepFinished):  # a paragraph joins the history every worker reads
            print(f"== {worker_name(event.worker)} finished step {event.step_index}")
        elif isinstance(event, Answer):
            print(f"== answer found at step {event.step}: {event.text}")
        elif isinstance(event, Done):
            print("answer:", event.answer, "| stats:", event.to_json()["stats"])
            return event.result()
    raise AssertionError("a stream always ends with Done")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens each worker may generate (default: 64)")
    main(max_tokens=parser.parse_args().max_tokens)
