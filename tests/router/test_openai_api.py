"""The OpenAI translation layer on its own (router/openai_api.py): requests -> GenerateRequest,
responses -> completion objects and chunks, errors -> the OpenAI shape and HTTP status. The
real stack behind it, through the official `openai` client, is tests/router/test_openai_stack.py.
"""

from __future__ import annotations

import json

import grpc
import pytest

from coralline.router import openai_api as oa
from coralline.rpc.errors import PromptTooLong, ServiceError
from coralline.rpc.protos import common_pb2, generation_pb2

MODEL = "smollm2-135m-instruct"
MODELS = (MODEL,)
HI = [{"role": "user", "content": "hi"}]


def _chat(**body) -> oa.Parsed:
    return oa.parse({"model": MODEL, "messages": HI, **body}, oa.CHAT, MODELS)


def _refused(body: object, kind: str = oa.CHAT) -> oa.ApiError:
    with pytest.raises(oa.ApiError) as e:
        oa.parse(body, kind, MODELS)
    return e.value


def test_chat_request_maps_every_supported_field():
    p = _chat(
        messages=[
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ],
        max_completion_tokens=7,
        temperature=0.5,
        top_p=0.9,
        seed=42,
        stop=["\n", "END"],
        n=1,
        stream=True,
        stream_options={"include_usage": True},
        drafter="none",
        ignore_eos=True,  # vLLM's extension
        user="someone",  # accepted, changes nothing
        frequency_penalty=0,  # its default: accepted
    )
    r = p.request
    assert p.kind == oa.CHAT and p.stream and p.include_usage and p.model == MODEL
    assert [(m.role, m.content) for m in r.messages.messages] == [
        ("system", "be brief"),
        ("user", "ab"),
    ]
    assert r.max_new_tokens == 7 and list(r.stop) == ["\n", "END"] and r.drafter == "none"
    assert r.sampling.temperature == 0.5 and r.sampling.top_p == pytest.approx(0.9)
    assert r.sampling.seed == 42 and r.sampling.ignore_eos is True


def test_defaults_follow_openai():
    p = _chat()
    assert p.request.sampling.temperature == 1.0  # OpenAI's default temperature
    assert not p.request.sampling.HasField("top_p") and not p.request.sampling.HasField("seed")
    assert p.request.sampling.ignore_eos is False
    assert p.request.max_new_tokens == oa.DEFAULT_MAX_TOKENS[oa.CHAT]
    assert not p.stream and not p.include_usage
    c = oa.parse({"model": MODEL, "prompt": "x"}, oa.COMPLETION, MODELS)
    assert c.request.max_new_tokens == 16  # the completions default
    assert c.request.text == "x" and c.request.chat_template is False
    assert _chat(max_tokens=5).request.max_new_tokens == 5  # the older name


def test_completion_prompt_forms():
    ids = oa.parse({"model": MODEL, "prompt": [1, 2, 3]}, oa.COMPLETION, MODELS)
    assert list(ids.request.token_ids.ids) == [1, 2, 3] and ids.prompt_tokens == 3
    one = oa.parse({"model": MODEL, "prompt": ["text"]}, oa.COMPLETION, MODELS)
    assert one.request.text == "text"
    nested = oa.parse({"model": MODEL, "prompt": [[5, 6]]}, oa.COMPLETION, MODELS)
    assert list(nested.request.token_ids.ids) == [5, 6]
    for prompt, match in [
        (["a", "b"], "batch"),
        ("", "empty"),
        ([1, -2], "non-negative"),
        ([1, True], "non-negative"),
        (None, "prompt must be"),
        (3, "prompt must be"),
    ]:
        e = _refused({"model": MODEL, "prompt": prompt}, oa.COMPLETION)
        assert e.status == 400 and e.param == "prompt" and match in e.message, prompt
    assert _refused({"model": MODEL}, oa.COMPLETION).param == "prompt"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"n": 2}, "n"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 3, "max_completion_tokens": 4}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ({"stream": True, "stream_options": {"other": 1}}, "stream_options"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"temprature": 0}, "temprature"),  # a typo is not silently ignored
        ({"echo": True}, "echo"),  # a completions-only field
        ({"drafter": 3}, "drafter"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages[0]"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content",
        ),
        ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{}]}]}, "messages[0]"),
    ],
)
def test_bad_chat_parameters_are_400_naming_the_field(extra, param):
    e = _refused({"model": MODEL, "messages": HI, **extra})
    assert e.status == 400 and e.type == "invalid_request_error" and e.param == param, e.message
    body = e.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]


def test_model_is_required_and_must_be_served():
    assert _refused({"messages": HI}).param == "model"
    e = _refused({"model": "gpt-4o", "messages": HI})
    assert (e.status, e.code, e.param) == (404, "model_not_found", "model")
    assert _refused([1, 2]).status == 400  # not an object


def test_errors_of_the_router_map_to_http_statuses():
    cases = [
        (ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "bad"), 400, None),
        (ValueError("bad value"), 400, None),
        (PromptTooLong("too long"), 400, "context_length_exceeded"),
        (ServiceError(grpc.StatusCode.UNAUTHENTICATED, "who"), 401, "invalid_api_key"),
        (ServiceError(grpc.StatusCode.NOT_FOUND, "no drafter"), 404, None),
        (ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", 2.5), 429, "rate_limit_exceeded"),
        (ServiceError(grpc.StatusCode.UNAVAILABLE, "none up"), 503, "service_unavailable"),
        (ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "slow"), 504, "timeout"),
        (RuntimeError("boom"), 500, None),
    ]
    for exc, status, code in cases:
        e = oa.api_error(exc)
        assert (e.status, e.code) == (status, code), exc
        assert str(exc) in e.message or exc.args[0] in e.message
    full = oa.api_error(ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", 2.5))
    assert full.headers() == {"retry-after": "3"}  # whole seconds, rounded up
    assert oa.api_error(PromptTooLong("x"), oa.COMPLETION).param == "prompt"
    assert oa.api_error(ServiceError(grpc.StatusCode.UNAVAILABLE, "x")).headers() == {}


def _responses(text_parts, summary: common_pb2.Summary):
    out = []
    for i, t in enumerate(text_parts):
        r = generation_pb2.GenerateResponse(session_id="s1", text=t, token_ids=[10 + i, 20 + i])
        r.stats.tree_nodes, r.stats.accepted = 5, 1
        out.append(r)
    out[-1].summary.CopyFrom(summary)
    return out


def test_answer_builds_the_response_and_the_stream():
    summary = common_pb2.Summary(
        tokens=6, rounds=3, acceptance_length=2.0, prompt_tokens=9, drafter="coral",
        verifier="greedy", seed=2**64 - 1, finish_reason=common_pb2.FINISH_REASON_EOS,
    )  # fmt: skip
    parsed = _chat(stream=True, stream_options={"include_usage": True})
    answer = oa.Answer(parsed, "s1")
    chunks = [answer.first_chunk()]
    chunks += [answer.chunk(r) for r in _responses(["He", "llo", ""], summary)]
    chunks += answer.last_chunks()
    assert chunks[3] is None  # no text: no chunk
    chunks = [c for c in chunks if c is not None]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1]) == "Hello"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-s1" for c in chunks)
    finish = chunks[-2]
    assert finish["choices"][0]["finish_reason"] == "stop" and finish["usage"] is None
    spec = finish["spec_decode"]
    assert spec["rounds"] == 3 and spec["draft_tokens"] == 12 and spec["accepted_tokens"] == 3
    assert spec["seed"] == str(2**64 - 1) and finish["session_id"] == "s1"
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15,
    }  # fmt: skip
    whole = answer.response()
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    json.dumps(whole)  # JSON-able as it is
    assert oa.sse({"a": 1}) == b'data: {"a": 1}\n\n' and oa.DONE == b"data: [DONE]\n\n"


def test_completion_answer_and_length_finish():
    summary = common_pb2.Summary(
        tokens=4, prompt_tokens=3, finish_reason=common_pb2.FINISH_REASON_LENGTH
    )
    parsed = oa.parse({"model": MODEL, "prompt": "x", "stream": True}, oa.COMPLETION, MODELS)
    answer = oa.Answer(parsed, "s2")
    assert answer.first_chunk() is None
    texts = [answer.chunk(r)["choices"][0]["text"] for r in _responses(["a", "b"], summary)]
    last = answer.last_chunks()
    assert texts == ["a", "b"] and len(last) == 1 and "usage" not in last[0]
    assert last[0]["choices"][0] == {
        "index": 0,
        "text": "",
        "logprobs": None,
        "finish_reason": "length",
    }
    whole = answer.response()
    assert whole["id"] == "cmpl-s2" and whole["choices"][0]["text"] == "ab"
    assert whole["usage"]["completion_tokens"] == 4


def test_models_list_shape():
    body = oa.models_list(MODELS, 123)
    assert body == {
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": 123, "owned_by": "coralline"}],
    }
