"""The command line (run, batch, bench, info), the live view and the CPU benchmark through `bench`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import hogwild_ray as hw
from hogwild_ray.cli import main
from hogwild_ray.cli.bench import BENCHMARKS
from hogwild_ray.core.events import Done, from_json
from hogwild_ray.ui import LiveView

ROOT = Path(__file__).resolve().parents[1]
RUN_FLAGS = ["--model", "--backend", "--tp", "--address", "--workers", "--max-tokens", "--max-steps", "--layout", "--temperature", "--top-k",
             "--top-p", "--seed", "--device", "--dtype", "--redundancy-every", "--no-redundancy", "--no-live",
             "--json"]


def test_help_mentions_every_flag(capsys):
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    for word in ("run", "batch", "bench", "info", "--version", "examples"):
        assert word in top, word
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in RUN_FLAGS + ["--events"]:
        assert flag in out, flag
    for layout in hw.LAYOUTS:
        assert layout in out
    assert main(["batch", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in RUN_FLAGS + ["--input", "--output", "--quiet"]:
        assert flag in out or flag == "--no-live", flag
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for name in BENCHMARKS:
        assert name in out and (ROOT / "benchmarks" / f"{name}.py").is_file()
    assert main(["info", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--address" in out and "--json" in out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert hw.__version__ in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--workers", "0"], "--workers"),
    (["--max-tokens", "-3"], "--max-tokens"),
    (["--layout", "diagonal"], "--layout"),
    (["--top-p", "2"], "--top-p"),
    (["--temperature", "-1"], "--temperature"),
    (["--model", "/nonexistent"], "/nonexistent"),
])
def test_bad_values_are_one_line_errors(capsys, argv, words):
    assert main(["run", "What is 2+3?", *argv]) == 2
    assert_one_line_error(capsys, words)


def assert_one_line_error(capsys, words: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, words", [
    (["batch", "--output", "o.jsonl"], "--input"),
    (["batch", "--input", "/nonexistent.jsonl", "--output", "o.jsonl"], "/nonexistent.jsonl is not a file"),
    (["batch", "--input", "{bad}", "--output", "o.jsonl"], "bad.jsonl:2 is not JSON"),
    (["batch", "--input", "{dup}", "--output", "o.jsonl"], "appears twice"),
    (["batch", "--input", "{good}", "--output", "o.jsonl", "--workers", "x"], "--workers"),
    (["batch", "--input", "{good}", "--output", "o.jsonl", "--backend", "local", "--address", "h:1"], "--address"),
    (["batch", "--input", "{good}", "--output", "o.jsonl", "--backend", "local", "--replicas", "2"],
     "--replicas runs engines on Ray: drop --backend local"),
    (["bench", "nope"], "NAME"),
    (["bench"], "NAME"),
    (["info", "--bogus"], "--bogus"),
    (["fly"], "fly"),
])
def test_bad_arguments_of_every_command(capsys, tmp_path, argv, words):
    files = {"{bad}": '{"problem": "a"}\n{"problem": \n', "{dup}": '{"id": 1, "problem": "a"}\n{"id": 1, "problem": "b"}\n',
             "{good}": '{"problem": "a"}\n'}
    for key, text in files.items():
        name = {"{bad}": "bad", "{dup}": "dup", "{good}": "good"}[key]
        (tmp_path / f"{name}.jsonl").write_text(text)
    argv = [str(tmp_path / f"{a[1:-1]}.jsonl") if a in files else a for a in argv]
    assert main(argv) == 2
    assert_one_line_error(capsys, words)
    assert not (tmp_path / "o.jsonl").exists()


def test_bench_without_a_checkout_names_the_fix(capsys, monkeypatch, tmp_path):
    import hogwild_ray.cli.bench as bench

    monkeypatch.setattr(bench, "checkout", lambda: tmp_path)
    assert main(["bench", "workers_cpu"]) == 2
    assert_one_line_error(capsys, "pip install -e .")


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["versions"]["hogwild-ray"] == hw.__version__
    for name in ("torch", "triton", "transformers", "ray"):
        assert name in out["versions"]
    assert out["devices"] and out["devices"][0]["type"] in ("cpu", "cuda")
    cluster = out["ray_cluster"]  # None unless a cluster is running on this machine
    assert cluster is None or ("CPU" in cluster["resources"] and cluster["nodes"])


def test_info_names_the_running_codes_version_from_a_checkout_not_installed(monkeypatch):
    """Run from a checkout on the path (no installed distribution, as on a machine given only the
    source): the version is still the code's own, not None or another installed copy's."""
    from importlib import metadata

    from hogwild_ray.cli import info

    real = metadata.version

    def version(name: str) -> str:
        if name == "hogwild-ray":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(info.metadata, "version", version)
    found = info.versions()
    assert found["hogwild-ray"] == hw.__version__ and found["torch"] == real("torch")


def test_engine_errors_are_one_line(capsys, default_engine):
    assert main(["run", "   ", "--json"], engine=default_engine) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "problem" in err and "\n" not in err


def test_run_json(capsys, default_engine):
    argv = ["run", "What is 2+3?", "--max-tokens", "8", "--workers", "2", "--json", "--temperature", "0"]
    assert main(argv, engine=default_engine) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"answer", "worker_texts", "transcript", "stats"} <= set(out)
    assert len(out["worker_texts"]) == 2 and all(out["worker_texts"])
    stats = out["stats"]
    assert stats["forward_passes"] > 0 and len(stats["generated_per_worker"]) == 2
    assert max(stats["generated_per_worker"]) <= 8 and "tokens_per_second" in stats


def test_run_plain_output(capsys, default_engine):
    argv = ["run", "What is 2+3?", "--max-tokens", "6", "--workers", "3", "--temperature", "0", "--no-redundancy"]
    assert main(argv, engine=default_engine) == 0
    out = capsys.readouterr().out
    for name in ("Alice", "Bob", "Carol"):
        assert name in out  # not a terminal: each worker's text is printed once, at the end
    assert "answer:" in out and "forward passes" in out


def test_run_events_are_json_lines(capsys, default_engine):
    argv = ["run", "What is 2+3?", "--max-tokens", "4", "--workers", "2", "--events", "--temperature", "0"]
    assert main(argv, engine=default_engine) == 0
    events = [from_json(line) for line in capsys.readouterr().out.splitlines()]
    assert isinstance(events[-1], Done) and {e.kind for e in events} >= {"worker_text", "progress"}


def test_live_view_renders_every_worker(default_engine):
    buf = io.StringIO()
    view = LiveView(3, Console(file=buf, force_terminal=True, width=120, height=40), fps=1000)
    assert view.enabled
    with view:
        for event in default_engine.stream("What is 2+3?", workers=3, max_tokens=6,
                                           sampling=hw.SamplingParams(temperature=0)):
            view.feed(event)
    text = Console(file=io.StringIO(), width=120, height=40, record=True)
    text.print(view.render())
    shown = text.export_text()
    for name in ("Alice", "Bob", "Carol"):
        assert f"{name} [1]:" in shown  # the pane's title and the worker's own text (its step header)
    assert "forward passes" in shown and "tokens/s" in shown and "done (" in shown and buf.getvalue()
    assert not LiveView(2, Console(file=io.StringIO())).enabled  # not a terminal: nothing live


def test_run_in_a_terminal_shows_every_worker(builtin_model):
    """The real command (the built-in model) in a pseudo-terminal: the live panes show each worker's text."""
    import os
    import pty

    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "LINES": "40", "TERM": "xterm-256color"}
    cmd = [sys.executable, "-m", "hogwild_ray", "run", "What is 2+3?", "--workers", "2", "--max-tokens", "8",
           "--temperature", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the terminal closed: the command ended
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=300) == 0
    shown = b"".join(chunks).decode(errors="replace")
    for name in ("Alice", "Bob"):
        assert f"{name} [1]:" in shown, shown[-3000:]  # each worker's text, with its step header
    assert "answer:" in shown and "forward passes" in shown and "loading" in shown


def test_benchmark_writes_results(tmp_path, builtin_model):
    cmd = [sys.executable, "-m", "hogwild_ray", "bench", "workers_cpu", "--passes", "4", "--warmup", "1",
           "--repeats", "1", "--workers", "1,2", "--out", str(tmp_path), "--date", "2000-01-01"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    stem = tmp_path / "2000-01-01-cpu-workers"
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["torch"] and data["cpu"] and [r["workers"] for r in data["rows"]] == [1, 2]
    assert data["rows"][0]["tokens_per_s_vs_1"] == 1.0
    assert stem.with_suffix(".csv").read_text().startswith("workers,")
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_cuda_graphs_flag_reaches_the_engine(monkeypatch, builtin_model):
    """--no-cuda-graphs turns the graphs off; by default the engine decides (None)."""
    from hogwild_ray.cli import build_parser
    from hogwild_ray.cli.common import load_engine
    from hogwild_ray.engine import HogwildEngine

    seen = {}
    monkeypatch.setattr(HogwildEngine, "from_pretrained", classmethod(lambda cls, *a, **kw: seen.update(kw)))
    for argv, want in ((["run", "--no-cuda-graphs"], False), (["run"], None)):
        load_engine(build_parser().parse_args(argv), quiet=True)
        assert seen["cuda_graphs"] is want


# ---- outputs that cannot be results files, input that is not UTF-8: one-line errors, no load -----

BAD_OUTPUTS = r"""
import contextlib, io, json, resource, sys
import torch  # its libraries mapped before the cap (a CUDA build maps gigabytes of address space)
import hogwild_ray as hw
from hogwild_ray.cli import main

# 3 GiB more address space than the process has now: reading a device forever fails fast
with open("/proc/self/status") as status:
    mapped = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (mapped + (3 << 30), resource.RLIM_INFINITY))

def loaded(*a, **k):
    raise SystemExit("the model began to load")

hw.HogwildEngine.from_pretrained = loaded
answers = []
for out in sys.argv[2:]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["batch", "--input", sys.argv[1], "--output", out])
    answers.append([code, err.getvalue()])
print(json.dumps(answers))
"""


@pytest.mark.reliability
def test_an_output_that_is_not_a_regular_file_is_refused_before_the_load(tmp_path):
    """A device (never ends: read back, it used to eat all memory), a directory, a FIFO (a read
    blocks), a socket, a missing directory: exit 2 and one line naming --output and the fix, and
    no model load. In a process of its own, with its address space capped (3 GiB past what it maps
    once imported) and a time limit."""
    import socket

    (tmp_path / "in.jsonl").write_text('{"id": "a", "problem": "1+1?"}\n')
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    cases = {"/dev/full": "/dev/full is a character device, not a regular file; give the path of a file",
             str(tmp_path / "dir"): "dir is a directory, not a regular file",
             str(tmp_path / "sock"): "sock is a socket, not a regular file",
             str(tmp_path / "no" / "out.jsonl"): "does not exist; create it (mkdir -p",
             str(tmp_path / "fifo"): "fifo is a FIFO, not a regular file"}
    try:
        run = subprocess.run([sys.executable, "-c", BAD_OUTPUTS, str(tmp_path / "in.jsonl"), *cases], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    finally:
        sock.close()
    assert run.returncode == 0, run.stderr[-3000:]
    for (out, words), (code, err) in zip(cases.items(), json.loads(run.stdout)):
        assert code == 2 and err.startswith(f"error: --output {out}") and err.count("\n") == 1, err
        assert words in err and "Traceback" not in err


@pytest.fixture
def no_load(monkeypatch):
    """A model load fails the test: the error must come before it."""
    def loaded(*a, **k):
        raise AssertionError("the model began to load before the error")

    monkeypatch.setattr(hw.HogwildEngine, "from_pretrained", loaded)


@pytest.mark.reliability
@pytest.mark.parametrize("data, words", [
    (b'{"id": "a", "problem": "1+1?"}\n{"id": "b", "problem": "Caf\xe9?"}\n',
     "in.jsonl:2 is not UTF-8 text (byte 0xe9); save it as UTF-8"),
    (b'{"id": "a", "problem": "1+1?"}\n{"id": "b", "problem": "\\udcff?"}\n',
     "in.jsonl:2 (id 'b') is not valid UTF-8 text (byte 0xff at character 0)"),
    (b'"1+1?"\n"\\ud83d and more"\n', "in.jsonl:2 (id 1) is not valid UTF-8 text (lone surrogate \\ud83d"),
])
def test_batch_input_that_is_not_utf8_is_a_one_line_error(tmp_path, capsys, no_load, data, words):
    (tmp_path / "in.jsonl").write_bytes(data)
    assert main(["batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]) == 2
    assert_one_line_error(capsys, words)
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.reliability
def test_a_problem_argument_that_is_not_utf8_is_a_one_line_error(capsys, no_load):
    """Python keeps an argument's bytes that are not UTF-8 as surrogates, as here."""
    assert main(["run", os.fsdecode(b"What is 2 \xff 3?")]) == 2
    assert_one_line_error(capsys, "the problem is not valid UTF-8 text (byte 0xff at character 10)")
