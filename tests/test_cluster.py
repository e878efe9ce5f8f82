"""Cluster use for real: a two-node Ray cluster on this machine (cluster/local.sh) with a job
server; `hogwild-ray batch` submitted as a Ray job by CLI and by JobSubmissionClient; an engine
with its coordinator on the head and its shards on the other node passing the oracle; the
launcher YAML against Ray's schema and the KubeRay manifests against KubeRay's required fields.

The cluster uses its own ports and temp dir (see local.sh), so other test modules' ray.init()
start their own clusters; it is stopped at module teardown and must leave no process behind.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from oracle import TOL, run_oracle

ray = pytest.importorskip("ray")

import hogwild_ray as hw  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LOCAL_SH = ROOT / "cluster" / "local.sh"
CODE = Path(hw.__file__).resolve().parent.parent  # the checkout the test imports; jobs and actors use it too
PROBLEMS = [{"id": "p1", "problem": "Compute 2 + 3."}, {"id": "p2", "problem": "Compute 4 * 5."}]


def free_port_block(size: int = 500) -> int:
    """A base port with `size` ports above it free now (local.sh uses base .. base+size)."""
    for base in range(30000, 60000 - size, 997):
        try:
            socks = [socket.create_server(("127.0.0.1", p)) for p in (base, base + 1, base + 200, base + 201)]
        except OSError:
            continue
        for s in socks:
            s.close()
        return base
    pytest.skip("no free block of ports for a local Ray cluster")


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def cluster_processes(tmp: Path) -> list[str]:
    """Command lines of live processes that belong to the cluster under `tmp` (raylet, gcs, ...)."""
    out = subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(tmp) + "/" in line]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """cluster/local.sh up on ports and a temp dir of our own; down (and checked empty) at the end."""
    if shutil.which("ray") is None:
        pytest.skip("the `ray` command is not installed")
    try:
        import aiohttp  # noqa: F401  (ray[default]: the dashboard and job server)
    except ImportError:
        pytest.skip("ray[default] is not installed (no job server): pip install 'ray[default]'")
    tmp = Path(f"/tmp/hwt{os.getpid()}")  # short: Ray's socket paths must stay under 108 bytes
    env = dict(os.environ, HW_RAY_TMP=str(tmp), HW_RAY_PORT=str(free_port()),
               HW_DASHBOARD_PORT=str(free_port()), HW_PORT_BASE=str(free_port_block()))
    env.pop("RAY_ADDRESS", None)
    up = subprocess.run([str(LOCAL_SH), "up"], env=env, capture_output=True, text=True, timeout=180)
    info = {"env": env, "tmp": tmp, "address": f"127.0.0.1:{env['HW_RAY_PORT']}",
            "dashboard": f"http://127.0.0.1:{env['HW_DASHBOARD_PORT']}"}
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield info
    finally:
        if ray.is_initialized():
            ray.shutdown()
        down = subprocess.run([str(LOCAL_SH), "down"], env=env, capture_output=True, text=True, timeout=120)
        left = cluster_processes(tmp)
        subprocess.run(["rm", "-rf", str(tmp)])
        assert down.returncode == 0 and not left, f"{down.stdout}{down.stderr}\nstill running: {left}"
        assert "RAY_ADDRESS" not in os.environ


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory, random_model):
    d = tmp_path_factory.mktemp("job")
    (d / "in.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return d, random_model("llama", "default")[0]


def batch_command(d: Path, model: Path, out: str) -> list[str]:
    return ["hogwild-ray", "batch", "--input", str(d / "in.jsonl"), "--output", str(d / out), "--model", str(model),
            "--workers", "2", "--max-tokens", "16"]


def check_results(path: Path) -> None:
    order = {p["id"]: i for i, p in enumerate(PROBLEMS)}  # the lines come as the problems finish
    records = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: order[r["id"]])
    assert [r["id"] for r in records] == [p["id"] for p in PROBLEMS]
    for r, p in zip(records, PROBLEMS):
        assert r["problem"] == p["problem"] and isinstance(r["answer"], str) and r["stats"]


def job_env() -> dict:
    """The job's runtime_env: this checkout as the working dir, imported from there (no network)."""
    sys.path.insert(0, str(ROOT / "examples"))
    from submit_job import runtime_env

    return runtime_env(CODE, [])


# ----------------------------------------------------------------------------- Ray jobs

def test_batch_job_by_cli(cluster, job_inputs):
    """`ray job submit --working-dir ... -- hogwild-ray batch ...` waits for the job and streams its logs."""
    d, model = job_inputs
    env = job_env()
    cmd = ["ray", "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(CODE),
           "--runtime-env-json", json.dumps({"excludes": env["excludes"], "env_vars": env["env_vars"]}),
           "--", *batch_command(d, model, "cli.jsonl")]
    run = subprocess.run(cmd, env=cluster["env"], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "succeeded" in (run.stdout + run.stderr).lower()
    assert "[2/2] id=" in run.stdout and "batch: 2/2 done" in run.stdout  # progress, through the job's logs
    check_results(d / "cli.jsonl")


def test_batch_job_by_job_submission_client(cluster, job_inputs):
    """examples/submit_job.py: JobSubmissionClient, wait for success, print the logs; results where asked."""
    d, model = job_inputs
    out = d / "client.jsonl"
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "submit_job.py"), "--address", cluster["dashboard"],
                          "--input", str(d / "in.jsonl"), "--output", str(out), "--model", str(model),
                          "--max-tokens", "16", "--working-dir", str(CODE), "--timeout", "200"],
                         env=cluster["env"], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "SUCCEEDED" in run.stderr and "batch: 2/2 done" in run.stdout
    assert "[1/2] id=" in run.stdout and all(f"/2] id={pid} " in run.stdout for pid in ("p1", "p2"))  # any order
    check_results(out)


# ----------------------------------------------------------------------------- two nodes

def test_coordinator_on_the_head_and_shards_on_the_other_node_pass_the_oracle(cluster, random_model):
    """tp=2 shards forced onto node2 by its custom resource, the coordinator onto the head by its own:
    the step channel must be the socket one, and the oracle must pass through it."""
    path, hf_model = random_model("llama", "default")
    ray.init(address=cluster["address"], log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{CODE}:{CODE / 'kernels'}"}})
    try:
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        head = next(k for k, r in nodes.items() if "hw_head" in r)
        node2 = next(k for k, r in nodes.items() if "hw_node2" in r)
        with hw.HogwildEngine.from_pretrained(str(path), backend="ray", tp=2, cache_tokens=2048, attention="torch",
                                              shard_resources={"hw_node2": 1},
                                              coordinator_resources={"hw_head": 1}) as engine:
            assert engine.placement == {"coordinator_node": head, "shard_nodes": [node2, node2], "channel": "socket"}
            worst, finished, session = run_oracle(engine, hf_model, 3, "combined", steps=14)
            assert worst <= TOL, f"max relative logit error {worst:.2e}"
            assert finished >= 2  # steps ended by the forced boundaries (oracle.FORCED)
    finally:
        ray.shutdown()


def test_placement_options_are_checked():
    with pytest.raises(hw.errors.InvalidRequestError, match="engine sets itself"):
        hw.HogwildEngine.from_pretrained(None, backend="ray", tp=2, shard_resources={"CPU": 2})
    with pytest.raises(hw.errors.InvalidRequestError, match="need backend='ray'"):
        hw.HogwildEngine.from_pretrained(None, coordinator_resources={"hw_head": 1})


# ----------------------------------------------------------------------------- manifests

def test_launcher_yaml_validates_against_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster" / "gpu-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert any("--shm-size" in o for o in config["docker"]["run_options"])
    assert any("hogwild-ray" in c for c in config["setup_commands"])
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers)


# Required fields of KubeRay's v1 CRDs: the fields without `omitempty` in
# ray-project/kuberay ray-operator/apis/ray/v1/raycluster_types.go (RayClusterSpec.headGroupSpec;
# HeadGroupSpec.rayStartParams, template; WorkerGroupSpec.groupName, minReplicas, maxReplicas,
# rayStartParams, template), which controller-gen turns into the `required` lists of
# ray-operator/config/crd/bases/ray.io_rayclusters.yaml; RayJobSpec (rayjob_types.go) has no
# required field, its rayClusterSpec is a RayClusterSpec. Pod templates: core/v1 PodSpec.containers
# and Container.name are required.
CLUSTER_SPEC_REQUIRED = ["headGroupSpec"]
HEAD_GROUP_REQUIRED = ["rayStartParams", "template"]
WORKER_GROUP_REQUIRED = ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"]


def check_cluster_spec(spec: dict) -> None:
    for key in CLUSTER_SPEC_REQUIRED:
        assert key in spec, key
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    for key in HEAD_GROUP_REQUIRED:
        assert key in spec["headGroupSpec"], key
    for group in spec.get("workerGroupSpecs", []):
        for key in WORKER_GROUP_REQUIRED:
            assert key in group, (group.get("groupName"), key)
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
    for group in groups:
        pod = group["template"]["spec"]
        assert pod["containers"] and all(c.get("name") and c.get("image") for c in pod["containers"])
        shm = {v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
        assert any(m["mountPath"] == "/dev/shm" and m["name"] in shm
                   for c in pod["containers"] for m in c.get("volumeMounts", [])), "no /dev/shm in memory"
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu", 0) for g in spec["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]]
    assert gpus and all(n >= 1 for n in gpus)


def test_kuberay_raycluster_carries_the_required_fields():
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster") and doc["metadata"]["name"]
    check_cluster_spec(doc["spec"])


def test_kuberay_rayjob_carries_the_required_fields():
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob") and doc["metadata"]["name"]
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("hogwild-ray batch --input ") and "--output " in spec["entrypoint"]
    assert "hogwild-ray" in yaml.safe_load(spec["runtimeEnvYAML"])["pip"]
    check_cluster_spec(spec["rayClusterSpec"])
