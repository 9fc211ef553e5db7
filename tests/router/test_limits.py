"""The router's limits, each with its own status and message: prompt and new-token bounds
(INVALID_ARGUMENT), the per-request bound (DEADLINE_EXCEEDED, the verifier's session freed),
and the admission queue in front of full verifiers (RESOURCE_EXHAUSTED with a retry hint after
a bounded wait; a request waiting there gets the verifier once it has room).

A real SmolLM2 verifier process that holds ONE session (plain decoding) and RouterCore in this
process."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from coralline.router.core import RouterConfig, RouterCore
from coralline.rpc.errors import ServiceError
from coralline.rpc.process import ServerProcess
from coralline.rpc.protos import generation_pb2, verifier_pb2, verifier_pb2_grpc


@pytest.fixture(scope="module")
def verifier(tmp_path_factory):
    p = ServerProcess(
        "verifier",
        ["--no-drafter", "--max-sessions", "1", "--retain-sessions", "0"],
        tmp_path_factory.mktemp("limits-logs"),
    )
    p.wait_ready(180)
    yield p.address
    p.stop()


LONG = (
    "Write a detailed 1000-word essay about the history of the Roman Empire."  # greedy: 300+ tokens
)
# (a short answer would end before the bound on a fast machine)


def _request(text: str, n: int) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(text=text, max_new_tokens=n, drafter="none")


async def _collect(core: RouterCore, req) -> list[generation_pb2.GenerateResponse]:
    return [r async for r in core.generate(req)]


async def _active(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        info = await verifier_pb2_grpc.VerifierServiceStub(ch).Info(
            verifier_pb2.VerifierInfoRequest(), timeout=10
        )
    return info.active_sessions


def _run(config: RouterConfig, body) -> None:
    async def main() -> None:
        core = RouterCore(config)
        try:
            await body(core)
        finally:
            await core.close()

    asyncio.run(main())


def test_prompt_and_new_token_bounds(verifier):
    config = RouterConfig(
        verifiers=(verifier,), default_drafter="none", max_prompt_tokens=8, max_new_tokens=32
    )

    async def body(core: RouterCore) -> None:
        with pytest.raises(ValueError, match=r"prompt has \d+ tokens .* at most 8 \(max_prompt"):
            await _collect(core, _request("Tell me a long story about the sea, please.", 4))
        with pytest.raises(ValueError, match=r"max_new_tokens is 33; .* at most 32"):
            await _collect(core, generation_pb2.GenerateRequest(token_ids={"ids": [1, 2]},
                                                                max_new_tokens=33))  # fmt: skip
        ok = await _collect(core, generation_pb2.GenerateRequest(token_ids={"ids": [1, 2]},
                                                                 max_new_tokens=3))  # fmt: skip
        assert ok[-1].summary.tokens == 3

    _run(config, body)


def test_a_request_past_max_request_s_ends_and_frees_its_session(verifier):
    config = RouterConfig(verifiers=(verifier,), default_drafter="none", max_request_s=1.5)

    async def body(core: RouterCore) -> None:
        got = []
        t0 = time.perf_counter()
        with pytest.raises(ServiceError) as e:
            async for r in core.generate(_request(LONG, 400)):
                got.append(r)
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "max_request_s" in e.value.message
        assert got and time.perf_counter() - t0 < 10  # it streamed, then stopped at the bound
        for _ in range(50):  # the verifier freed the session (its call was cancelled)
            if await _active(verifier) == 0:
                break
            await asyncio.sleep(0.1)
        assert await _active(verifier) == 0

    _run(config, body)


def test_the_admission_queue_waits_bounded_then_refuses_with_a_hint(verifier):
    """One verifier slot, held by a long request. A second request waits in the queue and is
    refused after queue_timeout_s with the retry hint; with the queue full (max_queued) a third
    is refused at once; a request that waits long enough gets the slot when it frees."""
    config = RouterConfig(
        verifiers=(verifier,),
        default_drafter="none",
        max_queued=1,
        queue_timeout_s=1.0,
        retry_after_s=2.5,
        refresh_s=0.05,
    )

    async def body(core: RouterCore) -> None:
        # the only slot, held by a request that will not end soon (raw text that counts on)
        count = core.tokenizer.encode(", ".join(str(i) for i in range(1, 40)) + ",")
        req = generation_pb2.GenerateRequest(max_new_tokens=400, drafter="none")
        req.token_ids.ids[:] = count
        hold = core.generate(req)
        await anext(hold)
        t0 = time.perf_counter()
        waiting = asyncio.ensure_future(_collect(core, _request("Say hi.", 4)))
        await asyncio.sleep(0.3)  # it is in the queue now
        assert core.queued == 1
        with pytest.raises(ServiceError) as full:  # the queue is full: at once
            await _collect(core, _request("Say hello.", 4))
        assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "admission queue is full" in full.value.message
        assert full.value.retry_after_s == 2.5
        with pytest.raises(ServiceError) as waited:
            await waiting
        assert waited.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "waited 1 s in the admission queue" in waited.value.message
        assert 0.9 < time.perf_counter() - t0 < 5
        assert waited.value.trailers() == (
            ("retry-after-ms", "2500"),
            ("grpc-retry-pushback-ms", "2500"),
        )
        assert core.queued == 0
        # a patient request: it waits while the slot is held, and runs once it frees
        core.config = RouterConfig(**{**core.config.__dict__, "queue_timeout_s": 60.0})
        patient = asyncio.ensure_future(_collect(core, _request("Say hi.", 4)))
        await asyncio.sleep(0.5)
        assert not patient.done() and core.queued == 1
        await hold.aclose()  # the long request's client goes away: the slot frees
        out = await asyncio.wait_for(patient, 60)
        assert out[-1].summary.tokens >= 1 and core.queued == 0

    _run(config, body)


def test_bad_limits_are_refused():
    for bad in ({"max_new_tokens": 0}, {"max_queued": -1}, {"queue_timeout_s": -1},
                {"max_request_s": -2}, {"max_prompt_tokens": -5}):  # fmt: skip
        with pytest.raises(ValueError, match="must be"):
            RouterConfig(verifiers=("127.0.0.1:1",), **bad)
