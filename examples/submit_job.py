"""Run `hogwild-ray batch` on a Ray cluster as a Ray job: submit, wait, print the job's logs.

    python examples/submit_job.py --address http://127.0.0.1:8265 --input problems.jsonl \
        --output /shared/results.jsonl [--model PATH] [--workers 2] [--max-tokens 256]

The same from the shell (what this script does, without the waiting; EXCLUDES abridged):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json '{"excludes": [".git", ".venv", ".env*", "*.safetensors", "*.gguf", "*.bin",
                                          "benchmarks", "results/", "__pycache__"]}' -- \
        hogwild-ray batch --input problems.jsonl --output /shared/results.jsonl

The clusters this project ships run with Ray's token authentication: the job server refuses a
request without the cluster's token. This script always sends it (it runs with RAY_AUTH_MODE=token);
Ray reads the token from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token.
The token travels in the clear over http://, so reach a remote head through a tunnel that ends on
this machine (`ray dashboard cluster/gpu-cluster.yaml`, `kubectl port-forward ...`), not its public
address.

The job's entrypoint runs on the head node, in a copy of the working directory: a relative
--input is read from that copy (so it travels with the code); --output should be an absolute
path on the head node or on storage the nodes share, or the results stay in the job's temp dir.
The copy leaves out EXCLUDES (version control, virtualenvs, .env files, weights, results, caches).

How the project reaches the workers (the job's runtime_env):
  * default: the working directory's code (this checkout: hogwild_ray/ and kernels/ on
    PYTHONPATH), on nodes that already have the dependencies (torch, transformers, ray);
    no network is needed;
  * --pip SPEC: also `pip install SPEC` on every node of the job, for nodes that lack the
    project. The project is not on PyPI, so a bare "hogwild-ray" would install whatever someone
    else registers under that name: SPEC for the project must be pinned to something you
    control, a git URL at a full commit hash
    ("hogwild-ray @ git+https://github.com/YOU/hogwild-ray@<40-hex commit>"), a wheel URL with
    its hash ("https://.../hogwild_ray-0.1.0-py3-none-any.whl#sha256=<64 hex>"), or a wheel
    path on the nodes; anything else for it is refused.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shlex
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
# Left out of the working_dir upload (gitignore-style patterns, matched at any depth): the job
# needs only the code, and whatever is uploaded lands on the cluster's nodes, readable by every
# job there. So no secrets (.env files, keys), no virtualenvs or version control, no weights
# (the nodes read the model from --model), no results of earlier runs, no caches.
EXCLUDES = [
    ".git", ".venv", "venv", ".env*", "*.pem", "*.key",
    "*.safetensors", "*.gguf", "*.bin", "*.pt", "*.pth",
    "benchmarks", "results/",
    "__pycache__", "*.egg-info", "build/", "dist/", ".whl", ".gpu", ".tok",
    ".hypothesis", ".pytest_cache", ".ruff_cache",
]

PROJECT = "hogwild-ray"
PLACEHOLDER = re.compile(r"/(OWNER|YOU)/|COMMIT|<|>")
GIT_AT_COMMIT = re.compile(r"@[0-9a-f]{40}(#.*)?$")
URL_WITH_HASH = re.compile(r"#sha256=[0-9a-f]{64}$")


def check_pip(spec: str) -> str:
    """`spec` as given, or ValueError where it would install code nobody pinned.

    The project's name is not on PyPI: a requirement by that name resolves to whatever someone
    registers under it later, and runs on every node of the job. So the project comes from a git
    URL at a full commit hash, an http(s) URL with its sha256, or a path on the nodes; git and
    http URLs are held to the same pins for any package. Other index requirements are the
    caller's choice, as in any requirements file; pip options (an extra index) are not taken.
    """
    spec = spec.strip()
    if spec.startswith("-"):
        raise ValueError(f"--pip {spec!r}: pip options are not taken here (an extra index could serve any package)")
    name, at, target = spec.partition(" @ ")
    target = target.strip() if at else spec
    if target.startswith("git+") or re.match(r"https?://", target):
        if PLACEHOLDER.search(target):
            raise ValueError(f"--pip {spec!r}: fill in the placeholders (your repository, a commit hash)")
        if target.startswith("git+") and not GIT_AT_COMMIT.search(target):
            raise ValueError(f"--pip {spec!r}: pin the git URL to a full 40-hex commit hash (...@<commit>): "
                             "a branch or tag can be moved to other code")
        if not target.startswith("git+") and not URL_WITH_HASH.search(target):
            raise ValueError(f"--pip {spec!r}: give the URL's hash (#sha256=<64 hex>), so pip refuses other contents")
        return spec
    if target.startswith(("/", "./", "../", "~", "file:")):
        return spec  # a path on the nodes: whoever controls those files controls the nodes anyway
    requirement = re.match(r"[A-Za-z0-9._-]*", name if at else spec).group()
    if re.sub(r"[-_.]+", "-", requirement).lower() == PROJECT:
        raise ValueError(f"--pip {spec!r}: {PROJECT} is not on PyPI, and whoever registers the name would run "
                         "code on every node; give a git URL at a commit, a URL with #sha256=, or a path")
    return spec


def runtime_env(working_dir: Path, pip: list[str]) -> dict:
    """Upload `working_dir` (less EXCLUDES), import the project from it, optionally pip-install (pinned)."""
    env = {"working_dir": str(working_dir), "excludes": list(EXCLUDES),
           "env_vars": {"PYTHONPATH": ".:kernels", "TOKENIZERS_PARALLELISM": "false"}}
    if pip:
        env["pip"] = [check_pip(spec) for spec in pip]
    return env


def pinned(spec: str) -> str:
    try:
        return check_pip(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def entrypoint(args: argparse.Namespace) -> str:
    cmd = ["hogwild-ray", "batch", "--input", args.input, "--output", args.output,
           "--workers", str(args.workers), "--max-tokens", str(args.max_tokens)]
    if args.model:
        cmd += ["--model", args.model]
    return shlex.join(cmd)


def warn_if_cleartext(address: str) -> None:
    """The token goes in a header: over plain http it is readable by anyone on the path."""
    parts = urlsplit(address if "://" in address else f"http://{address}")
    host = parts.hostname or ""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if parts.scheme == "http" and not local:
        print(f"warning: {address} is plain http to another host: the cluster's token travels unencrypted; "
              "reach the head through `ray dashboard CLUSTER.yaml` or `kubectl port-forward` and use "
              "http://127.0.0.1:8265", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default="http://127.0.0.1:8265", help="the Ray dashboard (job server) URL")
    p.add_argument("--input", required=True, help="problems JSONL (relative: inside the working dir)")
    p.add_argument("--output", required=True, help="results JSONL: an absolute path on the head node")
    p.add_argument("--model", help="model directory or .gguf on the cluster's nodes (default: built-in)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--working-dir", type=Path, default=ROOT, help="code to upload (default: this checkout)")
    p.add_argument("--pip", action="append", default=[], type=pinned,
                   help="pip-install this on the job's nodes too (the project itself: pinned, see above)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the job")
    args = p.parse_args(argv)

    # Before Ray is imported: it reads the mode once, and only in "token" mode does the client
    # send the token (refused without it by the clusters we ship; ignored by one without auth).
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray.job_submission import JobStatus, JobSubmissionClient

    warn_if_cleartext(args.address)
    client = JobSubmissionClient(args.address)
    job = client.submit_job(entrypoint=entrypoint(args), runtime_env=runtime_env(args.working_dir, args.pip))
    print(f"submitted {job}", file=sys.stderr)
    deadline, status = time.monotonic() + args.timeout, None
    while time.monotonic() < deadline:
        status = client.get_job_status(job)
        if status.is_terminal():
            break
        time.sleep(1)
    print(client.get_job_logs(job), end="")
    print(f"job {job}: {status}", file=sys.stderr)
    if status is None or not status.is_terminal():
        client.stop_job(job)
        print(f"gave up waiting after {args.timeout:g} s and stopped the job", file=sys.stderr)
    return 0 if status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
