"""The whole stack, real everything: SDK -> front (or Serve's gRPC proxy) -> Ray Serve router
replicas (two, sharing a real Redis) -> verifier processes <-> drafter processes, on SmolLM2.

One stack serves the module (Ray and five workers take ~30 s to start); the tests that kill
workers run last, in file order, followed only by the proxy ingress test (the workers left
serve it) and the `coralline serve` subprocess test. Outputs are compared with the in-process
engine (same target, same CORAL head): greedy token-identical, sampled with a seed
token-identical too (the coins are keyed by the committed length, the drafter is the same
head).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest

from coralline.client import Client
from coralline.client.errors import Cancelled, Unavailable
from coralline.rpc.protos import verifier_pb2, verifier_pb2_grpc

from ..redis_servers import own_redis

pytestmark = pytest.mark.slow

PROMPTS = [
    "Name three colors.",
    "Write one sentence about the sea.",
    "What is 12 times 7? Answer briefly.",
    "List two prime numbers.",
    "Say hello in French.",
    "Give a synonym of quick.",
    "What is the capital of Italy?",
    "Count from one to five.",
]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with own_redis(tmp_path_factory.mktemp("redis-e2e"), "--appendonly", "no") as server:
        yield server


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    from coralline.router.app import ReplicaConfig
    from coralline.router.stack import Stack, StackConfig

    st = Stack(
        StackConfig(
            port=0,
            http_port=0,
            drafters=2,
            verifiers=3,
            redis=redis_server.url,
            replicas=ReplicaConfig(routers=2),
            log_dir=str(tmp_path_factory.mktemp("stack-logs")),
            dashboard_port=0,  # telemetry on (the default): faults with tracing and metrics
        )
    )
    st.start()
    yield st
    st.stop()


@pytest.fixture(scope="module")
def engine_ref():
    """generate(prompt ids, max_new_tokens, temperature, seed) -> ids, in this process."""
    import torch

    from coralline.draft.registry import make_drafter
    from coralline.engine import Engine, generate_ids
    from coralline.sampling import SamplingParams
    from coralline.target import TargetRunner

    torch.set_num_threads(1)
    target = TargetRunner.load()
    engine = Engine(target, make_drafter("coral", target))

    def run(ids, max_new_tokens, temperature=0.0, seed=None, top_p=1.0, ignore_eos=False):
        params = SamplingParams(
            temperature=temperature,
            seed=seed,
            max_new_tokens=max_new_tokens,
            top_p=top_p,
            ignore_eos=ignore_eos,
        )
        return generate_ids(engine, ids, params)

    run.encode = target.encode
    run.tokenizer = target.tokenizer
    return run


def _verifier_sessions(address: str) -> list[str]:
    with grpc.insecure_channel(address) as ch:
        info = verifier_pb2_grpc.VerifierServiceStub(ch).Info(
            verifier_pb2.VerifierInfoRequest(), timeout=5
        )
    return list(info.session_ids)


def _wait_freed(stack, session_id: str, timeout_s: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        alive = [p for p in stack.verifiers if p.alive()]
        if not any(session_id in _verifier_sessions(p.address) for p in alive):
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


def _non_loopback_listeners() -> list[str]:
    """TCP listeners of this process and its descendants (Ray, Serve, workers) bound beyond
    127.0.0.1 (`ss -ltnp`)."""
    ours = _descendants(os.getpid()) | {os.getpid()}
    out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True, check=True).stdout
    bad = []
    for line in out.splitlines()[1:]:
        host = line.split()[3].rsplit(":", 1)[0]
        pids = {int(p.split(",")[0]) for p in line.split("pid=")[1:]}
        if pids & ours and host not in ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"):
            bad.append(line)
    return bad


# ---------------------------------------------------------------------- lossless through it all
def test_greedy_and_sampled_identical_to_the_engine(stack, engine_ref):
    with Client(stack.address) as c:
        r = c.generate(PROMPTS[0], max_new_tokens=40)
        assert r.token_ids == engine_ref(engine_ref.encode(PROMPTS[0]), 40)
        assert r.summary.drafter == "coral" and r.summary.rounds < r.summary.tokens
        ids = engine_ref.encode(PROMPTS[1])
        s = c.generate(token_ids=ids, max_new_tokens=40, temperature=0.8, top_p=0.9, seed=11)
        assert s.token_ids == engine_ref(ids, 40, 0.8, 11, 0.9)
        assert s.summary.seed == 11
        # ignore_eos reaches the verifier through the router: on past EOS (at ~12 tokens)
        e = c.generate(PROMPTS[0], max_new_tokens=24, ignore_eos=True)
        want = engine_ref(engine_ref.encode(PROMPTS[0]), 24, ignore_eos=True)
        assert e.token_ids == want and e.summary.finish_reason == "length"
        assert engine_ref.tokenizer.eos_token_id in want[:-1]
        assert not _non_loopback_listeners()  # Ray, Serve, the front, the workers
        info = c.get_session(r.session_id)  # through either replica: the record is in Redis
        assert info.state == "finished" and list(info.token_ids) == r.token_ids
        assert info.text == r.text and info.placement in {p.address for p in stack.verifiers}


def test_eight_concurrent_clients(stack, engine_ref):
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with Client(stack.address) as c:
                results[i] = c.generate(PROMPTS[i], max_new_tokens=24).token_ids
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    for i in range(8):
        assert results[i] == engine_ref(engine_ref.encode(PROMPTS[i]), 24), PROMPTS[i]


# ---------------------------------------------------------------------- cancellation
def test_client_going_away_frees_the_verifier_within_a_second(stack):
    with Client(stack.address) as c:
        stream = c.stream(PROMPTS[3], max_new_tokens=200)
        first = next(stream)
        sid = first.session_id
        assert any(sid in _verifier_sessions(p.address) for p in stack.verifiers)
        stream.close()  # the client cancels its call
        freed = _wait_freed(stack, sid, 5.0)
        assert freed is not None and freed < 1.0, freed
        deadline = time.monotonic() + 5
        while c.get_session(sid).state == "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get_session(sid).state == "cancelled"


def test_cancel_session_ends_the_stream(stack):
    with Client(stack.address) as c:
        stream = c.stream(PROMPTS[4], max_new_tokens=200)
        sid = next(stream).session_id
        assert c.cancel(sid) is True
        with pytest.raises(Cancelled):
            for _ in stream:
                pass
        assert _wait_freed(stack, sid, 1.0) is not None
        info = c.get_session(sid)
        assert info.state == "cancelled" and len(info.token_ids) < 200
        assert c.cancel(sid) is False  # already ended


# ---------------------------------------------------------------------- conversations
def test_three_turn_conversation_prefills_only_new_tokens(stack, engine_ref):
    from coralline.conversation import next_turn_ids

    turns = ["Name a fruit.", "What color is it?", "Name another one."]
    eos = frozenset([engine_ref.tokenizer.eos_token_id])
    with Client(stack.address) as c:
        r1 = c.generate(turns[0], max_new_tokens=24)
        sid = r1.session_id
        history = engine_ref.encode(turns[0]) + r1.token_ids
        for k, text in enumerate(turns[1:], start=2):
            r = c.generate(text, max_new_tokens=24, session_id=sid, continue_session=True)
            prompt = next_turn_ids(engine_ref.tokenizer, history, text, eos)
            # only the new turn's tokens were prefilled: the rest came from the retained cache
            assert r.summary.cached_prompt_tokens == len(history) - 1, k
            assert r.summary.prompt_tokens == len(prompt)
            fresh = c.generate(token_ids=prompt, max_new_tokens=24)  # the whole history, anew
            assert fresh.summary.cached_prompt_tokens == 0
            assert r.token_ids == fresh.token_ids == engine_ref(prompt, 24), k
            history = prompt + r.token_ids
        assert c.get_session(sid).turns == 3


# ---------------------------------------------------------------------- Redis restarts
def test_redis_restart_mid_session_keeps_the_stream_and_the_record(stack, redis_server):
    with Client(stack.address) as c:
        stream = c.stream(PROMPTS[5], max_new_tokens=64)
        chunks = [next(stream)]
        sid = chunks[0].session_id
        redis_server.kill9()
        with pytest.raises(Unavailable, match="session store"):
            c.get_session(sid, timeout=10)
        redis_server.start()  # empty: nothing was persisted
        chunks.extend(stream)
        ids = [t for ch in chunks for t in ch.token_ids]
        assert chunks[-1].summary is not None and chunks[-1].summary.tokens == len(ids)
        info = c.get_session(sid)
        # the router wrote the record again, whole: never a partial one
        assert info.state == "finished" and list(info.token_ids) == ids
        assert info.text == "".join(ch.text for ch in chunks)


# ---------------------------------------------------------------------- failover (kills workers)
def _process_of(stack, address: str):
    return next(p for p in [*stack.verifiers, *stack.drafters] if p.address == address)


def test_drafter_killed_mid_stream_request_completes(stack, engine_ref):
    with Client(stack.address) as c:
        stream = c.stream(PROMPTS[6], max_new_tokens=48)
        chunks = [next(stream)]
        rec = c.get_session(chunks[0].session_id)
        assert rec.drafter == "coral"
        from coralline.session_redis import RedisSessionStore

        drafter = RedisSessionStore(stack.config.redis).get(rec.session_id).drafter_address
        _process_of(stack, drafter).kill()
        chunks.extend(stream)
        ids = [t for ch in chunks for t in ch.token_ids]
        assert ids == engine_ref(engine_ref.encode(PROMPTS[6]), 48)
        assert chunks[-1].summary.fallback_rounds > 0  # rounds went on plainly


def test_verifier_killed_mid_stream_fails_over_without_gap_or_duplicate(stack, engine_ref):
    with Client(stack.address) as c:
        stream = c.stream(PROMPTS[7], max_new_tokens=64)
        chunks = [next(stream), next(stream)]
        sid = chunks[0].session_id
        victim = _process_of(stack, c.get_session(sid).placement)
        victim.kill()  # SIGKILL: no drain, no goodbye
        chunks.extend(stream)
    ids = [t for ch in chunks for t in ch.token_ids]
    assert ids == engine_ref(engine_ref.encode(PROMPTS[7]), 64)  # no gap, no duplicate
    text = "".join(ch.text for ch in chunks)
    assert text == engine_ref.tokenizer.decode(ids, skip_special_tokens=True)
    assert chunks[-1].summary.failovers == 1 and chunks[-1].summary.tokens == len(ids)
    assert [ch.stats.round for ch in chunks] == list(range(1, len(chunks) + 1))


def test_conversation_continues_when_its_verifier_is_gone(stack, engine_ref):
    from coralline.conversation import next_turn_ids

    eos = frozenset([engine_ref.tokenizer.eos_token_id])
    with Client(stack.address) as c:
        r1 = c.generate("Name a vegetable.", max_new_tokens=16)
        holder = c.get_session(r1.session_id).placement
        alive = [p for p in stack.verifiers if p.alive()]
        if len(alive) < 2:
            pytest.fail("this test needs a second verifier alive")
        _process_of(stack, holder).kill()
        r2 = c.generate(
            "And a fruit?", max_new_tokens=16, session_id=r1.session_id, continue_session=True
        )
        history = engine_ref.encode("Name a vegetable.") + r1.token_ids
        prompt = next_turn_ids(engine_ref.tokenizer, history, "And a fruit?", eos)
        assert r2.summary.cached_prompt_tokens == 0  # full prefill elsewhere
        assert r2.token_ids == engine_ref(prompt, 16)
        assert c.get_session(r1.session_id).placement != holder


# ---------------------------------------------------------------------- coralline serve
def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_serve_grpc_proxy_path_is_identical(stack, engine_ref):
    """The same through Ray Serve's own proxies (what the Kubernetes RayService runs): gRPC
    through the gRPC proxy, and the OpenAI API through the HTTP proxy, both via the HttpIngress
    deployment in front of the router. Last of the module's stack (after the kills: the
    workers left serve it), so the front is not started again."""
    import httpx2
    import openai

    stack.stop_router()
    try:
        stack.start_router("proxy")
        assert stack.http_url.startswith("http://127.0.0.1:")
        prompt = [{"role": "user", "content": PROMPTS[1]}]
        want = engine_ref(engine_ref.encode(PROMPTS[1]), 16)
        oai = openai.OpenAI(base_url=stack.http_url, api_key="none", max_retries=0)
        r = oai.chat.completions.create(
            model="smollm2-135m-instruct", messages=prompt, temperature=0, max_tokens=16
        )
        assert r.choices[0].message.content == engine_ref.tokenizer.decode(
            want, skip_special_tokens=True
        )
        assert r.usage.completion_tokens == len(want) and r.spec_decode["rounds"] >= 1
        with pytest.raises(openai.NotFoundError):
            oai.chat.completions.create(model="gpt-4o", messages=prompt, max_tokens=2)
        # a streaming HTTP client that goes away frees its session through Serve's proxy too
        body = {"model": "smollm2-135m-instruct", "messages": prompt, "max_tokens": 300,
                "stream": True, "temperature": 0}  # fmt: skip
        with httpx2.stream("POST", stack.http_url + "/chat/completions", json=body) as resp:
            sid = resp.headers["x-coralline-session-id"]
            next(resp.iter_lines())
        assert _wait_freed(stack, sid, 3.0) is not None
        with Client(stack.address) as c:
            r = c.generate(PROMPTS[2], max_new_tokens=32)
            assert r.token_ids == engine_ref(engine_ref.encode(PROMPTS[2]), 32)
            ids = engine_ref.encode(PROMPTS[3])
            s = c.generate(token_ids=ids, max_new_tokens=32, temperature=0.7, seed=5)
            assert s.token_ids == engine_ref(ids, 32, 0.7, 5)
            with pytest.raises(Exception, match="unknown session"):
                c.get_session("no-such-session")
            assert not _non_loopback_listeners()  # Serve's proxy too (a setup hook binds it)
    finally:
        stack.stop_router()


SERVE_ARGS = ["--port", "0", "--drafters", "0", "--http-port", "0"]


def test_coralline_serve_ctrl_c_stops_everything(tmp_path):
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "coralline.cli", "serve", *SERVE_ARGS],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=dict(os.environ, CORALLINE_THREADS="1"),
        )
    try:
        lines = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.strip().startswith("sessions"):
                break
        assert lines and "listening on" in lines[0], (tmp_path / "serve.log").read_text()[-3000:]
        address = lines[0].split("listening on ")[1].split()[0]
        with Client(address) as c:
            r = c.generate("Say yes.", max_new_tokens=4)
            assert r.summary.drafter == "none" and r.summary.tokens > 0
        # the HTTP API's base URL is printed beside the gRPC endpoint, and it answers
        http = [x for x in lines if "OpenAI-compatible HTTP API" in x]
        assert len(http) == 1, lines
        base = http[0].split()[-1]
        assert base.startswith("http://127.0.0.1:") and base.endswith("/v1")
        with urllib.request.urlopen(base + "/models", timeout=10) as resp:
            assert json.load(resp)["data"][0]["id"] == "smollm2-135m-instruct"
        started = _descendants(proc.pid)
        assert started, "serve started no processes?"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0
        time.sleep(1.0)
        left = [p for p in started if _alive(p)]
        assert not left, f"orphans after Ctrl-C: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
