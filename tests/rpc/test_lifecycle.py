"""Service lifecycle on the tiny model: session bounds, idle eviction, health and reflection,
and SIGTERM draining in a real `coralline drafter` process."""

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from coralline.rpc.drafter_server import DrafterServiceConfig, start_drafter
from coralline.rpc.protos import drafter_pb2, drafter_pb2_grpc
from coralline.rpc.verifier_server import VerifierServiceConfig, start_verifier

from .servers import ServerProcess

PROMPT = [1, 6, 3, 2, 5]


@pytest.fixture(scope="module")
def small(tiny_stack, tiny_folders):
    """A drafter with room for one session and a 0.5 s idle timeout, and a verifier with room
    for one session, on the shared test loop."""
    target, head = tiny_folders
    loop = tiny_stack.loop
    drafter, dservice = loop.call(
        start_drafter(
            DrafterServiceConfig(model=target, checkpoint=head, max_sessions=1, idle_timeout_s=0.5)
        )
    )
    verifier, core = loop.call(
        start_verifier(
            VerifierServiceConfig(model=target, drafter_endpoint=drafter.address, max_sessions=1)
        )
    )
    yield drafter, dservice, verifier, core
    loop.call(verifier.stop())
    loop.call(drafter.stop())


def _open(loop, address, session_id):
    async def run():
        ch = grpc.aio.insecure_channel(address)
        call = drafter_pb2_grpc.DrafterServiceStub(ch).Draft()
        req = drafter_pb2.DraftRequest()
        req.open.session_id = session_id
        req.open.prompt_ids[:] = PROMPT
        req.open.drafter = "ngram"  # no features needed
        req.open.sampling.seed = 1
        await call.write(req)
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as e:
            await ch.close()
            return None, e, None
        return call, first, ch

    return loop.call(run())


def test_the_drafter_bounds_its_sessions_and_evicts_idle_ones(tiny_stack, small):
    drafter, dservice, _, _ = small
    loop = tiny_stack.loop
    call, first, ch = _open(loop, drafter.address, "a")
    assert first.proposal.round == 1 and dservice.session_ids == ["a"]
    _, err, _ = _open(loop, drafter.address, "b")
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_sessions=1" in err.details()

    async def wait_end():
        try:
            await call.read()
        except grpc.aio.AioRpcError as e:
            return e
        finally:
            await ch.close()

    t0 = time.monotonic()
    err = loop.call(wait_end())  # no message for 0.5 s: the session is freed
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "no message" in err.details()
    assert time.monotonic() - t0 < 2.0 and dservice.session_ids == []


def test_the_verifier_bounds_its_sessions_with_a_retry_hint(small):
    _, _, verifier, core = small
    from coralline.client import Client, ResourceExhausted

    with Client(verifier.address, retries=0) as client:
        stream = iter(client.stream(token_ids=PROMPT, max_new_tokens=200, drafter="none"))
        next(stream)
        with pytest.raises(ResourceExhausted, match="retry"):
            client.generate(token_ids=PROMPT, max_new_tokens=4)
        stream.close()
    deadline = time.monotonic() + 2
    while core.live and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not core.live


def test_health_and_reflection(tiny_stack):
    for address, service in (
        (tiny_stack.verifier.address, "coralline.v1.Generation"),
        (tiny_stack.verifier.address, "coralline.v1.VerifierService"),
        (tiny_stack.drafter.address, "coralline.v1.DrafterService"),
    ):
        with grpc.insecure_channel(address) as ch:
            got = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
            assert got.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            req = reflection_pb2.ServerReflectionRequest(list_services="")
            names = [s.name for r in stub.ServerReflectionInfo(iter([req])) for s in
                     r.list_services_response.service]  # fmt: skip
            assert service in names and "grpc.health.v1.Health" in names
    with grpc.insecure_channel(tiny_stack.verifier.address) as ch:
        with pytest.raises(grpc.RpcError) as e:
            health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="nope"), timeout=5
            )
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.slow
def test_sigterm_drains_and_exits(tiny_folders):
    """A drafter process with a session open: SIGTERM -> health NOT_SERVING, new sessions are
    refused, the process exits 0 within its grace period."""
    target, head = tiny_folders
    proc = ServerProcess("drafter", "--model", target, "--draft-checkpoint", head)
    ch = grpc.insecure_channel(proc.address)
    stub = drafter_pb2_grpc.DrafterServiceStub(ch)
    req = drafter_pb2.DraftRequest()
    req.open.session_id, req.open.drafter = "s", "ngram"
    req.open.prompt_ids[:] = PROMPT
    req.open.sampling.seed = 1
    import queue

    q: queue.Queue = queue.Queue()
    q.put(req)
    responses = stub.Draft(iter(q.get, None))
    assert next(responses).proposal.round == 1
    t0 = time.monotonic()
    code = proc.stop()
    assert code == 0 and time.monotonic() - t0 < 10
    assert "draining: 1 sessions open" in proc.stderr()
    q.put(None)
    ch.close()


@pytest.mark.redis
def test_a_server_started_with_a_registry_registers_itself(tiny_stack, tiny_folders, redis_url):
    """--registry: the drafter appears in Redis with its load while it runs, and is removed
    when it stops."""
    from coralline.router.registry import RedisRegistry
    from coralline.rpc.server import ServerOptions

    registry = RedisRegistry(redis_url)
    registry.client.flushdb()
    target, head = tiny_folders
    config = DrafterServiceConfig(
        model=target, checkpoint=head, server=ServerOptions(registry=redis_url)
    )
    server, service = tiny_stack.loop.call(start_drafter(config))
    deadline = time.monotonic() + 5
    while not registry.discover() and time.monotonic() < deadline:
        time.sleep(0.05)
    (worker,) = registry.discover()
    assert worker.address == server.address and worker.kind == "drafter"
    assert worker.capacity == config.max_sessions and worker.target == service.fingerprint
    tiny_stack.loop.call(server.stop())
    assert registry.discover() == []
