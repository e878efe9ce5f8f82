"""The OpenAI-compatible server end to end, on a real local Ray Serve with the built-in model on
the CPU, driven by the real `openai` client (and raw HTTP for what a client library hides):
chat and completions, streamed and not, concurrent requests sharing passes, a closed stream
freeing its pages, refusals in OpenAI's error shape, the API key, the waiting limit, Prometheus
metrics, two replicas, and nothing left running after shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.serve
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from ray_state import assert_clean  # noqa: E402

from hogwild_ray.serve.app import DEFAULT_MODEL_NAME, ServeSettings, build_app  # noqa: E402
from hogwild_ray.serve.launch import free_port, wait_healthy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-0123456789"
MODEL = DEFAULT_MODEL_NAME
PROBLEM = "What is 17 * 23?"
SMALL_CACHE = 1024  # tokens (64 pages): one session of the small app (59 pages) at a time


@pytest.fixture(scope="module")
def server(random_model, builtin_model):
    """The main app (2 engine replicas of a small random model under the built-in model's name: the
    serving machinery, not the model, is tested here; an API key) at /, and a small one (the
    built-in model; a cache that holds one session, at most one waiting) at /small, on one local
    Serve instance."""
    port = free_port()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)  # logical CPUs: room for a tp=2 app too
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    main = ServeSettings(model=str(random_model("llama")[0]), served_model_name=MODEL, workers=2, max_tokens=24,
                         replicas=2, api_key=KEY, cache_tokens=16384)  # 16k: room to spare
    serve.run(build_app(main), name="main", route_prefix="/", blocking=False)
    serve.run(build_app(ServeSettings(workers=2, max_tokens=96, cache_tokens=SMALL_CACHE, max_waiting=1,
                                      served_model_name="small")), name="small", route_prefix="/small")
    wait_healthy(f"http://127.0.0.1:{port}/health")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=300)


def post(url: str, body: bytes | dict, key: str | None = KEY, stream: bool = False):
    """(status, headers, parsed JSON body) of a raw POST."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.headers, (r.read() if stream else json.loads(r.read()))
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def metrics(server: str) -> dict[str, float]:
    """Every sample of /metrics by name (labels dropped, values of one name summed), parsed by
    prometheus_client's own parser."""
    text = urllib.request.urlopen(f"{server}/metrics", timeout=30).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def chat(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": PROBLEM}], **kw}


# ----------------------------------------------------------------------------- the openai client

def test_models_list(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_completion(client):
    """No finisher (whose answer, written after the budget, is not in the transcript): the content is
    the \\boxed{} answer the collaboration wrote, or empty."""
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROBLEM}], max_tokens=12,
                                       extra_body={"workers": 3, "max_forward_passes": 60, "finisher": False})
    [choice] = r.choices
    extra = choice.model_extra["hogwild"]
    assert "finisher" not in extra["stop_reason"]
    assert len(extra["worker_texts"]) == 3 and all(extra["worker_texts"])
    content = choice.message.content
    assert isinstance(content, str) and (not content or "\\boxed{" + content in choice.message.model_extra[
        "reasoning_content"])  # the answer is the one the collaboration wrote
    assert choice.message.model_extra["reasoning_content"]  # the collaboration, every worker's text
    assert all(w in choice.message.model_extra["reasoning_content"] for w in ("Alice", "Bob", "Carol"))
    assert choice.finish_reason in ("stop", "length") and extra["forward_passes"] <= 60
    assert r.usage.completion_tokens == sum(extra["tokens_per_worker"]) > 0 and r.usage.prompt_tokens > 50
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")


def test_chat_stream_sends_each_workers_text_then_the_answer(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROBLEM}],
                                            max_tokens=16, stream=True, stream_options={"include_usage": True},
                                            extra_body={"workers": 2})
    chunks = list(stream)
    texts = {0: "", 1: ""}
    for ch in chunks[:-2]:
        [c] = ch.choices
        delta = c.delta.model_extra.get("reasoning_content")
        if delta:
            texts[c.model_extra["hogwild"]["worker"]] += delta
    final, usage = chunks[-2], chunks[-1]
    [c] = final.choices
    assert c.finish_reason in ("stop", "length")
    assert [texts[0], texts[1]] == c.model_extra["hogwild"]["worker_texts"]  # the deltas add up to each text
    assert usage.choices == [] and usage.usage.completion_tokens == sum(c.model_extra["hogwild"]["tokens_per_worker"])
    assert chunks[0].choices[0].delta.role == "assistant"


def test_completions_plain_and_streamed(client):
    r = client.completions.create(model=MODEL, prompt=PROBLEM, max_tokens=10, temperature=0,
                                  extra_body={"workers": 2})
    [choice] = r.choices
    assert r.object == "text_completion" and choice.model_extra["reasoning_content"]
    again = client.completions.create(model=MODEL, prompt=PROBLEM, max_tokens=10, temperature=0,
                                      extra_body={"workers": 2}, stream=True)
    pieces = list(again)
    final = pieces[-1].choices[0]
    assert final.model_extra["hogwild"]["worker_texts"] == choice.model_extra["hogwild"]["worker_texts"]  # greedy
    assert final.text == choice.text and final.finish_reason == choice.finish_reason


def test_n_runs_independent_sessions(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROBLEM}], max_tokens=12,
                                       n=3, seed=7, temperature=1.0)
    texts = [tuple(c.model_extra["hogwild"]["worker_texts"]) for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2] and len(set(texts)) == 3  # seeds offset per session
    seeded = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROBLEM}],
                                            max_tokens=12, n=3, seed=7, temperature=1.0)
    assert [tuple(c.model_extra["hogwild"]["worker_texts"]) for c in seeded.choices] == texts  # reproducible


def test_concurrent_requests_share_passes_on_both_replicas(server, client):
    before = metrics(server)
    replicas, errors = [], []

    def one(i: int) -> None:
        try:
            r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Compute {i} * 7."}],
                                               max_tokens=24, extra_body={"workers": 2})
            replicas.append(r.choices[0].model_extra["hogwild"]["replica"])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(replicas) == 8
    assert len(set(replicas)) == 2  # both replicas served
    time.sleep(1.5)  # the replicas report their counters every half second
    after = metrics(server)
    passes = after["hogwild:forward_passes_total"] - before["hogwild:forward_passes_total"]
    sessions = after["hogwild:pass_sessions_total"] - before["hogwild:pass_sessions_total"]
    rows = after["hogwild:pass_rows_total"] - before["hogwild:pass_rows_total"]
    assert sessions / passes > 1.5 and rows / passes > 2, (sessions, rows, passes)  # shared passes
    assert after["hogwild:num_requests_running"] == 0 and after["hogwild:num_requests_waiting"] == 0
    assert after["hogwild:request_success_total"] - before.get("hogwild:request_success_total", 0) == 8
    assert after["hogwild:time_to_first_token_seconds_count"] >= 8
    assert after["hogwild:e2e_request_latency_seconds_count"] >= 8
    assert after["hogwild:engine_replicas"] == 2
    # the CPU engines launch every pass when asked (on a GPU, ahead: see test_prelaunch)
    assert after["hogwild:passes_launched_ahead_total"] == after["hogwild:passes_launched_ahead_dropped_total"] == 0
    assert after["hogwild:cuda_graph_captures_total"] == after["hogwild:cuda_graph_capture_seconds_total"] == 0


def test_a_stream_closed_midway_frees_its_pages(server, client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROBLEM}],
                                            max_tokens=2000, stream=True, extra_body={"workers": 2})
    seen = 0
    for _ in stream:
        seen += 1
        if seen == 6:
            break
    deadline = time.monotonic() + 10
    while metrics(server)["hogwild:kv_cache_pages_used"] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metrics(server)["hogwild:kv_cache_pages_used"] > 0  # the session holds pages while it runs
    stream.close()
    closed = time.monotonic()
    while metrics(server)["hogwild:kv_cache_pages_used"] > 0 and time.monotonic() < closed + 15:
        time.sleep(0.2)
    m = metrics(server)
    assert m["hogwild:kv_cache_pages_used"] == 0 and m["hogwild:num_requests_running"] == 0
    assert time.monotonic() - closed < 15


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("body,param,words", [
    (chat(workers=0), "workers", "workers"),
    (chat(model="gpt-4"), "model", MODEL),
    (chat(temperature=-1), "temperature", "temperature"),
    (chat(top_p=0), "top_p", "top_p"),
    (chat(n=0), "n", "n"),
    (chat(messages=[]), "messages", "messages"),
    (chat(stop=["\n"]), "stop", "stop"),
    (chat(workers=2, foo=1), "foo", "unknown"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x " * 100_000}]}, None, "context"),
])
def test_bad_requests_answer_400_in_openais_shape(server, body, param, words):
    status, _, answer = post(f"{server}/v1/chat/completions", body)
    assert status == 400, answer
    error = answer["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert words.lower() in error["message"].lower() and "\n" not in error["message"]
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b"[1, 2]"])
def test_malformed_bodies_answer_400(server, raw):
    status, _, answer = post(f"{server}/v1/chat/completions", raw)
    assert status == 400 and answer["error"]["type"] == "invalid_request_error", answer


def test_a_body_too_large_is_refused_before_it_is_read(server):
    """A request that declares 17 MiB is answered 413 from its headers, before any body is sent."""
    import http.client

    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Authorization", f"Bearer {KEY}")
        conn.putheader("Content-Length", str(17 << 20))
        conn.endheaders()  # and no body
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 413 and answer["error"]["code"] == "request_too_large", answer


def test_the_openai_client_sees_a_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROBLEM}],
                                       extra_body={"workers": 1000})
    assert err.value.status_code == 400 and "workers" in str(err.value)


def test_a_missing_or_wrong_key_answers_401(server):
    for key in (None, "sk-wrong"):
        status, _, answer = post(f"{server}/v1/chat/completions", chat(), key=key)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key", answer
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    for route in ("/health", "/metrics"):  # probes and scrapers need no key, as vLLM's
        assert urllib.request.urlopen(f"{server}{route}", timeout=30).status == 200


def test_unknown_routes_answer_in_openais_shape(server):
    status, _, answer = post(f"{server}/v1/embeddings", {"model": MODEL, "input": "x"})
    assert status == 404 and "routes are" in answer["error"]["message"]


def test_the_waiting_limit_answers_503_with_retry_after(server):
    """The small app's cache holds one session and one may wait: a third answers 503."""
    url = f"{server}/small/v1/chat/completions"
    body = {"model": "small", "messages": [{"role": "user", "content": PROBLEM}], "stream": True,
            "max_tokens": 96, "workers": 2}
    opened = []
    try:
        for _ in range(2):  # one runs, one waits: each gets its response head at once
            req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            opened.append(urllib.request.urlopen(req, timeout=60))
            assert opened[-1].status == 200
        deadline = time.monotonic() + 30
        while metrics(f"{server}/small")["hogwild:num_requests_waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        status, headers, answer = post(url, dict(body, stream=False), key=None)
        assert status == 503, answer
        assert headers.get("Retry-After") == "1" and answer["error"]["code"] == "overloaded"
        assert "--max-waiting is 1" in answer["error"]["message"]
    finally:
        for r in opened:
            r.close()
    # the closed streams end their sessions as the server notices: until then one may still wait
    deadline = time.monotonic() + 30
    while metrics(f"{server}/small")["hogwild:num_requests_waiting"] > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    too_big = dict(body, stream=False, max_tokens=5000)  # could never fit this cache: 400, not 503
    status, _, answer = post(url, too_big, key=None)
    assert status == 400 and "cache" in answer["error"]["message"], answer


# ----------------------------------------------------------------------------- tensor parallel

def test_a_tensor_parallel_replica_serves_the_tokens_of_one_engine(server, random_model):
    """A replica with tp=2 (two shard actors and a coordinator, gloo on the CPU) serves greedy
    requests with exactly the tokens of the in-process engine; deleting the app releases them."""
    import hogwild_ray as hw

    path = random_model("llama")[0]
    serve.run(build_app(ServeSettings(model=str(path), served_model_name="tp2", tp=2, device="cpu", workers=2,
                                      max_tokens=16)), name="tp2", route_prefix="/tp2")
    tp2 = openai.OpenAI(base_url=f"{server}/tp2/v1", api_key="none", max_retries=0, timeout=300)
    problems = ["Compute 12 * 7.", "Compute 3 + 4."]
    answers: dict[str, list[str]] = {}

    def ask(problem: str) -> None:
        r = tp2.chat.completions.create(model="tp2", messages=[{"role": "user", "content": problem}], max_tokens=16,
                                        temperature=0)
        answers[problem] = r.choices[0].model_extra["hogwild"]["worker_texts"]

    threads = [threading.Thread(target=ask, args=(p,)) for p in problems]  # concurrent: shared passes
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    local = hw.HogwildEngine.from_pretrained(str(path), "cpu")
    for problem in problems:
        expected = local.solve(problem, workers=2, max_tokens=16, sampling=hw.SamplingParams(temperature=0))
        assert answers[problem] == expected.worker_texts, problem
    m = metrics(f"{server}/tp2")
    assert m["hogwild:pass_sessions_total"] > m["hogwild:forward_passes_total"]  # the two shared passes
    serve.delete("tp2")
    deadline = time.monotonic() + 30
    while [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"] and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    assert [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"] == []


# ----------------------------------------------------------------------------- the command

def test_cli_flags_are_checked_before_anything_starts():
    for flags, words in ((["--tp", "0"], "--tp"), (["--autoscale", "3"], "MIN,MAX"),
                         (["--autoscale", "3,1"], "autoscale maximum"), (["--api-key", " "], "--api-key is empty"),
                         (["--graph-warmup", "-1"], "--graph-warmup: must be an integer >= 0")):
        run = subprocess.run([sys.executable, "-m", "hogwild_ray", "serve", *flags], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 2 and run.stderr.startswith("error: ") and words in run.stderr, run.stderr
        assert run.stderr.count("\n") == 1


def test_shutdown_leaves_nothing_running(server):
    """Last in this module: the Serve instance goes down with every replica, and the port closes."""
    serve.shutdown()
    assert_clean()
    port = int(server.rsplit(":", 1)[1])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_hogwild_ray_serve_runs_until_sigterm(tmp_path, random_model):
    """The command itself: serves on the port it is given, answers, and exits 0 on SIGTERM with
    its Ray processes gone (a small random model under the built-in model's name: the command's
    machinery, not the model, is what is tested here)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "hogwild_ray", "serve", "--port", str(port), "--max-tokens", "8",
               "--cache-tokens", "4096", "--address", "local", "--model", str(random_model("llama")[0]),
               "--served-model-name", MODEL]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving {MODEL} on http://127.0.0.1:{port}/v1"), (line, proc.stderr.read()[-3000:]
                                                                                    if proc.poll() is not None else "")
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROBLEM}])
        assert r.choices[0].model_extra["hogwild"]["worker_texts"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        assert "shutting down" in proc.stdout.read()
    finally:
        proc.kill()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@serve.deployment
class Other:
    """Someone else's application on a shared cluster's Serve."""

    def __call__(self, request) -> str:
        return "other"


def test_hogwild_ray_serve_on_a_shared_serve_leaves_its_other_applications(tmp_path, random_model):
    """`serve --address` on a cluster whose Serve holds another application: a port other than Serve's is
    refused in one line naming Serve's port, deploying nothing; on Serve's port it serves, and SIGTERM
    deletes only its own application (serve.shutdown() took the other one with it)."""
    if not ray.is_initialized():  # alone; in the module, the server fixture's Ray (its Serve shut down)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Other.bind(), name="other", route_prefix="/other")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "hogwild_ray", "serve", "--max-tokens", "8", "--cache-tokens", "4096",
               "--address", ray.get_runtime_context().gcs_address, "--model", str(random_model("llama")[0])]
    try:
        run = subprocess.run([*command, "--port", str(free_port())], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=180)
        last = run.stderr.splitlines()[-1]  # after Ray's own lines of connecting
        assert run.returncode == 2 and last.startswith("error: ") and run.stderr.count("error: ") == 1, run.stderr
        assert f"--port {port}" in last and run.stdout == ""
        assert set(serve.status().applications) == {"other"}
        proc = subprocess.Popen([*command, "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            assert f"on http://127.0.0.1:{port}/v1" in line, (line, proc.stderr.read()[-3000:] if proc.poll() else "")
            wait_healthy(f"http://127.0.0.1:{port}/health", timeout=60)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 0
        finally:
            proc.kill()
        assert set(serve.status().applications) == {"other"}
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=30).read() == b"other"
    finally:
        serve.shutdown()
