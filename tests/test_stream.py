"""engine.stream(): event order and content, JSON round trips, solve built on it, the Ray engine's stream."""

from __future__ import annotations

import dataclasses
import json

import pytest
from dictation import dictate

import hogwild_ray as hw
from hogwild_ray.core.events import Answer, Done, Progress, RedundancyCheck, StepFinished, WorkerText, from_json
from hogwild_ray.core.protocol import REDUNDANCY_QUESTION
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


def test_event_order_and_content(engine, monkeypatch):
    """Finished steps, the redundancy question and the answer appear as events, in order, and the
    workers' text pieces add up to their whole texts."""
    session = engine.start("Compute 3 + 4.", workers=2, max_tokens=64, sampling=GREEDY, redundancy_every=2)
    answer = "So the sum is \\boxed{7}.\n\n"
    dictate(monkeypatch, session, 1, answer)  # Bob writes it himself (an injected box is no answer)
    # Bob samples its n tokens in passes 1 .. n, each fed the pass after: the last one, the
    # paragraph break, is fed in pass n + 1, which finishes his step 1 with the answer
    end = len(session.encode(answer)) + 1
    assert end > 4  # after Alice's finished step (pass 3) and her redundancy question (pass 4)
    events = list(session_events(Steered(session, {3: {0: "First part done.\n\n"}})))

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
    assert [(e.worker, e.step_index, e.step) for e in finished] == [(0, 1, 3), (1, 1, end)]
    assert finished[0].text.startswith("**Alice [1]:** ") and finished[0].text.endswith("First part done.\n\n")
    assert finished[1].text.startswith("**Bob [1]:** ") and finished[1].text.endswith(answer)
    checks = [e for e in events if isinstance(e, RedundancyCheck)]
    assert [(e.worker, e.step) for e in checks] == [(0, 4)] and checks[0].question == REDUNDANCY_QUESTION
    answers = [e for e in events if isinstance(e, Answer)]
    assert [(a.text, a.step) for a in answers] == [("7", end)]
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


def pane_titles(view) -> list[str]:
    """The panes' titles as the live view renders them (plain text, no terminal needed)."""
    from io import StringIO

    from rich.console import Console

    console = Console(file=StringIO(), width=200, height=60, color_system=None)
    view.console = console
    console.print(view.render())
    lines = console.file.getvalue().splitlines()
    return [next(line for line in lines if f" {name} · " in line) for name in ("Alice", "Bob")[: len(view.texts)]]


def test_live_view_counts_steps_as_the_text_numbers_them():
    """A pane says `step k` while the text shows `**Name [k]:**` (the step being written), and how
    many steps finished; a header a worker writes inside its step does not move the count."""
    from io import StringIO

    from rich.console import Console

    from hogwild_ray.ui import LiveView

    view = LiveView(2, Console(file=StringIO()))
    assert not view.enabled  # not a terminal: nothing is drawn, the state is kept

    def progress(n, finished):
        return Progress(n, [n, n], finished, ["active", "active"], 1.0)

    for e in (WorkerText(0, 1, "**Alice [1]:** Hi"), WorkerText(1, 1, "**Bob [1]:** Yo"), progress(1, [0, 0])):
        view.feed(e)
    alice, bob = pane_titles(view)
    assert "Alice · step 1 (0 done) · 1 tok" in alice and "Bob · step 1 (0 done) · 1 tok" in bob
    # Bob ends step 1 with a header of his own (the protocol's next one comes a pass later),
    # Alice writes the next header's exact text inside her step 1
    for e in (WorkerText(0, 2, " then **Alice [2]:**"), WorkerText(1, 2, ", done.\n**Bob [7]:**"),
              StepFinished(1, 1, "**Bob [1]:** Yo, done.\n**Bob [7]:**", 2), progress(2, [0, 1])):
        view.feed(e)
    alice, bob = pane_titles(view)
    assert "Alice · step 1 (0 done)" in alice and "Bob · step 1 (1 done)" in bob
    for e in (WorkerText(1, 3, "**Bob [2]:** Next"), progress(3, [0, 1])):
        view.feed(e)
    assert "Bob · step 2 (1 done) · 3 tok" in pane_titles(view)[1]
    view.feed(Done(None, [view.texts[0], view.texts[1]], "", hw.Stats(stop_reason="budget")))
    assert "step 2 (1 done)" in pane_titles(view)[1]

    plain = LiveView(1, Console(file=StringIO()))  # without the protocol there are no steps to count
    plain.feed(WorkerText(0, 1, "2 + 3 = 5"))
    plain.feed(Progress(1, [1], [0], ["active"], 1.0))
    assert "step" not in pane_titles(plain)[0] and "done" not in pane_titles(plain)[0]


def test_live_view_follows_a_session(engine):
    """Fed a real session's events, each pane's step is the last header its text shows."""
    import re
    from io import StringIO

    from rich.console import Console

    from hogwild_ray.ui import LiveView

    session = engine.start("Compute 3 + 4.", workers=2, max_tokens=24, sampling=GREEDY, finisher=False)
    script = {3: {0: "First part done.\n\n"}, 6: {0: "Second part.\n\n", 1: "Checked.\n\n"}}
    view = LiveView(2, Console(file=StringIO()))
    for event in session_events(Steered(session, script)):
        view.feed(event)
    done = event
    for w, (name, title) in enumerate(zip(("Alice", "Bob"), pane_titles(view))):
        shown = int(re.findall(rf"\*\*{name} \[(\d+)\]:\*\* ", done.worker_texts[w])[-1])
        finished = done.stats.steps_per_worker[w]
        assert shown == finished + 1 and f"{name} · step {shown} ({finished} done)" in title
    assert done.stats.steps_per_worker == [2, 1]


@pytest.fixture(scope="class")
def ray_engine(llama):
    """One Ray engine for the class below (a fixture of its own: pytest retires class-scoped fixture methods)."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    engine = hw.HogwildEngine.from_pretrained(llama[0], backend="ray", tp=1, **KW)
    yield engine
    engine.close()
    ray.shutdown()


class TestRayEngine:
    """The Ray engine streams through its session proxy the events the local engine streams."""

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
