"""RouterCore without Ray: two router replicas on one real Redis, TTL expiry, bad requests.

A real SmolLM2 verifier process (plain decoding: no drafter needed for what is tested here) and
RouterCore instances in this process, each on its own event loop run, as two Serve replicas
would be.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest

from coralline.router.core import RouterConfig, RouterCore
from coralline.rpc.errors import ServiceError
from coralline.rpc.process import ServerProcess
from coralline.rpc.protos import generation_pb2


@pytest.fixture(scope="module")
def verifier(tmp_path_factory):
    p = ServerProcess("verifier", ["--no-drafter"], tmp_path_factory.mktemp("core-logs"))
    p.wait_ready(180)
    yield p.address
    p.stop()


def _request(text=None, ids=None, n=12, session_id="", cont=False, drafter="none"):
    req = generation_pb2.GenerateRequest(
        max_new_tokens=n, session_id=session_id, continue_session=cont, drafter=drafter
    )
    if text is not None:
        req.text = text
    if ids is not None:
        req.token_ids.ids.extend(ids)
    return req


async def _collect(core: RouterCore, req) -> list[generation_pb2.GenerateResponse]:
    return [r async for r in core.generate(req)]


def _ids(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def test_two_replicas_on_one_redis_share_sessions(verifier, redis_url):
    config = RouterConfig(verifiers=(verifier,), redis=redis_url, default_drafter="none")

    async def main() -> None:
        a, b = RouterCore(config), RouterCore(config)
        try:
            sid = f"shared-{uuid.uuid4().hex}"
            out = await _collect(a, _request("Name a color.", session_id=sid))
            seen = await b.get_session(sid)  # made through A, read through B
            assert seen.state == generation_pb2.SESSION_STATE_FINISHED
            assert list(seen.token_ids) == _ids(out) and seen.placement == verifier
            # B continues the conversation A started: the verifier kept its KV cache
            turn2 = await _collect(b, _request("Another one.", session_id=sid, cont=True))
            assert turn2[-1].summary.cached_prompt_tokens == seen.prompt_tokens + len(out) - 1
            assert (await a.get_session(sid)).turns == 2
            # B cancels a stream A is relaying: A's stream ends CANCELLED, the record says so
            long_sid = f"long-{uuid.uuid4().hex}"
            stream = a.generate(_request("Count to fifty.", n=200, session_id=long_sid))
            first = await anext(stream)
            assert first.session_id == long_sid
            assert await b.cancel_session(long_sid) is True
            with pytest.raises(ServiceError) as e:
                async for _ in stream:
                    pass
            assert e.value.code == grpc.StatusCode.CANCELLED
            rec = await a.get_session(long_sid)
            assert rec.state == generation_pb2.SESSION_STATE_CANCELLED
            assert await b.cancel_session(long_sid) is False
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_sessions_expire_one_ttl_after_their_last_write(verifier, redis_url, store):
    config = RouterConfig(
        verifiers=(verifier,),
        redis=redis_url if store == "redis" else None,
        session_ttl_s=1.0,
        default_drafter="none",
    )

    async def main() -> None:
        core = RouterCore(config)
        try:
            out = await _collect(core, _request("Say hi.", n=4))
            sid = out[0].session_id
            assert (await core.get_session(sid)).state == generation_pb2.SESSION_STATE_FINISHED
            time.sleep(1.5)
            for call in (
                core.get_session(sid),
                _collect(core, _request("Again.", session_id=sid, cont=True)),
            ):
                with pytest.raises(ServiceError) as e:
                    await call
                assert e.value.code == grpc.StatusCode.NOT_FOUND
        finally:
            await core.close()

    asyncio.run(main())


def test_bad_requests_get_clear_errors(verifier):
    config = RouterConfig(verifiers=(verifier,), default_drafter="none")

    async def main() -> None:
        core = RouterCore(config)
        try:
            cases = [
                (_request(), ValueError, "no prompt"),
                (_request(text="   "), ValueError, "empty"),
                (_request(ids=[]), ValueError, "no prompt|empty"),
                (_request(text="hi", n=-1), ValueError, "max_new_tokens"),
                (_request(text="hi", cont=True), ValueError, "session_id"),
                (_request(text="hi", session_id="nope", cont=True), ServiceError, "unknown"),
            ]
            for req, exc, message in cases:
                with pytest.raises(exc, match=message):
                    await _collect(core, req)
            # a running session id cannot start again, nor be continued
            sid = f"busy-{uuid.uuid4().hex}"
            stream = core.generate(_request("Count to fifty.", n=200, session_id=sid))
            await anext(stream)
            for req, code in (
                (_request("hi", session_id=sid), grpc.StatusCode.ALREADY_EXISTS),
                (_request("hi", session_id=sid, cont=True), grpc.StatusCode.FAILED_PRECONDITION),
            ):
                with pytest.raises(ServiceError) as e:
                    await _collect(core, req)
                assert e.value.code == code
            await stream.aclose()  # the client goes away: the session ends cancelled
            assert (await core.get_session(sid)).state == generation_pb2.SESSION_STATE_CANCELLED
            with pytest.raises(ServiceError) as e:
                await core.get_session("no-such-session")
            assert e.value.code == grpc.StatusCode.NOT_FOUND
        finally:
            await core.close()

    asyncio.run(main())


def test_no_verifier_up_is_unavailable(tmp_path):
    config = RouterConfig(verifiers=("127.0.0.1:9",), default_drafter="none")  # nothing there

    async def main() -> None:
        core = RouterCore(config)
        try:
            with pytest.raises(ServiceError) as e:
                await _collect(core, _request("hi"))
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
            assert "no verifier" in e.value.message
        finally:
            await core.close()

    asyncio.run(main())


def test_registry_discovery_and_eviction_updates_the_record(redis_url, tmp_path):
    """A verifier found only through its Redis heartbeat (no static list); with one idle cache
    allowed, a second finished session evicts the first, whose record then names no holder."""
    from coralline.session_redis import RedisSessionStore

    args = ["--no-drafter", "--registry", redis_url, "--sessions", redis_url]
    p = ServerProcess("verifier", [*args, "--retain-sessions", "1"], tmp_path)
    try:
        address = p.wait_ready(180)
        config = RouterConfig(redis=redis_url, default_drafter="none")  # discovery: Redis

        async def main() -> None:
            core = RouterCore(config)
            try:
                first = await _collect(core, _request("Say one.", n=4))
                sid = first[0].session_id
                store = RedisSessionStore(redis_url)
                assert store.get(sid).holder == address  # placed through the registry
                await _collect(core, _request("Say two.", n=4))  # evicts the first cache
                deadline = time.monotonic() + 5
                while store.get(sid).holder and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                rec = store.get(sid)
                assert rec.holder == "" and rec.cached_tokens == 0
            finally:
                await core.close()

        asyncio.run(main())
    finally:
        p.stop()
