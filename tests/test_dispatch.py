"""The pure parts of running many problems over replicas: the dispatch window and its retries
(every item finishes exactly once, whatever dies when), the replica plan, the run's tally."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hogwild_ray.core.dispatch import Dispatch, RetriesExhausted
from hogwild_ray.core.replica_plan import plan_replicas
from hogwild_ray.core.tally import Tally
from hogwild_ray.errors import HogwildError, InvalidRequestError


@settings(max_examples=150, deadline=None)
@given(n=st.integers(0, 40), window=st.integers(1, 12), choices=st.lists(st.integers(0, 99), max_size=400))
def test_every_item_finishes_exactly_once_whatever_is_lost(n, window, choices):
    """Drive the dispatch with random outcomes: a call finishes, is lost, or answers late after it
    was counted as lost. No item is ever finished twice, the window is never exceeded, every
    loss is a retry, and the run ends with every item finished."""
    d = Dispatch(range(n), window, max_attempts=10_000)
    in_flight: list[int] = []
    finished: list[int] = []
    lost = 0
    late: list[int] = []
    choices = iter(choices)
    while not d.done:
        in_flight += d.next_items()
        assert len(d.in_flight) <= window and set(in_flight) == d.in_flight
        c = next(choices, 0)
        key = in_flight.pop(c % len(in_flight))
        if c % 4 == 3:  # its replica died: it runs again, and maybe answers late as well
            d.lose(key)
            lost += 1
            late.append(key)
        else:
            assert d.finish(key)
            finished.append(key)
        if late and c % 5 == 0:  # a late answer from a replica counted as lost
            key = late.pop()
            if key not in d.in_flight:
                assert not d.finish(key)
    assert sorted(finished) == list(range(n)) and d.retried == lost


def test_a_lost_item_goes_first_and_is_refused_after_max_attempts():
    d = Dispatch(["a", "b", "c"], window=1, max_attempts=2)
    assert d.next_items() == ["a"]
    d.lose("a")
    assert d.next_items() == ["a"] and d.retried == 1  # back at the front, before b
    with pytest.raises(RetriesExhausted, match="'a' was lost 2 times") as caught:
        d.lose("a")
    # a HogwildError: `hogwild-ray batch --replicas` shows it as one line naming what to do (a traceback before)
    assert isinstance(caught.value, HogwildError) and "\n" not in str(caught.value)
    assert "`ray logs`" in str(caught.value) and "--replicas" in str(caught.value)


def test_a_call_that_failed_on_its_replica_is_one_line_naming_the_replicas_error():
    from hogwild_ray.serve.pool import ReplicaFailedError, replica_failure

    traceback = ("ray::ServeReplica:app:HogwildEngine.handle_request() (pid=7, ip=10.0.0.2)\n"
                 "  File \"replica.py\", line 120, in solve\n    raise ValueError(x)\nValueError: bad options 3")
    error = replica_failure("q7", RuntimeError(traceback))
    assert isinstance(error, ReplicaFailedError) and isinstance(error, HogwildError)
    assert "'q7'" in str(error) and "ValueError: bad options 3" in str(error) and "\n" not in str(error)
    assert "TimeoutError: no answer" in str(replica_failure("q8", TimeoutError("no answer")))


def test_bad_windows_and_repeated_items_are_refused():
    with pytest.raises(ValueError, match="window"):
        Dispatch([1], 0)
    with pytest.raises(ValueError, match="twice"):
        Dispatch([1, 1], 2)


@pytest.mark.parametrize("asked, device, tp, gpus, cpus, want", [
    (None, "cpu", 1, 0, 8, 1),  # a laptop: one engine
    (3, "cpu", 1, 0, 8, 3),
    (None, "cuda", 1, 8, 64, 8),  # a replica per GPU
    (None, "cuda", 2, 8, 64, 4),  # a replica per tp GPUs
    (None, "cuda", 4, 6, 64, 1),
    (2, "cuda", 2, 8, 64, 2),
])
def test_the_replica_plan(asked, device, tp, gpus, cpus, want):
    assert plan_replicas(asked, device, tp, gpus, cpus) == want


@pytest.mark.parametrize("asked, device, tp, gpus, cpus, message", [
    (5, "cuda", 2, 8, 64, "replicas=5 with tp=2 needs 10 GPUs and the Ray cluster has 8; lower replicas to 4"),
    (None, "cuda", 4, 2, 64, "the Ray cluster has 2 GPU(s) and one engine replica with tp=4 needs 4"),
    (3, "cpu", 1, 0, 2, "replicas=3 needs 3 CPUs (one per replica) and the Ray cluster has 2"),
])
def test_a_plan_the_cluster_cannot_hold_is_a_clear_error(asked, device, tp, gpus, cpus, message):
    with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_replicas(asked, device, tp, gpus, cpus)


def test_the_tally_says_done_failed_retried_and_each_replicas_share():
    t = Tally(total=10, skipped=2)
    t.add(tokens=100, replica="b")
    t.add(failed=True, replica="a")
    t.add(tokens=50, replica="a")
    t.retried = 3
    assert t.count == 5
    assert t.status(10.0) == ("5/10 problems, 1 failed, 3 retried, 15.0 tokens/s; replica a: 2 (5.0 tokens/s), "
                              "replica b: 1 (10.0 tokens/s)")
