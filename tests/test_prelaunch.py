"""A pass launched before the sessions ask for it changes nothing (fp32; CPU, and GPU with CUDA graphs).

The in-process executor launches the next pass as soon as the current one's samples are
read, when every session of the pass foresaw it (LocalExecutor.run); it is used only if the
sessions then ask for exactly it, and dropped otherwise. Here the same schedule of several
sessions runs with that on and off: steps that end (a header fed next, its pass launched
ahead), an end of text, max_tokens, an injection, a fork and a close, and every pass's
tokens, the last logits (bit for bit), the transcripts and the draw counts must be the same.
"""

from __future__ import annotations

import pytest
import torch

import hogwild_ray as hw
from hogwild_ray.core.events import Done, WorkerText
from hogwild_ray.scheduler import Scheduler
from hogwild_ray.session import run_pass
from hogwild_ray.streaming import event_job

PERIOD = 14  # a worker's step ends about every PERIOD tokens of its block
EOS_AT = ("C", 1, 212)  # session C's worker 1 samples the end of text once its view passes 212 tokens
PASSES = 30
# pass -> what happens before it: ("inject", session, {worker: text}), ("fork", session, name), ("close", session)
EVENTS = {7: ("inject", "A", {0: "Let me check."}), 11: ("fork", "A", "A2"), 16: ("close", "B"),
          19: ("inject", "A2", {1: "Another idea:\n\n"})}


def rig_samples(engine, brk: list[int], eos: int, eos_layout) -> None:
    """Rewrite the runner's samples by where each write ends (so that a pass launched ahead and
    the same pass run on request are rewritten alike): the tokens of a paragraph break every
    PERIOD tokens of a worker's block, and the end of text once for EOS_AT."""
    runner = engine.executor.runner
    real = runner.forward
    _, eos_worker, eos_position = EOS_AT

    def forward(steps, table=None, staged=None, batch=None, feed=None):
        logits, tokens = real(steps, table, staged, batch, feed)
        if tokens is None:
            return logits, tokens
        tokens = tokens.clone()
        for i, s in enumerate(steps):
            if s.worker is None:
                continue
            end = s.local_start + len(s.tokens)
            k = end % PERIOD - (PERIOD - len(brk))
            if k >= 0:
                tokens[i] = brk[k]
            if s.block is eos_layout.cur[eos_worker] and s.position >= eos_position:
                tokens[i] = eos
        return logits, tokens

    runner.forward = forward


def run_schedule(prelaunch: bool, device: str = "cpu") -> tuple[list[dict], dict, dict]:
    engine = hw.HogwildEngine.from_pretrained("random:tiny", device, "float32", cache_tokens=16384)
    executor = engine.executor
    executor.prelaunch = prelaunch
    eos = 0
    engine.eos_ids = frozenset({eos})
    sessions = {
        "A": engine.start("Compute 12 * 7 and explain.", workers=3,
                          sampling=hw.SamplingParams(temperature=1.0, seed=4)),
        "B": engine.start("Name three primes.", workers=2, layout="interleaved",
                          sampling=[hw.SamplingParams(temperature=0), hw.SamplingParams(temperature=0.8, seed=2)]),
        "C": engine.start("Sum 1 to 10.", workers=2, max_tokens=20,
                          sampling=hw.SamplingParams(temperature=1.0, top_k=20, seed=6)),
    }
    rig_samples(engine, sessions["A"].encode("\n\n"), eos, sessions[EOS_AT[0]].layout)
    launched_headers = []
    real_launch = executor._launch_ahead

    def launch_ahead(ready, samples):  # counts the launched passes that feed a header
        got = real_launch(ready, samples)
        if got is not None:
            launched_headers.append(sum(len(h) > 1 for _, sight, _ in ready.sights for h in sight.headers.values()))
        return got

    executor._launch_ahead = launch_ahead
    log = []
    try:
        for i in range(PASSES):
            inject, event = {}, EVENTS.get(i, ("",))
            if event[0] == "inject":
                inject = {sessions[event[1]]: event[2]}
            elif event[0] == "fork":
                sessions[event[2]] = sessions[event[1]].fork()
            elif event[0] == "close":
                sessions.pop(event[1]).close()
            live = [s for s in sessions.values() if not s.done]
            out = run_pass(live, inject)
            if executor.launched is not None:  # one launched with a sample that ends a text is dropped at once
                assert all(part.fed is not None for part in executor.launched.parts), i
            log.append({name: out[s] for name, s in sessions.items() if s in out})
            log[-1]["logits"] = {name: s.last_logits.clone() for name, s in sessions.items() if not s.done}
        results = {}
        for name, s in sessions.items():
            r = s.result()
            stats = {k: v for k, v in r.stats.to_dict().items() if k not in ("seconds", "tokens_per_second")}
            results[name] = (r.answer, r.worker_texts, r.transcript, stats, [w.status for w in s.workers])
        # a fork drops a pass launched for its session (its draws are taken back) and copies the draws
        forks = {name: s.fork() for name, s in sessions.items() if not s.done}
        draws = {name: list(executor.sessions[f.executor.session].sampler.draws) for name, f in forks.items()}
        sessions.update({f"{name} fork": f for name, f in forks.items()})
        counts = {"prelaunched": executor.prelaunched, "dropped": executor.prelaunch_dropped,
                  "with_headers": sum(1 for n in launched_headers if n), "launched": len(launched_headers)}
        metrics = engine.metrics()
        assert (metrics["passes_launched_ahead"], metrics["launched_ahead_dropped"]) == \
            (counts["prelaunched"], counts["dropped"])
    finally:
        for s in sessions.values():
            s.close()
    return log, {"results": results, "draws": draws}, counts


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="on a GPU: CUDA graphs and the staged plans they replay"))])
def test_a_pass_launched_ahead_changes_nothing(device):
    off_log, off_results, off_counts = run_schedule(False, device)
    on_log, on_results, on_counts = run_schedule(True, device)
    assert off_counts["prelaunched"] == off_counts["launched"] == 0
    assert len(on_log) == len(off_log) == PASSES
    for i, (a, b) in enumerate(zip(off_log, on_log)):
        assert a.keys() == b.keys(), i
        for name in a:
            if name == "logits":
                assert a[name].keys() == b[name].keys()
                for n in a[name]:
                    assert torch.equal(a[name][n].nan_to_num(7.0), b[name][n].nan_to_num(7.0)), (i, n)
            else:
                assert a[name] == b[name], (i, name)
    assert on_results == off_results
    # the schedule did what it is for: steps ended (headers launched ahead and used), the end of
    # text and the events dropped a launched pass, and most passes ran ahead
    results = on_results["results"]
    assert sum(sum(r[3]["steps_per_worker"]) for r in results.values()) >= 6
    # C: worker 1 ended its text early, worker 0 used up max_tokens, then the finisher ran
    assert results["C"][3]["generated_per_worker"] == [20, 5] and results["C"][3]["stop_reason"] == "budget"
    assert on_counts["with_headers"] >= 2 and on_counts["dropped"] >= 3, on_counts
    assert on_counts["prelaunched"] >= PASSES // 2, on_counts
    print(on_counts, {name: r[3]["steps_per_worker"] for name, r in results.items()})



def run_arrival(prelaunch: bool) -> tuple[dict, dict, int, bool]:
    """Request 0 runs alone; request 1 arrives once 0 decodes (with launching ahead on, while a
    pass is launched for 0): each request's final event, the passes run before each started,
    the launched passes dropped, and whether a pass was launched when 1 arrived."""
    engine = hw.HogwildEngine.from_pretrained("random:tiny", "cpu", "float32", cache_tokens=8192)
    engine.executor.prelaunch = prelaunch
    engine.eos_ids = frozenset({0})
    sched = Scheduler(engine, prefill_chunk=64)
    started, done, held = {}, {}, []

    def submit(key: int) -> None:
        problem = f"Problem {key}: add the numbers from 1 to {key + 5}."

        def start():
            started[key] = engine.counters.passes
            return event_job(engine.start(problem, 2, write_prompt=False, max_tokens=10,
                                          sampling=hw.SamplingParams(temperature=1.0, seed=key)))
        sched.submit(key, start, engine.request_pages(problem, 2, max_tokens=10))

    submit(0)
    for key, item in sched:
        if isinstance(item, Done):
            done[key] = (item.answer, item.worker_texts, item.stats.generated_per_worker)
        if key == 0 and not held and isinstance(item, WorkerText) and item.step >= 3:
            held.append(engine.executor.holds_launched)
            submit(1)
    assert set(done) == {0, 1}
    return done, started, engine.executor.prelaunch_dropped, held[0]


def test_a_request_arriving_while_a_pass_is_launched_joins_the_next_pass():
    """A newcomer's prompt would drop the pass launched ahead for the running sessions: they take
    it, and the newcomer starts one pass later (that pass launched when asked), with nothing
    computed for nothing and every request's tokens what they are with launching off."""
    off_done, off_started, off_dropped, off_held = run_arrival(False)
    on_done, on_started, on_dropped, on_held = run_arrival(True)
    assert on_held and not off_held
    assert on_dropped == off_dropped == 0
    assert on_started[0] == off_started[0] and on_started[1] == off_started[1] + 1
    assert on_done == off_done


def test_a_launch_ahead_that_fails_is_logged_once_and_the_passes_run_when_asked(caplog):
    """A pass launched ahead whose launch raises (here: every launch ahead) leaves the current
    pass's results standing; the next pass runs when the session asks for it, with the same
    tokens as with launching off, and the first failure is logged with its cause."""
    def tokens(prelaunch: bool, broken: bool) -> tuple[list, int]:
        engine = hw.HogwildEngine.from_pretrained("random:tiny", "cpu", "float32", cache_tokens=4096)
        executor = engine.executor
        executor.prelaunch = prelaunch
        real = executor.runner.forward

        def forward(steps, table=None, staged=None, batch=None, feed=None):
            if broken and batch is not None:  # only a pass launched ahead comes with its batch laid out
                raise RuntimeError("no room for the next pass's inputs")
            return real(steps, table, staged, batch, feed)

        executor.runner.forward = forward
        session = engine.start("Sum 1 to 10.", 2, max_tokens=None, stop_on_answer=False, finisher=False,
                               sampling=hw.SamplingParams(temperature=1.0, seed=3))
        try:
            return [session.step() for _ in range(8)], executor.launch_failures, executor.prelaunched
        finally:
            session.close()

    with caplog.at_level("WARNING", logger="hogwild_ray.executor.local"):
        got, failures, used = tokens(True, True)
    assert got == tokens(False, False)[0] and used == 0 and failures >= 6
    warned = [r for r in caplog.records if "launching a pass ahead failed" in r.getMessage()]
    assert len(warned) == 1 and "no room for the next pass's inputs" in warned[0].getMessage()
