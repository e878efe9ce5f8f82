"""Cluster use for real: a two-node Ray cluster on this machine (cluster/local.sh) with a job
server; `hogwild-ray batch` submitted as a Ray job by CLI and by JobSubmissionClient; an engine
with its coordinator on the head and its shards on the other node passing the oracle; the
launcher YAML against Ray's schema and the KubeRay manifests against KubeRay's required fields.
Security: every cluster file and script runs Ray with token authentication (and the local
cluster refuses clients without the token), dashboards are not bound to every interface, the
project is never installed by its bare (unregistered) name, and what is shipped to a cluster or
an image leaves out secrets, virtualenvs and weights.

The cluster uses its own ports, temp dir and token file (see local.sh), so other test modules'
ray.init() start their own clusters; it is stopped at module teardown and must leave no process behind.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml
from oracle import TOL, run_oracle

ray = pytest.importorskip("ray")

import hogwild_ray as hw  # noqa: E402
from ray_state import alive_actors, busy_one  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LOCAL_SH = ROOT / "cluster" / "local.sh"
CODE = Path(hw.__file__).resolve().parent.parent  # the checkout the test imports; jobs and actors use it too
PROBLEMS = [{"id": "p1", "problem": "Compute 2 + 3."}, {"id": "p2", "problem": "Compute 4 * 5."}]
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


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
    out = subprocess.run(["ps", "-wweo", "args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(tmp) + "/" in line]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """cluster/local.sh up on ports, a temp dir and a token file of our own; down (and checked empty) at the end.

    local.sh gets no RAY_AUTH_MODE: it must turn token authentication on by itself. It makes the
    token file (RAY_AUTH_TOKEN_PATH, absent before). Clients use "client_env": the same plus
    RAY_AUTH_MODE=token, without which Ray clients send no token.
    """
    if shutil.which("ray") is None:
        pytest.skip("the `ray` command is not installed")
    try:
        import aiohttp  # noqa: F401  (ray[default]: the dashboard and job server)
    except ImportError:
        pytest.skip("ray[default] is not installed (no job server): pip install 'ray[default]'")
    if importlib.util.find_spec("ray._private.authentication") is None:
        pytest.skip("this Ray has no token authentication (Ray >= 2.52), and local.sh starts no open cluster")
    tmp = Path(f"/tmp/hwt{os.getpid()}")  # short: Ray's socket paths must stay under 108 bytes
    token_path = tmp_path_factory.mktemp("auth") / "token"
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS and k != "RAY_ADDRESS"}
    env.update(HW_RAY_TMP=str(tmp), HW_RAY_PORT=str(free_port()), HW_DASHBOARD_PORT=str(free_port()),
               HW_PORT_BASE=str(free_port_block()), RAY_AUTH_TOKEN_PATH=str(token_path),
               RAY_worker_niceness="0")  # its replicas as busy as this test, not below the CPU-bound tests beside
    up = subprocess.run([str(LOCAL_SH), "up"], env=env, capture_output=True, text=True, timeout=180)
    info = {"env": env, "client_env": dict(env, RAY_AUTH_MODE="token"), "tmp": tmp, "token_path": token_path,
            "address": f"127.0.0.1:{env['HW_RAY_PORT']}", "dashboard": f"http://127.0.0.1:{env['HW_DASHBOARD_PORT']}"}
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        info["token"] = token_path.read_text().strip()
        yield info
    finally:
        if ray.is_initialized():
            ray.shutdown()
        down = subprocess.run([str(LOCAL_SH), "down"], env=env, capture_output=True, text=True, timeout=120)
        left = cluster_processes(tmp)
        subprocess.run(["rm", "-rf", str(tmp)])
        assert down.returncode == 0 and not left, f"{down.stdout}{down.stderr}\nstill running: {left}"
        assert "RAY_ADDRESS" not in os.environ


@pytest.fixture
def driver_auth(cluster):
    """This process as a client of the cluster: its auth mode and token in the environment. Ray reads
    both once and caches them, so they are reloaded now and again after the test, when the
    environment is put back (other modules' ray.init() start clusters with their own token)."""
    from ray._private.authentication_test_utils import reset_auth_token_state

    saved = {k: os.environ.get(k) for k in AUTH_VARS}
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(cluster["token_path"]))
    reset_auth_token_state()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_auth_token_state()


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
    run = subprocess.run(cmd, env=cluster["client_env"], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "succeeded" in (run.stdout + run.stderr).lower()
    assert "[2/2] id=" in run.stdout and "batch: 2/2 problems done" in run.stdout  # progress, through the job's logs
    check_results(d / "cli.jsonl")


def test_batch_job_by_job_submission_client(cluster, job_inputs):
    """examples/submit_job.py: JobSubmissionClient, wait for success, print the logs; results where asked.
    Run without RAY_AUTH_MODE in its environment: the script sends the token by itself."""
    d, model = job_inputs
    out = d / "client.jsonl"
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "submit_job.py"), "--address", cluster["dashboard"],
                          "--input", str(d / "in.jsonl"), "--output", str(out), "--model", str(model),
                          "--max-tokens", "16", "--working-dir", str(CODE), "--timeout", "200"],
                         env=cluster["env"], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "SUCCEEDED" in run.stderr and "batch: 2/2 problems done" in run.stdout
    assert "[1/2] id=" in run.stdout and all(f"/2] id={pid} " in run.stdout for pid in ("p1", "p2"))  # any order
    check_results(out)


# ----------------------------------------------------------------------------- two nodes

def test_coordinator_on_the_head_and_shards_on_the_other_node_pass_the_oracle(cluster, driver_auth, random_model):
    """tp=2 shards forced onto node2 by its custom resource, the coordinator onto the head by its own:
    the step channel must be the socket one, and the oracle must pass through it."""
    path, hf_model = random_model("llama", "default")
    ray.init(address=cluster["address"], log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{CODE}:{CODE / 'kernels'}"}})
    try:
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        head = next(k for k, r in nodes.items() if "hw_head" in r)
        node2 = next(k for k, r in nodes.items() if "hw_node2" in r)
        with hw.HogwildEngine.from_pretrained(str(path), backend="ray", tp=2, device="cpu", cache_tokens=2048,
                                              attention="torch", shard_resources={"hw_node2": 1},
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


# ----------------------------------------------------------------------------- replicas on both nodes

def serve_replicas(cluster) -> dict[str, str]:
    """The engine replicas of batch and eval runs alive on the cluster now (this process is its
    driver): actor id -> node id."""
    return {a["ActorID"]: a["Address"]["NodeID"] for a in alive_actors()
            if a["ActorClassName"].startswith("ServeReplica:hogwild-batch-")}


def serve_apps() -> dict:
    """Serve's applications on the cluster now: none once the driver that started Serve has shut it
    down (the client this process keeps then names a dead controller)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.status().applications
    except (ray.exceptions.RayActorError, RayServeException):
        return {}


def batch_apps() -> dict:
    """The batch and eval runs' applications on the cluster now, by name."""
    return {name: app for name, app in serve_apps().items() if name.startswith("hogwild-batch-")}


def apps_running() -> bool:
    """Whether batch apps run and their replicas are up (loading the model is work too: not a problem's)."""
    apps = batch_apps()
    return bool(apps) and all(app.status == "RUNNING" for app in apps.values())


def wait_for(what, timeout: float, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(step)
    return what()


def eval_records(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()]


def test_eval_over_replicas_on_both_nodes_ends_with_its_driver_resumes_and_equals_one_engine(
        cluster, driver_auth, random_model, tmp_path):
    """eval --replicas 2 on the two-node cluster: a replica on each node; the driver SIGKILLed
    mid-run takes its replicas with it (their lease ends); the rerun resumes, and the results
    equal one in-process engine's, record for record (each problem has its own seeds)."""
    model = random_model("llama", "default")[0]
    flags = ["--generated", "6", "--workers", "2", "--budgets", "8,24", "--modes", "single,hogwild",
             "--model", str(model), "--temperature", "1"]
    from hogwild_ray.cli import main

    assert main(["eval", *flags, "--out", str(tmp_path / "one"), "--quiet"]) == 0  # one engine, in this process
    command = ["hogwild-ray", "eval", *flags, "--out", str(tmp_path / "rep"), "--address", cluster["address"],
               "--replicas", "2"]
    ray.init(address=cluster["address"], log_to_driver=False)
    try:
        driver = subprocess.Popen(command, env=cluster["client_env"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            # polled often, killed once two runs are written (a line per budget): its 12 runs are short
            placed = wait_for(lambda: len(set(serve_replicas(cluster).values())) == 2, 240, step=0.1)
            assert placed, f"the replicas are not on both nodes: {serve_replicas(cluster)}"
            parts = tmp_path / "rep" / "parts"
            assert wait_for(lambda: any(p.read_text().count("\n") >= 4 for p in parts.glob("*.jsonl")), 240, step=0.02)
        finally:
            driver.kill()
            driver.wait()
        gone = wait_for(lambda: not serve_replicas(cluster) and not batch_apps(), 60, step=0.5)
        assert gone, f"replicas outlived their driver: {serve_replicas(cluster)} {list(batch_apps())}"
        rerun = subprocess.run(command, env=cluster["client_env"], capture_output=True, text=True, timeout=400)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        skipped = int(rerun.stderr.split("eval: 12 runs, ", 1)[1].split(" ", 1)[0])
        assert 2 <= skipped < 12  # resumed after the runs the killed driver had written
        assert eval_records(tmp_path / "rep" / "results.jsonl") == eval_records(tmp_path / "one" / "results.jsonl")
        assert wait_for(lambda: not serve_replicas(cluster) and not batch_apps(), 30)
    finally:
        ray.shutdown()


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
    assert "pip" not in yaml.safe_load(spec["runtimeEnvYAML"])  # the project comes in the image
    check_cluster_spec(spec["rayClusterSpec"])


def mappings(obj) -> list[dict]:
    """Every mapping in a parsed YAML document, nested ones included."""
    if isinstance(obj, dict):
        return [obj, *(m for v in obj.values() for m in mappings(v))]
    return [m for v in obj for m in mappings(v)] if isinstance(obj, list) else []


def test_kuberay_rayservice_carries_the_required_fields():
    """The RayService: token auth, one Serve app built by app_builder with args ServeSettings takes, GPU
    workers, the API key from a Secret (never in the file), every service ClusterIP, the proxy on the pod IP."""
    from hogwild_ray.serve.app import API_KEY_ENV, ServeSettings, _coerce

    text = (KUBERAY / "rayservice.yaml").read_text()
    doc = yaml.safe_load(text)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService") and doc["metadata"]["name"]
    spec = doc["spec"]
    # RayServiceSpec (rayservice_types.go): the cluster is rayClusterConfig; the unhealthy-second
    # thresholds are deprecated and unused since KubeRay v1.1.0
    assert "rayClusterSpec" not in spec and not {"serviceUnhealthySecondThreshold",
                                                 "deploymentUnhealthySecondThreshold"} & set(spec)
    cluster = spec["rayClusterConfig"]
    check_cluster_spec(cluster)
    assert cluster["authOptions"]["mode"] == "token"

    serve = yaml.safe_load(spec["serveConfigV2"])  # a YAML document in a string
    assert serve["http_options"]["host"] == "0.0.0.0" and serve["http_options"].get("port", 8000) == 8000
    [app] = serve["applications"]
    assert (app["name"], app["route_prefix"]) == ("hogwild", "/")
    assert app["import_path"] == "hogwild_ray.serve.app:app_builder"
    assert not {"pip", "working_dir"} & set(app.get("runtime_env", {}))  # the project comes in the image
    args = app["args"]
    assert set(args) <= set(ServeSettings.__dataclass_fields__), set(args) - set(ServeSettings.__dataclass_fields__)
    assert all(isinstance(v, str) for v in args.values())  # as `serve run key=value` passes them
    settings = ServeSettings(**{k: _coerce(k, v) for k, v in args.items()})  # app_builder's own check
    assert settings.model and settings.model.startswith("/models/") and settings.device == "cuda"
    assert settings.workers == 4 and (settings.autoscale or (settings.replicas, settings.replicas))[1] >= 1
    assert settings.api_key is None and "api_key" not in args  # the key comes from the Secret

    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": 8000, "name": "serve"} in head["ports"]  # KubeRay's serve service needs the name
    models = [m for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]
              for m in c.get("volumeMounts", []) if m["mountPath"] == "/models"]
    assert models and all(m.get("readOnly") for m in models)
    for c in ray_containers(cluster):  # the key on every Ray container, by reference only
        [env] = [e for e in c["env"] if e["name"] == API_KEY_ENV]
        assert "value" not in env, c["name"]
        assert env["valueFrom"]["secretKeyRef"] == {"name": "hogwild-api-key", "key": "api-key"}, c["name"]
    for m in [*mappings(doc), *mappings(serve)]:  # no literal key or token anywhere, in env or elsewhere
        assert not ({"name", "value"} <= set(m) and re.search(r"KEY|TOKEN", str(m["name"]), re.I)), m
        assert not [k for k in m if re.fullmatch(r"(hogwild_)?api[_-]?key", str(k), re.I)], m
    made = re.findall(r"kubectl create secret generic hogwild-api-key --from-literal=api-key=(\S+)", text)
    assert made and all(v.startswith(('"$(', "$(")) for v in made)  # how to make it, with a generated key

    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"  # the serve service takes the head's type
    assert spec.get("serveService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    assert not re.search(r"LoadBalancer|NodePort", re.sub(r"#.*", "", text))


# ----------------------------------------------------------------------------- security

CLUSTER_DIR = ROOT / "cluster"
KUBERAY = CLUSTER_DIR / "kuberay"
LAUNCHER = CLUSTER_DIR / "gpu-cluster.yaml"
SUBMIT_JOB = ROOT / "examples" / "submit_job.py"


def load_submit_job():
    sys.path.insert(0, str(ROOT / "examples"))
    import submit_job

    return submit_job


def kuberay_cluster_specs() -> dict[str, dict]:
    """The RayClusterSpec of each KubeRay manifest (a RayJob's is its rayClusterSpec, a RayService's its
    rayClusterConfig)."""
    docs = {p.name: yaml.safe_load(p.read_text())
            for p in (KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml", KUBERAY / "rayservice.yaml")}
    return {name: d["spec"].get("rayClusterSpec") or d["spec"].get("rayClusterConfig") or d["spec"]
            for name, d in docs.items()}


def ray_containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def start_commands(config: dict) -> list[str]:
    keys = ("head_start_ray_commands", "worker_start_ray_commands")
    return [c for key in keys for c in config[key] if "ray start" in c]


@pytest.mark.reliability
def test_every_cluster_file_and_script_runs_ray_with_token_authentication():
    """Without RAY_AUTH_MODE=token on every node, anyone who reaches the GCS or the job API runs code there."""
    shipped = {p.relative_to(CLUSTER_DIR).as_posix() for p in CLUSTER_DIR.rglob("*") if p.is_file()}
    checked = {"gpu-cluster.yaml", "local.sh", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
               "kuberay/rayservice.yaml", "kuberay/Dockerfile",
               "kuberay/Dockerfile.dockerignore"}  # the last: no Ray in it (see the excludes test)
    assert shipped <= checked, f"a cluster file this test does not check: {sorted(shipped - checked)}"

    config = yaml.safe_load(LAUNCHER.read_text())  # launcher: the container's env, each ray start, the token file
    assert "-e RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert len(start_commands(config)) == 2
    for cmd in start_commands(config):
        assert re.search(r"(^|[;&\s])RAY_AUTH_MODE=token ray start ", cmd), cmd
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"

    for name, spec in kuberay_cluster_specs().items():  # KubeRay: the operator's token Secret, and the mode
        assert spec.get("authOptions", {}).get("mode") == "token", name
        assert tuple(map(int, spec["rayVersion"].split(".")[:2])) >= (2, 52), name  # authOptions needs it
        for c in ray_containers(spec):
            assert {"name": "RAY_AUTH_MODE", "value": "token"} in c.get("env", []), (name, c["name"])
    assert re.search(r"^ENV RAY_AUTH_MODE=token$", (KUBERAY / "Dockerfile").read_text(), re.M)

    local = LOCAL_SH.read_text()  # local.sh: on whatever the caller's environment says
    assert re.search(r"^export RAY_AUTH_MODE=token$", local, re.M)
    assert not re.search(r"RAY_AUTH_MODE=\S*disabled", local)

    source = SUBMIT_JOB.read_text()  # the job client: sends the token whatever the caller's environment says
    assert 'os.environ["RAY_AUTH_MODE"] = "token"' in source
    assert source.index('os.environ["RAY_AUTH_MODE"] = "token"') < source.index("from ray.job_submission import")


@pytest.mark.reliability
def test_dashboards_are_not_bound_to_every_interface():
    """The launcher's dashboard on the head's loopback (reached by `ray dashboard`'s SSH tunnel), the local
    cluster's too; KubeRay's behind a ClusterIP service only (the operator and submitter reach it in-cluster)."""
    config = yaml.safe_load(LAUNCHER.read_text())
    hosts = [m for c in start_commands(config) for m in re.findall(r"--dashboard-host[= ](\S+)", c)]
    assert hosts == ["127.0.0.1"]
    assert re.findall(r"--dashboard-host[= ](\S+)", LOCAL_SH.read_text()) == ["127.0.0.1"]
    for name, spec in kuberay_cluster_specs().items():
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("dashboard-host", "unset") not in ("0.0.0.0", "::", "[::]"), name
        assert head.get("serviceType") == "ClusterIP", name
    for path in [LAUNCHER, LOCAL_SH, *KUBERAY.iterdir(), SUBMIT_JOB]:
        assert not re.search(r"dashboard.host\W+0\.0\.0\.0", path.read_text()), path


BARE_PROJECT = re.compile(r"^hogwild[-_.]ray(\[[^\]]*\])?([<>=!~].*)?$", re.I)


def pip_install_targets(text: str) -> list[str]:
    """The arguments of every `pip install` in `text` (commands and comments alike), quotes removed,
    up to the end of that command (; && || |)."""
    targets = []
    for line in text.splitlines():
        for m in re.finditer(r"pip3? install\s+(.*)", line):
            try:
                lexer = shlex.shlex(m.group(1), posix=True, punctuation_chars=";&|")
                lexer.whitespace_split, lexer.commenters = True, "#"
                words = list(lexer)
            except ValueError:
                words = m.group(1).split()
            for w in words:
                if w and set(w) <= set(";&|"):
                    break
                if not w.startswith("-"):
                    targets.append(w)
    return targets


@pytest.mark.reliability
def test_no_file_installs_the_project_by_its_bare_name():
    """hogwild-ray is not on PyPI: installing it by name runs whatever someone registers under it, on every node."""
    files = [p for p in CLUSTER_DIR.rglob("*") if p.is_file()] + sorted((ROOT / "examples").glob("*.py"))
    for path in files:
        text = path.read_text()
        bare = [t for t in pip_install_targets(text) if BARE_PROJECT.match(t.strip("'\""))]
        assert not bare, f"{path}: pip install {bare}"
        for doc in (yaml.safe_load_all(text) if path.suffix == ".yaml" else []):
            kind = (doc or {}).get("kind")
            envs = [yaml.safe_load(doc["spec"].get("runtimeEnvYAML", "{}"))] if kind == "RayJob" else []
            if kind == "RayService":  # each Serve application's runtime_env
                serve = yaml.safe_load(doc["spec"].get("serveConfigV2", "{}"))
                envs = [a.get("runtime_env", {}) for a in serve.get("applications", [])]
            for env in envs:
                assert not [r for r in env.get("pip", []) if BARE_PROJECT.match(r.replace(" ", ""))], path
    config = yaml.safe_load(LAUNCHER.read_text())  # the launcher installs the mounted checkout
    assert config["file_mounts"].get("~/hogwild-ray") == "."
    assert pip_install_targets("\n".join(config["setup_commands"])) == ["~/hogwild-ray"]

    submit_job = load_submit_job()  # --pip: the project pinned to code the user controls, or refused
    sha, digest = "0123456789abcdef" * 2 + "01234567", "ab" * 32
    for spec in ["hogwild-ray", "hogwild_ray==0.1.0", "Hogwild.Ray>=0.1", "hogwild-ray[test]",
                 "git+https://github.com/OWNER/hogwild-ray@COMMIT", f"git+https://github.com/OWNER/hogwild-ray@{sha}",
                 "hogwild-ray @ git+https://github.com/me/hogwild-ray@main", "https://example.org/hogwild_ray.whl",
                 "--extra-index-url https://example.org/simple"]:
        with pytest.raises(ValueError):
            submit_job.check_pip(spec)
        with pytest.raises(ValueError):
            submit_job.runtime_env(ROOT, [spec])
    for spec in [f"hogwild-ray @ git+https://github.com/me/hogwild-ray@{sha}", "/opt/wheels/hogwild_ray-0.1.0.whl",
                 f"https://example.org/hogwild_ray-0.1.0-py3-none-any.whl#sha256={digest}", "numpy>=1.26"]:
        assert submit_job.runtime_env(ROOT, [spec])["pip"] == [spec]
    with pytest.raises(SystemExit):  # refused at the command line, before anything is submitted
        submit_job.main(["--input", "x", "--output", "/y", "--pip", "hogwild-ray"])


# Paths that must never leave the machine with the code, and paths the code needs.
SECRET_OR_BULKY = [".venv/bin/python", ".git/config", ".env", ".env.local", "hogwild_ray/.env",
                   "model.safetensors", "models/m.gguf", "weights/pytorch_model.bin", "hogwild_ray/x.safetensors",
                   "benchmarks/results/run.json", "hogwild_ray/__pycache__/engine.cpython-311.pyc"]
NEEDED = ["pyproject.toml", "README.md", "hogwild_ray/__init__.py", "hogwild_ray/core/results.py",
          "kernels/hogwild_kernels/__init__.py"]


def docker_ignored(path: str, lines: list[str]) -> bool:
    """Docker's .dockerignore rule: patterns from the context root (** any depth), each tried on the
    path and its parents, the last one that matches decides (! re-includes)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").strip().strip("/")
        rx = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if any(re.fullmatch(rx.replace(r"\?", "[^/]"), p) for p in prefixes):
            ignored = not negate
    return ignored


def rsync_excluded(path: str, patterns: list[str]) -> bool:
    """rsync --exclude: a pattern without / matches a name at any depth, one with / a path's tail; a
    trailing / only directories; an excluded directory takes its contents with it."""
    parts = path.split("/")
    for i in range(len(parts)):
        is_dir = i < len(parts) - 1
        for pat in patterns:
            p = pat.rstrip("/")
            if pat.endswith("/") and not is_dir:
                continue
            n = p.count("/") + 1
            tail = "/".join(parts[max(0, i + 1 - n): i + 1])
            if fnmatch.fnmatchcase(tail, p):
                return True
    return False


@pytest.mark.reliability
def test_what_is_shipped_leaves_out_secrets_environments_and_weights(tmp_path):
    """The job's working_dir (zipped by Ray itself with EXCLUDES), the launcher's file mounts (rsync_exclude)
    and the image's build context (the Dockerfile's ignore file) carry the code, never .env, .venv, weights..."""
    from ray._private.runtime_env.packaging import _zip_files

    tree = tmp_path / "checkout"
    for rel in SECRET_OR_BULKY + NEEDED:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("x")
    zipped = tmp_path / "working_dir.zip"
    _zip_files(str(tree), load_submit_job().EXCLUDES, str(zipped), include_gitignore=False)
    assert sorted(zipfile.ZipFile(zipped).namelist()) == sorted(NEEDED)

    rsync_exclude = yaml.safe_load(LAUNCHER.read_text())["rsync_exclude"]
    assert [p for p in SECRET_OR_BULKY if not rsync_excluded(p, rsync_exclude)] == []
    assert [p for p in NEEDED if rsync_excluded(p, rsync_exclude)] == []

    ignore = KUBERAY / "Dockerfile.dockerignore"  # BuildKit's ignore file for -f cluster/kuberay/Dockerfile
    lines = ignore.read_text().splitlines()
    assert [p for p in SECRET_OR_BULKY if not docker_ignored(p, lines)] == []
    assert [p for p in NEEDED if docker_ignored(p, lines)] == []
    copies = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", (KUBERAY / "Dockerfile").read_text(), re.M)
    sources = [s for c in copies for s in c.split()]
    assert "." not in sources and sources and not [s for s in sources if docker_ignored(s, lines)]


def http_status(url: str, token: str | None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.reliability
def test_local_cluster_refuses_clients_without_its_token(cluster):
    """The job API and the GCS of cluster/local.sh: no token or a wrong one is refused (and runs
    nothing), the cluster's token is let in. The token file is the user's alone."""
    assert stat.S_IMODE(cluster["token_path"].stat().st_mode) == 0o600
    jobs = f"{cluster['dashboard']}/api/jobs/"
    assert http_status(jobs, None) == 401
    assert http_status(jobs, "0" * 64) == 403
    assert http_status(jobs, cluster["token"]) == 200

    no_token = {k: v for k, v in cluster["env"].items() if k not in AUTH_VARS}
    no_token["HOME"] = str(cluster["token_path"].parent)  # and no ~/.ray/auth_token to fall back on
    marker = f"refused-{os.getpid()}"
    run = subprocess.run(["ray", "job", "submit", "--address", cluster["dashboard"], "--no-wait", "--", "echo", marker],
                         env=no_token, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "Authentication" in run.stderr, run.stdout + run.stderr
    with urllib.request.urlopen(urllib.request.Request(jobs, headers={"Authorization": f"Bearer {cluster['token']}"}),
                                timeout=20) as response:
        assert marker not in response.read().decode()  # refused before it ran
    for env in (no_token, dict(no_token, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="f" * 64)):
        run = subprocess.run(["ray", "status", "--address", cluster["address"]], env=env,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode != 0 and "InvalidAuthToken" in run.stderr, run.stdout + run.stderr
    run = subprocess.run(["ray", "status", "--address", cluster["address"]], env=cluster["client_env"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "node_" in run.stdout, run.stdout + run.stderr


# ----------------------------------------------------------------------------- last: a node dies

def test_batch_over_replicas_loses_nothing_when_a_nodes_raylet_is_killed(cluster, driver_auth, random_model,
                                                                        tmp_path):
    """batch --replicas 2 with a replica on each node; node2's raylet SIGKILLed mid-run (the node
    and its replica die): the problems it held run again on the head, every id is in the output
    exactly once, the summary counts the retries, and nothing is left running. Last in the module:
    node2 stays down."""
    model = random_model("llama", "default")[0]
    problems = [{"id": f"n{i}", "problem": f"Compute {i} * {i + 2}."} for i in range(24)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    out = tmp_path / "out.jsonl"
    command = ["hogwild-ray", "batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--model",
               str(model), "--address", cluster["address"], "--replicas", "2", "--max-tokens", "256",
               "--temperature", "0", "--max-concurrent", "2"]  # in waves: node2's replica holds work to the end
    # (256 tokens a worker, a second or more a problem; 24 of them: Serve may send node2's replica its first
    # only after several, and it must still hold one when it is seen running and killed)
    ray.init(address=cluster["address"], log_to_driver=False)
    try:
        driver = subprocess.Popen(command, env=cluster["client_env"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            placed = wait_for(lambda: len(set(serve_replicas(cluster).values())) == 2, 240, step=0.5)
            assert placed, f"the replicas are not on both nodes: {serve_replicas(cluster)}"
            [node2] = [n for n in ray.nodes() if n["Alive"] and "hw_node2" in n["Resources"]]
            [replica2] = [a["Pid"] for a in alive_actors() if a["ActorID"] in serve_replicas(cluster)
                          and a["Address"]["NodeID"] == node2["NodeID"]]
            assert wait_for(apps_running, 240, step=0.2), "the app never ran"
            assert wait_for(lambda: out.exists() and out.read_text().count("\n") >= 1, 240)
            assert busy_one([replica2], within_s=240), "node2's replica ran nothing"
            node_id = f"--node_id={node2['NodeID']}"
            raylets = [line.split(None, 1)[0] for line in subprocess.run(
                ["ps", "-wweo", "pid=,args="], capture_output=True, text=True).stdout.splitlines()
                if "/raylet " in line and node_id in line.split()]
            assert raylets, f"node2's raylet ({node_id}) is not running"
            for pid in raylets:
                os.kill(int(pid), signal.SIGKILL)
            _, err = driver.communicate(timeout=400)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
        assert driver.returncode == 0, err[-3000:]
        ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
        assert sorted(ids) == sorted(p["id"] for p in problems)  # every id exactly once, no line cut or lost
        done = next(line for line in err.splitlines() if line.startswith("batch: 24/24 problems done"))
        retried = int(done.split(" retried")[0].rsplit(" ", 1)[1])
        assert retried >= 1 and err.count("running it again") == retried, err[-3000:]
        assert wait_for(lambda: not serve_replicas(cluster) and not batch_apps(), 60)
    finally:
        ray.shutdown()
