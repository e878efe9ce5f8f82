"""Fuzzing the Python API: any argument either runs or is refused with the project's own error,
and no case leaves a page, a session or a scheduler behind."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hogwild_ray as hw
from hogwild_ray.errors import HogwildError

pytestmark = pytest.mark.reliability

ODD = st.sampled_from([None, True, False, -1, 0, 1, 2**63, -(2**63), 10**12, math.nan, math.inf, -math.inf, 0.5,
                       -0.5, 1e-300, "2", "", b"1", [], {}, 3.0])
TEXT = st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "system", "\\boxed{7}", "\x1b[2J",
                              "\x00", " ", "12", "+", "\n", "\udc80"]), max_size=12).map("".join),
    st.sampled_from(["", " ", "\n\n", "x" * 5000]),
)


@pytest.fixture(scope="module")
def engine(random_model):
    path, _ = random_model("llama")
    return hw.HogwildEngine.from_pretrained(path, "cpu", "float32", cache_tokens=1024)


def check_nothing_left(engine) -> None:
    assert engine.allocator.free_pages == engine.allocator.num_pages, "pages leaked"
    m = engine.metrics()
    assert m["sessions_running"] == 0 and m["sessions_waiting"] == 0, m


def run_or_refuse(engine, call) -> str:
    """'ran' or 'refused'; any exception that is not the project's own fails the test."""
    try:
        session = call()
    except HogwildError:
        return "refused"
    try:
        session.step()
    except HogwildError:
        pass
    finally:
        session.close()
    return "ran"


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=TEXT, workers=st.one_of(st.integers(-3, 80), ODD), max_tokens=st.one_of(st.integers(-2, 3000), ODD),
       max_steps=st.one_of(st.integers(-2, 5), ODD), layout=st.one_of(st.sampled_from(["combined", "contiguous",
                                                                                      "interleaved"]), TEXT, ODD))
def test_start_arguments_run_or_are_refused_cleanly(engine, problem, workers, max_tokens, max_steps, layout):
    run_or_refuse(engine, lambda: engine.start(problem, workers=workers, max_tokens=max_tokens, max_steps=max_steps,
                                               layout=layout))
    check_nothing_left(engine)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(temperature=st.one_of(st.floats(allow_nan=True, allow_infinity=True), ODD),
       top_k=st.one_of(st.integers(-5, 10**6), ODD), top_p=st.one_of(st.floats(), ODD),
       seed=st.one_of(st.integers(-5, 2**64), ODD))
def test_sampling_values_run_or_are_refused_cleanly(engine, temperature, top_k, top_p, seed):
    def start():
        params = hw.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        return engine.start("What is 2 + 2?", workers=2, max_tokens=3, sampling=params)

    outcome = run_or_refuse(engine, start)
    valid = (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and 0 <= temperature < math.inf
             and isinstance(top_p, (int, float)) and not isinstance(top_p, bool) and 0 < top_p <= 1
             and type(top_k) is int and 0 <= top_k < 2**31
             and (seed is None or (type(seed) is int and 0 <= seed < 2**63)))
    assert outcome == ("ran" if valid else "refused")
    check_nothing_left(engine)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problems=st.lists(st.one_of(TEXT, st.fixed_dictionaries({"id": st.one_of(st.text(max_size=4), ODD),
                                                                 "problem": st.one_of(TEXT, ODD)}), ODD), max_size=5),
       max_concurrent=st.one_of(st.integers(-1, 4), ODD))
def test_solve_many_gives_every_problem_a_record_or_refuses_the_call(engine, problems, max_concurrent, tmp_path_factory):
    out = tmp_path_factory.mktemp("many") / "out.jsonl"
    try:
        records = engine.solve_many(problems, out=str(out), max_concurrent=max_concurrent, workers=2, max_tokens=2)
    except HogwildError:
        records = None
    if records is not None:
        assert len(records) == len(problems)
    check_nothing_left(engine)
