"""The OpenAI HTTP API as coralline requests and answers: JSON bodies -> GenerateRequest,
GenerateResponse streams -> completion objects and server-sent-event chunks, errors -> the
OpenAI error shape with its HTTP status.

Follows the OpenAI reference for the fields that apply to one text model (docs/openai.md has
the table): `messages` (rendered with the target's chat template by the router) or `prompt`,
`max_tokens` / `max_completion_tokens`, `temperature` (default 1, as OpenAI), `top_p`, `seed`,
`stop` (up to 4 strings), `n` = 1, `stream`, `stream_options.include_usage`. Fields that would
change the output and are not supported (penalties, logit_bias, logprobs, tools, a JSON
response format, n > 1, ...) are refused with 400 naming the field, as are unknown fields
(OpenAI does the same); fields that change nothing (user, metadata, store, ...) are accepted.
Extensions: `drafter` and `verifier` pick the speculation (as GenerateRequest does),
`ignore_eos` (as vLLM's: an end-of-sequence token does not end the generation), and every
answer carries `spec_decode` (rounds, acceptance length, drafted / accepted tokens), like vLLM's
per-request speculative decoding metrics, plus the coralline `session_id`.

Pure: no web framework, no Ray. http.py serves it; the router's limits and placement apply
unchanged, since every request becomes the same GenerateRequest the gRPC API takes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import grpc

from coralline.rpc.errors import PromptTooLong, ServiceError
from coralline.rpc.protos import common_pb2, generation_pb2

CHAT, COMPLETION = "chat", "completion"
MAX_STOP = 4  # OpenAI's bound on stop sequences
DEFAULT_MAX_TOKENS = {CHAT: 256, COMPLETION: 16}  # OpenAI's completions default is 16

# accepted and ignored: they change nothing about the output
_IGNORED = frozenset(
    {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
     "parallel_tool_calls", "reasoning_effort", "verbosity"}
)  # fmt: skip
# accepted when they hold their "off" value (the value the client libraries send by default)
_OFF: dict[str, tuple] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
}
_COMMON = frozenset(
    {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream",
     "stream_options", "drafter", "verifier", "ignore_eos"}
)  # fmt: skip
_FIELDS = {
    CHAT: _COMMON | {"messages", "max_completion_tokens"},
    COMPLETION: _COMMON | {"prompt"},
}
_CHAT_ONLY_OFF = {
    "tools", "tool_choice", "functions", "function_call", "response_format", "modalities",
    "audio", "prediction", "web_search_options", "top_logprobs",
}  # fmt: skip
_COMPLETION_ONLY_OFF = {"best_of", "echo", "suffix"}

FINISH = {
    common_pb2.FINISH_REASON_EOS: "stop",
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CONTEXT: "length",
}


# ---------------------------------------------------------------------- errors
class ApiError(Exception):
    """An error as the OpenAI API sends it: HTTP status + {"error": {message, type, param,
    code}}; retry_after_s becomes the Retry-After header (429)."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.retry_after_s = param, code, retry_after_s

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"retry-after": str(max(1, math.ceil(self.retry_after_s)))}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


# gRPC status -> (HTTP status, OpenAI error type, code)
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error", None),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "conflict_error", None),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.CANCELLED: (499, "cancelled", None),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error", "timeout"),
}


def api_error(exc: BaseException, kind: str = CHAT) -> ApiError:
    """The OpenAI form of what the router (or this layer) raised; None of the internals of
    an unexpected error leak beyond its type and message."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, PromptTooLong):
        param = "messages" if kind == CHAT else "prompt"
        return ApiError(400, str(exc), "invalid_request_error", param, "context_length_exceeded")
    if isinstance(exc, ServiceError):
        status, type_, code = _STATUS.get(exc.code, (500, "internal_error", None))
        return ApiError(status, exc.message, type_, None, code, exc.retry_after_s)
    if isinstance(exc, ValueError):
        return bad(str(exc))
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")


# ---------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Parsed:
    """One OpenAI request as coralline reads it."""

    kind: str  # CHAT or COMPLETION
    model: str
    request: generation_pb2.GenerateRequest
    stream: bool = False
    include_usage: bool = False
    prompt_tokens: int | None = None  # known here for token-id prompts only
    extra: dict = field(default_factory=dict)


def _number(body: dict, name: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise bad(f"{name} must be a number", name)
    if v < lo or v > hi or (lo_open and v == lo):
        side = "(" if lo_open else "["
        raise bad(f"{name} must be in {side}{lo:g}, {hi:g}], got {v}", name)
    return float(v)


def _int(body: dict, name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{name} must be an integer", name)
    if not lo <= v <= hi:
        raise bad(f"{name} must be in [{lo}, {hi}], got {v}", name)
    return v


def _check_fields(body: dict, kind: str) -> None:
    allowed = _FIELDS[kind]
    skip = _COMPLETION_ONLY_OFF if kind == CHAT else _CHAT_ONLY_OFF
    for name, value in body.items():
        if name in allowed or name in _IGNORED:
            continue
        if name in _OFF and name not in skip:
            if value not in _OFF[name]:
                raise bad(
                    f"{name} is not supported by coralline (only its default, "
                    f"{_OFF[name][-1]!r}, is accepted)",
                    name,
                    "unsupported_parameter",
                )
            continue
        raise bad(f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")


def _content(value, where: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad(f"{where}[{j}]: only text parts are supported", where)
            if not isinstance(part.get("text"), str):
                raise bad(f"{where}[{j}].text must be a string", where)
            texts.append(part["text"])
        return "".join(texts)
    if value is None:
        return ""
    raise bad(f"{where} must be a string or a list of text parts", where)


def _messages(value) -> generation_pb2.ChatMessages:
    if not isinstance(value, list) or not value:
        raise bad("messages must be a non-empty list", "messages")
    out = generation_pb2.ChatMessages()
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a role", f"messages[{i}]")
        if m.get("tool_calls") or m.get("function_call"):
            raise bad(f"messages[{i}]: tool calls are not supported", f"messages[{i}]")
        content = _content(m.get("content"), f"messages[{i}].content")
        out.messages.add(role=m["role"], content=content)
    return out


def _prompt(value, req: generation_pb2.GenerateRequest) -> int | None:
    """Sets the completion prompt; returns its length when given as token ids."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]  # a batch of one
    if isinstance(value, str):
        if not value:
            raise bad("prompt is empty", "prompt")
        req.text = value
        req.chat_template = False  # a completion continues the raw text
        return None
    if isinstance(value, list) and value and all(isinstance(t, int) for t in value):
        if any(isinstance(t, bool) or t < 0 for t in value):
            raise bad("prompt token ids must be non-negative integers", "prompt")
        req.token_ids.ids.extend(value)
        return len(value)
    if isinstance(value, list) and len(value) > 1:
        raise bad("a batch of prompts is not supported: send one prompt per request", "prompt")
    raise bad("prompt must be a string, a list of token ids, or a list of one of them", "prompt")


def parse(body: object, kind: str, models: tuple[str, ...]) -> Parsed:
    """An OpenAI chat completion (kind=CHAT) or completion request -> Parsed; ApiError for a
    bad one (404 for a model this server does not serve)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    _check_fields(body, kind)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("you must provide a model parameter", "model")
    if model not in models:
        raise ApiError(
            404,
            f"The model `{model}` does not exist; this server serves {', '.join(models)}",
            "not_found_error",
            "model",
            "model_not_found",
        )
    req = generation_pb2.GenerateRequest()
    prompt_tokens = None
    if kind == CHAT:
        req.messages.CopyFrom(_messages(body.get("messages")))
    else:
        if "prompt" not in body:
            raise bad("you must provide a prompt", "prompt")
        prompt_tokens = _prompt(body["prompt"], req)

    n = _int(body, "n", 1, 1 << 31)
    if n not in (None, 1):
        raise bad("n must be 1: coralline returns one choice per request", "n")
    names = ("max_completion_tokens", "max_tokens") if kind == CHAT else ("max_tokens",)
    limits = {k: _int(body, k, 1, 1 << 31) for k in names}
    given = [v for v in limits.values() if v is not None]
    if len(set(given)) > 1:
        raise bad("max_tokens and max_completion_tokens differ: set one", "max_tokens")
    req.max_new_tokens = given[0] if given else DEFAULT_MAX_TOKENS[kind]

    temperature = _number(body, "temperature", 0.0, 2.0)
    req.sampling.temperature = 1.0 if temperature is None else temperature
    top_p = _number(body, "top_p", 0.0, 1.0, lo_open=True)
    if top_p is not None and top_p < 1:
        req.sampling.top_p = top_p
    seed = _int(body, "seed", 0, (1 << 63) - 1)
    if seed is not None:
        req.sampling.seed = seed

    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise bad("stop must be a non-empty string or a list of them", "stop")
        if len(stop) > MAX_STOP:
            raise bad(f"stop takes at most {MAX_STOP} sequences", "stop")
        req.stop.extend(stop)

    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream must be a boolean", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad("stream_options takes include_usage only", "stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise bad("stream_options.include_usage must be a boolean", "stream_options")
    for name in ("drafter", "verifier"):
        value = body.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise bad(f"{name} must be a string", name)
            setattr(req, name, value)
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is not None:
        if not isinstance(ignore_eos, bool):
            raise bad("ignore_eos must be a boolean", "ignore_eos")
        req.sampling.ignore_eos = ignore_eos
    return Parsed(kind, model, req, bool(stream), include_usage, prompt_tokens)


# ---------------------------------------------------------------------- answers
@dataclass
class Tally:
    """What a generation's responses add up to (for the final chunk and the response)."""

    text: list[str] = field(default_factory=list)
    tokens: int = 0
    drafted: int = 0  # draft tokens proposed (tree nodes beyond each round's root)
    accepted: int = 0
    session_id: str = ""
    summary: common_pb2.Summary | None = None

    def add(self, response: generation_pb2.GenerateResponse) -> None:
        self.session_id = self.session_id or response.session_id
        self.text.append(response.text)
        self.tokens += len(response.token_ids)
        if response.HasField("stats"):
            self.drafted += max(0, response.stats.tree_nodes - 1)
            self.accepted += response.stats.accepted
        if response.HasField("summary"):
            self.summary = response.summary

    @property
    def finish_reason(self) -> str | None:
        if self.summary is None:
            return None
        return FINISH.get(self.summary.finish_reason, "stop")

    def usage(self, prompt_tokens: int | None) -> dict:
        s = self.summary
        prompt = s.prompt_tokens if s is not None else (prompt_tokens or 0)
        completion = s.tokens if s is not None else self.tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def spec_decode(self) -> dict:
        s = self.summary or common_pb2.Summary()
        return {
            "drafter": s.drafter,
            "verifier": s.verifier,
            "rounds": s.rounds,
            "acceptance_length": round(s.acceptance_length, 4),
            "draft_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "fallback_rounds": s.fallback_rounds,
            "plain_rounds": s.plain_rounds,
            "seed": str(s.seed),  # a uint64: a string keeps it exact in JavaScript
        }


class Answer:
    """Builds the response objects and stream chunks of one request."""

    def __init__(self, parsed: Parsed, session_id: str) -> None:
        self.parsed = parsed
        self.chat = parsed.kind == CHAT
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + session_id
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"
        self.tally = Tally(session_id=session_id)

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.parsed.model}

    def _extensions(self) -> dict:
        return {"session_id": self.tally.session_id, "spec_decode": self.tally.spec_decode()}

    def response(self) -> dict:
        """The whole (non-streamed) answer."""
        t = self.tally
        text = "".join(t.text)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"logprobs": None, "finish_reason": t.finish_reason}
        body = self._head(self.object) | {"choices": [choice]}
        return body | {"usage": t.usage(self.parsed.prompt_tokens)} | self._extensions()

    def _chunk(self, delta_text: str | None, finish: str | None, first: bool = False) -> dict:
        if self.chat:
            delta: dict = {}
            if first:
                delta["role"] = "assistant"
            if delta_text is not None:
                delta["content"] = delta_text
            choice = {"index": 0, "delta": delta}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta_text or ""}
            obj = "text_completion"
        choice |= {"logprobs": None, "finish_reason": finish}
        chunk = self._head(obj) | {"choices": [choice]}
        if self.parsed.include_usage:
            chunk["usage"] = None
        return chunk

    def first_chunk(self) -> dict | None:
        """Chat streams open with the assistant role (and empty content), as OpenAI's do."""
        return self._chunk("", None, first=True) if self.chat else None

    def chunk(self, response: generation_pb2.GenerateResponse) -> dict | None:
        """The chunk for one streamed response (None when it adds no text)."""
        self.tally.add(response)
        return self._chunk(response.text, None) if response.text else None

    def last_chunks(self) -> list[dict]:
        """The finish chunk (with the extensions), then the usage chunk when asked for."""
        t = self.tally
        last = self._chunk(None if self.chat else "", t.finish_reason) | self._extensions()
        out = [last]
        if self.parsed.include_usage:
            usage = self._head(last["object"]) | {"choices": []}
            out.append(usage | {"usage": t.usage(self.parsed.prompt_tokens)})
        return out


def sse(data: dict | str) -> bytes:
    """One server-sent event (`data: ...` and a blank line)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


DONE = sse("[DONE]")


def error_event(e: ApiError) -> bytes:
    """An error after the stream has started (headers sent): one event with the error shape,
    as OpenAI's streams do, then the stream ends."""
    return sse(e.body())


def models_list(models: tuple[str, ...], created: int) -> dict:
    return {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": created, "owned_by": "coralline"}
            for m in models
        ],
    }
