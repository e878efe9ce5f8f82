"""A Ray the engine starts for itself authenticates with a token of its own and leaves no token
file behind (Ray's default writes ~/.ray/auth_token, readable by every user, and keeps it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hogwild_ray.runtime.ray_init import starts_own_ray

pytestmark = pytest.mark.reliability
ROOT = Path(__file__).resolve().parents[1]


def test_which_addresses_start_a_ray_of_our_own(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert starts_own_ray("local")
    assert not starts_own_ray("127.0.0.1:6379") and not starts_own_ray("ray://head:10001")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not starts_own_ray(None)  # the cluster the environment names


def test_the_engines_own_ray_has_its_own_token_and_leaves_no_file(random_model, tmp_path):
    path = random_model("llama")[0]
    code = textwrap.dedent(f"""
        import os
        import hogwild_ray as hw
        from ray._raylet import AuthenticationMode, get_authentication_mode
        engine = hw.HogwildEngine.from_pretrained({str(path)!r}, backend="ray", tp=1, cache_tokens=1024,
                                                  attention="torch")
        engine.solve("Compute 2 + 2.", workers=2, max_tokens=4)
        print(get_authentication_mode() == AuthenticationMode.TOKEN, len(os.environ["RAY_AUTH_TOKEN"]))
        engine.close()
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", code, ], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["True", "64"]  # token authentication on, with a 256-bit token
    assert not (tmp_path / ".ray" / "auth_token").exists()


def test_info_address_local_leaves_no_token_file(tmp_path):
    """`hogwild-ray info --address local` starts its Ray through init_ray too: no ~/.ray/auth_token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "hogwild_ray", "info", "--address", "local", "--json"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert '"CPU"' in run.stdout
    assert not (tmp_path / ".ray" / "auth_token").exists()


def test_a_cluster_that_refuses_this_process_is_one_line_naming_the_token(tmp_path):
    """A head with token authentication, joined without its token: Ray retries for about 20 s and
    raises a bare ConnectionError; the CLI says, in one line, to set RAY_AUTH_TOKEN."""
    import shutil
    import signal
    import socket
    import tempfile
    import time

    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), OMP_NUM_THREADS="1")
    short = tempfile.mkdtemp(prefix="hwr", dir="/tmp")  # Ray's socket paths must stay short
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             f"--port={port}", "--num-cpus=1", "--include-dashboard=false", f"--temp-dir={short}"],
                            env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        run = subprocess.run([sys.executable, "-m", "hogwild_ray", "info", "--address", f"127.0.0.1:{port}"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(60)
        shutil.rmtree(short, ignore_errors=True)
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Failed to connect to Ray cluster at ") and "set RAY_AUTH_MODE=token and " \
        "RAY_AUTH_TOKEN to its token" in last
    assert "Traceback" not in run.stderr
