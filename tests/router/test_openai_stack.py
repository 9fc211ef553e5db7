"""The OpenAI-compatible HTTP API of a real `coralline serve` stack (drafter, verifier, Ray
Serve router, a real Redis as the session store, SmolLM2), through the official `openai`
client and raw HTTP: answers equal the gRPC SDK's and the target's own greedy decoding, usage
counts equal the token counts, every error has its OpenAI shape and status, and a streamed
request whose client disconnects frees its session within a second (read in Redis and at the
verifier). The 503 test kills the verifier, so it runs last (file order).
"""

from __future__ import annotations

import json
import threading
import time

import httpx2
import openai
import pytest

from coralline.client import Client
from coralline.engine import Engine, generate_ids
from coralline.rpc.protos import verifier_pb2, verifier_pb2_grpc
from coralline.sampling import SamplingParams
from coralline.session import RUNNING
from coralline.session_redis import RedisSessionStore

from ..redis_servers import own_redis

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
TOKEN = "http-api-test-token-" + "k" * 12
MAX_PROMPT = 256  # the router's max_prompt_tokens here
QUEUE_S = 2.0  # the router's queue_timeout_s here: a full stack answers 429 after it
CONVERSATIONS = [
    [{"role": "user", "content": "Name three colors."}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is 12 times 7?"},
        {"role": "assistant", "content": "12 times 7 is 84."},
        {"role": "user", "content": "And 12 times 8?"},
    ],
]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with own_redis(tmp_path_factory.mktemp("redis-http"), "--appendonly", "no") as server:
        yield server


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    from coralline.router.stack import Stack, StackConfig

    st = Stack(
        StackConfig(
            port=0,
            http_port=0,
            drafters=1,
            verifiers=1,
            max_sessions=2,  # two sessions fill it (the 429 test)
            redis=redis_server.url,
            log_dir=str(tmp_path_factory.mktemp("http-logs")),
            dashboard_port=0,
            api_tokens=frozenset({TOKEN}),
            router_options=(("max_prompt_tokens", MAX_PROMPT), ("queue_timeout_s", QUEUE_S)),
        )
    )
    st.start()
    yield st
    st.stop()


@pytest.fixture(scope="module")
def oai(stack):
    return openai.OpenAI(base_url=stack.http_url, api_key=TOKEN, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def sdk(stack):
    with Client(stack.address, token=TOKEN) as c:
        yield c


def _greedy(smollm2, ids: list[int], n: int) -> list[int]:
    """The target's own greedy decoding (plain, in this process)."""
    return generate_ids(Engine(smollm2), ids, SamplingParams(max_new_tokens=n))


def _post(
    stack, path: str, body, token: str | None = TOKEN, timeout: float = 120
) -> httpx2.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx2.post(
        stack.http_url + path,
        content=data,
        headers=headers | {"content-type": "application/json"},
        timeout=timeout,
    )


def test_models_and_health(stack, oai):
    assert stack.http_url.startswith("http://127.0.0.1:")
    assert any("OpenAI-compatible HTTP API" in line for line in stack.describe())
    assert [m.id for m in oai.models.list()] == [MODEL]
    assert oai.models.retrieve(MODEL).id == MODEL
    root = stack.http_url.removesuffix("/v1")
    health = httpx2.get(root + "/health", timeout=10)  # open: no token needed
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["verifiers_up"] == 1
    metrics = httpx2.get(root + "/metrics", timeout=10)
    assert metrics.status_code == 200 and "coralline:router_" in metrics.text


def test_chat_completions_equal_the_sdk_and_the_target(stack, oai, sdk, smollm2):
    from coralline.conversation import chat_ids

    for messages in CONVERSATIONS:
        prompt = chat_ids(smollm2.tokenizer, [(m["role"], m["content"]) for m in messages])
        want = _greedy(smollm2, prompt, 24)
        grpc_result = sdk.generate(messages, max_new_tokens=24)
        assert list(grpc_result.token_ids) == want  # lossless through the router
        r = oai.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=24
        )
        choice = r.choices[0]
        assert choice.message.role == "assistant"
        assert choice.message.content == grpc_result.text
        eos = want[-1] == smollm2.tokenizer.eos_token_id
        assert choice.finish_reason == ("stop" if eos else "length")
        assert r.usage.prompt_tokens == len(prompt)
        assert r.usage.completion_tokens == len(want)
        assert r.usage.total_tokens == len(prompt) + len(want)
        assert r.id == "chatcmpl-" + r.session_id and r.object == "chat.completion"
        spec = r.spec_decode
        assert spec["drafter"] == "coral" and spec["verifier"] == "greedy"
        assert spec["rounds"] >= 1 and spec["acceptance_length"] >= 1
        assert 0 <= spec["accepted_tokens"] <= spec["draft_tokens"]

        # the same request streamed: the same text, then the finish, usage and [DONE]
        chunks = list(
            oai.chat.completions.create(
                model=MODEL,
                messages=messages,
                temperature=0,
                max_tokens=24,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == grpc_result.text
        finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finish) == 1 and finish[0].choices[0].finish_reason == choice.finish_reason
        assert finish[0].spec_decode["rounds"] == spec["rounds"]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want)
        assert chunks[-1].usage.prompt_tokens == len(prompt)


def test_completions_and_sampling_with_a_seed(stack, oai, sdk, smollm2):
    prompt = "The capital of France is"
    ids = smollm2.tokenizer(prompt)["input_ids"]
    want = _greedy(smollm2, ids, 12)
    grpc_result = sdk.generate(prompt, chat_template=False, max_new_tokens=12)
    assert list(grpc_result.token_ids) == want
    r = oai.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12)
    assert r.choices[0].text == grpc_result.text and r.object == "text_completion"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want))
    streamed = oai.completions.create(
        model=MODEL, prompt=ids, temperature=0, max_tokens=12, stream=True
    )  # token ids as the prompt
    assert "".join(c.choices[0].text for c in streamed) == grpc_result.text
    # sampled with a seed: the same answer as the SDK with that seed (keyed coins)
    kw = {"temperature": 0.8, "top_p": 0.9, "seed": 1234}
    a = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=12, **kw)
    b = sdk.generate(prompt, chat_template=False, max_new_tokens=12, **kw)
    assert a.choices[0].text == b.text and a.spec_decode["seed"] == "1234"
    stop = oai.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=12, stop=[" Paris"]
    )
    if " Paris" in grpc_result.text:
        assert stop.choices[0].finish_reason == "stop"
        assert stop.choices[0].text == grpc_result.text.split(" Paris")[0]


def _error(resp: httpx2.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def test_errors_have_the_openai_shape_and_status(stack, oai):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    # 400: bad parameters, raw and through the client
    for extra, param in [({"n": 2}, "n"), ({"temperature": 3}, "temperature")]:
        resp = _post(stack, "/chat/completions", chat | extra)
        assert resp.status_code == 400 and _error(resp)["param"] == param
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3)
    assert e.value.body["param"] == "n"
    resp = _post(stack, "/chat/completions", b"{not json")
    assert resp.status_code == 400 and "JSON" in _error(resp)["message"]
    # 401: no token, a wrong token
    for token in (None, TOKEN + "x"):
        resp = _post(stack, "/chat/completions", chat, token=token)
        assert resp.status_code == 401 and _error(resp)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack.http_url, api_key="nope", max_retries=0).models.list()
    # 404: an unknown model, an unknown path
    resp = _post(stack, "/chat/completions", chat | {"model": "gpt-4o"})
    assert resp.status_code == 404 and _error(resp)["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    assert _post(stack, "/nowhere", chat).status_code == 404
    # 413: a body over max_body_bytes (4 MiB); 400: a prompt over max_prompt_tokens
    huge = json.dumps(chat | {"user": "x" * (5 << 20)}).encode()
    resp = _post(stack, "/chat/completions", huge)
    assert resp.status_code == 413 and _error(resp)["code"] == "request_too_large"
    long_prompt = "hello " * (MAX_PROMPT + 10)
    resp = _post(stack, "/completions", {"model": MODEL, "prompt": long_prompt, "max_tokens": 2})
    err = _error(resp)
    assert resp.status_code == 400 and err["code"] == "context_length_exceeded"
    assert err["param"] == "prompt" and "max_prompt_tokens" in err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": long_prompt}], max_tokens=2
        )
    assert e.value.body["code"] == "context_length_exceeded"
    # the service kept serving
    ok = oai.chat.completions.create(model=MODEL, messages=chat["messages"], max_tokens=2)
    assert ok.usage.completion_tokens >= 1


def _verifier_sessions(stack) -> list[str]:
    import grpc

    with grpc.insecure_channel(stack.verifiers[0].address) as ch:
        info = verifier_pb2_grpc.VerifierServiceStub(ch).Info(
            verifier_pb2.VerifierInfoRequest(), timeout=5
        )
    return list(info.session_ids)


def _open_stream(stack, max_tokens: int = 400):
    """A streamed chat request held open: (client, response, session id, its line iterator)
    after two content events (the iterator is kept: dropping it closes the response)."""
    client = httpx2.Client(timeout=60)
    req = client.build_request(
        "POST",
        stack.http_url + "/chat/completions",
        headers={"authorization": f"Bearer {TOKEN}"},
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me a very long story about a fox."}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        },
    )
    resp = client.send(req, stream=True)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    sid = resp.headers["x-coralline-session-id"]
    lines = resp.iter_lines()
    contents = 0
    for line in lines:
        if line.startswith("data: ") and '"content": "' in line:
            contents += 1
            if contents >= 2:
                break
    return client, resp, sid, lines


def test_full_stack_is_429_and_a_disconnect_frees_the_session(stack, oai, redis_server):
    store = RedisSessionStore(redis_server.url)
    held = [_open_stream(stack), _open_stream(stack)]  # both of the verifier's slots
    sids = [h[2] for h in held]
    assert [store.get(s).state for s in sids] == [RUNNING, RUNNING]
    assert set(sids) <= set(_verifier_sessions(stack))
    t0 = time.monotonic()
    with pytest.raises(openai.RateLimitError) as e:
        oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    waited = time.monotonic() - t0
    assert waited >= QUEUE_S * 0.9  # it waited in the admission queue first
    assert e.value.body["code"] == "rate_limit_exceeded"
    assert int(e.value.response.headers["retry-after"]) >= 1

    # the client of the first stream goes away mid-stream: its session is freed within 1 s
    client, resp, sid, _ = held[0]
    resp.close()
    client.close()
    t0 = time.monotonic()
    freed = None
    while time.monotonic() - t0 < 5:
        rec = store.get(sid)
        if rec.state != RUNNING and sid not in _verifier_sessions(stack):
            freed = time.monotonic() - t0
            break
        time.sleep(0.02)
    assert freed is not None and freed < 1.0, f"session freed after {freed} s"
    assert store.get(sid).state == "cancelled"
    # the other one is untouched and still streaming
    assert store.get(held[1][2]).state == RUNNING
    client, resp, sid, _ = held[1]
    resp.close()
    client.close()
    deadline = time.monotonic() + 5
    while sid in _verifier_sessions(stack) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sid not in _verifier_sessions(stack)


# greedy: 300+ tokens (a short answer would end before the client leaves on a fast machine)
ESSAY = "Write a detailed 1000-word essay about the history of the Roman Empire."


def test_a_non_streamed_request_whose_client_leaves_is_cancelled(stack, redis_server):
    store = RedisSessionStore(redis_server.url)
    before = set(_verifier_sessions(stack))
    result: dict = {}

    def call() -> None:
        try:
            result["response"] = _post(
                stack,
                "/chat/completions",
                {"model": MODEL, "max_tokens": 1000, "temperature": 0,
                 "messages": [{"role": "user", "content": ESSAY}]},
                timeout=1.5,  # the client gives up mid-generation (greedy: 300+ tokens)
            )  # fmt: skip
        except httpx2.TimeoutException as e:
            result["timeout"] = e

    t = threading.Thread(target=call)
    t.start()
    new: set[str] = set()
    deadline = time.monotonic() + 10
    while not new and time.monotonic() < deadline:
        new = set(_verifier_sessions(stack)) - before
        time.sleep(0.02)
    assert len(new) == 1, f"the request never reached the verifier: {result}"
    sid = new.pop()
    t.join(30)
    assert "timeout" in result
    # the session is cancelled at the verifier and in the store (the server looks for the
    # client every 0.25 s)
    deadline = time.monotonic() + 5
    while sid in _verifier_sessions(stack) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sid not in _verifier_sessions(stack)
    assert store.get(sid).state == "cancelled"


def test_no_verifier_up_is_503(stack, oai):
    """Last: kills the only verifier."""
    stack.verifiers[0].kill()
    root = stack.http_url.removesuffix("/v1")
    deadline = time.monotonic() + 20
    status = None
    while time.monotonic() < deadline:
        resp = _post(
            stack,
            "/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        status = resp.status_code
        if status == 503:
            break
        time.sleep(0.3)
    assert status == 503 and _error(resp)["type"] == "service_unavailable_error"
    assert httpx2.get(root + "/health", timeout=10).status_code == 503
    with pytest.raises(openai.InternalServerError) as e:
        oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert e.value.status_code == 503
