"""The drafter and verifier services on a tiny model, over real loopback gRPC: a rogue drafter
never costs a request its output, bad requests get clear statuses, cancellation frees both
services. (SmolLM2 end to end, in separate processes: test_split_smollm2.py.)"""

import asyncio
import dataclasses
import time
from collections import Counter

import grpc
import pytest

from coralline.engine import Engine
from coralline.rpc.protos import (
    common_pb2,
    drafter_pb2,
    drafter_pb2_grpc,
    generation_pb2,
    verifier_pb2,
)
from coralline.rpc.server import Server, ServerOptions
from coralline.sampling import SamplingParams
from coralline.target import TargetConfig, TargetRunner

PROMPT = [1, 6, 3, 2, 5]


class Rogue(drafter_pb2_grpc.DrafterServiceServicer):
    """A drafter that misbehaves in the way its session id names ("mode:n")."""

    def __init__(self):
        self.opens: Counter = Counter()

    @staticmethod
    def proposal(mode: str, root: int, rnd: int) -> drafter_pb2.DraftResponse:
        out = drafter_pb2.DraftResponse()
        p = out.proposal
        p.round, p.tree_kind = rnd, "sampled_swor"
        tokens, parents = [root, 1], [-1, 0]
        rows = [[1, 2], [1.0, 0.0]]  # one-hot at token 1 (valid)
        if mode == "cycle":
            tokens, parents = [root, 1, 2], [-1, 2, 1]
        elif mode == "parents":
            parents = [-1, 7]
        elif mode == "nan":
            rows = [[1, 2], [float("nan"), 0.5]]
        elif mode == "negative":
            rows = [[1, 2], [1.5, -0.5]]
        elif mode == "unnormalised":
            rows = [[1, 2], [0.3, 0.2]]
        elif mode == "sizes":
            parents = [-1]
        elif mode == "zero":
            rows = [[2, 3], [0.5, 0.5]]  # the drafted token 1 has probability 0
        elif mode == "huge":
            tokens, parents = [root] + [1] * 9999, list(range(-1, 9999))
        elif mode == "stale":
            p.round = rnd - 1
        elif mode == "kind":
            p.tree_kind = "sampled_iid"
        p.tree.tokens[:] = tokens
        p.tree.parents[:] = parents
        n = len(tokens) if mode != "rows" else 1
        p.rows.num_rows, p.rows.width, p.rows.vocab_size = n, 2, 8
        p.rows.indices[:] = rows[0] * n
        p.rows.values[:] = rows[1] * n
        return out

    async def Draft(self, request_iterator, context):
        ctx, mode, answered = [], "", 0
        async for msg in request_iterator:
            kind = msg.WhichOneof("kind")
            if kind == "open":
                mode = msg.open.session_id.split(":")[0]
                self.opens[mode] += 1
                ctx, rnd = list(msg.open.prompt_ids), msg.open.round
            elif kind == "commit":
                ctx += list(msg.commit.new_ids)
                rnd = msg.commit.round
            else:
                return
            answered += 1
            if mode == "hang":
                await asyncio.sleep(3600)
            if mode == "drop" and answered == 3 and self.opens[mode] == 1:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "dropped on purpose")
            yield self.proposal(mode, ctx[-1], rnd)

    async def Info(self, request, context):
        return drafter_pb2.DrafterInfo(drafters=["coral"])


@pytest.fixture(scope="module")
def rogue(tiny_stack):
    servicer = Rogue()

    async def start():  # an aio server belongs to the loop it is made on
        server = Server(ServerOptions(), ["coralline.v1.DrafterService"])
        drafter_pb2_grpc.add_DrafterServiceServicer_to_server(servicer, server.server)
        await server.start()
        return server

    server = tiny_stack.loop.call(start())
    yield server.address, servicer
    tiny_stack.loop.call(server.stop())


@pytest.fixture(scope="module")
def reference(tiny_folders):
    target = TargetRunner.load(TargetConfig(model=tiny_folders[0]))

    def run(params: SamplingParams) -> list[int]:
        return [t for c in Engine(target.fork()).generate(PROMPT, params) for t in c.token_ids]

    return run


def _verify(stack, params: SamplingParams, **fields):
    req = verifier_pb2.VerifyRequest(prompt_ids=PROMPT, max_new_tokens=params.max_new_tokens)
    req.sampling.temperature = params.temperature
    if params.seed is not None:
        req.sampling.seed = params.seed
    for k, v in fields.items():
        setattr(req, k, v)
    ids, summary, nodes = [], None, []
    for chunk in stack.ver.Generate(req, timeout=60):
        ids += chunk.token_ids
        nodes.append(chunk.stats.tree_nodes)
        if chunk.HasField("summary"):
            summary = chunk.summary
    stack.last_nodes = nodes
    return ids, summary


MODES = ["cycle", "parents", "nan", "negative", "unnormalised", "sizes", "zero", "huge",
         "stale", "kind", "hang"]  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_rogue_drafter_costs_nothing_but_speed(tiny_stack, rogue, reference, mode, temperature):
    """Every proposal is unusable: each round decodes plainly, the output equals plain decoding
    (greedy, and sampled with the same seed: the fallback rounds use the same keyed coins),
    and the verifier keeps serving."""
    address, servicer = rogue
    params = SamplingParams(temperature=temperature, seed=7, max_new_tokens=10)
    ids, summary = _verify(
        tiny_stack, params, drafter_endpoint=address, session_id=f"{mode}:{temperature}"
    )
    assert ids == reference(params)
    # no bad proposal was ever verified: every round fell back but the first (the prompt's own)
    assert summary.fallback_rounds == summary.rounds - 1 > 0
    assert servicer.opens[mode] >= 1
    info = tiny_stack.ver.Info(verifier_pb2.VerifierInfoRequest(), timeout=5)
    assert info.active_sessions == 0 or _wait_idle(tiny_stack)


def test_a_dropped_stream_is_reopened_and_the_output_is_unchanged(tiny_stack, rogue, reference):
    address, servicer = rogue
    params = SamplingParams(max_new_tokens=16)
    ids, summary = _verify(tiny_stack, params, drafter_endpoint=address, session_id="drop:1")
    assert ids == reference(params)
    assert servicer.opens["drop"] == 2 and summary.drafter_reconnects == 1
    assert summary.fallback_rounds == 1  # only the round whose stream broke
    verified = [n for n in tiny_stack.last_nodes if n > 1]
    # every other round but the first (the prompt's own) verified the drafter's tree
    assert len(verified) == summary.rounds - 2


def _wait_idle(stack, timeout: float = 3.0) -> bool:
    from coralline.rpc.protos import drafter_pb2 as d

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = stack.ver.Info(verifier_pb2.VerifierInfoRequest(), timeout=5).active_sessions
        dr = stack.dr.Info(d.DrafterInfoRequest(), timeout=5).active_sessions
        if v == 0 and dr == 0:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_split_path_equals_the_engine_on_the_tiny_model(tiny_stack, tiny_folders, temperature):
    """The real CORAL drafter service: token-identical to the in-process engine with the same
    head, seed and tree policy."""
    from coralline.draft.registry import make_drafter

    target = TargetRunner.load(TargetConfig(model=tiny_folders[0]))
    engine = Engine(target, make_drafter("coral", target, tiny_folders[1]))
    for seed in range(3):
        params = SamplingParams(temperature=temperature, seed=seed, max_new_tokens=24)
        want = [t for c in engine.generate(PROMPT, params) for t in c.token_ids]
        got, summary = _verify(tiny_stack, params)
        assert got == want
        assert summary.fallback_rounds == 0 and summary.drafter == "coral"


def _gen(stack, timeout=30, **fields):
    req = generation_pb2.GenerateRequest(**fields)
    return list(stack.gen.Generate(req, timeout=timeout))


OK = generation_pb2.TokenIds(ids=PROMPT)


@pytest.mark.parametrize(
    ("fields", "code", "match"),
    [
        ({"token_ids": generation_pb2.TokenIds(ids=[])}, "INVALID_ARGUMENT", "prompt is empty"),
        ({"token_ids": None}, "INVALID_ARGUMENT", "no prompt"),
        ({"sampling": common_pb2.SamplingParams(temperature=-1)}, "INVALID_ARGUMENT",
         "temperature"),
        ({"sampling": common_pb2.SamplingParams(top_p=1.5)}, "INVALID_ARGUMENT", "top_p"),
        ({"sampling": common_pb2.SamplingParams(top_k=-3)}, "INVALID_ARGUMENT", "top_k"),
        ({"max_new_tokens": 0}, "INVALID_ARGUMENT", "max_new_tokens must be > 0"),
        ({"max_new_tokens": 1000}, "INVALID_ARGUMENT", "exceeds the context window"),
        ({"token_ids": generation_pb2.TokenIds(ids=[1, 99])}, "INVALID_ARGUMENT", "[0, 8)"),
        ({"drafter": "nope"}, "NOT_FOUND", "unknown drafter"),
        ({"verifier": "nope"}, "INVALID_ARGUMENT", "unknown verifier"),
        ({"stop": [""]}, "INVALID_ARGUMENT", "stop"),
        ({"token_ids": None, "text": "hello"}, "INVALID_ARGUMENT", "no tokenizer"),
        ({"token_ids": generation_pb2.TokenIds(ids=[7] * 2_000_000)}, "RESOURCE_EXHAUSTED",
         "larger than max"),
    ],
)  # fmt: skip
def test_bad_requests_get_clear_statuses(tiny_stack, fields, code, match):
    request = {"token_ids": OK, "max_new_tokens": 4, **fields}
    request = {k: v for k, v in request.items() if v is not None}
    with pytest.raises(grpc.RpcError) as e:
        _gen(tiny_stack, **request)
    assert e.value.code().name == code, e.value.details()
    assert match in e.value.details()
    ok = _gen(tiny_stack, token_ids=OK, max_new_tokens=3)
    assert ok[-1].summary.tokens == 3  # still serving


def test_unknown_sessions(tiny_stack):
    with pytest.raises(grpc.RpcError) as e:
        tiny_stack.gen.GetSession(generation_pb2.GetSessionRequest(session_id="nope"), timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "unknown session" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        tiny_stack.gen.CancelSession(generation_pb2.CancelSessionRequest(session_id="x"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_sessions_are_recorded(tiny_stack):
    out = _gen(tiny_stack, token_ids=generation_pb2.TokenIds(ids=PROMPT), max_new_tokens=6,
               session_id="rec-1")  # fmt: skip
    s = tiny_stack.gen.GetSession(generation_pb2.GetSessionRequest(session_id="rec-1"))
    assert s.state == generation_pb2.SESSION_STATE_FINISHED
    assert list(s.token_ids) == [t for r in out for t in r.token_ids] and len(s.token_ids) == 6
    assert s.summary.tokens == 6 and s.prompt_tokens == len(PROMPT)


def test_a_client_that_goes_away_frees_both_services(tiny_stack):
    req = generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=PROMPT), max_new_tokens=200, session_id="gone-1"
    )
    call = tiny_stack.gen.Generate(req, timeout=60)
    got = [next(call), next(call)]
    assert got[0].session_id == "gone-1"
    assert tiny_stack.core.live and tiny_stack.dservice.session_ids  # both hold the session
    call.cancel()
    t0 = time.monotonic()
    assert _wait_idle(tiny_stack, 2.0), "a cancelled session is still held"
    assert time.monotonic() - t0 < 1.0
    s = tiny_stack.gen.GetSession(generation_pb2.GetSessionRequest(session_id="gone-1"))
    assert s.state == generation_pb2.SESSION_STATE_CANCELLED


def test_cancel_session_ends_the_stream_with_cancelled(tiny_stack):
    req = generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=PROMPT), max_new_tokens=200, session_id="cx-1"
    )
    call = tiny_stack.gen.Generate(req, timeout=60)
    next(call)
    r = tiny_stack.gen.CancelSession(generation_pb2.CancelSessionRequest(session_id="cx-1"))
    assert r.cancelled
    with pytest.raises(grpc.RpcError) as e:
        for _ in call:
            pass
    assert e.value.code() == grpc.StatusCode.CANCELLED
    assert _wait_idle(tiny_stack, 2.0)
    again = tiny_stack.gen.CancelSession(generation_pb2.CancelSessionRequest(session_id="cx-1"))
    assert not again.cancelled  # finished sessions are not an error


def test_the_drafter_refuses_a_head_for_another_target(tiny_stack):
    """FAILED_PRECONDITION at Open, naming the target the drafter serves."""

    async def open_once():
        async with grpc.aio.insecure_channel(tiny_stack.drafter.address) as ch:
            call = drafter_pb2_grpc.DrafterServiceStub(ch).Draft()
            req = drafter_pb2.DraftRequest()
            req.open.session_id, req.open.target_fingerprint = "fp-1", "0123456789abcdef"
            req.open.prompt_ids[:] = PROMPT
            req.open.sampling.seed = 1
            await call.write(req)
            try:
                await call.read()
            except grpc.aio.AioRpcError as e:
                return e
        return None

    err = tiny_stack.loop.call(open_once())
    assert err is not None and err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "serves target" in err.details()


def test_drafter_rounds_grow_with_gaps_and_never_repeat(tiny_stack):
    """Rounds on the drafter stream are the verifier's: a Commit may skip rounds (the verifier
    decoded them without asking), but one that does not move forward is INVALID_ARGUMENT."""

    async def stream():
        async with grpc.aio.insecure_channel(tiny_stack.drafter.address) as ch:
            call = drafter_pb2_grpc.DrafterServiceStub(ch).Draft()
            req = drafter_pb2.DraftRequest()
            o = req.open
            o.session_id, o.drafter, o.round = "rounds-1", "ngram", 2
            o.prompt_ids[:] = PROMPT
            o.sampling.seed = 1
            await call.write(req)
            got = [(await call.read()).proposal.round]
            for rnd in (5, 5):  # a gap (rounds 3, 4 decoded plainly), then a repeat
                req = drafter_pb2.DraftRequest()
                req.commit.round = rnd
                req.commit.new_ids[:] = [PROMPT[0]]
                await call.write(req)
                try:
                    got.append((await call.read()).proposal.round)
                except grpc.aio.AioRpcError as e:
                    return got, e
        return got, None

    got, err = tiny_stack.loop.call(stream())
    assert got == [2, 5]
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Commit for round 5, expected a round after 5" in err.details()


class _OneInThree:
    """A `speculate` hook: its calls 1, 4, 7, ... speculate, the others decode plainly."""

    def __init__(self, *_, **__) -> None:
        self.round = 0

    def __call__(self, last) -> bool:
        self.round += 1
        return self.round % 3 == 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_plain_rounds_under_load_reach_the_drafter_service_as_one_commit(
    tiny_stack, tiny_folders, monkeypatch, temperature
):
    """The verifier's speculation switch (batching/switch.py) decides; here a fixed pattern
    stands in for the load (one speculative round in three) so that the wire path runs every
    time: the rounds the drafter sat out reach the real drafter service in the next Commit, with
    no fallback, and the output is token for token the in-process engine's under the same
    pattern (the same keyed coins at T > 0)."""
    from coralline.draft.registry import make_drafter
    from coralline.rpc import verifier_server

    monkeypatch.setattr(verifier_server, "SpeculationSwitch", _OneInThree)
    config = dataclasses.replace(tiny_stack.core.config, plain_switch=True)
    monkeypatch.setattr(tiny_stack.core, "config", config)
    target = TargetRunner.load(TargetConfig(model=tiny_folders[0]))
    for seed in range(2):
        params = SamplingParams(temperature=temperature, seed=seed, max_new_tokens=24)
        engine = Engine(target, make_drafter("coral", target, tiny_folders[1]))
        engine.speculate = _OneInThree()
        want = [t for c in engine.generate(PROMPT, params) for t in c.token_ids]
        got, summary = _verify(tiny_stack, params)
        assert got == want
        assert summary.fallback_rounds == 0 and summary.drafter_reconnects == 0
        # the hook decides from round 2 on (round 1 is the prompt's own: no draft, not plain)
        r = summary.rounds
        assert summary.plain_rounds == (r - 1) - (r + 1) // 3 > 0
        assert tiny_stack.last_nodes[0] == 1 and tiny_stack.last_nodes[2:4] == [1, 1]


def test_the_measured_switch_decides_for_the_sessions_and_loses_nothing(
    tiny_stack, tiny_folders, monkeypatch
):
    """`--speculation measured` (batching/measured.py): the verifier's one switch is every
    session's `speculate` hook. Here its windows are a few ms long and the load is said to be 4
    sessions, so one generation runs through both modes and the switch's measurements; the
    greedy output is still the target's own."""
    from coralline.batching.measured import MeasuredConfig, MeasuredSwitch

    fast = MeasuredConfig(window_s=0.002, settle_s=0.0, min_tokens=1, probe_every=1)
    switch = MeasuredSwitch(lambda: 4, fast)
    monkeypatch.setattr(tiny_stack.core, "measured", switch)
    target = TargetRunner.load(TargetConfig(model=tiny_folders[0]))
    want = [t for c in Engine(target).generate(PROMPT, SamplingParams(max_new_tokens=40))
            for t in c.token_ids]  # fmt: skip
    got, summary = _verify(tiny_stack, SamplingParams(max_new_tokens=40))
    assert got == want
    assert 0 < summary.plain_rounds < summary.rounds and summary.fallback_rounds == 0
    assert switch.windows > 0 and {lvl for lvl, _ in switch.rates} == {4}
