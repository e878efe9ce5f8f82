"""The pure logic of hogwild-ray's OpenAI-compatible API: requests in, OpenAI-shaped bodies out.

`parse_chat` / `parse_completion` turn the JSON body of `POST /v1/chat/completions` or
`POST /v1/completions` into one checked `GenerateRequest`, or raise `RequestError` (an HTTP status
and OpenAI's error body) naming the field and the fix. Everything hogwild-ray adds to OpenAI's
request (workers, layout, protocol options, per-worker sampling) comes as extra top-level fields,
which is where the openai client puts `extra_body`. The rest builds responses, streamed chunks
(server-sent events), error bodies and the models list. No I/O: the server does that.

Each request runs `n` independent sessions; the answer (the `\\boxed{}` result) is the content,
the workers' shared transcript the `reasoning_content`, and the run's numbers go in `hogwild`.
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass, replace

from ..core.protocol import ProtocolOptions
from ..core.results import SolveResult, Stats
from ..core.sampling_params import TOP_K_HINT, TOP_K_LIMIT, SamplingParams
from ..errors import HogwildError, InvalidRequestError

LAYOUTS = ("combined", "contiguous", "interleaved")
MAX_TOKENS_LIMIT = 1_000_000
SEED_LIMIT = 2**63
SSE_DONE: bytes = b"data: [DONE]\n\n"

ONE_PROBLEM = (
    "hogwild-ray solves one problem per request: send one user message; earlier assistant turns are not supported"
)

# request field -> ProtocolOptions field (engine.start takes `protocol` for `enabled`)
PROTOCOL_FIELDS = {
    "protocol": "enabled",
    "redundancy_every": "redundancy_every",
    "finisher": "finisher",
    "finisher_tokens": "finisher_tokens",
    "stop_on_answer": "stop_on_answer",
    "chat_template": "chat_template",
}
EXTENSION_FIELDS = ("workers", "layout", "max_forward_passes", *PROTOCOL_FIELDS, "top_k", "worker_sampling")
COMMON_FIELDS = ("model", "max_tokens", "temperature", "top_p", "seed", "n", "stream", "stream_options")
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")
WORKER_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "seed")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _empty(x: object) -> bool:
    return x is None or (isinstance(x, (str, list, dict)) and len(x) == 0)


def _zero(x: object) -> bool:
    return x is None or (_is_number(x) and x == 0)


# field -> (is this value the default, so accepted?, why it is refused otherwise)
_UNSUPPORTED_COMMON = {
    "stop": (_empty, "the workers stop at their \\boxed{} answer or their budget"),
    "logprobs": (lambda x: x is None or x is False, "log-probabilities are not returned"),
    "logit_bias": (_empty, "logit biases are not applied"),
    "presence_penalty": (_zero, "penalties are not applied"),
    "frequency_penalty": (_zero, "penalties are not applied"),
}
_UNSUPPORTED_CHAT = {
    "top_logprobs": (lambda x: x is None or (_is_int(x) and x == 0), "log-probabilities are not returned"),
    "tools": (_empty, "it makes no tool calls"),
    "tool_choice": (lambda x: x is None or x == "none", "it makes no tool calls"),
    "functions": (_empty, "it makes no function calls"),
    "function_call": (lambda x: x is None or x == "none", "it makes no function calls"),
    "response_format": (
        lambda x: x is None or x == {"type": "text"}, "only plain text responses ({\"type\": \"text\"})"
    ),
}
_UNSUPPORTED_COMPLETION = {
    "best_of": (lambda x: x is None or (_is_int(x) and x == 1), "use n for several independent sessions"),
    "echo": (lambda x: x is None or x is False, "the prompt is not echoed"),
    "suffix": (lambda x: x is None, "it does not insert text"),
}

_short_repr = reprlib.Repr()
_short_repr.maxstring = 60
_short_repr.maxother = 60
_short_repr.maxlong = 40
_short_repr.maxlevel = 2


def _show(value: object) -> str:
    """A short repr for error messages: a huge or deeply nested value must not flood (or break) one."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    try:
        return _short_repr.repr(value)
    except Exception:  # a value whose repr fails still gets a message
        return f"a {type(value).__name__}"


class RequestError(HogwildError):
    """A request the server refuses: its HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        """OpenAI's error body, as clients parse it."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _refuse(message: str, param: str | None, code: str | None = None) -> RequestError:
    return RequestError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ServeDefaults:
    """What the server fills in when a request does not say, and the most it lets a request ask for."""

    model: str  # the served model's name (what /v1/models lists and requests must name)
    workers: int = 2  # workers per session when a request does not say
    max_workers: int = 64  # the most a request may ask for
    max_tokens: int = 1024  # per worker, when a request does not say
    max_n: int = 16  # the most independent sessions (`n`) one request may ask for


def _offset_seed(params: SamplingParams, k: int) -> SamplingParams:
    """The seed moved on by k (wrapping below 2**63, so any valid seed works); unseeded stays unseeded."""
    if params.seed is None or k == 0:
        return params
    return replace(params, seed=(params.seed + k) % SEED_LIMIT)


@dataclass(frozen=True)
class GenerateRequest:
    """One checked request: what to solve, how, and how many independent sessions to run."""

    kind: str  # "chat" or "completion"
    model: str
    problem: str  # the text the workers solve
    workers: int
    layout: str  # "combined" | "contiguous" | "interleaved"
    max_tokens: int  # per worker
    max_forward_passes: int | None  # a budget in forward passes for the whole session; None: none
    sampling: tuple[SamplingParams, ...]  # one per worker (len == workers)
    protocol: dict  # engine.start's protocol options the request gave (`enabled` spelled `protocol`)
    n: int
    stream: bool
    include_usage: bool  # stream_options.include_usage

    def start_options(self, index: int) -> dict:
        """Keyword arguments for engine.start(problem, workers, **...) of session `index` (0..n-1).

        Session i moves each set seed on by i * workers, so that the n sessions are independent
        (no two workers of the request share a seed) and each is reproducible."""
        if not _is_int(index) or not 0 <= index < self.n:
            raise ValueError(f"index must be an integer in [0, {self.n}) (one per session), got {index!r}")
        return {
            "sampling": [_offset_seed(s, index * self.workers) for s in self.sampling],
            "layout": self.layout,
            "max_tokens": self.max_tokens,
            "max_steps": self.max_forward_passes,
            **self.protocol,
        }


# ---- reading the body ------------------------------------------------------------------


def decode_json(raw: bytes) -> object:
    """The request body as JSON (UTF-8, standard JSON: no NaN or Infinity), else a 400 saying what is wrong."""
    def refuse(message: str) -> RequestError:
        return _refuse(message, None, "invalid_json")

    if not bytes(raw).strip():
        raise refuse("the request body is empty: send a JSON object")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise refuse(f"the request body must be UTF-8 JSON: invalid UTF-8 at byte {e.start}") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise refuse(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise refuse("the request body is nested too deeply to read: send a flatter JSON object") from None
    except _NotJson as e:
        raise refuse(f"the request body is not valid JSON: {e}") from None
    except ValueError:  # Python reads at most 4300 digits of an integer
        raise refuse("the request body holds a number too long to read (over 4300 digits)") from None


class _NotJson(ValueError):
    """NaN or Infinity: Python's json reads them, but they are not JSON."""


def _no_constant(name: str) -> object:
    raise _NotJson(f"{name} is not a JSON number")


def _integer(value: object, param: str, lo: int, hi: int | None = None, *, hint: str = "",
             null: str | None = None, hi_text: str | None = None) -> int | None:
    """An integer (not a bool) with lo <= value (<= hi), or None when `null` says what null means."""
    if value is None and null is not None:
        return None
    if _is_int(value) and value >= lo and (hi is None or value <= hi):
        return value
    rule = f">= {lo}" if hi is None else f"in [{lo}, {hi_text or hi}]"
    extra = f" ({hint})" if hint else ""
    alt = "" if null is None else f" or null{f' ({null})' if null else ''}"
    raise _refuse(f"{param} must be an integer {rule}{extra}{alt}, got {_show(value)}", param)


def _boolean(value: object, param: str) -> bool:
    if isinstance(value, bool):
        return value
    raise _refuse(f"{param} must be true or false (a JSON boolean), got {_show(value)}", param)


def _string(value: object, param: str, what: str) -> str:
    if isinstance(value, str):
        return value
    raise _refuse(f"{param} must be {what}, got {_show(value)}", param)


def _check_fields(body: dict, kind: str) -> None:
    """Unknown fields are refused (a typo must not be ignored); OpenAI features we lack, when set."""
    unsupported = {**_UNSUPPORTED_COMMON, **(_UNSUPPORTED_CHAT if kind == "chat" else _UNSUPPORTED_COMPLETION)}
    own = ("messages", "max_completion_tokens") if kind == "chat" else ("prompt",)
    known = {*COMMON_FIELDS, *IGNORED_FIELDS, *EXTENSION_FIELDS, *unsupported, *own}
    unknown = sorted(str(k) for k in body if k not in known)
    if unknown:
        raise _refuse(
            f"unknown field(s) {', '.join(_show(k)[1:-1] for k in unknown)}; hogwild-ray's own fields are "
            f"{', '.join(EXTENSION_FIELDS)}", unknown[0], "unknown_parameter",
        )
    for name, (accepted, why) in unsupported.items():
        if name in body and not accepted(body[name]):
            raise _refuse(
                f"{name} is not supported by hogwild-ray ({why}); leave it out, got {_show(body[name])}",
                name, "unsupported_parameter",
            )


def _model(body: dict, defaults: ServeDefaults) -> str:
    if "model" not in body:
        raise _refuse(f"model is required: this server serves {defaults.model!r}", "model")
    model = _string(body["model"], "model", f"a string (this server serves {defaults.model!r})")
    if model != defaults.model:
        raise _refuse(f"model {_show(model)} is not served here: use model {defaults.model!r}", "model",
                      "model_not_found")
    return model


def _content(value: object, param: str) -> str:
    """A message's text: a string, or a list of text parts (joined with newlines)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _refuse(f"{param} must be a string or a list of text parts, got {_show(value)}", param)
    texts = []
    for j, part in enumerate(value):
        p = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise _refuse(f"{p} must be a text part {{\"type\": \"text\", \"text\": ...}}, got {_show(part)}", p)
        if part.get("type") != "text":
            raise _refuse(f"only text content parts are supported; {p} has type {_show(part.get('type'))}", p)
        extra = sorted(str(k) for k in part if k not in ("type", "text"))
        if extra:
            raise _refuse(f"{p} has unknown key(s) {', '.join(extra)}; a text part has type and text", p)
        texts.append(_string(part.get("text"), f"{p}.text", "a string"))
    return "\n".join(texts)


def _messages(body: dict) -> str:
    """The problem: the user message's text, after any system or developer text (joined by blank lines)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _refuse(
            f"messages must be a non-empty list of messages with one user message, got {_show(messages)}",
            "messages",
        )
    before, user = [], None
    for i, message in enumerate(messages):
        p = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _refuse(f"{p} must be an object with role and content, got {_show(message)}", p)
        extra = sorted(str(k) for k in message if k not in ("role", "content", "name"))
        if extra:
            raise _refuse(f"{p} has unknown key(s) {', '.join(extra)}; a message has role, content and name", p)
        if message.get("name") is not None:
            _string(message["name"], f"{p}.name", "a string")
        role = message.get("role")
        if role in ("assistant", "tool", "function"):
            raise _refuse(f"{ONE_PROBLEM} ({p} has role {role!r})", f"{p}.role")
        if not isinstance(role, str) or role not in ("system", "developer", "user"):
            raise _refuse(f"{p}.role must be system, developer or user, got {_show(role)}", f"{p}.role")
        text = _content(message.get("content"), f"{p}.content")
        if role == "user":
            if user is not None:
                raise _refuse(f"{ONE_PROBLEM} ({p} is a second user message)", f"{p}.role")
            user = (p, text)
        elif user is not None:
            raise _refuse(f"{p}: {role} messages must come before the user message", f"{p}.role")
        elif text.strip():
            before.append(text)
    if user is None:
        raise _refuse("messages must hold one user message: its text is the problem to solve", "messages")
    if not user[1].strip():
        raise _refuse(f"{user[0]}.content is empty: the user message is the problem to solve", f"{user[0]}.content")
    return "\n\n".join([*before, user[1]])


def _prompt(body: dict) -> str:
    """The problem of a completion request: one string (or a list of exactly one string)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, str) for x in prompt):
        raise _refuse(
            f"prompt must be one string: hogwild-ray solves one problem per request (use n for several "
            f"sessions), got {len(prompt)} prompts", "prompt",
        )
    if not isinstance(prompt, str):
        raise _refuse(f"prompt must be text (a string), not token ids or other values, got {_show(prompt)}",
                      "prompt")
    if not prompt.strip():
        raise _refuse("prompt is empty: it is the problem to solve", "prompt")
    return prompt


def _max_tokens(body: dict, defaults: ServeDefaults) -> int:
    """Tokens each worker may generate; chat's max_completion_tokens means the same (completions refuse it
    as an unknown field before this)."""
    given = {name: body.get(name) for name in ("max_tokens", "max_completion_tokens") if body.get(name) is not None}
    for name, value in given.items():
        _integer(value, name, 1, MAX_TOKENS_LIMIT, hint="tokens per worker")
    if len(set(given.values())) > 1:
        raise _refuse(
            f"max_tokens ({given['max_tokens']}) and max_completion_tokens ({given['max_completion_tokens']}) "
            "differ: give one of them (both mean tokens per worker)", "max_completion_tokens",
        )
    return next(iter(given.values()), defaults.max_tokens)


def _layout(body: dict) -> str:
    layout = body.get("layout")
    if layout is None:
        return "combined"
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise _refuse(f"layout must be one of {', '.join(LAYOUTS)}, got {_show(layout)}", "layout")
    return layout


def _protocol(body: dict) -> dict:
    """The protocol options the request gave, checked by building ProtocolOptions; null means not given
    (except redundancy_every, where null turns the checks off)."""
    options = {}
    for name in ("protocol", "finisher", "stop_on_answer", "chat_template"):
        if body.get(name) is not None:
            options[name] = _boolean(body[name], name)
    if "redundancy_every" in body:
        options["redundancy_every"] = _integer(body["redundancy_every"], "redundancy_every", 1,
                                               hint="tokens between redundancy checks", null="off")
    if body.get("finisher_tokens") is not None:
        options["finisher_tokens"] = _integer(body["finisher_tokens"], "finisher_tokens", 1)
    for name, value in options.items():  # each alone, so that a refusal names its field
        try:
            ProtocolOptions(**{PROTOCOL_FIELDS[name]: value})
        except InvalidRequestError as e:
            raise _refuse(str(e), name) from None
    return options


def _sampling_fields(source: dict, prefix: str) -> dict:
    """The sampling fields that `source` gives (null: not given), checked one by one so that a refusal
    names its field (SamplingParams' own message when the value is out of its range)."""
    fields = {}
    for name in WORKER_SAMPLING_KEYS:
        value, param = source.get(name), f"{prefix}{name}"
        if value is None:
            continue
        if name in ("temperature", "top_p"):
            if not _is_number(value):
                raise _refuse(f"{param} must be a number, got {_show(value)}", param)
            try:
                value = float(value)
            except OverflowError:
                value = math.inf
        elif name == "top_k":
            value = _integer(value, param, 0, TOP_K_LIMIT - 1, hi_text="2**31 - 1", hint=TOP_K_HINT)
        else:
            value = _integer(value, param, 0, SEED_LIMIT - 1, hi_text="2**63 - 1", null="unseeded")
        try:
            SamplingParams(**{name: value})
        except InvalidRequestError as e:
            raise _refuse(f"{prefix}{e}", param) from None
        fields[name] = value
    return fields


def _sampling(body: dict, workers: int) -> tuple[SamplingParams, ...]:
    """One SamplingParams per worker: the request's, a set seed moved on by the worker's index (as
    `per_worker` does), then each worker's own `worker_sampling` values over it (its seed as given)."""
    base = SamplingParams(**_sampling_fields(body, ""))
    expanded = [_offset_seed(base, w) for w in range(workers)]
    overrides = body.get("worker_sampling")
    if overrides is None:
        return tuple(expanded)
    if not isinstance(overrides, list) or len(overrides) != workers:
        got = f"a list of {len(overrides)}" if isinstance(overrides, list) else _show(overrides)
        raise _refuse(
            f"worker_sampling must be a list of {workers} objects (one per worker, workers={workers}), got {got}",
            "worker_sampling",
        )
    for w, override in enumerate(overrides):
        p = f"worker_sampling[{w}]"
        if not isinstance(override, dict):
            raise _refuse(f"{p} must be an object with any of {', '.join(WORKER_SAMPLING_KEYS)}, "
                          f"got {_show(override)}", p)
        extra = sorted(str(k) for k in override if k not in WORKER_SAMPLING_KEYS)
        if extra:
            raise _refuse(f"{p} has unknown key(s) {', '.join(extra)}; it may set "
                          f"{', '.join(WORKER_SAMPLING_KEYS)}", p)
        expanded[w] = replace(expanded[w], **_sampling_fields(override, p + "."))
    return tuple(expanded)


def _stream(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage); stream_options only goes with stream: true."""
    stream = body.get("stream")
    stream = False if stream is None else _boolean(stream, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise _refuse("stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(options, dict):
        raise _refuse(f"stream_options must be null or {{\"include_usage\": bool}}, got {_show(options)}",
                      "stream_options")
    extra = sorted(str(k) for k in options if k != "include_usage")
    if extra:
        raise _refuse(f"stream_options has unknown key(s) {', '.join(extra)}; it may only set include_usage",
                      "stream_options")
    usage_wanted = options.get("include_usage")
    return stream, False if usage_wanted is None else _boolean(usage_wanted, "stream_options.include_usage")


def _parse(body: object, defaults: ServeDefaults, kind: str) -> GenerateRequest:
    if not isinstance(body, dict):
        kind_name = "null" if body is None else type(body).__name__
        raise _refuse(f"the request body must be a JSON object, got {kind_name}", None)
    _check_fields(body, kind)
    model = _model(body, defaults)
    problem = _messages(body) if kind == "chat" else _prompt(body)
    max_tokens = _max_tokens(body, defaults)
    workers = body.get("workers")
    workers = defaults.workers if workers is None else _integer(
        workers, "workers", 1, defaults.max_workers, hint="the server's --max-workers")
    layout = _layout(body)
    passes = _integer(body.get("max_forward_passes"), "max_forward_passes", 1, null="no budget")
    protocol = _protocol(body)
    sampling = _sampling(body, workers)
    n = body.get("n")
    n = 1 if n is None else _integer(n, "n", 1, defaults.max_n, hint="independent sessions per request")
    stream, include_usage = _stream(body)
    return GenerateRequest(kind, model, problem, workers, layout, max_tokens, passes, sampling, protocol, n,
                           stream, include_usage)


def parse_chat(body: object, defaults: ServeDefaults) -> GenerateRequest:
    """A checked request from the JSON body of POST /v1/chat/completions; RequestError 400 otherwise."""
    return _parse(body, defaults, "chat")


def parse_completion(body: object, defaults: ServeDefaults) -> GenerateRequest:
    """A checked request from the JSON body of POST /v1/completions; RequestError 400 otherwise."""
    return _parse(body, defaults, "completion")


# ---- responses -------------------------------------------------------------------------


def finish_reason(stats: Stats) -> str:
    """OpenAI's finish_reason: "length" when the budget ended the session (the finisher may then have
    forced an answer out: "budget+finisher"), else "stop" (an answer, or every worker's end of text)."""
    return "length" if stats.stop_reason.split("+")[0] == "budget" else "stop"


def usage(results: list[SolveResult], prompt_tokens: list[int]) -> dict:
    """Token counts for billing-style clients: completion tokens are those the model sampled, all workers
    of all choices; the prompt counted once, however many choices read it (as OpenAI and vLLM count n)."""
    prompt = max(prompt_tokens, default=0)
    completion = sum(sum(r.stats.generated_per_worker) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def hogwild_extension(result: SolveResult) -> dict:
    """What OpenAI's shape has no room for: each worker's text and the run's numbers."""
    stats = result.stats
    return {
        "worker_texts": list(result.worker_texts),
        "forward_passes": stats.forward_passes,
        "tokens_per_worker": list(stats.generated_per_worker),
        "steps_per_worker": list(stats.steps_per_worker),
        "stop_reason": stats.stop_reason,
        "seconds": stats.seconds,
    }


def _envelope(request: GenerateRequest, request_id: str, created: int, obj: str, choices: list) -> dict:
    return {"id": request_id, "object": obj, "created": created, "model": request.model, "choices": choices}


def chat_response(request: GenerateRequest, request_id: str, created: int, results: list[SolveResult],
                  prompt_tokens: list[int]) -> dict:
    """A chat.completion: the answer as content, the shared transcript as reasoning_content."""
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": r.answer or "", "reasoning_content": r.transcript},
            "finish_reason": finish_reason(r.stats),
            "hogwild": hogwild_extension(r),
        }
        for i, r in enumerate(results)
    ]
    return {**_envelope(request, request_id, created, "chat.completion", choices),
            "usage": usage(results, prompt_tokens)}


def completion_response(request: GenerateRequest, request_id: str, created: int, results: list[SolveResult],
                        prompt_tokens: list[int]) -> dict:
    """A text_completion: the answer as text, the shared transcript as reasoning_content."""
    choices = [
        {
            "index": i,
            "text": r.answer or "",
            "reasoning_content": r.transcript,
            "finish_reason": finish_reason(r.stats),
            "logprobs": None,
            "hogwild": hogwild_extension(r),
        }
        for i, r in enumerate(results)
    ]
    return {**_envelope(request, request_id, created, "text_completion", choices),
            "usage": usage(results, prompt_tokens)}


class StreamChunks:
    """Builds the chunks of one streamed request (chat.completion.chunk or text_completion objects).

    Workers' text streams as reasoning_content tagged with the worker (`hogwild.worker`); each
    session's answer comes last, as content, with its finish_reason and the run's numbers."""

    def __init__(self, request: GenerateRequest, request_id: str, created: int) -> None:
        self.request, self.request_id, self.created = request, request_id, created
        self.chat = request.kind == "chat"

    def _chunk(self, choices: list) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return _envelope(self.request, self.request_id, self.created, obj, choices)

    def start(self, index: int) -> dict | None:
        """Chat: the first chunk of choice `index` (the assistant's role); completions have none."""
        if not self.chat:
            return None
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])

    def worker_text(self, index: int, worker: int, text: str) -> dict:
        """New text of one worker of session `index`, as reasoning_content."""
        if self.chat:
            choice = {"index": index, "delta": {"reasoning_content": text}, "finish_reason": None}
        else:
            choice = {"index": index, "text": "", "reasoning_content": text, "finish_reason": None, "logprobs": None}
        return self._chunk([{**choice, "hogwild": {"worker": worker}}])

    def finish(self, index: int, result: SolveResult) -> dict:
        """Session `index`'s answer as content, its finish_reason, and the run's numbers."""
        reason = finish_reason(result.stats)
        if self.chat:
            choice = {"index": index, "delta": {"content": result.answer or ""}, "finish_reason": reason}
        else:
            choice = {"index": index, "text": result.answer or "", "finish_reason": reason, "logprobs": None}
        return self._chunk([{**choice, "hogwild": hogwild_extension(result)}])

    def usage_chunk(self, results: list[SolveResult], prompt_tokens: list[int]) -> dict:
        """The last chunk when stream_options.include_usage: no choices, the request's usage."""
        return {**self._chunk([]), "usage": usage(results, prompt_tokens)}


def sse(obj: dict) -> bytes:
    """One server-sent event: compact JSON, non-ASCII kept as UTF-8 (a lone surrogate becomes '?')."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + text.encode("utf-8", "replace") + b"\n\n"


def sse_error(error: RequestError) -> bytes:
    """An error once a stream has begun (the status line is already sent): its body as an event."""
    return sse(error.body())


def models_list(defaults: ServeDefaults, created: int) -> dict:
    """GET /v1/models: the one model this server serves."""
    return {
        "object": "list",
        "data": [{"id": defaults.model, "object": "model", "created": created, "owned_by": "hogwild-ray"}],
    }
