"""The OpenAI-compatible API's pure logic: request parsing and refusals, response and chunk shapes, SSE bytes."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hogwild_ray.core.results import SolveResult, Stats
from hogwild_ray.core.sampling_params import SamplingParams
from hogwild_ray.serve.openai_protocol import (
    SSE_DONE,
    GenerateRequest,
    RequestError,
    ServeDefaults,
    StreamChunks,
    chat_response,
    completion_response,
    decode_json,
    finish_reason,
    hogwild_extension,
    models_list,
    parse_chat,
    parse_completion,
    sse,
    sse_error,
    usage,
)

D = ServeDefaults(model="smol", workers=2, max_workers=8, max_tokens=100, max_n=4)


def chat(**fields) -> dict:
    return {"model": "smol", "messages": [{"role": "user", "content": "What is 2+2?"}], **fields}


def completion(**fields) -> dict:
    return {"model": "smol", "prompt": "What is 2+2?", **fields}


def refused(parse, body, defaults=D) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse(body, defaults)
    assert info.value.status == 400
    return info.value


def result(answer="4", stop_reason="answer", generated=(3, 5), seconds=1.5) -> SolveResult:
    stats = Stats(forward_passes=7, tokens_per_worker=[4, 6], generated_per_worker=list(generated),
                  steps_per_worker=[2, 1], seconds=seconds, stop_reason=stop_reason)
    return SolveResult(answer=answer, worker_texts=["**Alice [1]:** two", "**Bob [1]:** plus two"],
                       transcript="Alice and Bob", stats=stats)


# ---- parsing: defaults and the accepted shapes ------------------------------------------


def test_minimal_chat_takes_the_defaults():
    req = parse_chat(chat(), D)
    assert isinstance(req, GenerateRequest)
    assert (req.kind, req.model, req.problem) == ("chat", "smol", "What is 2+2?")
    assert (req.workers, req.layout, req.max_tokens, req.max_forward_passes) == (2, "combined", 100, None)
    assert req.sampling == (SamplingParams(), SamplingParams())
    assert (req.protocol, req.n, req.stream, req.include_usage) == ({}, 1, False, False)


def test_minimal_completion_takes_the_defaults():
    req = parse_completion(completion(), D)
    assert (req.kind, req.problem, req.workers, req.max_tokens, req.n) == ("completion", "What is 2+2?", 2, 100, 1)
    assert parse_completion(completion(prompt=["Solve x"]), D).problem == "Solve x"


def test_system_and_developer_text_goes_before_the_problem():
    body = chat(messages=[{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "Use SI."},
                          {"role": "user", "content": "How far?", "name": "ann"}])
    assert parse_chat(body, D).problem == "Be brief.\n\nUse SI.\n\nHow far?"
    blank_system = chat(messages=[{"role": "system", "content": "  "}, {"role": "user", "content": "Q"}])
    assert parse_chat(blank_system, D).problem == "Q"


def test_text_content_parts_are_joined_by_newlines():
    parts = [{"type": "text", "text": "Line one"}, {"type": "text", "text": "line two"}]
    body = chat(messages=[{"role": "system", "content": [{"type": "text", "text": "Sys"}]},
                          {"role": "user", "content": parts}])
    assert parse_chat(body, D).problem == "Sys\n\nLine one\nline two"


def test_extension_and_sampling_fields_are_read():
    body = chat(workers=3, layout="interleaved", max_forward_passes=50, protocol=False, redundancy_every=None,
                finisher=True, finisher_tokens=8, stop_on_answer=False, chat_template=False, top_k=40,
                temperature=0, top_p=0.9, seed=11, n=2, stream=True, stream_options={"include_usage": True},
                max_completion_tokens=64, user="u", metadata={"a": "b"}, store=False, service_tier="auto",
                parallel_tool_calls=True, stop=[], logprobs=False, presence_penalty=0, tool_choice="none",
                response_format={"type": "text"}, logit_bias={})
    req = parse_chat(body, D)
    assert (req.workers, req.layout, req.max_forward_passes, req.max_tokens) == (3, "interleaved", 50, 64)
    assert req.protocol == {"protocol": False, "redundancy_every": None, "finisher": True, "finisher_tokens": 8,
                            "stop_on_answer": False, "chat_template": False}
    assert req.sampling == tuple(SamplingParams(0.0, 40, 0.9, 11 + w) for w in range(3))
    assert (req.n, req.stream, req.include_usage) == (2, True, True)


def test_null_means_not_given():
    body = chat(max_tokens=None, workers=None, layout=None, temperature=None, seed=None, n=None, stream=None,
                stream_options=None, protocol=None, finisher_tokens=None, worker_sampling=None)
    req = parse_chat(body, D)
    assert (req.max_tokens, req.workers, req.layout, req.n, req.stream) == (100, 2, "combined", 1, False)
    assert req.sampling == (SamplingParams(), SamplingParams()) and req.protocol == {}


def test_equal_max_tokens_and_max_completion_tokens_are_accepted():
    assert parse_chat(chat(max_tokens=5, max_completion_tokens=5), D).max_tokens == 5


def test_completion_accepts_its_default_valued_features():
    req = parse_completion(completion(best_of=1, echo=False, suffix=None, logprobs=None, frequency_penalty=0.0), D)
    assert req.max_tokens == 100


# ---- parsing: every refusal -------------------------------------------------------------

USER = {"role": "user", "content": "Q"}

CHAT_REFUSALS = [
    # (body, param, a word of the message)
    ([], None, "JSON object"),
    ("text", None, "JSON object"),
    ({"messages": [USER]}, "model", "required"),
    (chat(model=3), "model", "string"),
    (chat(model="gpt-4o"), "model", "smol"),
    (chat(messages=[]), "messages", "non-empty"),
    (chat(messages="hi"), "messages", "list"),
    ({"model": "smol"}, "messages", "list"),
    (chat(messages=["hi"]), "messages[0]", "object"),
    (chat(messages=[{"role": "user", "content": "Q", "x": 1}]), "messages[0]", "unknown key"),
    (chat(messages=[{"role": "user", "content": "Q", "name": 5}]), "messages[0].name", "string"),
    (chat(messages=[{"role": "assistant", "content": "A"}, USER]), "messages[0].role", "one user message"),
    (chat(messages=[USER, {"role": "assistant", "content": "A"}]), "messages[1].role", "assistant turns"),
    (chat(messages=[USER, {"role": "tool", "content": "A"}]), "messages[1].role", "one problem"),
    (chat(messages=[{"role": "robot", "content": "Q"}]), "messages[0].role", "system, developer or user"),
    (chat(messages=[{"content": "Q"}]), "messages[0].role", "role"),
    (chat(messages=[USER, USER]), "messages[1].role", "second user"),
    (chat(messages=[USER, {"role": "system", "content": "S"}]), "messages[1].role", "before the user"),
    (chat(messages=[{"role": "system", "content": "S"}]), "messages", "one user message"),
    (chat(messages=[{"role": "user", "content": "  \n"}]), "messages[0].content", "empty"),
    (chat(messages=[{"role": "user", "content": []}]), "messages[0].content", "empty"),
    (chat(messages=[{"role": "user"}]), "messages[0].content", "string or a list"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content", "string or a list"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages[0].content[0]", "only text content parts"),
    (chat(messages=[{"role": "user", "content": ["Q"]}]), "messages[0].content[0]", "text part"),
    (chat(messages=[{"role": "user", "content": [{"type": "text", "text": 1}]}]), "messages[0].content[0].text",
     "string"),
    (chat(messages=[{"role": "user", "content": [{"type": "text", "text": "Q", "cache": 1}]}]),
     "messages[0].content[0]", "unknown key"),
    (chat(max_tokens=0), "max_tokens", "integer"),
    (chat(max_tokens=1_000_001), "max_tokens", "1000000"),
    (chat(max_tokens=2.5), "max_tokens", "integer"),
    (chat(max_tokens="10"), "max_tokens", "integer"),
    (chat(max_tokens=True), "max_tokens", "integer"),
    (chat(max_completion_tokens=-1), "max_completion_tokens", "integer"),
    (chat(max_tokens=5, max_completion_tokens=6), "max_completion_tokens", "differ"),
    (chat(workers=0), "workers", "--max-workers"),
    (chat(workers=9), "workers", "[1, 8]"),
    (chat(workers=2**80), "workers", "integer"),
    (chat(layout="diagonal"), "layout", "combined"),
    (chat(layout=["combined"]), "layout", "one of"),
    (chat(max_forward_passes=0), "max_forward_passes", ">= 1"),
    (chat(protocol=1), "protocol", "boolean"),
    (chat(protocol="false"), "protocol", "boolean"),
    (chat(finisher=0), "finisher", "boolean"),
    (chat(stop_on_answer="yes"), "stop_on_answer", "boolean"),
    (chat(chat_template=[]), "chat_template", "boolean"),
    (chat(redundancy_every=0), "redundancy_every", ">= 1"),
    (chat(redundancy_every=True), "redundancy_every", "integer"),
    (chat(finisher_tokens=0), "finisher_tokens", ">= 1"),
    (chat(top_k=-1), "top_k", "[0, 2**31 - 1]"),
    (chat(top_k=1.0), "top_k", "integer"),
    (chat(top_k=2**31), "top_k", "[0, 2**31 - 1]"),
    (chat(top_k=10**400), "top_k", "[0, 2**31 - 1]"),
    (chat(temperature=-0.1), "temperature", ">= 0"),
    (chat(temperature=float("nan")), "temperature", "finite"),
    (chat(temperature=float("inf")), "temperature", "finite"),
    (chat(temperature=10**400), "temperature", "finite"),
    (chat(temperature=True), "temperature", "number"),
    (chat(temperature="0.5"), "temperature", "number"),
    (chat(top_p=0), "top_p", "(0, 1]"),
    (chat(top_p=1.5), "top_p", "(0, 1]"),
    (chat(seed=-1), "seed", "2**63"),
    (chat(seed=2**63), "seed", "2**63"),
    (chat(seed=1.0), "seed", "integer"),
    (chat(worker_sampling=[{}]), "worker_sampling", "list of 2"),
    (chat(worker_sampling={}), "worker_sampling", "list of 2"),
    (chat(worker_sampling=[{}, 3]), "worker_sampling[1]", "object"),
    (chat(worker_sampling=[{}, {"temp": 1}]), "worker_sampling[1]", "unknown key"),
    (chat(worker_sampling=[{}, {"temperature": -1}]), "worker_sampling[1].temperature", ">= 0"),
    (chat(worker_sampling=[{"seed": "x"}, {}]), "worker_sampling[0].seed", "integer"),
    (chat(worker_sampling=[{"top_p": 2}, {}]), "worker_sampling[0].top_p", "(0, 1]"),
    (chat(n=0), "n", "[1, 4]"),
    (chat(n=5), "n", "[1, 4]"),
    (chat(n="2"), "n", "integer"),
    (chat(stream="true"), "stream", "boolean"),
    (chat(stream_options={"include_usage": True}), "stream_options", "stream: true"),
    (chat(stream=True, stream_options=[]), "stream_options", "include_usage"),
    (chat(stream=True, stream_options={"continuous": True}), "stream_options", "unknown key"),
    (chat(stream=True, stream_options={"include_usage": 1}), "stream_options.include_usage", "boolean"),
    (chat(stop="\n"), "stop", "not supported"),
    (chat(stop=["###"]), "stop", "not supported"),
    (chat(logprobs=True), "logprobs", "not supported"),
    (chat(top_logprobs=3), "top_logprobs", "not supported"),
    (chat(tools=[{"type": "function"}]), "tools", "tool"),
    (chat(tool_choice="auto"), "tool_choice", "tool"),
    (chat(functions=[{"name": "f"}]), "functions", "function"),
    (chat(function_call="auto"), "function_call", "function"),
    (chat(response_format={"type": "json_object"}), "response_format", "plain text"),
    (chat(logit_bias={"1": 5}), "logit_bias", "not supported"),
    (chat(presence_penalty=0.5), "presence_penalty", "penalties"),
    (chat(frequency_penalty=-1), "frequency_penalty", "penalties"),
    (chat(frequency_penalty=False), "frequency_penalty", "penalties"),
    (chat(best_of=2), "best_of", "unknown field"),  # a completions field
    (chat(prompt="x"), "prompt", "unknown field"),
    (chat(wrokers=3, zz=1), "wrokers", "hogwild-ray's own fields are workers, layout"),
]


@pytest.mark.parametrize("body,param,word", CHAT_REFUSALS)
def test_chat_refusals_name_the_field(body, param, word):
    error = refused(parse_chat, body)
    assert error.param == param
    assert word in error.message, error.message
    assert "\n" not in error.message
    assert error.body() == {"error": {"message": error.message, "type": "invalid_request_error",
                                      "param": param, "code": error.code}}


COMPLETION_REFUSALS = [
    ({"prompt": "Q"}, "model", "required"),
    (completion(model="other"), "model", "smol"),
    ({"model": "smol"}, "prompt", "text"),
    (completion(prompt=[1, 2, 3]), "prompt", "prompt must be text"),
    (completion(prompt=[[1, 2]]), "prompt", "prompt must be text"),
    (completion(prompt=[]), "prompt", "prompt must be text"),
    (completion(prompt=["a", "b"]), "prompt", "one string"),
    (completion(prompt=" "), "prompt", "empty"),
    (completion(prompt=None), "prompt", "text"),
    (completion(best_of=2), "best_of", "not supported"),
    (completion(best_of=True), "best_of", "not supported"),
    (completion(echo=True), "echo", "not supported"),
    (completion(suffix="end"), "suffix", "not supported"),
    (completion(logprobs=1), "logprobs", "not supported"),
    (completion(stop="x"), "stop", "not supported"),
    (completion(messages=[USER]), "messages", "unknown field"),
    (completion(max_completion_tokens=5), "max_completion_tokens", "unknown field"),
    (completion(tools=[]), "tools", "unknown field"),
    (completion(workers=65), "workers", "integer"),
    (completion(max_tokens=0), "max_tokens", "integer"),
]


@pytest.mark.parametrize("body,param,word", COMPLETION_REFUSALS)
def test_completion_refusals_name_the_field(body, param, word):
    error = refused(parse_completion, body)
    assert error.param == param
    assert word in error.message, error.message


def test_refusal_codes():
    assert refused(parse_chat, chat(model="gpt-4o")).code == "model_not_found"
    assert "'smol'" in refused(parse_chat, chat(model="gpt-4o")).message
    assert refused(parse_chat, chat(stop="x")).code == "unsupported_parameter"
    unknown = refused(parse_chat, chat(wrokers=3, aa=1))
    assert unknown.code == "unknown_parameter" and "aa, wrokers" in unknown.message
    assert "worker_sampling" in unknown.message


def test_workers_message_reads_as_documented():
    error = refused(parse_chat, chat(workers=0), ServeDefaults(model="smol"))
    assert error.message == "workers must be an integer in [1, 64] (the server's --max-workers), got 0"


def test_huge_values_give_short_messages():
    error = refused(parse_chat, chat(seed=10**5000))
    assert error.param == "seed" and len(error.message) < 200
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    error = refused(parse_chat, chat(layout=deep))
    assert error.param == "layout" and len(error.message) < 200


# ---- start_options ----------------------------------------------------------------------


def test_start_options_offset_seeds_per_session():
    req = parse_chat(chat(workers=2, n=3, seed=100, temperature=0.5, max_forward_passes=9, finisher=False), D)
    seeds = [[s.seed for s in req.start_options(i)["sampling"]] for i in range(3)]
    assert seeds == [[100, 101], [102, 103], [104, 105]]
    options = req.start_options(1)
    assert options["layout"] == "combined" and options["max_tokens"] == 100 and options["max_steps"] == 9
    assert options["finisher"] is False and "protocol" not in options
    assert all(s.temperature == 0.5 for s in options["sampling"])
    with pytest.raises(ValueError):
        req.start_options(3)


def test_start_options_unseeded_stays_unseeded():
    req = parse_chat(chat(n=3, workers=3), D)
    for i in range(3):
        options = req.start_options(i)
        assert [s.seed for s in options["sampling"]] == [None] * 3
        assert set(options) == {"sampling", "layout", "max_tokens", "max_steps"}


def test_worker_sampling_overrides_per_worker():
    body = chat(workers=3, n=3, temperature=0.7, seed=10,
                worker_sampling=[{"temperature": 0}, {}, {"top_p": 0.5, "top_k": 5, "seed": 1000}])
    req = parse_chat(body, D)
    assert req.sampling == (SamplingParams(0.0, 0, 1.0, 10), SamplingParams(0.7, 0, 1.0, 11),
                            SamplingParams(0.7, 5, 0.5, 1000))
    assert [s.seed for s in req.start_options(2)["sampling"]] == [16, 17, 1006]
    assert [s.temperature for s in req.start_options(2)["sampling"]] == [0.0, 0.7, 0.7]


def test_worker_sampling_wrong_length_is_refused():
    error = refused(parse_chat, chat(workers=3, worker_sampling=[{}, {}]))
    assert error.param == "worker_sampling" and "list of 3" in error.message and "a list of 2" in error.message


def test_largest_seed_wraps_instead_of_failing():
    req = parse_chat(chat(seed=2**63 - 1, n=2), D)
    assert [s.seed for s in req.sampling] == [2**63 - 1, 0]
    assert [s.seed for s in req.start_options(1)["sampling"]] == [1, 2]


# ---- responses --------------------------------------------------------------------------


@pytest.mark.parametrize("reason,expected", [("answer", "stop"), ("eos", "stop"), ("budget", "length"),
                                             ("budget+finisher", "length"), ("eos+finisher", "stop"),
                                             ("", "stop")])
def test_finish_reason(reason, expected):
    assert finish_reason(Stats(stop_reason=reason)) == expected


def test_usage_counts_the_prompt_once_and_every_generated_token():
    results = [result(generated=(3, 5)), result(generated=(10, 0, 2))]
    # two choices of one prompt: the prompt once (OpenAI's and vLLM's count), both choices' completions
    assert usage(results, [7, 7]) == {"prompt_tokens": 7, "completion_tokens": 20, "total_tokens": 27}
    assert usage([], []) == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def test_hogwild_extension():
    assert hogwild_extension(result()) == {
        "worker_texts": ["**Alice [1]:** two", "**Bob [1]:** plus two"], "forward_passes": 7,
        "tokens_per_worker": [3, 5], "steps_per_worker": [2, 1], "stop_reason": "answer", "seconds": 1.5,
    }


def test_chat_response_shape():
    req = parse_chat(chat(n=2), D)
    results = [result(), result(answer=None, stop_reason="budget")]
    body = chat_response(req, "chatcmpl-1", 1700, results, [9, 9])
    assert {k: body[k] for k in ("id", "object", "created", "model")} == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1700, "model": "smol"}
    first, second = body["choices"]
    assert first == {"index": 0, "message": {"role": "assistant", "content": "4", "reasoning_content": "Alice and Bob"},
                     "finish_reason": "stop", "hogwild": hogwild_extension(results[0])}
    assert second["index"] == 1 and second["message"]["content"] == "" and second["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 16, "total_tokens": 25}
    json.dumps(body)  # plain JSON


def test_completion_response_shape():
    req = parse_completion(completion(), D)
    body = completion_response(req, "cmpl-1", 1700, [result(stop_reason="eos")], [9])
    assert (body["id"], body["object"], body["created"], body["model"]) == ("cmpl-1", "text_completion", 1700, "smol")
    assert body["choices"] == [{"index": 0, "text": "4", "reasoning_content": "Alice and Bob", "finish_reason": "stop",
                                "logprobs": None, "hogwild": hogwild_extension(result(stop_reason="eos"))}]
    assert body["usage"]["total_tokens"] == 17


def test_chat_stream_chunks():
    req = parse_chat(chat(stream=True, stream_options={"include_usage": True}), D)
    chunks = StreamChunks(req, "chatcmpl-9", 5)
    start = chunks.start(0)
    assert start == {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 5, "model": "smol",
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    text = chunks.worker_text(0, 1, "so")
    assert text["object"] == "chat.completion.chunk"
    assert text["choices"] == [{"index": 0, "delta": {"reasoning_content": "so"}, "finish_reason": None,
                                "hogwild": {"worker": 1}}]
    done = chunks.finish(0, result(stop_reason="budget"))
    assert done["choices"][0]["delta"] == {"content": "4"} and done["choices"][0]["finish_reason"] == "length"
    assert done["choices"][0]["hogwild"]["stop_reason"] == "budget"
    assert chunks.finish(0, result(answer=None))["choices"][0]["delta"] == {"content": ""}
    last = chunks.usage_chunk([result()], [4])
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12}
    assert last["object"] == "chat.completion.chunk" and last["id"] == "chatcmpl-9"


def test_completion_stream_chunks():
    req = parse_completion(completion(stream=True, n=2), D)
    chunks = StreamChunks(req, "cmpl-9", 5)
    assert chunks.start(1) is None
    text = chunks.worker_text(1, 0, "so")
    assert text["object"] == "text_completion"
    assert text["choices"] == [{"index": 1, "text": "", "reasoning_content": "so", "finish_reason": None,
                                "logprobs": None, "hogwild": {"worker": 0}}]
    done = chunks.finish(1, result())
    assert "delta" not in done["choices"][0]
    assert done["choices"][0]["text"] == "4" and done["choices"][0]["finish_reason"] == "stop"
    assert done["choices"][0]["hogwild"] == hogwild_extension(result())
    assert chunks.usage_chunk([], [])["object"] == "text_completion"


def test_sse_bytes_keep_utf8():
    assert sse({"a": "é ∑ 🙂", "b": [1, None]}) == 'data: {"a":"é ∑ 🙂","b":[1,null]}\n\n'.encode()
    assert SSE_DONE == b"data: [DONE]\n\n"
    error = RequestError(400, "bad", param="n")
    assert sse_error(error) == b'data: {"error":{"message":"bad","type":"invalid_request_error","param":"n",' \
                               b'"code":null}}\n\n'
    assert sse({"t": "\ud800"}) == b'data: {"t":"?"}\n\n'  # a lone surrogate cannot break the stream


def test_request_error_body():
    error = RequestError(404, "gone", type="not_found_error", code="model_not_found")
    assert (error.status, str(error)) == (404, "gone")
    assert error.body() == {"error": {"message": "gone", "type": "not_found_error", "param": None,
                                      "code": "model_not_found"}}


# ---- decode_json, models ----------------------------------------------------------------


def test_decode_json_reads_utf8_json():
    assert decode_json('{"a": "é", "n": [1, 2.5]}'.encode()) == {"a": "é", "n": [1, 2.5]}


@pytest.mark.parametrize("raw,word", [(b"", "empty"), (b"  \n", "empty"), (b'{"a": "\xff"}', "UTF-8"),
                                      (b'{"model": "smol"', "not valid JSON"), (b"{'a': 1}", "not valid JSON"),
                                      (b'{"t": NaN}', "NaN"), (b"[Infinity]", "Infinity"),
                                      (b"[" * 100_000 + b"]" * 100_000, "too deeply"),
                                      (b"1" * 5000, "too long")])
def test_decode_json_refuses_bad_bytes(raw, word):
    with pytest.raises(RequestError) as info:
        decode_json(raw)
    error = info.value
    assert (error.status, error.code, error.param) == (400, "invalid_json", None)
    assert word in error.message and "\n" not in error.message


def test_models_list():
    assert models_list(D, 42) == {"object": "list", "data": [
        {"id": "smol", "object": "model", "created": 42, "owned_by": "hogwild-ray"}]}


# ---- any JSON-like value: a request or a 400, never another exception ----------------------

FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
          "n", "stream", "stream_options", "include_usage", "workers", "layout", "max_forward_passes", "protocol",
          "redundancy_every", "finisher", "finisher_tokens", "stop_on_answer", "chat_template", "top_k",
          "worker_sampling", "stop", "logprobs", "top_logprobs", "tools", "tool_choice", "response_format",
          "logit_bias", "presence_penalty", "best_of", "echo", "suffix", "user", "role", "content", "type", "text",
          "name"]
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**62, max_value=2**90)
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(["smol", "user", "system", "text", ""])
           | st.text(max_size=8))
KEYS = st.sampled_from(FIELDS) | st.text(max_size=6)
JSONISH = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
                       max_leaves=20)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]), "content": JSONISH},
                                optional={"name": JSONISH})
# mostly valid bodies with a few fields set to plausible or odd values, so that the checks past `model` run too
PLAUSIBLE = st.sampled_from([0, 1, 2, 3, 0.5, 1.0, True, False, None, "combined", "none", [], {}, [{}, {}],
                             {"include_usage": True}, [{"temperature": 0.1}, {"seed": 3}]]) | JSONISH
BODY_FIELDS = [f for f in FIELDS if f not in ("model", "messages", "prompt", "role", "content", "type", "text",
                                              "name", "include_usage")]
NEARLY_VALID = st.builds(
    lambda base, extra: {**base, **extra},
    st.fixed_dictionaries({"model": st.just("smol"), "prompt": st.just("Q")})
    | st.fixed_dictionaries({"model": st.just("smol"), "messages": st.lists(MESSAGE, min_size=1, max_size=3)})
    | st.just({"model": "smol", "messages": [{"role": "user", "content": "Q"}]}),
    st.dictionaries(st.sampled_from(BODY_FIELDS), PLAUSIBLE, max_size=4),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=JSONISH | NEARLY_VALID | st.dictionaries(KEYS, JSONISH, max_size=8))
def test_any_value_parses_or_is_a_400(body):
    for parse in (parse_chat, parse_completion):
        try:
            req = parse(body, D)
        except RequestError as e:
            assert e.status == 400 and isinstance(e.message, str) and e.message
            json.dumps(e.body())
        else:
            assert isinstance(req, GenerateRequest) and len(req.sampling) == req.workers
            assert 1 <= req.n <= D.max_n and 1 <= req.workers <= D.max_workers and req.problem.strip()
            for s in req.sampling:
                assert math.isfinite(s.temperature)
            for i in range(req.n):
                req.start_options(i)


@settings(max_examples=150, deadline=None)
@given(body=st.fixed_dictionaries({"model": st.just("smol"), "prompt": st.text(min_size=1).filter(str.strip)},
                                  optional={"workers": st.integers(1, 8), "n": st.integers(1, 4),
                                            "seed": st.integers(0, 2**63 - 1), "temperature": st.floats(0, 5),
                                            "top_p": st.floats(0.01, 1), "top_k": st.integers(0, 100),
                                            "layout": st.sampled_from(["combined", "contiguous", "interleaved"])}))
def test_valid_bodies_are_accepted(body):
    req = parse_completion(body, D)
    assert req.problem == body["prompt"] and req.workers == body.get("workers", 2)
    seeds = [s.seed for i in range(req.n) for s in req.start_options(i)["sampling"]]
    if "seed" in body:
        assert len(set(seeds)) == len(seeds)  # every worker of every session samples on its own
