"""coralline.client against a fake Generation server (a real grpc.aio server on 127.0.0.1).

The fake streams three chunks (stats on each, the summary on the last), records every request
and its metadata, and can be told to fail: with a given status, with UNAVAILABLE for the first
N calls, with UNAVAILABLE after one chunk, or by sleeping past the client's deadline. The sync
client talks to a server running in its own event-loop thread; the async client to a server in
the test's own loop (asyncio.run, no pytest-asyncio).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest

import coralline.client as cc
from coralline.client import _common
from coralline.rpc.protos import common_pb2, generation_pb2, generation_pb2_grpc

pytestmark = pytest.mark.timeout(20)

_T = TypeVar("_T")
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------- the fake server
def _summary() -> common_pb2.Summary:
    return common_pb2.Summary(
        tokens=4,
        rounds=3,
        acceptance_length=1.3333333,
        tokens_per_second=123.45678,
        prefill_ns=12_345_678,
        draft_ns=4_500_000,
        verify_ns=9_000_000,
        finish_reason=common_pb2.FINISH_REASON_LENGTH,
        verifier="greedy",
        drafter="coral",
        seed=42,
        prompt_tokens=7,
        fallback_rounds=1,
        drafter_reconnects=2,
    )


CHUNKS = [("Hel", [11, 12]), ("lo", [13]), ("!", [14])]


def _responses(session_id: str) -> list[generation_pb2.GenerateResponse]:
    out = []
    for i, (text, ids) in enumerate(CHUNKS):
        r = generation_pb2.GenerateResponse(session_id=session_id, text=text, token_ids=ids)
        r.stats.round = i + 1
        r.stats.tree_nodes = 5
        r.stats.accepted = len(ids) - 1
        r.stats.draft_ns = 1_500_000
        r.stats.verify_ns = 3_000_000
        r.stats.fallback = "late" if i == 1 else ""
        r.stats.bytes_to_drafter = 100 + i
        r.stats.bytes_from_drafter = 200 + i
        r.stats.forward_ns, r.stats.accept_ns, r.stats.commit_ns = 2_000_000, 700_000, 300_000
        r.stats.drafter_ns, r.stats.tree_depth = 1_000_000, 3
        if i == len(CHUNKS) - 1:
            r.summary.CopyFrom(_summary())
        out.append(r)
    return out


def _session(sid: str, state: int, **kw: Any) -> generation_pb2.Session:
    return generation_pb2.Session(
        session_id=sid, state=state, prompt_tokens=7, drafter="coral", verifier="greedy", **kw
    )


class FakeGeneration(generation_pb2_grpc.GenerationServicer):
    """Records requests; its attributes say how to misbehave (set them before the call)."""

    def __init__(self) -> None:
        self.requests: list[generation_pb2.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.calls = 0  # Generate attempts
        self.unary_calls = 0  # GetSession + CancelSession attempts
        self.fail: tuple[grpc.StatusCode, str] | None = None
        self.unavailable_first = 0  # the first N calls (of any method) fail with UNAVAILABLE
        self.unavailable_after_first_chunk = False
        self.sleep_s = 0.0  # before the first chunk
        self.gap_s = 0.0  # between chunks
        self.cancelled = threading.Event()  # a Generate handler saw its call cancelled
        self.sessions = {
            "s-running": _session("s-running", generation_pb2.SESSION_STATE_RUNNING),
            "s-done": _session(
                "s-done",
                generation_pb2.SESSION_STATE_FINISHED,
                token_ids=[11, 12, 13, 14],
                text="Hello!",
                summary=_summary(),
                created_unix_ns=1_700_000_000_000_000_000,
            ),
            "s-failed": _session(
                "s-failed", generation_pb2.SESSION_STATE_FAILED, error="drafter exploded"
            ),
        }

    async def _gate(self, context: grpc.aio.ServicerContext) -> None:
        if self.unavailable_first > 0:
            self.unavailable_first -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        if self.fail is not None:
            await context.abort(*self.fail)

    async def Generate(self, request, context):  # type: ignore[override]
        self.calls += 1
        self.requests.append(request)
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        await self._gate(context)
        try:
            if self.sleep_s:
                await asyncio.sleep(self.sleep_s)
            for i, response in enumerate(_responses(request.session_id or "sess-1")):
                if i and self.gap_s:
                    await asyncio.sleep(self.gap_s)
                yield response
                if self.unavailable_after_first_chunk:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "verifier went away")
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def GetSession(self, request, context):  # type: ignore[override]
        self.unary_calls += 1
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        await self._gate(context)
        if request.session_id not in self.sessions:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown session {request.session_id!r}"
            )
        return self.sessions[request.session_id]

    async def CancelSession(self, request, context):  # type: ignore[override]
        self.unary_calls += 1
        await self._gate(context)
        session = self.sessions.get(request.session_id)
        if session is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown session {request.session_id!r}"
            )
        running = session.state == generation_pb2.SESSION_STATE_RUNNING
        if running:
            session.state = generation_pb2.SESSION_STATE_CANCELLED
        return generation_pb2.CancelSessionResponse(cancelled=running)


async def _start(
    servicer: FakeGeneration, creds: grpc.ServerCredentials | None = None
) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    if creds is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    return server, port


class ServerThread:
    """A grpc.aio server in its own event-loop thread, for the blocking client."""

    def __init__(self, servicer: FakeGeneration, creds: grpc.ServerCredentials | None = None):
        self.servicer = servicer
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port = self._run(_start(servicer, creds))
        self.target = f"127.0.0.1:{self.port}"

    def _run(self, coro: Awaitable[_T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=5)  # type: ignore[arg-type]

    def stop(self) -> None:
        self._run(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


@pytest.fixture
def fake() -> Iterator[ServerThread]:
    srv = ServerThread(FakeGeneration())
    yield srv
    srv.stop()


@pytest.fixture
def client(fake: ServerThread) -> Iterator[cc.Client]:
    with cc.Client(fake.target, timeout=5) as c:
        yield c


def run_async(
    servicer: FakeGeneration, body: Callable[[str], Awaitable[_T]], limit_s: float = 5.0
) -> _T:
    """Start the fake in a fresh event loop, run body(target) there with a time limit."""

    async def main() -> _T:
        server, port = await _start(servicer)
        try:
            return await asyncio.wait_for(body(f"127.0.0.1:{port}"), limit_s)
        finally:
            await server.stop(None)

    return asyncio.run(main())


# ---------------------------------------------------------------------- expectations
def _check_result(r: cc.GenerationResult, session_id: str = "sess-1") -> None:
    assert r.session_id == session_id
    assert r.text == "Hello!"
    assert r.token_ids == [11, 12, 13, 14]
    assert r.chunks == 3
    assert r.finish_reason == "length"
    s = r.summary
    assert (s.tokens, s.rounds, s.seed, s.prompt_tokens) == (4, 3, 42, 7)
    assert (s.fallback_rounds, s.drafter_reconnects) == (1, 2)
    assert (s.verifier, s.drafter) == ("greedy", "coral")
    assert s.prefill_ms == pytest.approx(12.345678)
    assert s.draft_ms == pytest.approx(4.5)
    assert s.verify_ms == pytest.approx(9.0)
    assert r.stats == {
        "rounds": 3,
        "tokens": 4,
        "acceptance_length": 1.3333,
        "tokens_per_second": 123.457,
        "draft_ms": 4.5,
        "verify_ms": 9.0,
        "prefill_ms": 12.3,
        "finish_reason": "length",
        "verifier": "greedy",
        "drafter": "coral",
    }


def _check_chunks(chunks: list[cc.Chunk]) -> None:
    assert [c.text for c in chunks] == ["Hel", "lo", "!"]
    assert [c.token_ids for c in chunks] == [(11, 12), (13,), (14,)]
    assert [c.stats.round for c in chunks if c.stats] == [1, 2, 3]
    assert [c.summary is not None for c in chunks] == [False, False, True]
    first = chunks[0].stats
    assert first == cc.RoundStats(
        round=1,
        tree_nodes=5,
        accepted=1,
        draft_ms=1.5,
        verify_ms=3.0,
        fallback=None,
        bytes_to_drafter=100,
        bytes_from_drafter=200,
        forward_ms=2.0,
        accept_ms=0.7,
        commit_ms=0.3,
        drafter_ms=1.0,
        tree_depth=3,
    )
    assert chunks[1].stats is not None and chunks[1].stats.fallback == "late"


ERRORS = [
    (grpc.StatusCode.INVALID_ARGUMENT, cc.InvalidArgument, "temperature must be >= 0, got -1"),
    (grpc.StatusCode.NOT_FOUND, cc.NotFound, "unknown drafter 'nope'"),
    (grpc.StatusCode.ALREADY_EXISTS, cc.AlreadyExists, "session 'x' is in use"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, cc.ResourceExhausted, "the server is full (8/8)"),
    (grpc.StatusCode.FAILED_PRECONDITION, cc.FailedPrecondition, "head trained for another"),
    (grpc.StatusCode.UNAUTHENTICATED, cc.Unauthenticated, "a valid bearer token is required"),
    (grpc.StatusCode.PERMISSION_DENIED, cc.PermissionDenied, "not allowed"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, cc.DeadlineExceeded, "server-side deadline"),
    (grpc.StatusCode.CANCELLED, cc.Cancelled, "cancelled by an operator"),
    (grpc.StatusCode.INTERNAL, cc.Internal, "internal error: KeyError: 3"),
    (grpc.StatusCode.UNAVAILABLE, cc.Unavailable, "shutting down"),
    (grpc.StatusCode.UNIMPLEMENTED, cc.OtherError, "not here"),
]


def _check_error(e: cc.CorallineError, code: grpc.StatusCode, cls: type, message: str) -> None:
    assert type(e) is cls
    assert e.code == code
    assert e.message == message
    assert str(e) == f"{code.name}: {message}"


# ---------------------------------------------------------------------- sync client
def test_generate_collects_text_ids_and_summary(client: cc.Client) -> None:
    _check_result(client.generate("hi", max_new_tokens=4))


def test_stream_yields_chunks_in_order(client: cc.Client) -> None:
    chunks = list(client.stream("hi"))
    _check_chunks(chunks)
    assert {c.session_id for c in chunks} == {"sess-1"}


def test_text_request_sets_only_what_was_given(fake: ServerThread, client: cc.Client) -> None:
    client.generate("hi")
    (req,) = fake.servicer.requests
    assert req.WhichOneof("prompt") == "text" and req.text == "hi"
    assert req.HasField("chat_template") and req.chat_template is True
    assert not req.sampling.HasField("top_p")
    assert not req.sampling.HasField("seed") and req.sampling.ignore_eos is False
    assert not req.HasField("max_new_tokens")
    assert (req.sampling.temperature, req.sampling.top_k) == (0.0, 0)
    assert (list(req.stop), req.drafter, req.verifier, req.session_id) == ([], "", "", "")
    assert "authorization" not in fake.servicer.metadata[0]


def test_chat_template_false_is_sent(fake: ServerThread, client: cc.Client) -> None:
    client.generate("raw text", chat_template=False)
    (req,) = fake.servicer.requests
    assert req.HasField("chat_template") and req.chat_template is False


def test_token_id_request_maps_every_field(fake: ServerThread) -> None:
    with cc.Client(fake.target, token="s3cret", timeout=5) as c:
        r = c.generate(
            token_ids=[1, 2, 3],
            max_new_tokens=16,
            temperature=0.7,
            top_k=20,
            top_p=0.9,
            seed=7,
            stop=["\n\n", "END"],
            drafter="ngram",
            verifier="traversal",
            session_id="mine",
            ignore_eos=True,
        )
    assert r.session_id == "mine"
    (req,) = fake.servicer.requests
    assert req.WhichOneof("prompt") == "token_ids"
    assert list(req.token_ids.ids) == [1, 2, 3]
    assert not req.HasField("chat_template")
    assert req.max_new_tokens == 16 and req.HasField("max_new_tokens")
    assert req.sampling.temperature == 0.7 and req.sampling.top_k == 20
    assert req.sampling.HasField("top_p") and req.sampling.top_p == 0.9
    assert req.sampling.HasField("seed") and req.sampling.seed == 7
    assert req.sampling.ignore_eos is True
    assert list(req.stop) == ["\n\n", "END"]
    assert (req.drafter, req.verifier, req.session_id) == ("ngram", "traversal", "mine")
    assert fake.servicer.metadata[0]["authorization"] == "Bearer s3cret"


def test_seed_zero_and_top_p_one_are_still_sent(fake: ServerThread, client: cc.Client) -> None:
    client.generate("hi", seed=0, top_p=1.0, max_new_tokens=1)
    (req,) = fake.servicer.requests
    assert req.sampling.HasField("seed") and req.sampling.seed == 0
    assert req.sampling.HasField("top_p") and req.HasField("max_new_tokens")


@pytest.mark.parametrize(
    "kwargs", [{}, {"prompt": "hi", "token_ids": [1]}, {"prompt": None, "token_ids": None}]
)
def test_prompt_xor_token_ids(fake: ServerThread, client: cc.Client, kwargs: dict) -> None:
    with pytest.raises(ValueError, match="exactly one of prompt"):
        client.generate(**kwargs)
    with pytest.raises(ValueError, match="exactly one of prompt"):
        client.stream(**kwargs)  # checked when called, before any iteration
    assert fake.servicer.calls == 0


def test_bad_argument_types_fail_client_side(fake: ServerThread, client: cc.Client) -> None:
    with pytest.raises(TypeError, match="stop must be a list"):
        client.generate("hi", stop="\n")
    with pytest.raises(TypeError, match="token_ids"):
        client.generate([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"prompt\[1\] must be a message"):
        client.generate([{"role": "user", "content": "hi"}, {"content": "no role"}])
    assert fake.servicer.calls == 0


def test_a_conversation_is_sent_as_messages(fake: ServerThread, client: cc.Client) -> None:
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    client.generate(convo, max_new_tokens=2)
    (req,) = fake.servicer.requests
    assert req.WhichOneof("prompt") == "messages" and not req.HasField("chat_template")
    assert [(m.role, m.content) for m in req.messages.messages] == [
        ("system", "Be brief."), ("user", "hi"),
    ]  # fmt: skip


@pytest.mark.parametrize(("code", "cls", "message"), ERRORS)
def test_status_codes_map_to_exceptions(
    fake: ServerThread, code: grpc.StatusCode, cls: type, message: str
) -> None:
    fake.servicer.fail = (code, message)
    with cc.Client(fake.target, timeout=5, retries=0) as c, pytest.raises(cls) as info:
        c.generate("hi")
    _check_error(info.value, code, cls, message)
    assert isinstance(info.value, cc.CorallineError)


def test_unavailable_is_retried_then_succeeds(fake: ServerThread) -> None:
    fake.servicer.unavailable_first = 2
    t0 = time.monotonic()
    with cc.Client(fake.target, timeout=5, retries=3) as c:
        r = c.generate("hi")
    assert time.monotonic() - t0 >= 0.1 + 0.2 - 0.01  # the backoff was waited
    _check_result(r)
    assert fake.servicer.calls == 3


def test_retries_are_bounded(fake: ServerThread) -> None:
    fake.servicer.unavailable_first = 10
    with cc.Client(fake.target, timeout=5, retries=2) as c, pytest.raises(cc.Unavailable) as info:
        c.generate("hi")
    assert info.value.message == "warming up"
    assert fake.servicer.calls == 3  # the first attempt + 2 retries


def test_other_codes_are_not_retried(fake: ServerThread, client: cc.Client) -> None:
    fake.servicer.fail = (grpc.StatusCode.RESOURCE_EXHAUSTED, "full")
    with pytest.raises(cc.ResourceExhausted):
        client.generate("hi")
    assert fake.servicer.calls == 1


def test_unavailable_after_a_chunk_is_raised_not_retried(
    fake: ServerThread, client: cc.Client
) -> None:
    fake.servicer.unavailable_after_first_chunk = True
    with pytest.raises(cc.Unavailable, match="verifier went away"):
        client.generate("hi")
    assert fake.servicer.calls == 1
    got: list[cc.Chunk] = []
    with pytest.raises(cc.Unavailable):
        for chunk in client.stream("hi"):
            got.append(chunk)
    assert [c.text for c in got] == ["Hel"]  # delivered once, never repeated
    assert fake.servicer.calls == 2


def test_deadline_exceeded(fake: ServerThread) -> None:
    fake.servicer.sleep_s = 3.0
    t0 = time.monotonic()
    with cc.Client(fake.target, timeout=0.3) as c, pytest.raises(cc.DeadlineExceeded):
        c.generate("hi")
    with cc.Client(fake.target, timeout=300) as c, pytest.raises(cc.DeadlineExceeded):
        list(c.stream("hi", timeout=0.3))  # the per-call override
    assert time.monotonic() - t0 < 2.0


def test_closing_a_stream_early_cancels_the_call(fake: ServerThread, client: cc.Client) -> None:
    fake.servicer.gap_s = 2.0
    it = client.stream("hi")
    assert next(it).text == "Hel"
    it.close()  # type: ignore[attr-defined]
    assert fake.servicer.cancelled.wait(timeout=1.5)


def test_get_session(client: cc.Client) -> None:
    info = client.get_session("s-done")
    assert info.state == "finished"
    assert (info.text, info.token_ids, info.prompt_tokens) == ("Hello!", (11, 12, 13, 14), 7)
    assert info.summary is not None and info.summary.finish_reason == "length"
    assert info.created_unix_ns == 1_700_000_000_000_000_000
    assert info.error is None
    running = client.get_session("s-running")
    assert running.state == "running" and running.summary is None
    assert client.get_session("s-failed").error == "drafter exploded"
    with pytest.raises(cc.NotFound) as info_nf:
        client.get_session("nope")
    assert info_nf.value.message == "unknown session 'nope'"


def test_cancel(client: cc.Client) -> None:
    assert client.cancel("s-running") is True
    assert client.cancel("s-running") is False  # already ended: not an error
    assert client.cancel("s-done") is False
    with pytest.raises(cc.NotFound, match="unknown session 'nope'"):
        client.cancel("nope")


def test_unary_calls_retry_on_unavailable(fake: ServerThread, client: cc.Client) -> None:
    fake.servicer.unavailable_first = 1
    assert client.get_session("s-done").state == "finished"
    assert fake.servicer.unary_calls == 2
    fake.servicer.unavailable_first = 1
    assert client.cancel("s-running") is True
    assert fake.servicer.unary_calls == 4


def test_token_stays_out_of_repr_and_errors(fake: ServerThread) -> None:
    fake.servicer.fail = (grpc.StatusCode.UNAUTHENTICATED, "bad token")
    c = cc.Client(fake.target, token="top-secret-token", retries=0, timeout=5)
    try:
        assert "top-secret-token" not in repr(c)
        assert fake.target in repr(c)
        with pytest.raises(cc.Unauthenticated) as info:
            c.generate("hi")
        assert "top-secret-token" not in str(info.value)
        assert fake.servicer.metadata[0]["authorization"] == "Bearer top-secret-token"
    finally:
        c.close()


def test_closed_client_refuses_calls(fake: ServerThread) -> None:
    with cc.Client(fake.target) as c:
        pass
    c.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        c.get_session("s-done")


def test_constructor_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="retries"):
        cc.Client("127.0.0.1:1", retries=-1)
    with pytest.raises(ValueError, match="timeout"):
        cc.Client("127.0.0.1:1", timeout=0)
    with pytest.raises(ValueError, match="target"):
        cc.Client("")


def test_backoff_doubles_from_a_tenth_of_a_second() -> None:
    assert [_common.backoff_s(i) for i in range(4)] == pytest.approx([0.1, 0.2, 0.4, 0.8])


def test_from_rpc_error_keeps_the_servers_message(fake: ServerThread) -> None:
    fake.servicer.fail = (grpc.StatusCode.ABORTED, "try again later")
    with grpc.insecure_channel(fake.target) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetSession(generation_pb2.GetSessionRequest(session_id="s-done"), timeout=5)
    err = cc.from_rpc_error(info.value)
    _check_error(err, grpc.StatusCode.ABORTED, cc.OtherError, "try again later")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl binary to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=20,
    )  # fmt: skip
    return (d / "cert.pem").read_bytes(), (d / "key.pem").read_bytes()


def test_tls_channel(tls_files: tuple[bytes, bytes]) -> None:
    cert, key = tls_files
    srv = ServerThread(FakeGeneration(), grpc.ssl_server_credentials([(key, cert)]))
    try:
        with cc.Client(srv.target, root_certificates=cert, token="t", timeout=5) as c:
            _check_result(c.generate("hi"))
        assert srv.servicer.metadata[0]["authorization"] == "Bearer t"
        with cc.Client(srv.target, timeout=1, retries=0) as plain, pytest.raises(cc.Unavailable):
            plain.generate("hi")  # an insecure channel cannot talk to a TLS server
    finally:
        srv.stop()


# ---------------------------------------------------------------------- async client
def test_async_generate_and_stream() -> None:
    servicer = FakeGeneration()

    async def body(target: str) -> tuple[cc.GenerationResult, list[cc.Chunk]]:
        async with cc.AsyncClient(target, token="tok", timeout=5) as c:
            result = await c.generate("hi", top_p=0.5, seed=3)
            chunks = [chunk async for chunk in c.stream(token_ids=[5, 6], max_new_tokens=8)]
        return result, chunks

    result, chunks = run_async(servicer, body)
    _check_result(result)
    _check_chunks(chunks)
    first, second = servicer.requests
    assert first.text == "hi" and first.HasField("chat_template") and first.chat_template
    assert first.sampling.top_p == 0.5 and first.sampling.seed == 3
    assert not first.HasField("max_new_tokens")
    assert list(second.token_ids.ids) == [5, 6] and not second.HasField("chat_template")
    assert second.max_new_tokens == 8 and not second.sampling.HasField("seed")
    assert all(m["authorization"] == "Bearer tok" for m in servicer.metadata)


def test_async_prompt_xor_token_ids() -> None:
    async def body() -> None:
        c = cc.AsyncClient("127.0.0.1:1")
        with pytest.raises(ValueError, match="exactly one of prompt"):
            await c.generate()
        with pytest.raises(ValueError, match="exactly one of prompt"):
            c.stream("hi", token_ids=[1])
        await c.close()

    asyncio.run(asyncio.wait_for(body(), 5))


@pytest.mark.parametrize(("code", "cls", "message"), ERRORS)
def test_async_status_codes_map_to_exceptions(
    code: grpc.StatusCode, cls: type, message: str
) -> None:
    servicer = FakeGeneration()
    servicer.fail = (code, message)

    async def body(target: str) -> cc.CorallineError:
        async with cc.AsyncClient(target, timeout=5, retries=0) as c:
            with pytest.raises(cls) as info:
                await c.generate("hi")
            return info.value

    _check_error(run_async(servicer, body), code, cls, message)


def test_async_retry_then_success_and_no_retry_after_a_chunk() -> None:
    servicer = FakeGeneration()
    servicer.unavailable_first = 2

    async def body(target: str) -> list[str]:
        async with cc.AsyncClient(target, timeout=5, retries=3) as c:
            _check_result(await c.generate("hi"))
            assert servicer.calls == 3
            servicer.unavailable_after_first_chunk = True
            got: list[str] = []
            with pytest.raises(cc.Unavailable, match="verifier went away"):
                async for chunk in c.stream("hi"):
                    got.append(chunk.text)
            assert servicer.calls == 4
            return got

    assert run_async(servicer, body) == ["Hel"]


def test_async_retries_are_bounded() -> None:
    servicer = FakeGeneration()
    servicer.unavailable_first = 10

    async def body(target: str) -> None:
        async with cc.AsyncClient(target, timeout=5, retries=1) as c:
            with pytest.raises(cc.Unavailable, match="warming up"):
                await c.generate("hi")

    run_async(servicer, body)
    assert servicer.calls == 2


def test_async_deadline_exceeded() -> None:
    servicer = FakeGeneration()
    servicer.sleep_s = 3.0

    async def body(target: str) -> None:
        async with cc.AsyncClient(target, timeout=0.3) as c:
            with pytest.raises(cc.DeadlineExceeded):
                await c.generate("hi")
        async with cc.AsyncClient(target) as c:
            with pytest.raises(cc.DeadlineExceeded):
                async for _ in c.stream("hi", timeout=0.3):
                    pass

    t0 = time.monotonic()
    run_async(servicer, body)
    assert time.monotonic() - t0 < 2.0


def test_async_sessions() -> None:
    servicer = FakeGeneration()
    servicer.unavailable_first = 1  # the first unary call is retried

    async def body(target: str) -> None:
        async with cc.AsyncClient(target, timeout=5) as c:
            info = await c.get_session("s-done")
            assert info.state == "finished" and info.text == "Hello!"
            assert info.summary is not None and info.summary.prefill_ms == pytest.approx(12.345678)
            assert await c.cancel("s-running") is True
            assert await c.cancel("s-done") is False
            with pytest.raises(cc.NotFound, match="unknown session 'x'"):
                await c.get_session("x")
            with pytest.raises(cc.NotFound, match="unknown session 'x'"):
                await c.cancel("x")

    run_async(servicer, body)
    assert servicer.unary_calls == 6


def test_async_closing_a_stream_early_cancels_the_call() -> None:
    servicer = FakeGeneration()
    servicer.gap_s = 2.0

    async def body(target: str) -> None:
        async with cc.AsyncClient(target, timeout=5) as c:
            stream = c.stream("hi")
            async with contextlib.aclosing(stream) as it:  # type: ignore[type-var]
                async for chunk in it:
                    assert chunk.text == "Hel"
                    break
            for _ in range(150):
                if servicer.cancelled.is_set():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("the server never saw the cancellation")

    run_async(servicer, body)


# ---------------------------------------------------------------------- import isolation
def test_import_pulls_in_no_heavy_modules() -> None:
    code = (
        "import coralline.client, sys; "
        "bad = [m for m in ('torch', 'transformers', 'ray', 'numpy') if m in sys.modules]; "
        "bad += [m for m in sys.modules if m.startswith('coralline.') and not m.startswith("
        "('coralline.client', 'coralline._proto', 'coralline.rpc.protos')) "
        "and m != 'coralline.rpc']; "
        "assert not bad, bad"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
