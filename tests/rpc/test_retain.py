"""Retained sessions at the verifier, over real loopback gRPC on the tiny model: a next turn
prefills only its new tokens and keeps the output of a fresh session; idle caches are evicted
least recently used first beyond the session and token bounds; cancelled sessions are never
retained."""

import time

import grpc
import pytest

from coralline.rpc.protos import verifier_pb2, verifier_pb2_grpc
from coralline.rpc.server import ServerOptions
from coralline.rpc.verifier_server import VerifierServiceConfig, start_verifier

PROMPT = [1, 6, 3, 2, 5]
NEW = [4, 7, 1]  # the next turn's new tokens


class Verifier:
    """A verifier of its own (retain bounds of the test) on the tiny stack's drafter."""

    def __init__(self, stack, **config):
        self.loop, self.evicted = stack.loop, []
        cfg = VerifierServiceConfig(
            model=stack.core.config.model,
            drafter_endpoint=stack.drafter.address,
            max_sessions=4,
            server=ServerOptions(max_message_bytes=1 << 20),
            **config,
        )
        self.server, self.core = self.loop.call(start_verifier(cfg, on_evict=self.evicted.append))
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = verifier_pb2_grpc.VerifierServiceStub(self.channel)

    def generate(self, prompt, session_id="", retain=False, temperature=0.0, n=10):
        req = verifier_pb2.VerifyRequest(
            session_id=session_id, prompt_ids=prompt, max_new_tokens=n, retain=retain
        )
        req.sampling.temperature, req.sampling.seed = temperature, 7
        ids, summary = [], None
        for chunk in self.stub.Generate(req, timeout=60):
            ids.extend(chunk.token_ids)
            summary = chunk.summary if chunk.HasField("summary") else summary
        return ids, summary

    def info(self) -> verifier_pb2.VerifierInfo:
        return self.stub.Info(verifier_pb2.VerifierInfoRequest(), timeout=5)

    def wait_evicted(self, n: int) -> list[str]:
        """The ids given to on_evict (called in a worker thread) once there are n."""
        deadline = time.monotonic() + 3.0
        while len(self.evicted) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.evicted

    def wait_idle(self) -> bool:
        deadline = time.monotonic() + 3.0
        while self.info().active_sessions and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.info().active_sessions == 0

    def close(self) -> None:
        self.channel.close()
        self.loop.call(self.server.stop())


@pytest.fixture
def verifier(tiny_stack, request):
    v = Verifier(tiny_stack, **getattr(request, "param", {}))
    yield v
    v.close()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_next_turn_prefills_only_its_new_tokens(verifier, temperature):
    out1, s1 = verifier.generate(PROMPT, "chat-1", retain=True, temperature=temperature)
    assert s1.cached_prompt_tokens == 0 and s1.fallback_rounds == 0
    info = verifier.info()
    assert list(info.retained_session_ids) == ["chat-1"] and info.active_sessions == 0
    assert info.retained_tokens == len(PROMPT) + len(out1) - 1  # all committed but the last
    prompt2 = PROMPT + out1 + NEW
    out2, s2 = verifier.generate(prompt2, "chat-1", retain=True, temperature=temperature)
    assert s2.cached_prompt_tokens == len(PROMPT) + len(out1) - 1
    assert s2.prompt_tokens == len(prompt2) and s2.fallback_rounds == 0
    assert s2.drafter == "coral"
    want, fresh = verifier.generate(prompt2, "", temperature=temperature)  # a new id, no retain
    assert out2 == want and fresh.cached_prompt_tokens == 0
    info = verifier.info()
    assert list(info.retained_session_ids) == ["chat-1"]  # the fresh session was not retained
    assert info.retained_tokens == len(prompt2) + len(out2) - 1
    assert verifier.evicted == []


@pytest.mark.parametrize("verifier", [{"retain_sessions": 2}], indirect=True)
def test_the_least_recently_used_cache_is_evicted(verifier):
    outs = {sid: verifier.generate(PROMPT, sid, retain=True)[0] for sid in ("a", "b")}
    verifier.generate(PROMPT + outs["a"] + NEW, "a", retain=True)  # "a" is used again: "b" is LRU
    assert list(verifier.info().retained_session_ids) == ["b", "a"]
    verifier.generate(PROMPT, "c", retain=True)
    assert verifier.wait_evicted(1) == ["b"]
    assert list(verifier.info().retained_session_ids) == ["a", "c"]
    # the evicted session's next turn is a full prefill, with the same output
    prompt = PROMPT + outs["b"] + NEW
    got, s = verifier.generate(prompt, "b", retain=True)
    assert s.cached_prompt_tokens == 0
    assert got == verifier.generate(prompt)[0]
    assert verifier.wait_evicted(2) == ["b", "a"]
    assert list(verifier.info().retained_session_ids) == ["c", "b"]


@pytest.mark.parametrize("verifier", [{"retain_tokens": 40}], indirect=True)
def test_the_token_bound_evicts_too(verifier):
    for sid in ("t1", "t2"):  # 5 + 10 - 1 = 14 tokens each
        verifier.generate(PROMPT, sid, retain=True)
    assert verifier.info().retained_tokens == 28
    verifier.generate(PROMPT, "t3", retain=True)  # 42 > 40
    assert verifier.wait_evicted(1) == ["t1"]
    info = verifier.info()
    assert list(info.retained_session_ids) == ["t2", "t3"] and info.retained_tokens == 28
    verifier.generate(PROMPT, "big", retain=True, n=30)  # 34 tokens: both others must go
    assert verifier.wait_evicted(3) == ["t1", "t2", "t3"]
    assert list(verifier.info().retained_session_ids) == ["big"]
    verifier.generate(PROMPT, "huge", retain=True, n=50)  # 54 tokens: over the bound alone
    assert verifier.wait_evicted(5) == ["t1", "t2", "t3", "big", "huge"]
    assert verifier.info().retained_tokens == 0


def test_cancelled_and_unretained_sessions_are_not_kept(verifier):
    req = verifier_pb2.VerifyRequest(
        session_id="gone", prompt_ids=PROMPT, max_new_tokens=200, retain=True
    )
    call = verifier.stub.Generate(req, timeout=60)
    next(call)
    assert verifier.stub.Cancel(verifier_pb2.CancelRequest(session_id="gone")).cancelled
    with pytest.raises(grpc.RpcError) as e:
        for _ in call:
            pass
    assert e.value.code() == grpc.StatusCode.CANCELLED
    verifier.generate(PROMPT, "plain")  # finished, but did not ask to be retained
    assert verifier.wait_idle()
    info = verifier.info()
    assert list(info.retained_session_ids) == [] and info.retained_tokens == 0
    assert verifier.evicted == []
    # a cancelled session's next request starts from an empty cache
    assert verifier.generate(PROMPT, "gone", retain=True)[1].cached_prompt_tokens == 0


def test_retain_bounds_are_validated():
    with pytest.raises(ValueError, match="retain_sessions and retain_tokens"):
        VerifierServiceConfig(retain_sessions=-1)


@pytest.mark.parametrize("verifier", [{"retain_sessions": 0}], indirect=True)
def test_a_failing_eviction_hook_is_logged_not_raised(verifier, caplog):
    def broken(session_id):
        raise RuntimeError(f"router down for {session_id}")

    verifier.core.on_evict = broken
    verifier.generate(PROMPT, "x", retain=True)  # retain_sessions=0: evicted at once
    deadline = time.monotonic() + 3.0
    while "on_evict('x') failed" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "on_evict('x') failed" in caplog.text
    assert verifier.generate(PROMPT)[1].tokens == 10  # still serving


def test_a_refused_request_keeps_the_retained_cache(verifier):
    out, _ = verifier.generate(PROMPT, "keep", retain=True)
    req = verifier_pb2.VerifyRequest(
        session_id="keep", prompt_ids=PROMPT + out, retain=True, verifier="no-such-verifier"
    )
    with pytest.raises(grpc.RpcError) as e:
        list(verifier.stub.Generate(req, timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(verifier.info().retained_session_ids) == ["keep"]
    _, s = verifier.generate(PROMPT + out + NEW, "keep", retain=True)
    assert s.cached_prompt_tokens == len(PROMPT) + len(out) - 1


def test_the_verifiers_own_generation_api_continues_a_conversation(verifier, tiny_stack):
    """Generation.Generate with continue_session (the one-verifier deployment): the next turn
    appends its ids to prompt + output, prefills only them, and equals a fresh request."""
    from coralline.rpc.protos import generation_pb2, generation_pb2_grpc

    gen = generation_pb2_grpc.GenerationStub(verifier.channel)

    def run(ids, session_id="", cont=False):
        req = generation_pb2.GenerateRequest(
            session_id=session_id, max_new_tokens=8, continue_session=cont
        )
        req.token_ids.ids.extend(ids)
        out, summary = [], None
        for r in gen.Generate(req, timeout=60):
            out.extend(r.token_ids)
            summary = r.summary if r.HasField("summary") else summary
        return out, summary

    out1, _ = run(PROMPT, "conv")
    out2, s2 = run(NEW, "conv", cont=True)
    assert s2.cached_prompt_tokens == len(PROMPT) + len(out1) - 1
    history = PROMPT + out1 + NEW
    fresh, s3 = run(history)
    assert out2 == fresh and s3.cached_prompt_tokens == 0
    rec = gen.GetSession(generation_pb2.GetSessionRequest(session_id="conv"), timeout=5)
    assert rec.turns == 2 and rec.prompt_tokens == len(history)
    with pytest.raises(grpc.RpcError) as e:
        run(NEW, "no-such-conv", cont=True)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        run(NEW, "", cont=True)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
