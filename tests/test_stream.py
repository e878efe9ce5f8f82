"""engine.stream(): event order and content, JSON round trips, solve built on it, the Ray engine's stream."""

from __future__ import annotations

import dataclasses
import json

import pytest

import hogwild_ray as hw
from hogwild_ray.events import Answer, Done, Progress, RedundancyCheck, StepFinished, WorkerText, from_json
from hogwild_ray.protocol import REDUNDANCY_QUESTION
from hogwild_ray.streaming import session_events

KW = dict(cache_tokens=2048, attention="torch")
GREEDY = hw.SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def llama(random_model):
    return random_model("llama", "default")


@pytest.fixture(scope="module")
def engine(llama):
    return hw.HogwildEngine.from_pretrained(llama[0], **KW)


class Steered:
    """A session whose step() feeds scripted interjections: random weights never end a step themselves."""

    def __init__(self, session, inject: dict[int, dict[int, str]]) -> None:
        self.session, self.inject, self.n = session, inject, 0

    def step(self):
        self.n += 1
        return self.session.step(inject=self.inject.get(self.n))

    def __getattr__(self, name):
        return getattr(self.session, name)


def texts_of(events, workers: int) -> list[str]:
    return ["".join(e.text for e in events if isinstance(e, WorkerText) and e.worker == w) for w in range(workers)]


def without_seconds(stats: hw.Stats) -> dict:
    return {k: v for k, v in dataclasses.asdict(stats).items() if k != "seconds"}


def test_event_order_and_content(engine):
    """Finished steps, the redundancy question and the answer appear as events, in order, and the
    workers' text pieces add up to their whole texts."""
    session = engine.start("Compute 3 + 4.", workers=2, max_tokens=64, sampling=GREEDY, redundancy_every=2)
    script = {3: {0: "First part done.\n\n"}, 8: {1: "So the sum is \\boxed{7}.\n\n"}}
    events = list(session_events(Steered(session, script)))

    assert isinstance(events[-1], Done) and sum(isinstance(e, Done) for e in events) == 1
    done = events[-1]
    assert done.answer == "7" and done.stats.stop_reason == "answer"
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.step for p in progress] == list(range(1, done.stats.forward_passes + 1))
    assert progress[-1].steps_per_worker == done.stats.steps_per_worker == [1, 1]
    # each step's events end with its Progress
    steps = [e.step for e in events[:-1]]
    assert steps == sorted(steps)
    for p in progress:
        last = max(i for i, e in enumerate(events[:-1]) if e.step == p.step)
        assert events[last] is p

    finished = [e for e in events if isinstance(e, StepFinished)]
    assert [(e.worker, e.step_index, e.step) for e in finished] == [(0, 1, 3), (1, 1, 8)]
    assert finished[0].text.startswith("**Alice [1]:** ") and finished[0].text.endswith("First part done.\n\n")
    assert finished[1].text.startswith("**Bob [1]:** ") and "\\boxed{7}" in finished[1].text
    checks = [e for e in events if isinstance(e, RedundancyCheck)]
    assert [(e.worker, e.step) for e in checks] == [(0, 4)] and checks[0].question == REDUNDANCY_QUESTION
    answers = [e for e in events if isinstance(e, Answer)]
    assert [(a.text, a.step) for a in answers] == [("7", 8)]
    assert events.index(answers[0]) > events.index(finished[1])

    assert texts_of(events, 2) == done.worker_texts
    assert engine.allocator.free_pages == engine.allocator.num_pages


def test_solve_is_the_stream_consumed(engine):
    """A greedy solve gives the texts, answer and stats of the same request's stream."""
    ask = dict(workers=2, max_tokens=12, sampling=GREEDY)
    result = engine.solve("Compute 2 + 2.", **ask)
    events = list(engine.stream("Compute 2 + 2.", **ask))
    done = events[-1]
    assert isinstance(done, Done)
    assert texts_of(events, 2) == done.worker_texts == result.worker_texts
    assert (done.answer, done.transcript) == (result.answer, result.transcript)
    assert without_seconds(done.stats) == without_seconds(result.stats)
    assert result.stats.stop_reason.startswith("budget")  # random weights: the budget ends it, then the finisher


def test_events_round_trip_through_json(engine):
    events = list(engine.stream("Compute 5 - 1.", workers=2, max_tokens=4, sampling=GREEDY))
    kinds = {e.kind for e in events}
    assert {"worker_text", "progress", "done"} <= kinds
    for e in events:
        line = json.dumps(e.to_json())
        assert json.loads(line)["kind"] == e.kind
        assert from_json(line) == e
    with pytest.raises(hw.InvalidRequestError, match="kind 'nope'"):
        from_json({"kind": "nope"})


def test_leaving_early_frees_the_session(engine):
    for event in engine.stream("Compute 1 + 1.", workers=3, max_tokens=50):
        if isinstance(event, Progress) and event.step == 2:
            break
    assert engine.allocator.free_pages == engine.allocator.num_pages


def test_bad_request_fails_at_the_first_event(engine):
    events = engine.stream("   ", workers=2)
    with pytest.raises(hw.InvalidRequestError, match="problem"):
        next(events)


class TestRayEngine:
    """The Ray engine streams through its session proxy the events the local engine streams."""

    @pytest.fixture(scope="class")
    def ray_engine(self, llama):
        ray = pytest.importorskip("ray")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        engine = hw.HogwildEngine.from_pretrained(llama[0], backend="ray", tp=1, **KW)
        yield engine
        engine.close()
        ray.shutdown()

    def test_stream_and_solve_match_the_local_engine(self, engine, ray_engine):
        ask = dict(workers=2, max_tokens=10, sampling=GREEDY)
        local = list(engine.stream("Compute 6 * 7.", **ask))
        remote = list(ray_engine.stream("Compute 6 * 7.", **ask))

        def strip(e):
            return dataclasses.replace(e, seconds=0.0) if isinstance(e, Progress) else e

        assert [strip(e) for e in remote[:-1]] == [strip(e) for e in local[:-1]]
        solved = ray_engine.solve("Compute 6 * 7.", **ask)  # the coordinator's one-call loop
        for done in (remote[-1], local[-1]):
            assert (solved.answer, solved.worker_texts, solved.transcript) == \
                (done.answer, done.worker_texts, done.transcript)
            assert without_seconds(solved.stats) == without_seconds(done.stats)
