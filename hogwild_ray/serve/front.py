"""The server's HTTP front: OpenAI's routes, API keys, the waiting limit and the metrics.

It parses and checks each request (hogwild_ray.serve.openai_protocol), starts its `n`
sessions on the engine replicas through a deployment handle (each call streams that
session's progress), and answers in OpenAI's shapes, as one JSON body or as server-sent
events. Every request passes through here, so the request metrics are observed here; the
replicas' engine counters arrive with their answers. A client that goes away cancels its
calls, which ends their sessions on the replicas before their next pass.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from ray import serve
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..core.events import from_json
from ..core.results import SolveResult
from .metrics import CONTENT_TYPE, ServerMetrics
from .openai_protocol import (
    SSE_DONE, GenerateRequest, RequestError, ServeDefaults, StreamChunks, chat_response, completion_response,
    decode_json, finish_reason, models_list, parse_chat, parse_completion, sse, sse_error,
)

RETRY_AFTER_S = 1
HEALTH_TIMEOUT_S = 10.0
LOG = logging.getLogger("ray.serve")
MAX_BODY_BYTES = 16 << 20  # a request body larger than this is refused before it is read (memory)

http = FastAPI(title="hogwild-ray", docs_url=None, redoc_url=None, openapi_url=None)


@http.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown paths and methods answer in OpenAI's error shape too, not FastAPI's."""
    what = {404: "no such route", 405: "method not allowed on this route"}.get(exc.status_code, str(exc.detail))
    error = RequestError(exc.status_code, f"{what}: {request.method} {request.url.path}; the routes are "
                         "GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /metrics, GET /health",
                         type="invalid_request_error", code="not_found" if exc.status_code == 404 else None)
    return JSONResponse(error.body(), status_code=exc.status_code)


def error_response(error: RequestError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 503 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class SessionCall:
    """One session of a request, on its way through a replica: its state for the gauges and
    its times for the histograms (kept by the front, whatever way the call ends)."""

    def __init__(self, front: OpenAIFront, arrived: float, workers: int) -> None:
        self.front, self.arrived, self.workers = front, arrived, workers
        self.state = "waiting"
        self.first: float | None = None
        self.last_text: dict[int, float] = {}
        self.prompt_tokens = 0
        self.result: SolveResult | None = None
        front.waiting += 1
        front.refresh_gauges()

    def on(self, msg: dict) -> None:
        """Observe one message of the replica's stream."""
        kind, now, m = msg["type"], time.monotonic(), self.front.metrics
        if kind == "queued":
            self.prompt_tokens = msg["prompt_tokens"]
        elif kind == "admitted":
            self._move("running")
            m.engines.update(msg["metrics"]["replica"], msg["metrics"])
        elif kind == "text":
            if self.first is None:
                self.first = now
                m.ttft.observe(now - self.arrived)
            elif msg["worker"] in self.last_text:
                m.itl.observe(now - self.last_text[msg["worker"]])
            self.last_text[msg["worker"]] = now
        elif kind == "step":
            m.steps.inc()
        elif kind == "done":
            self.result = from_json(msg["event"]).result()
        elif kind == "end":
            m.engines.update(msg["metrics"]["replica"], msg["metrics"])
            m.e2e.observe(now - self.arrived)
            m.prompt_tokens.inc(self.prompt_tokens)
            m.generation_tokens.inc(sum(self.result.stats.generated_per_worker) if self.result else 0)
            m.success.labels(finished_reason=finish_reason(self.result.stats) if self.result else "abort").inc()
            m.workers.observe(self.workers)
            self._move("ended")
        elif kind == "error":  # counted once per request where it is answered (_answer, _events)
            self._move("ended")

    def close(self) -> None:
        """The call is over (ended, failed or cancelled): it leaves the gauges."""
        self._move("ended")

    def _move(self, state: str) -> None:
        if self.state == state or self.state == "ended":
            return
        if self.state == "waiting":
            self.front.waiting -= 1
        elif self.state == "running":
            self.front.running -= 1
        if state == "running":
            self.front.running += 1
        self.state = state
        self.front.refresh_gauges()


class OpenAIFront:
    """The ingress deployment's class (Ray Serve wraps it; see hogwild_ray.serve.app)."""

    def __init__(self, engine: Any, defaults: ServeDefaults, api_key: str | None, max_waiting: int) -> None:
        self.engine = engine
        self.defaults, self.api_key, self.max_waiting = defaults, api_key, max_waiting
        self.metrics = ServerMetrics()
        self.waiting = self.running = 0
        self.created = int(time.time())

    def refresh_gauges(self) -> None:
        self.metrics.waiting.set(self.waiting)
        self.metrics.running.set(self.running)

    # ---- routes --------------------------------------------------------------------------
    @http.get("/v1/models")
    async def models(self, request: Request) -> Response:
        return await self._answer(request, lambda: JSONResponse(models_list(self.defaults, self.created)))

    @http.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self._answer(request, lambda: self._generate(request, parse_chat, "chatcmpl"))

    @http.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._answer(request, lambda: self._generate(request, parse_completion, "cmpl"))

    @http.get("/metrics")
    async def prometheus(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    @http.get("/health")
    async def health(self) -> Response:
        try:
            await asyncio.wait_for(_response(self.engine.ping.remote()), HEALTH_TIMEOUT_S)
        except Exception as e:  # no replica answers: a probe must see it, not a traceback
            # the route is open: the reason names the failure's kind only; its text (which may name
            # the replica's process, node and actor) goes to the server's log
            LOG.warning("health check failed: %s: %s", type(e).__name__, e)
            late = isinstance(e, asyncio.TimeoutError)
            reason = (f"no engine replica answered within {HEALTH_TIMEOUT_S:g} s" if late else
                      f"the engine replica failed its check ({type(e).__name__}; the server's log has the details)")
            return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    def report(self, metrics: dict) -> None:
        """An engine replica's counters (engine.metrics() and its replica id), sent every half second."""
        self.metrics.engines.update(metrics["replica"], metrics)

    # ---- requests ------------------------------------------------------------------------
    async def _answer(self, request: Request, make: Callable[[], Any]) -> Response:
        """Check the key, then answer; every failure in OpenAI's error shape, never a traceback."""
        try:
            self._check_key(request)
            answer = make()
            return await answer if asyncio.iscoroutine(answer) else answer
        except RequestError as e:
            self.metrics.failed.labels(status=str(e.status)).inc()
            return error_response(e)
        except Exception as e:
            self.metrics.failed.labels(status="500").inc()
            return error_response(RequestError(500, f"internal error: {type(e).__name__}: {e}".splitlines()[0],
                                               type="server_error"))

    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise RequestError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with "
                                    "the server's --api-key", type="invalid_request_error", code="invalid_api_key")

    async def _generate(self, request: Request, parse: Callable, prefix: str) -> Response:
        req: GenerateRequest = parse(decode_json(await read_body(request)), self.defaults)
        if self.waiting and self.waiting + req.n > self.max_waiting:  # an idle server takes any request
            raise RequestError(503, f"{self.waiting} requests are waiting for the engines (the server's "
                                    f"--max-waiting is {self.max_waiting}); retry after {RETRY_AFTER_S} s",
                               type="server_error", code="overloaded")
        arrived = time.monotonic()
        calls = [SessionCall(self, arrived, req.workers) for _ in range(req.n)]
        streams = [self.engine.options(stream=True).generate.remote(req.problem, req.workers, req.start_options(i))
                   for i in range(req.n)]
        request_id, created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
        try:
            firsts = [await _first(s) for s in streams]
            for call, first in zip(calls, firsts):
                call.on(first)
            bad = next((f for f in firsts if f["type"] == "error"), None)
            if bad is not None:
                raise _replica_error(bad)
        except BaseException:
            _end(streams, calls)
            raise
        prompt = [f["prompt_tokens"] for f in firsts]
        if req.stream:
            replicas = [f["replica"] for f in firsts]
            return StreamingResponse(self._events(req, request_id, created, streams, calls, prompt, replicas),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results: list[SolveResult | None] = [None] * req.n
        try:
            async for i, msg in _merged(streams):
                calls[i].on(msg)
                if msg["type"] == "error":
                    raise _replica_error(msg)
                if msg["type"] == "end":
                    results[i] = calls[i].result
        finally:
            _end(streams, calls)
        build = chat_response if req.kind == "chat" else completion_response
        body = build(req, request_id, created, results, prompt)
        for choice, first in zip(body["choices"], firsts):
            choice["hogwild"]["replica"] = first["replica"]  # which engine replica ran the session
        return JSONResponse(body)

    async def _events(self, req: GenerateRequest, request_id: str, created: int, streams: list, calls: list,
                      prompt: list[int], replicas: list[str]) -> AsyncIterator[bytes]:
        """The server-sent events of a streamed request; a closed connection ends its sessions."""
        chunks = StreamChunks(req, request_id, created)
        results: list[SolveResult | None] = [None] * req.n
        try:
            for i in range(req.n):
                start = chunks.start(i)
                if start is not None:
                    yield sse(start)
            async for i, msg in _merged(streams):
                calls[i].on(msg)
                kind = msg["type"]
                if kind == "text":
                    yield sse(chunks.worker_text(i, msg["worker"], msg["text"]))
                elif kind == "end":
                    results[i] = calls[i].result
                    chunk = chunks.finish(i, results[i])
                    chunk["choices"][0]["hogwild"]["replica"] = replicas[i]
                    yield sse(chunk)
                elif kind == "error":  # the 200 head is out: the error goes in the stream, then its end
                    self.metrics.failed.labels(status=str(msg["status"])).inc()
                    yield sse_error(_replica_error(msg))
                    yield SSE_DONE
                    return
            if req.include_usage:
                yield sse(chunks.usage_chunk(results, prompt))
            yield SSE_DONE
        finally:
            _end(streams, calls)


def _replica_error(message: dict) -> RequestError:
    """An engine replica's error message in OpenAI's shape: a 400 is the request's fault."""
    status = message["status"]
    return RequestError(status, message["message"], type="invalid_request_error" if status == 400 else "server_error")


# Applied when this module is imported (in the driver and in the replica alike): Serve turns the
# class's routes into FastAPI routes of `http` at this point, and a replica imports this module
# rather than receiving `http` by value.
OpenAIIngress = serve.ingress(http)(OpenAIFront)


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, read only up to `limit` bytes: a larger one is a 413 (by its Content-Length, or
    as it arrives), so no client can make the front hold gigabytes."""
    too_big = RequestError(413, f"the request body is larger than {limit >> 20} MiB; send a shorter problem",
                           code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _response(ref: Any) -> Any:
    return await ref


async def _first(stream: Any) -> dict:
    """A replica's first message: "queued" (or "error"); a full replica queue is a 503."""
    from ray.serve.exceptions import BackPressureError

    try:
        return await stream.__anext__()
    except BackPressureError as e:
        raise RequestError(503, f"the engine replicas' queues are full; retry after {RETRY_AFTER_S} s",
                           type="server_error", code="overloaded") from e


async def _merged(streams: list) -> AsyncIterator[tuple[int, dict]]:
    """(index, message) of several replica streams, as they come."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: Any) -> None:
        try:
            async for msg in stream:
                await queue.put((i, msg))
        except Exception as e:
            await queue.put((i, {"type": "error", "status": 500,
                                 "message": f"an engine replica failed: {type(e).__name__}: {e}".splitlines()[0]}))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, msg = await queue.get()
            if msg is None:
                left -= 1
            else:
                yield i, msg
    finally:
        for task in tasks:
            task.cancel()


def _end(streams: list, calls: list[SessionCall]) -> None:
    """Cancel whatever is still running of these calls (their sessions end on the replicas)."""
    for stream in streams:
        try:
            stream.cancel()
        except Exception:  # already finished
            pass
    for call in calls:
        call.close()
