"""Make the model "write" a text: a test helper shared by the test files that need a worker to
produce given text itself (only what a worker samples gives a session its answer; injected text
never does)."""

from __future__ import annotations


def dictate(monkeypatch, session, worker: int, text: str) -> None:
    """From the next pass on, `worker` samples the tokens of `text` (one a pass): the model
    itself writes it, as far as the session can tell. Passes without this session (another
    session's, a fork's) are left as they are."""
    script = session.encode(text)
    executor = session.executor.executor
    real = executor.run

    def run(passes, while_running=None):
        out = real(passes, while_running)
        if session.executor.session not in out:
            return out
        steps, sampled = out[session.executor.session]
        for i, s in enumerate(steps):
            if s.worker == worker and script:
                sampled[i] = script.pop(0)
        return out

    monkeypatch.setattr(executor, "run", run)
