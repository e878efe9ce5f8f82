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
