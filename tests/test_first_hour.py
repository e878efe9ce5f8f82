"""What a newcomer meets first: errors that come before any load and within seconds, flags named
as flags, progress lines when the output is not a terminal, the model's config read fast."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hogwild_ray as hw
from hogwild_ray.cli import main
from hogwild_ray.cli.common import as_flags
from hogwild_ray.errors import InvalidRequestError, ModelNotFoundError
from hogwild_ray.core.events import Done, Progress
from hogwild_ray.progress_lines import ProgressLines
from hogwild_ray.ray_address import check_reachable, host_port

SECONDS = 20  # generous for a busy 2-core machine; the slow paths took minutes


@pytest.fixture
def no_load(monkeypatch):
    """Any model load or Ray start fails the test: the error must come before them."""
    import ray

    def loaded(*a, **k):
        raise AssertionError("a model load or Ray start began before the error")

    import hogwild_ray.api

    monkeypatch.setattr(hw.HogwildEngine, "from_pretrained", loaded)
    monkeypatch.setattr(hw.HogwildEngine, "load", loaded)
    monkeypatch.setattr(hogwild_ray.api, "load", loaded)
    monkeypatch.setattr(ray, "init", loaded)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, words", [
    (["run", ""], "the problem is empty"),
    (["run", "   "], "the problem is empty"),
    (["run", "--tp", "3", "--backend", "local"], "--tp 3 needs --backend ray"),
    (["run", "--model", "random:nope"], "random:tiny"),
    (["run", "--top-p", "1.5"], "--top-p must be"),
    (["run", "--temperature", "-1"], "--temperature must be"),
])
def test_errors_come_before_any_load(capsys, no_load, argv, words):
    refused_within_seconds(capsys, argv, words)


def refused_within_seconds(capsys, argv: list[str], words: str) -> str:
    """The command exits 2 with one line naming the problem, within SECONDS; that line."""
    t = time.perf_counter()
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert words in err
    assert time.perf_counter() - t < SECONDS
    return err


@pytest.mark.parametrize("argv, words", [
    (["run", "--tp", "2"], "9 query heads are not divisible by 2"),
    (["run", "--tp", "2"], "Valid tp values: 1, 3"),
    (["run", "--address", "http://head:8265"], "http:// addresses are not Ray's"),
])
def test_errors_about_the_built_in_model_come_before_any_load(capsys, no_load, builtin_model, argv, words):
    """The checks that read the default model's header (its heads; the model found before the address)."""
    refused_within_seconds(capsys, argv, words)


def dead_address_refused_within_seconds(capsys, command: list[str]) -> None:
    address = f"127.0.0.1:{free_port()}"
    err = refused_within_seconds(capsys, [*command, "--address", address], f"no Ray cluster answers at {address}")
    assert "connection refused" in err


def test_info_names_a_dead_cluster_address_within_seconds(capsys, no_load):
    dead_address_refused_within_seconds(capsys, ["info"])


def test_run_names_a_dead_cluster_address_within_seconds(capsys, no_load, builtin_model):
    """`run` reads the built-in model's heads (checked against --tp) before it asks the cluster."""
    dead_address_refused_within_seconds(capsys, ["run", "--tp", "3"])


def test_cluster_addresses_parse_to_host_and_port():
    assert host_port("head:6379") == ("head", 6379)
    assert host_port("head") == ("head", 6379)
    assert host_port("ray://head") == ("head", 10001)
    assert host_port("ray://10.0.0.2:10002/") == ("10.0.0.2", 10002)
    assert host_port("[::1]:6380") == ("::1", 6380)
    for bad in ("head:port", "grpc://head:1", ":6379"):
        with pytest.raises(InvalidRequestError):
            host_port(bad)
    for passes in (None, "auto", "local"):
        check_reachable(passes)


def test_a_batch_with_every_id_done_loads_nothing(capsys, no_load, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "a", "problem": "1+1?"}\n{"id": "b", "problem": "2+2?"}\n')
    out.write_text('{"id": "a", "problem": "1+1?", "answer": "2"}\n{"id": "b", "problem": "2+2?", "answer": "4"}\n')
    assert main(["batch", "--input", str(src), "--output", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    assert "nothing to run" in captured.err
    assert [json.loads(line)["id"] for line in captured.out.splitlines()] == ["a", "b"]


def test_unknown_flags_point_to_the_subcommand_with_a_guess(capsys):
    assert main(["run", "--tempreature", "0"]) == 2
    err = one_line_error(capsys)
    assert "--tempreature (did you mean --temperature?)" in err and "`hogwild-ray run --help`" in err
    assert main(["batch", "--input", "a", "--output", "b", "--wrkers", "2"]) == 2
    err = one_line_error(capsys)
    assert "did you mean --workers?" in err and "`hogwild-ray batch --help`" in err
    assert main(["info", "--zzz"]) == 2
    assert "did you mean" not in one_line_error(capsys)


def test_library_errors_name_flags_as_flags():
    assert as_flags("use device='cpu'") == "use --device cpu"
    assert as_flags("top_p must be in (0, 1], got 2") == "--top-p must be in (0, 1], got 2"
    assert as_flags("lower workers or max_tokens") == "lower workers or --max-tokens"  # English stays
    assert as_flags("workers must be an integer >= 1") == "--workers must be an integer >= 1"
    assert as_flags("tp=3 needs backend='ray'") == "--tp 3 needs --backend ray"
    assert as_flags("pass max_context= to from_pretrained") == "pass max_context= to from_pretrained"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the machine without a GPU")
def test_a_gpu_benchmark_without_a_gpu_is_an_error_line(capsys):
    assert main(["bench", "attention_kernels"]) == 2
    assert "needs a CUDA GPU" in one_line_error(capsys)


def test_progress_lines_every_interval_and_at_the_end():
    out = io.StringIO()
    lines = ProgressLines(out, interval_s=0.0)
    lines.feed(Progress(step=3, generated_per_worker=[3, 2], steps_per_worker=[1, 0], statuses=["active"] * 2,
                        seconds=1.0))
    lines.feed(Done(answer="4", worker_texts=["", ""], transcript=""))
    text = out.getvalue().splitlines()
    assert text[0] == "run: pass 3, 5 tokens, 5.0 tokens/s, steps finished: Alice 1, Bob 0; running"
    assert text[1].startswith("run: pass 3, 5 tokens") and text[1].endswith("done (-)")
    quiet = io.StringIO()
    muted = ProgressLines(quiet, interval_s=3600.0)
    muted.feed(Progress(step=1, generated_per_worker=[1], steps_per_worker=[0], statuses=["active"], seconds=1.0))
    assert quiet.getvalue() == ""  # within the interval: nothing yet


def test_run_piped_prints_plain_progress(tmp_path):
    cmd = [sys.executable, "-m", "hogwild_ray", "run", "What is 2 + 3?", "--model", "random:tiny", "--device", "cpu",
           "--max-steps", "6", "--temperature", "0", "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "loading random:tiny on cpu" in done.stderr
    assert "run: pass 6," in done.stderr and "done (" in done.stderr
    assert "answer:" in done.stdout


def test_the_gguf_header_gives_the_models_spec_fast(builtin_model):
    from hogwild_ray.model.loader import load_config, locate, quick_spec
    from hogwild_ray.model.spec import spec_from_config

    t = time.perf_counter()
    fast = quick_spec(None)
    assert time.perf_counter() - t < SECONDS
    slow = spec_from_config(load_config(locate(None)))
    for name in ("family", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "intermediate_size", "tie_embeddings", "max_positions", "eos_token_ids", "rms_eps"):
        assert getattr(fast, name) == pytest.approx(getattr(slow, name)), name
    assert (fast.inv_freq == slow.inv_freq).all()


def test_a_damaged_gguf_is_a_clear_error(tmp_path, builtin_model):
    from hogwild_ray.model.gguf_header import read_header
    from hogwild_ray.model.loader import locate

    ckpt = locate(None)
    data = (ckpt.directory / ckpt.gguf_file).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:5000])
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04" + data[4:100])
    with pytest.raises(ModelNotFoundError, match="damaged GGUF header"):
        read_header(tmp_path / "cut.gguf")
    with pytest.raises(ModelNotFoundError, match="not a GGUF file"):
        read_header(tmp_path / "not.gguf")


def test_threads_flag_fixes_the_count_and_stops_the_governor(monkeypatch):
    import torch

    from hogwild_ray import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert threads.set_threads(1) == 1 and torch.get_num_threads() == 1 and threads.governor() is None
        with pytest.raises(InvalidRequestError, match="threads must be an integer >= 1"):
            threads.set_threads(0)
        threads.set_threads(None)  # back to the default: the governor decides
        assert threads.governor() is not None or threads.machine_cpus() is None
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        threads._governor = None
        threads.govern()
        assert threads.governor() is None  # the user's OMP_NUM_THREADS stays
    finally:
        threads._governor, threads._fixed = None, False
        torch.set_num_threads(before)


@pytest.mark.parametrize("cores, elsewhere, expected", [
    (2, 0.0, 2), (2, 0.3, 2), (2, 1.0, 1), (2, 1.9, 1), (2, 2.0, 1), (8, 2.2, 6), (8, 7.6, 1), (1, 0.0, 1),
])
def test_threads_for_the_cores_left_free(cores, elsewhere, expected):
    from hogwild_ray.threads import threads_for

    assert threads_for(cores, elsewhere) == expected


def test_the_governor_follows_the_machine_with_hysteresis():
    import torch

    from hogwild_ray import threads

    before = torch.get_num_threads()
    counters = iter([(0.0, 0.0), (0.0, 2.0), (0.0, 4.0), (0.0, 6.0), (2.0, 8.0), (4.0, 10.0)])  # (idle, total) s
    own = iter([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])  # this process: 1 core's worth each second
    clock = iter([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    g = threads.ThreadGovernor(interval_s=1.0, clock=lambda: next(clock), cpu_time=lambda: next(own),
                               counters=lambda: next(counters))
    g.cores, g.enabled = 2, True
    try:
        torch.set_num_threads(2)
        g.tick()  # first sample
        g.tick()  # the machine is fully busy, we use 1 core: 1 core elsewhere -> 1 thread, seen once
        assert torch.get_num_threads() == 2 and g.pending == 1
        g.tick()  # seen twice: made
        assert torch.get_num_threads() == 1 and g.decisions == [1]
        g.tick()  # still busy: stays
        g.tick()  # the others stopped (1 core idle, we use 1): 2 threads, seen once
        assert torch.get_num_threads() == 1
        g.tick()
        assert torch.get_num_threads() == 2 and g.decisions == [1, 2]
    finally:
        torch.set_num_threads(before)


def test_the_threads_benchmark_writes_its_table(tmp_path):
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "benchmarks" / "threads_cpu.py"), "--seconds", "0.2", "--warmup", "1",
           "--repeats", "1", "--busy", "1", "--model", "random:tiny", "--out", str(tmp_path), "--date", "d"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "d-cpu-threads.json").read_text())["rows"]
    assert {(r["policy"], r["condition"], str(r["threads"])) for r in rows} >= {
        (p, c, t) for p in ("unset", "ACTIVE", "PASSIVE") for c in ("quiet", "busy") for t in ("1", "auto")}
    assert all(r["passes_per_s"] > 0 for r in rows)
    assert (tmp_path / "d-cpu-threads.png").stat().st_size > 0 and (tmp_path / "d-cpu-threads.csv").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU's entry")
def test_info_names_the_cpu_model(capsys):
    from hogwild_ray.devices import cpu_name

    assert main(["info", "--json"]) == 0
    cpu = json.loads(capsys.readouterr().out)["devices"][0]
    assert cpu["name"] == cpu_name() and cpu["name"] not in ("", "x86_64")
