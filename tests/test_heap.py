"""Runs of passes keep the collector off the objects that were alive when they began."""

from __future__ import annotations

import gc
import threading

import hogwild_ray as hw
from hogwild_ray import heap


def test_a_run_freezes_the_heap_and_the_last_run_puts_it_back():
    assert gc.get_freeze_count() == 0
    with heap.settled():
        frozen = gc.get_freeze_count()
        assert frozen > 0
        with heap.settled():  # a run inside a run (or on another thread) changes nothing
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen
    assert gc.get_freeze_count() == 0


def test_runs_on_two_threads_put_it_back_once_both_end():
    inside, leave = threading.Event(), threading.Event()

    def other_run():
        with heap.settled():
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=other_run)
    thread.start()
    assert inside.wait(10)
    with heap.settled():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() > 0  # the other run goes on
    leave.set()
    thread.join(10)
    assert gc.get_freeze_count() == 0


def test_a_heap_the_process_froze_itself_is_left_frozen():
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with heap.settled():
            pass
        # still frozen; frozen objects may be freed meanwhile (other threads run), never put back
        assert 0 < gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()


def test_a_session_run_and_a_scheduled_run_are_settled(random_model):
    """stream() and stream_many() run their passes with the heap frozen, and put it back at
    their end, or when the caller stops early."""
    path, _ = random_model("llama")
    engine = hw.HogwildEngine.from_pretrained(path, "cpu", "float32", cache_tokens=2048, attention="torch")
    events = engine.stream("What is 2 + 3?", workers=2, max_tokens=4)
    next(events)
    assert gc.get_freeze_count() > 0
    for _ in events:
        pass
    assert gc.get_freeze_count() == 0
    many = engine.stream_many(["What is 2 + 3?", "What is 4 + 5?"], workers=2, max_tokens=4)
    next(many)
    assert gc.get_freeze_count() > 0
    many.close()  # stopped early
    assert gc.get_freeze_count() == 0
