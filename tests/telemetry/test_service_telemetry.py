"""Telemetry of the real services on a tiny model, in this process over loopback gRPC: one
request is one trace across router, verifier and drafter (W3C context in the gRPC metadata and
in each Open / Commit), tracing changes no output, and /metrics agrees with the Summary.

Each service gets its own in-memory Tracing (as three processes would have their own
provider), so every span says which service made it."""

from __future__ import annotations

import asyncio
import itertools
import time
import urllib.request
import uuid

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coralline.router.core import RouterConfig, RouterCore
from coralline.rpc import drafter_server, verifier_server
from coralline.rpc.drafter_server import DrafterService, DrafterServiceConfig
from coralline.rpc.protos import (
    drafter_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    verifier_pb2,
    verifier_pb2_grpc,
)
from coralline.rpc.server import Server
from coralline.rpc.verifier_server import (
    GenerationServicer,
    VerifierCore,
    VerifierServiceConfig,
    VerifierServicer,
)
from coralline.telemetry import tracing as tr
from coralline.telemetry.spans import from_sdk
from coralline.telemetry.tracing import Tracing

from ..rpc.servers import LoopThread

VOCAB = 8
PROMPT = [1, 6, 3, 2, 5]
N = 24  # tokens per request: several rounds on the tiny model
ROUTER, VERIFIER, DRAFTER = (tr.SERVICES[k] for k in ("router", "verifier", "drafter"))


# ---------------------------------------------------------------------- the services
class Services:
    """A drafter and a verifier with their own in-memory Tracing and a /metrics port each."""

    def __init__(self, folders) -> None:
        target, head = folders
        self.loop = LoopThread()
        self.dtracing, self.dexp = Tracing.in_memory(DRAFTER)
        self.vtracing, self.vexp = Tracing.in_memory(VERIFIER)
        # start_drafter / start_verifier take no tracing: the same steps, with ours
        self.dserver, self.dservice = self.loop.call(self._drafter(target, head))
        self.vserver, self.core = self.loop.call(self._verifier(target))
        self.channel = grpc.insecure_channel(self.vserver.address)
        self.ver = verifier_pb2_grpc.VerifierServiceStub(self.channel)
        self.gen = generation_pb2_grpc.GenerationStub(self.channel)

    async def _drafter(self, target, head):
        config = DrafterServiceConfig(
            model=target, checkpoint=head, idle_timeout_s=30.0, metrics_port=0
        )
        service = DrafterService(config, tracing=self.dtracing)
        server = Server(config.server, [drafter_server.SERVICE_NAME])
        drafter_pb2_grpc.add_DrafterServiceServicer_to_server(service, server.server)
        await server.start()
        server.serve_metrics(service.metrics.registry, config.metrics_port)
        return server, service

    async def _verifier(self, target):
        config = VerifierServiceConfig(
            model=target,
            drafter_endpoint=self.dserver.address,
            max_tree_nodes=64,
            metrics_port=0,
        )
        core = VerifierCore(config, tracing=self.vtracing)
        server = Server(config.server, verifier_server.SERVICE_NAMES)
        verifier_pb2_grpc.add_VerifierServiceServicer_to_server(
            VerifierServicer(core), server.server
        )
        generation_pb2_grpc.add_GenerationServicer_to_server(
            GenerationServicer(core), server.server
        )
        await server.start()
        server.serve_metrics(core.metrics.registry, config.metrics_port)
        return server, core

    def idle(self) -> bool:
        """No session left in either service (their spans have ended by then)."""
        return not self.core.live and not self.dservice.session_ids

    def wait_idle(self) -> None:
        _wait(self.idle, "the services to free the session")

    def mark(self) -> tuple[int, int]:
        """How many spans each service has ended so far (for `spans(since=...)`)."""
        return len(self.vexp.get_finished_spans()), len(self.dexp.get_finished_spans())

    def spans(self, since: tuple[int, int] = (0, 0)) -> list:
        """The verifier's and the drafter's spans ended after the `mark()` given."""
        return [
            from_sdk(s)
            for e, n in zip((self.vexp, self.dexp), since, strict=True)
            for s in e.get_finished_spans()[n:]
        ]

    def wait_span(self, since, name: str, **attrs) -> None:
        """Until a span named so has ended (a request's SERVER span ends just after its last
        chunk went out; a router cancels the call once it has the summary)."""

        def ended() -> bool:
            return any(
                s.name == name and all(s.attributes.get(k) == v for k, v in attrs.items())
                for s in self.spans(since)
            )

        _wait(ended, f"span {name} {attrs}")

    def stop(self) -> None:
        self.channel.close()
        self.loop.call(self.vserver.stop())
        self.loop.call(self.dserver.stop())
        self.loop.stop()


@pytest.fixture(scope="module")
def services(tiny_folders):
    s = Services(tiny_folders)
    yield s
    s.stop()


def _wait(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _verify(services: Services, session_id: str, metadata=()):
    """(ids, per-round stats, summary) of a greedy VerifierService.Generate."""
    req = verifier_pb2.VerifyRequest(session_id=session_id, prompt_ids=PROMPT, max_new_tokens=N)
    req.sampling.temperature = 0.0
    ids, stats, summary = [], [], None
    for chunk in services.ver.Generate(req, timeout=60, metadata=metadata):
        ids += chunk.token_ids
        stats.append(chunk.stats)
        if chunk.HasField("summary"):
            summary = chunk.summary
    assert summary is not None and summary.tokens == len(ids) == N
    return ids, stats, summary


def _one(spans, name: str, **attrs):
    found = [
        s
        for s in spans
        if s.name == name and all(s.attributes.get(k) == v for k, v in attrs.items())
    ]
    assert len(found) == 1, f"{name} {attrs}: {len(found)} spans"
    return found[0]


class Traced:
    """One traced request through the verifier, its trace context made by a router span."""

    def __init__(self, services: Services) -> None:
        services.wait_idle()
        before = services.mark()
        self.router, rexp = Tracing.in_memory(ROUTER)
        self.sid = f"traced-{uuid.uuid4().hex[:8]}"
        root = self.router.start("text_completion tiny", kind="SERVER")
        self.client = self.router.start(tr.VERIFIER_RPC, root, "CLIENT")
        self.ids, self.stats, self.summary = _verify(
            services, self.sid, self.router.metadata(self.client)
        )
        self.client.end()
        root.end()
        services.wait_span(before, tr.VERIFIER_RPC, **{"specdec.session_id": self.sid})
        services.wait_span(before, tr.DRAFTER_RPC, **{"specdec.session_id": self.sid})
        self.spans = services.spans(before) + [from_sdk(s) for s in rexp.get_finished_spans()]
        ctx = self.client.get_span_context()
        self.trace_id, self.client_id = f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


@pytest.fixture(scope="module")
def traced(services):
    return Traced(services)


# ---------------------------------------------------------------------- one trace
def test_one_request_is_one_trace_across_the_services(traced):
    spans, summary = traced.spans, traced.summary
    assert {s.trace_id for s in spans} == {traced.trace_id}
    assert {s.service for s in spans} == {ROUTER, VERIFIER, DRAFTER}
    assert all(s.end_ns >= s.start_ns > 0 for s in spans)
    assert all(s.status != "ERROR" for s in spans)

    server = _one(spans, tr.VERIFIER_RPC, **{"specdec.session_id": traced.sid})
    assert (server.kind, server.service) == ("SERVER", VERIFIER)
    assert server.parent_id == traced.client_id  # the router's span, from the gRPC metadata
    assert server.attributes["specdec.outcome"] == "finished"
    assert server.attributes["gen_ai.usage.output_tokens"] == N
    assert server.attributes["gen_ai.usage.input_tokens"] == len(PROMPT)
    assert server.attributes["specdec.rounds"] == summary.rounds
    assert server.attributes["gen_ai.request.temperature"] == 0.0
    assert server.attributes["gen_ai.request.max_tokens"] == N
    assert server.attributes["specdec.drafter"] == "coral"

    prefill = _one(spans, tr.VERIFIER_PREFILL)
    assert prefill.parent_id == server.span_id
    assert prefill.end_ns <= min(s.start_ns for s in spans if s.name == tr.DRAFT_WAIT)

    rounds = {s.attributes["specdec.round"]: s for s in spans if s.name == tr.VERIFIER_ROUND}
    assert sorted(rounds) == list(range(1, summary.rounds + 1))  # one span per round
    for stats in traced.stats:
        r = rounds[stats.round]
        assert r.parent_id == server.span_id
        assert r.attributes["specdec.tree_nodes"] == stats.tree_nodes
        assert r.attributes["specdec.accepted"] == stats.accepted
        assert r.attributes["specdec.tree_depth"] == stats.tree_depth
        hops = sorted(
            (s for s in spans if s.parent_id == r.span_id and s.service == VERIFIER),
            key=lambda s: (s.start_ns, s.end_ns),
        )
        assert [h.name for h in hops] == [tr.DRAFT_WAIT, tr.TARGET_FORWARD, tr.VERIFY, tr.KV_COMMIT]
        assert all(a.end_ns == b.start_ns for a, b in itertools.pairwise(hops))
        assert hops[1].start_ns - hops[0].start_ns == stats.draft_ns  # the wire's own numbers
        assert hops[2].start_ns - hops[1].start_ns == stats.forward_ns


def test_each_drafter_round_is_a_child_of_its_verifier_round(traced):
    spans, summary = traced.spans, traced.summary
    assert summary.fallback_rounds == 0  # every round verified a proposal: one drafter round each
    server = _one(spans, tr.VERIFIER_RPC, **{"specdec.session_id": traced.sid})
    rounds = {s.span_id: s for s in spans if s.name == tr.VERIFIER_ROUND}
    drafted = [s for s in spans if s.name == tr.DRAFTER_ROUND]
    # round 1 decodes the prompt's last token in the prompt's forward: no drafter round
    assert len(drafted) == summary.rounds - 1
    by_parent = {}
    for d in drafted:
        assert d.service == DRAFTER
        assert d.parent_id in rounds, "a drafter round outside any verifier round"
        assert rounds[d.parent_id].attributes["specdec.round"] > 1
        by_parent.setdefault(d.parent_id, []).append(d)
    assert sorted(len(v) for v in by_parent.values()) == [1] * (summary.rounds - 1)
    for parent_id, (d,) in by_parent.items():
        r = rounds[parent_id]
        # the context came in that round's Open / Commit, and it drafted for that round
        assert d.attributes["specdec.round"] == r.attributes["specdec.round"]
        assert d.attributes["specdec.session_id"] == traced.sid
        assert d.attributes["specdec.tree_nodes"] == r.attributes["specdec.tree_nodes"]
        assert d.attributes["specdec.drafter"] == "coral"
        # CORAL records its phases: head forwards, LM-head calls, then the tree selection
        children = sorted((s for s in spans if s.parent_id == d.span_id), key=lambda s: s.start_ns)
        names = [c.name for c in children]
        assert tr.DRAFTER_HEAD in names and tr.DRAFTER_LM_HEAD in names
        assert names[-1] == tr.DRAFTER_TREE and names.count(tr.DRAFTER_TREE) == 1
        assert set(names) <= {tr.DRAFTER_HEAD, tr.DRAFTER_LM_HEAD, tr.DRAFTER_TREE}
        assert all(d.start_ns <= c.start_ns <= c.end_ns <= d.end_ns for c in children)
        for key in ("specdec.head_ms", "specdec.lm_head_ms", "specdec.tree_ms"):
            assert d.attributes[key] >= 0

    stream = _one(spans, tr.DRAFTER_RPC)
    assert (stream.kind, stream.service) == ("SERVER", DRAFTER)
    assert stream.parent_id == server.span_id  # the Draft stream's metadata
    assert stream.attributes["specdec.session_id"] == traced.sid
    assert stream.attributes["specdec.close_reason"]


def test_the_generation_api_is_traced_too(services):
    services.wait_idle()
    before = services.mark()
    router, _ = Tracing.in_memory(ROUTER)
    client = router.start("chat tiny", kind="CLIENT")
    sid = f"gen-{uuid.uuid4().hex[:8]}"
    req = generation_pb2.GenerateRequest(session_id=sid, max_new_tokens=8)
    req.token_ids.ids.extend(PROMPT)
    req.sampling.temperature = 0.0
    out = list(services.gen.Generate(req, timeout=60, metadata=router.metadata(client)))
    client.end()
    services.wait_span(before, tr.GENERATION_RPC, **{"specdec.session_id": sid})
    services.wait_span(before, tr.DRAFTER_RPC, **{"specdec.session_id": sid})
    spans = services.spans(before)
    server = _one(spans, tr.GENERATION_RPC)
    assert server.kind == "SERVER"
    assert server.parent_id == f"{client.get_span_context().span_id:016x}"
    assert server.attributes["specdec.session_id"] == sid
    assert server.attributes["gen_ai.usage.output_tokens"] == sum(len(r.token_ids) for r in out)
    rounds = [s for s in spans if s.name == tr.VERIFIER_ROUND]
    assert len(rounds) == out[-1].summary.rounds
    assert {s.trace_id for s in spans} == {f"{client.get_span_context().trace_id:032x}"}


# ---------------------------------------------------------------------- tracing changes nothing
@pytest.mark.parametrize("metrics", [True, False], ids=["tracing-off", "all-off"])
def test_without_tracing_the_same_tokens_and_no_span(services, traced, metrics):
    services.wait_idle()
    core, dservice = services.core, services.dservice
    saved = core.tracing, dservice.tracing, core.metrics, dservice.metrics
    core.tracing = dservice.tracing = Tracing.disabled()
    if not metrics:
        core.metrics = dservice.metrics = None
    before = services.mark()
    try:
        router, _ = Tracing.in_memory(ROUTER)
        span = router.start("chat tiny", kind="CLIENT")  # an incoming context changes nothing
        ids, _, summary = _verify(services, f"off-{uuid.uuid4().hex[:8]}", router.metadata(span))
        span.end()
        services.wait_idle()
        time.sleep(0.2)  # a span would have ended by now (the traced ones end within ms)
    finally:
        core.tracing, dservice.tracing, core.metrics, dservice.metrics = saved
    assert ids == traced.ids
    assert summary.rounds == traced.summary.rounds
    assert services.spans(before) == []


# ---------------------------------------------------------------------- /metrics
def _scrape(url: str) -> dict:
    """{(sample name, sorted labels): value} of a /metrics page, fetched over HTTP."""
    request = urllib.request.Request(
        url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        body = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def _delta(after: dict, before: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in after, f"{name} {labels} not scraped"
    return after[key] - before.get(key, 0.0)


def test_metrics_endpoints_agree_with_the_summary(services):
    services.wait_idle()
    vurl, durl = services.vserver.metrics_url, services.dserver.metrics_url
    assert vurl.startswith("http://127.0.0.1:") and durl.startswith("http://127.0.0.1:")
    v0, d0 = _scrape(vurl), _scrape(durl)
    ids, stats, summary = _verify(services, f"metrics-{uuid.uuid4().hex[:8]}")
    finished = ("coralline:requests_total", (("outcome", "finished"),))

    def ended() -> bool:
        return _scrape(vurl).get(finished, 0.0) - v0.get(finished, 0.0) >= 1

    _wait(ended, "the request's end in /metrics")
    services.wait_idle()
    v1, d1 = _scrape(vurl), _scrape(durl)
    rounds, fallbacks = summary.rounds, summary.fallback_rounds
    speculative = [s for s in stats if s.tree_nodes > 1]
    assert _delta(v1, v0, "coralline:rounds_total") == rounds == len(stats)
    assert _delta(v1, v0, "coralline:generation_tokens_total") == summary.tokens == len(ids)
    assert _delta(v1, v0, "coralline:prompt_tokens_total") == len(PROMPT)
    accepted = sum(s.accepted for s in stats)
    assert _delta(v1, v0, "coralline:spec_decode_num_accepted_tokens_total") == accepted
    assert accepted == round((summary.acceptance_length - 1) * rounds)
    assert _delta(v1, v0, "coralline:spec_decode_num_drafts_total") == len(speculative)
    assert _delta(v1, v0, "coralline:spec_decode_num_draft_tokens_total") == sum(
        s.tree_nodes - 1 for s in speculative
    )
    assert _delta(v1, v0, "coralline:spec_decode_fallback_rounds_total") == fallbacks
    assert _delta(v1, v0, "coralline:requests_total", outcome="finished") == 1
    assert _delta(v1, v0, "coralline:request_success_total", finished_reason="length") == 1
    assert _delta(v1, v0, "coralline:round_duration_seconds_count") == rounds
    assert _delta(v1, v0, "coralline:time_to_first_token_seconds_count") == 1
    assert _delta(v1, v0, "coralline:e2e_request_latency_seconds_count") == 1
    assert _delta(v1, v0, "coralline:request_prefill_time_seconds_count") == 1
    sent = sum(s.bytes_to_drafter for s in stats)
    assert _delta(v1, v0, "coralline:drafter_link_bytes_total", direction="sent") == sent > 0
    assert v1[("coralline:num_requests_running", ())] == 0
    assert v1[("coralline:num_requests_waiting", ())] == 0

    asked = [s for s in stats if s.round > 1 and not s.fallback]  # (round 1: the prompt's)
    assert (
        _delta(d1, d0, "coralline:drafter_proposals_total") == len(asked) == rounds - 1 - fallbacks
    )
    assert _delta(d1, d0, "coralline:drafter_proposal_nodes_total") == sum(
        s.tree_nodes for s in asked
    )
    assert _delta(d1, d0, "coralline:drafter_sessions_opened_total") == 1
    assert _delta(d1, d0, "coralline:drafter_head_seconds_count") == len(asked)
    assert d1[("coralline:drafter_sessions", ())] == 0
    assert d1[("coralline:drafter_queue_depth", ())] == 0


def test_a_refused_request_is_counted_and_traced_as_rejected(services):
    services.wait_idle()
    before = services.mark()
    v0 = _scrape(services.vserver.metrics_url)
    sid = f"refused-{uuid.uuid4().hex[:8]}"
    req = verifier_pb2.VerifyRequest(
        session_id=sid, prompt_ids=PROMPT, max_new_tokens=N, drafter="no-such-drafter"
    )
    with pytest.raises(grpc.RpcError) as err:
        list(services.ver.Generate(req, timeout=30))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    v1 = _scrape(services.vserver.metrics_url)
    assert _delta(v1, v0, "coralline:requests_total", outcome="rejected") == 1
    failed = ("coralline:requests_total", (("outcome", "failed"),))
    assert v1.get(failed, 0.0) == v0.get(failed, 0.0)
    span = _one(services.spans(before), tr.VERIFIER_RPC, **{"specdec.outcome": "rejected"})
    assert span.status == "ERROR" and "no-such-drafter" in span.status_message


# ---------------------------------------------------------------------- through the router
def test_a_router_request_is_one_trace_across_three_services(services):
    services.wait_idle()
    before = services.mark()
    rtracing, rexp = Tracing.in_memory(ROUTER)
    config = RouterConfig(
        verifiers=(services.vserver.address,),
        drafters=(services.dserver.address,),
        default_drafter="coral",
        refresh_s=0.0,
    )
    req = generation_pb2.GenerateRequest(max_new_tokens=12)
    req.token_ids.ids.extend(PROMPT)
    req.sampling.temperature = 0.0

    async def main():
        core = RouterCore(config, tracing=rtracing)  # the memory store
        try:
            return [r async for r in core.generate(req)]
        finally:
            await core.close()

    out = asyncio.run(main())
    sid, summary = out[0].session_id, out[-1].summary
    services.wait_span(before, tr.VERIFIER_RPC, **{"specdec.session_id": sid})
    services.wait_span(before, tr.DRAFTER_RPC, **{"specdec.session_id": sid})
    tokens = sum(len(r.token_ids) for r in out)
    assert tokens == summary.tokens == 12
    rspans = [from_sdk(s) for s in rexp.get_finished_spans()]
    spans = rspans + services.spans(before)

    root = _one(rspans, f"text_completion {config.model}")  # token ids: not a chat
    assert (root.kind, root.parent_id, root.status) == ("SERVER", "", "UNSET")
    a = root.attributes
    assert a["gen_ai.operation.name"] == "text_completion"
    assert a["gen_ai.request.model"] == config.model
    assert a["gen_ai.usage.output_tokens"] == tokens
    assert a["gen_ai.usage.input_tokens"] == len(PROMPT)
    assert a["specdec.session_id"] == sid
    assert a["specdec.outcome"] == "finished"
    assert a["specdec.rounds"] == summary.rounds
    assert a["gen_ai.response.finish_reasons"] == ["length"]

    place = _one(rspans, tr.ROUTER_PLACE)
    assert place.parent_id == root.span_id
    assert place.attributes["specdec.verifier"] == services.vserver.address
    assert place.attributes["specdec.drafter_endpoint"] == services.dserver.address
    client = _one(rspans, tr.VERIFIER_RPC)
    assert (client.kind, client.parent_id) == ("CLIENT", root.span_id)
    assert client.attributes["server.address"] == services.vserver.address

    server = _one(spans, tr.VERIFIER_RPC, **{"specdec.session_id": sid})
    assert (server.kind, server.service, server.parent_id) == ("SERVER", VERIFIER, client.span_id)
    # the router cancels the call once it has the summary: still a finished request
    assert (server.attributes["specdec.outcome"], server.status) == ("finished", "UNSET")
    assert {s.trace_id for s in spans} == {root.trace_id}
    assert {s.service for s in spans} >= {ROUTER, VERIFIER, DRAFTER}
    assert _one(spans, tr.DRAFTER_RPC).parent_id == server.span_id
    rounds = {s.span_id for s in spans if s.name == tr.VERIFIER_ROUND}
    assert len(rounds) == summary.rounds
    drafted = [s for s in spans if s.name == tr.DRAFTER_ROUND]
    assert len(drafted) == summary.rounds - 1 - summary.fallback_rounds  # (round 1: no draft)
    assert all(d.parent_id in rounds for d in drafted)
