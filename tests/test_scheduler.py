"""Many sessions per forward pass: first-come-first-served admission by page reservations (pure,
property-based), then the scheduler on a real tiny engine: random arrivals of problems of
different shapes all end with Done, reservations cover what the sessions really hold, the
pool comes back whole, the pass counters add up, an impossible request is refused while the
others finish, and `engine.step` / leaving `stream_many` early behave.
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import hogwild_ray as hw
from hogwild_ray.core.events import Done, Error, Progress
from hogwild_ray.core.layout import LAYOUTS
from hogwild_ray.core.scheduling import Admission, session_pages, take_chunks
from hogwild_ray.errors import CacheFullError, InvalidRequestError
from hogwild_ray.scheduler import Failed, Finished, Scheduler
from hogwild_ray.streaming import event_job

GREEDY = hw.SamplingParams(temperature=0)
PROBLEMS = ["Compute 3 + 4.", "What is 12 * 7?", "Name a prime above 10.", "Is 91 prime?", "Sum 1..5."]


# ---- pure: admission, prompt chunks, page bounds ----------------------------------------------

OPS = st.lists(st.one_of(
    st.tuples(st.just("submit"), st.integers(0, 40)),  # pages; above the capacity now and then
    st.tuples(st.just("finish"), st.integers(0, 99)),  # which running request ends
    st.tuples(st.just("drop"), st.integers(0, 99)),  # which request leaves, waiting or running
    st.tuples(st.just("admit"), st.just(0)),
), max_size=60)


def check_admission(adm: Admission, eligible: list[str], admitted: list[str], pages: dict[str, int]) -> None:
    """The invariants after any admit(): capacity and the cap hold, admission so far is exactly the
    arrival order, the queue is the rest in order, and admit() stopped only where it had to."""
    assert adm.reserved <= adm.capacity
    assert adm.max_running is None or len(adm.running) <= adm.max_running
    assert admitted == eligible[:len(admitted)], "admitted out of arrival order"
    assert [w.key for w in adm.queue] == eligible[len(admitted):]
    assert adm.running == {k: pages[k] for k in adm.running}
    if adm.queue:  # the head waits only when the cap or the pages forbid it
        full = adm.max_running is not None and len(adm.running) >= adm.max_running
        assert full or adm.reserved + adm.queue[0].pages > adm.capacity


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(1, 30), page_size=st.sampled_from([1, 8, 16]),
       max_running=st.none() | st.integers(1, 4), ops=OPS)
def test_admission_is_fcfs_bounded_and_never_starves(capacity, page_size, max_running, ops):
    """Random submits (some too big for the pool), finishes, drops and admits, then a drain in
    which the oldest running request ends at a time: nobody waits for ever."""
    adm: Admission[str] = Admission(capacity, page_size, max_running)
    accepted, admitted, gone_waiting, pages = [], [], set(), {}

    def eligible() -> list[str]:
        return [k for k in accepted if k not in gone_waiting]

    for i, (op, x) in enumerate(ops):
        if op == "submit":
            key = f"r{i}"
            if x > capacity:  # refused at once, naming both sizes, and not queued
                with pytest.raises(CacheFullError, match=rf"{x} pages \({x * page_size} tokens.*{capacity} pages"):
                    adm.submit(key, x)
                assert all(w.key != key for w in adm.queue)
            else:
                adm.submit(key, x)
                accepted.append(key)
                pages[key] = x
            assert key not in adm.running  # submit queues; only admit() starts
        elif op == "finish" and adm.running:
            adm.finish(list(adm.running)[x % len(adm.running)])
        elif op == "drop" and accepted:
            key = accepted[x % len(accepted)]
            if any(w.key == key for w in adm.queue):
                gone_waiting.add(key)
            adm.drop(key)
            assert key not in adm.running and all(w.key != key for w in adm.queue)
        elif op == "admit":
            before, fits = len(admitted), adm.head_fits()  # what the scheduler asks before admitting
            admitted += adm.admit()
            assert fits == (len(admitted) > before)
            check_admission(adm, eligible(), admitted, pages)
    # drain: the oldest running request ends, one at a time; every waiting one gets its turn
    for _ in range(2 * len(accepted) + 2):
        admitted += adm.admit()
        check_admission(adm, eligible(), admitted, pages)
        if not adm.queue and not adm.running:
            break
        if adm.running:
            adm.finish(next(iter(adm.running)))
    assert not adm.queue and not adm.running and adm.reserved == 0, "a request was left waiting (deadlock)"
    assert admitted == eligible() and len(set(admitted)) == len(admitted)


def test_the_head_is_never_overtaken():
    """A big request at the head waits for room; a small one behind it that would fit waits too."""
    adm: Admission[str] = Admission(10, 16)
    adm.submit("a", 6)
    assert adm.admit() == ["a"]
    adm.submit("big", 5)
    adm.submit("small", 1)
    assert adm.admit() == [] and adm.reserved == 6
    adm.finish("a")
    assert adm.admit() == ["big", "small"] and adm.reserved == 6


@given(entries=st.lists(st.tuples(st.sampled_from(["common", "hdr_others", "hdr_own"]),
                                  st.lists(st.integers(0, 9), min_size=1, max_size=20)), max_size=4),
       budget=st.integers(0, 50))
def test_take_chunks_takes_the_front_in_order_within_budget(entries, budget):
    queue = [(b, list(ids)) for b, ids in entries]
    flat = [(b, t) for b, ids in entries for t in ids]
    taken = take_chunks(queue, budget)
    got = [(b, t) for b, ids in taken for t in ids]
    assert got + [(b, t) for b, ids in queue for t in ids] == flat  # nothing lost, nothing reordered
    assert len(got) == min(budget, len(flat))
    assert all(isinstance(ids, tuple) and ids for _, ids in taken)
    assert [b for b, _ in taken] == [b for b, _ in entries][:len(taken)]  # one part per entry
    assert all(list(ids) == entries[i][1] for i, (_, ids) in enumerate(taken[:-1]))  # split at most the last
    if budget:  # repeated passes drain the queue in ceil(total / budget) of them
        rest = [(b, list(ids)) for b, ids in entries]
        calls = 0
        while rest:
            take_chunks(rest, budget)
            calls += 1
        assert calls == math.ceil(len(flat) / budget)


@given(kind=st.sampled_from(LAYOUTS), workers=st.integers(1, 16), prompt=st.integers(1, 4000),
       max_tokens=st.none() | st.integers(1, 5000), context=st.integers(64, 8192),
       page_size=st.sampled_from([1, 8, 16, 64]), forced=st.integers(0, 200))
def test_session_pages_grow_with_every_request_size(kind, workers, prompt, max_tokens, context, page_size, forced):
    """The reservation is monotone in what a request asks for, None bounds every max_tokens,
    it holds the prompt, and forced-answer forks only add."""
    assume(prompt < context)  # a longer prompt is refused before any reservation (ContextLengthError)
    n = session_pages(kind, workers, prompt, max_tokens, context, page_size, forced)
    assert n >= math.ceil(prompt / page_size) + workers
    assert session_pages(kind, workers + 1, prompt, max_tokens, context, page_size, forced) >= n
    assert session_pages(kind, workers, prompt + 100, max_tokens, context, page_size, forced) >= n
    assert session_pages(kind, workers, prompt, None, context, page_size, forced) >= n
    assert session_pages(kind, workers, prompt, max_tokens, context, page_size, forced + 10) >= n
    assert session_pages(kind, workers, prompt, max_tokens, context, page_size, 0) <= n
    if max_tokens is not None:
        assert session_pages(kind, workers, prompt, max_tokens + 7, context, page_size, forced) >= n
    if kind != "interleaved":  # one view holds every worker: never more than the interleaved bound
        assert n <= session_pages("interleaved", workers, prompt, max_tokens, context, page_size, forced)


# ---- a real tiny engine --------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(random_model):
    """A random Llama with a small pool (128 pages of 16): two to four small requests fit at once.
    Every executor pass is recorded (sessions in it, prompt-chunk parts, decode parts, rows)."""
    path, _ = random_model("llama")
    eng = hw.HogwildEngine.from_pretrained(path, "cpu", "float32", cache_tokens=2048, attention="torch")
    eng.passes = []
    real = eng.executor.run

    def run(passes, while_running=None):
        eng.passes.append(dict(sessions=len(passes), prefill=sum(bool(p.prefill) for p in passes),
                               decode=sum(bool(p.fed) for p in passes), rows=sum(p.rows for p in passes),
                               prompt_tokens=sum(len(ids) for p in passes for _, ids in p.prefill)))
        return real(passes, while_running)

    eng.executor.run = run
    return eng


def totals(engine) -> dict:
    """Pass counters as totals (the metrics give means)."""
    m = engine.metrics()
    return dict(passes=m["passes"], rows=round(m["rows_per_pass"] * m["passes"]),
                sessions=round(m["sessions_per_pass"] * m["passes"]), generated=m["tokens_generated"],
                prompt=m["prompt_tokens"])


def used(engine) -> int:
    return engine.allocator.num_pages - engine.allocator.free_pages


REQUEST = st.fixed_dictionaries(dict(
    workers=st.integers(1, 3), layout=st.sampled_from(LAYOUTS), max_tokens=st.integers(1, 8),
    protocol=st.booleans(), greedy=st.booleans(), arrival=st.integers(0, 8)))


def options(spec: dict, seed: int) -> dict:
    sampling = GREEDY if spec["greedy"] else hw.SamplingParams(temperature=1.0, top_k=50, seed=seed)
    return dict(layout=spec["layout"], max_tokens=spec["max_tokens"], protocol=spec["protocol"], sampling=sampling)


@settings(max_examples=10, deadline=None)
@given(requests=st.lists(REQUEST, min_size=2, max_size=5), max_concurrent=st.none() | st.integers(1, 3),
       impossible=st.booleans())
def test_random_arrivals_all_finish_within_their_reservations(engine, requests, max_concurrent, impossible):
    """Arrivals while others run (in passes since the start); FCFS admission; at every event the
    pages in use stay within the running requests' reservations and the cap holds; every request
    ends with Done and then Finished; the pool comes back whole and the counters add up."""
    start_free, before, first_pass = engine.allocator.free_pages, totals(engine), len(engine.passes)
    sched = Scheduler(engine, max_concurrent, prefill_chunk=64)
    admitted, sessions, items = [], {}, defaultdict(list)
    pending = sorted(enumerate(requests), key=lambda kv: kv[1]["arrival"])
    submitted, most_running = [], 0

    def starter(key: int, spec: dict):
        def start():
            admitted.append(key)
            s = engine.start(PROBLEMS[key % len(PROBLEMS)], spec["workers"], write_prompt=False,
                             **options(spec, key))
            sessions[key] = s
            return event_job(s)
        return start

    def submit(key: int, spec: dict) -> None:
        pages = engine.request_pages(PROBLEMS[key % len(PROBLEMS)], spec["workers"], layout=spec["layout"],
                                     max_tokens=spec["max_tokens"], protocol=spec["protocol"])
        sched.submit(key, starter(key, spec), pages)
        submitted.append(key)

    if impossible:  # could never fit in the pool: refused at once, the queue unchanged
        with pytest.raises(CacheFullError, match=r"pages .* the cache has \d+ pages"):
            sched.submit("huge", starter(-1, {}), engine.request_pages(PROBLEMS[0], 3, max_tokens=4000))
        assert sched.waiting == 0 and not sched.running
    while pending or sched.running or sched.waiting:
        if not (sched.running or sched.waiting):  # idle until the next arrival
            submit(*pending.pop(0))
        for key, item in sched:
            items[key].append(item)
            while pending and pending[0][1]["arrival"] <= len(engine.passes) - first_pass:
                submit(*pending.pop(0))
            assert used(engine) - (engine.allocator.num_pages - start_free) <= sched.admission.reserved
            assert max_concurrent is None or len(sched.running) <= max_concurrent
            most_running = max(most_running, len(sched.running))
    assert admitted == submitted, "admission order must be arrival order"
    for key in submitted:
        kinds = [type(x) for x in items[key]]
        assert kinds.count(Done) == 1 and kinds[-2:] == [Done, Finished], (key, kinds)
        assert not any(isinstance(x, Failed) for x in items[key])
        assert items[key][-2].stats.forward_passes >= 1
    assert engine.allocator.free_pages == start_free
    ours = engine.passes[first_pass:]
    after = totals(engine)
    assert after["passes"] - before["passes"] == len(ours)
    assert after["rows"] - before["rows"] == sum(p["rows"] for p in ours)
    assert after["sessions"] - before["sessions"] == sum(p["sessions"] for p in ours)
    assert after["generated"] - before["generated"] == sum(
        sum(x[-2].stats.generated_per_worker) for x in items.values())
    assert after["prompt"] - before["prompt"] >= sum(len(s.prompt_ids) - 1 for s in sessions.values())
    assert max(p["sessions"] for p in ours) <= (max_concurrent or len(requests))
    assert max(p["prompt_tokens"] for p in ours) <= 64  # newcomers share one prompt budget a pass
    if most_running >= 2:  # sessions that run at the same time share passes
        assert max(p["sessions"] for p in ours) >= 2
    if max_concurrent == 1:
        assert all(p["sessions"] == 1 for p in ours)


def long_problem(engine, capacity: int) -> str:
    """A problem that fits the context but whose reservation could never fit the pool."""
    text = "Add up the apples: " + " ".join(["apple"] * 1700)
    assert engine.request_pages(text, 2, max_tokens=6) > capacity  # no ContextLengthError either
    return text


def test_stream_many_refuses_the_impossible_and_batches_the_rest(engine):
    """One problem that could never fit: one Error event (CacheFullError) at once; the three others
    run together (decode passes of six rows, two per session) and end with Done."""
    start_free, first_pass, before = engine.allocator.free_pages, len(engine.passes), totals(engine)
    problems = [PROBLEMS[0], long_problem(engine, engine.allocator.num_pages), PROBLEMS[1], PROBLEMS[2]]
    events = list(engine.stream_many(problems, workers=2, max_tokens=6, sampling=GREEDY, protocol=False))
    assert isinstance(events[0][1], Error) and events[0][0] == 1
    assert events[0][1].error == "CacheFullError" and "pages" in events[0][1].message
    assert [pid for pid, e in events if isinstance(e, Error)] == [1]
    done = {pid: e for pid, e in events if isinstance(e, Done)}
    assert sorted(done) == [0, 2, 3] and all(d.stats.generated_per_worker == [6, 6] for d in done.values())
    ours = engine.passes[first_pass:]
    assert any(p["decode"] == 3 and p["rows"] == 6 for p in ours), ours
    m, after = engine.metrics(), totals(engine)
    assert m["sessions_per_pass"] > 0 and after["sessions"] - before["sessions"] > after["passes"] - before["passes"]
    assert after["generated"] - before["generated"] == 3 * 2 * 6
    assert m["sessions_running"] == m["sessions_waiting"] == 0 and not engine.schedulers
    assert engine.allocator.free_pages == start_free


def test_metrics_count_running_and_waiting(engine):
    """max_concurrent=1: while the first runs the others wait, and metrics() says so."""
    seen = set()
    for pid, event in engine.stream_many(PROBLEMS[:3], workers=2, max_concurrent=1, max_tokens=3, sampling=GREEDY):
        m = engine.metrics()
        seen.add((pid, m["sessions_running"], m["sessions_waiting"]))
        assert m["pages_used"] == used(engine) and m["pages_used"] + m["pages_free"] == m["pages_total"]
    assert {(0, 1, 2), (1, 1, 1), (2, 1, 0)} <= seen
    assert engine.metrics()["sessions_running"] == 0 and not engine.schedulers


def test_leaving_stream_many_early_frees_every_page(engine):
    """A consumer that stops reading (two running, three waiting) must not strand their pages."""
    start_free = engine.allocator.free_pages
    running = 0
    for _, event in engine.stream_many(PROBLEMS, workers=2, max_concurrent=2, max_tokens=50):
        if isinstance(event, Progress):
            running = engine.metrics()["sessions_running"]
            assert used(engine) > 0 and engine.metrics()["sessions_waiting"] == 3
            break  # the generator is dropped here: its scheduler closes every job
    assert running == 2
    assert engine.allocator.free_pages == start_free and not engine.schedulers
    assert engine.metrics()["sessions_running"] == 0


def test_forced_answers_share_a_schedulers_passes(engine):
    """force_answers as a job beside another problem's job: the same answers as alone, and the
    forked session's pages go back while its parent keeps its own."""
    start_free = engine.allocator.free_pages
    parent = engine.start(PROBLEMS[3], 3, max_tokens=40, sampling=hw.SamplingParams(temperature=1.0, seed=4),
                          finisher_tokens=6)
    for _ in range(5):
        parent.step()
    held, first_pass = used(engine), len(engine.passes)
    sched = Scheduler(engine)
    sched.submit("force", lambda: parent.forced_answers_job([0, 2]), 40)
    sched.submit("other", lambda: event_job(engine.start(PROBLEMS[4], 2, write_prompt=False, max_tokens=8,
                                                         sampling=GREEDY)), 40)
    ends = {key: item for key, item in sched if isinstance(item, (Finished, Failed))}
    assert isinstance(ends["force"], Finished) and isinstance(ends["other"], Finished)
    assert any(p["sessions"] == 2 and p["decode"] >= 1 for p in engine.passes[first_pass:])
    assert used(engine) == held
    answers = ends["force"].value
    assert len(answers) == 2 and any(answers)
    assert answers == parent.force_answers([0, 2])  # the same alone; the fork left the parent as it was
    parent.close()
    assert engine.allocator.free_pages == start_free


def test_cancel_gives_a_running_jobs_pages_and_reservation_back(engine):
    """Cancelling a running request closes its session at once; its reservation admits the
    next request and the others finish."""
    start_free = engine.allocator.free_pages
    sched = Scheduler(engine, max_concurrent=2)
    sessions = {}

    def starter(key):
        def start():
            sessions[key] = engine.start(PROBLEMS[key], 2, write_prompt=False, max_tokens=30, sampling=GREEDY)
            return event_job(sessions[key])
        return start

    for key in range(3):
        sched.submit(key, starter(key), engine.request_pages(PROBLEMS[key], 2, max_tokens=30))
    ends, cancelled = {}, False
    for key, item in sched:
        if isinstance(item, Progress) and key == 0 and item.step == 2:
            held, reserved = used(engine), sched.admission.reserved
            sched.cancel(1)
            cancelled = True
            assert sessions[1].done and used(engine) < held and sched.admission.reserved < reserved
            assert sched.waiting == 1 and 1 not in sched.running
        if isinstance(item, (Finished, Failed)):
            ends[key] = item
    assert cancelled and sorted(ends) == [0, 2] and all(isinstance(e, Finished) for e in ends.values())
    assert engine.allocator.free_pages == start_free


# ---- engine.step -----------------------------------------------------------------------------

def twins(engine):
    """Two different sessions, each opened twice: one copy steps in shared passes, one alone."""
    def make():
        return (engine.start(PROBLEMS[0], 2, max_tokens=20, sampling=GREEDY),
                engine.start(PROBLEMS[1], 3, layout="interleaved", protocol=False, max_tokens=20,
                             sampling=hw.SamplingParams(temperature=0.8, seed=2)),
                engine.start(PROBLEMS[2], 2, write_prompt=False, layout="contiguous", max_tokens=20,
                             sampling=GREEDY))
    return make(), make()


def test_engine_step_gives_each_session_its_own_tokens(engine):
    """engine.step([...]) is one pass for all: each session's tokens are those of its own step()."""
    start_free = engine.allocator.free_pages
    (a, b, c), (a1, b1, c1) = twins(engine)
    assert c.prefilling
    out = engine.step([a, b, c])
    assert list(out) == [a, b, c] and [sorted(out[s]) for s in (a, b, c)] == [[0, 1], [0, 1, 2], [0, 1]]
    assert out[c] == {0: [], 1: []} and not c.prefilling  # its pass wrote its prompt
    assert out[a] == a1.step() and out[b] == b1.step() and c1.step() == out[c]
    compared = 0
    for _ in range(6):
        out = engine.step([a, b, c])
        for s, alone in ((a, a1), (b, b1), (c, c1)):
            want = alone.step()
            assert out[s] == want
            compared += sum(len(t) for t in want.values())
    assert compared >= 6 * 7  # every worker got tokens in every pass
    for s in (a, b, c, a1, b1, c1):
        s.close()
    assert engine.allocator.free_pages == start_free


def test_engine_step_refuses_a_session_twice_or_two_engines(engine, random_model):
    """Both are caller mistakes that would corrupt a pass: refused before anything runs."""
    start_free = engine.allocator.free_pages
    a = engine.start(PROBLEMS[0], 2, max_tokens=5, sampling=GREEDY)
    b = engine.start(PROBLEMS[1], 2, max_tokens=5, sampling=GREEDY)
    with pytest.raises(InvalidRequestError, match="listed twice"):
        engine.step([a, b, a])
    other = hw.HogwildEngine.from_pretrained(random_model("llama")[0], "cpu", "float32", cache_tokens=1024,
                                             attention="torch")
    c = other.start(PROBLEMS[2], 2, max_tokens=5, sampling=GREEDY)
    for mixed in ([a, c], [c, b]):
        with pytest.raises(InvalidRequestError, match="different engines"):
            engine.step(mixed)
    done = engine.start(PROBLEMS[3], 1, max_tokens=5, sampling=GREEDY)
    done.close()
    with pytest.raises(InvalidRequestError, match="done"):
        engine.step([a, done])
    assert [s.stats.forward_passes for s in (a, b, c)] == [0, 0, 0]  # nothing ran
    assert list(engine.step([b, a])) == [b, a] and a.stats.forward_passes == b.stats.forward_passes == 1
    for s in (a, b, c):
        s.close()
    assert engine.allocator.free_pages == start_free and other.allocator.free_pages == other.allocator.num_pages


def test_unique_request_keys():
    """A key queued twice is a caller's bug: refused before it can shadow the first."""
    class Pool:
        free_pages, page_size = 10, 16

    sched = Scheduler(type("E", (), {"allocator": Pool()})())
    sched.submit("k", lambda: iter(()), 1)
    with pytest.raises(ValueError, match="already queued"):
        sched.submit("k", lambda: iter(()), 1)


def test_a_request_that_outgrows_its_reservation_holds_back_the_next():
    """Reservations follow real use: a session past its reservation keeps newcomers waiting, and
    a newcomer must also fit the pool's free pages beyond what the running ones may still take."""
    adm = Admission(100, 16)
    adm.submit("a", 40)
    adm.submit("b", 40)
    adm.submit("c", 30)
    assert adm.admit() == ["a", "b"]
    adm.grow("a", 70)  # many short steps: a holds more than it asked for
    assert adm.reserved == 110 and adm.admit() == []
    adm.grow("a", 50)  # a reservation never shrinks while it runs
    assert adm.running["a"] == 70
    adm.finish("a")
    assert adm.admit(free_pages=20) == []  # pages held elsewhere: c waits although reservations allow it
    assert adm.admit(free_pages=30) == ["c"]
