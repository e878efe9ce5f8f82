"""Run `hogwild-ray batch` on a Ray cluster as a Ray job: submit, wait, print the job's logs.

    python examples/submit_job.py --address http://HEAD:8265 --input problems.jsonl \
        --output /shared/results.jsonl [--model PATH] [--workers 2] [--max-tokens 256]

The same from the shell (what this script does, without the waiting):

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        hogwild-ray batch --input problems.jsonl --output /shared/results.jsonl

The job's entrypoint runs on the head node, in a copy of the working directory: a relative
--input is read from that copy (so it travels with the code); --output should be an absolute
path on the head node or on storage the nodes share, or the results stay in the job's temp dir.

How the project reaches the workers (the job's runtime_env):
  * default: the working directory's code (this checkout: hogwild_ray/ and kernels/ on
    PYTHONPATH), on nodes that already have the dependencies (torch, transformers, ray);
    no network is needed;
  * --pip SPEC: also `pip install SPEC` on every node of the job (e.g. "hogwild-ray" or
    "git+https://github.com/OWNER/hogwild-ray"), for nodes that lack the project.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

ROOT = Path(__file__).resolve().parent.parent
EXCLUDES = [".git", ".whl", ".gpu", ".hypothesis", "benchmarks", "**/__pycache__", "*.egg-info"]


def runtime_env(working_dir: Path, pip: list[str]) -> dict:
    """Upload `working_dir` (without caches and results), import the project from it, optionally pip-install."""
    env = {"working_dir": str(working_dir), "excludes": EXCLUDES,
           "env_vars": {"PYTHONPATH": ".:kernels", "TOKENIZERS_PARALLELISM": "false"}}
    if pip:
        env["pip"] = pip
    return env


def entrypoint(args: argparse.Namespace) -> str:
    cmd = ["hogwild-ray", "batch", "--input", args.input, "--output", args.output,
           "--workers", str(args.workers), "--max-tokens", str(args.max_tokens)]
    if args.model:
        cmd += ["--model", args.model]
    return shlex.join(cmd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default="http://127.0.0.1:8265", help="the Ray dashboard (job server) URL")
    p.add_argument("--input", required=True, help="problems JSONL (relative: inside the working dir)")
    p.add_argument("--output", required=True, help="results JSONL: an absolute path on the head node")
    p.add_argument("--model", help="model directory or .gguf on the cluster's nodes (default: built-in)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--working-dir", type=Path, default=ROOT, help="code to upload (default: this checkout)")
    p.add_argument("--pip", action="append", default=[], help="pip-install this on the job's nodes too")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the job")
    args = p.parse_args(argv)

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
