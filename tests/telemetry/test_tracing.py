"""Tracing, SessionTelemetry, record_round and the metrics endpoint as units: synthetic numbers
in, spans (in-memory exporter) and Prometheus samples out. No model, no services."""

from __future__ import annotations

import os
import time
import urllib.request

import grpc
import pytest

from coralline.engine import RoundStats, Summary
from coralline.rpc.errors import ServiceError
from coralline.rpc.remote_drafter import WireStats
from coralline.sampling import SamplingParams
from coralline.telemetry import tracing as tr
from coralline.telemetry.drafter import record_round
from coralline.telemetry.metrics import DrafterMetrics, VerifierMetrics, serve_metrics
from coralline.telemetry.spans import from_sdk
from coralline.telemetry.tracing import Tracing, carrier_of_metadata, env_enabled
from coralline.telemetry.verifier import SessionTelemetry

MS = 1_000_000  # ns per ms


@pytest.fixture
def clean_env(monkeypatch):
    """No OTEL_* variable from the machine running the tests."""
    for key in list(os.environ):
        if key.startswith("OTEL_"):
            monkeypatch.delenv(key)
    return monkeypatch


def _spans(exporter) -> list:
    return [from_sdk(s) for s in exporter.get_finished_spans()]


def _one(spans, name: str):
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"{name}: {len(found)} spans in {[s.name for s in spans]}"
    return found[0]


# ---------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": " None "}, False),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}, False),
        ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, False),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_RESOURCE_ATTRIBUTES": "a=b"}, False),
    ],
)
def test_env_enabled(env, on):
    assert env_enabled(env) is on


def test_env_enabled_reads_the_process_environment(clean_env):
    assert env_enabled() is False
    clean_env.setenv("OTEL_TRACES_EXPORTER", "console")
    assert env_enabled() is True


def test_from_env_is_disabled_with_a_clean_environment(clean_env):
    t = Tracing.from_env("coralline-router")
    assert t.enabled is False
    assert t.tracer is None and t.provider is None
    t.shutdown()  # a no-op when off
    assert Tracing.disabled().enabled is False


def test_from_env_with_the_console_exporter_is_enabled(clean_env):
    clean_env.setenv("OTEL_TRACES_EXPORTER", "console")
    t = Tracing.from_env("coralline-router")
    try:
        assert t.enabled is True and t.tracer is not None
        assert t.provider.resource.attributes["service.name"] == "coralline-router"
    finally:
        t.shutdown()


def test_from_env_with_an_otlp_endpoint_builds_the_grpc_exporter(clean_env):
    # nothing is sent until a span ends (there is none): no collector needed
    clean_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    t = Tracing.from_env("coralline-verifier")
    try:
        assert t.enabled is True
        exporters = [type(p.span_exporter).__module__ for p in _processors(t)]
        assert exporters == ["opentelemetry.exporter.otlp.proto.grpc.trace_exporter"]
    finally:
        t.shutdown()


def test_from_env_http_protobuf_protocol(clean_env):
    clean_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    clean_env.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    t = Tracing.from_env("coralline-verifier")
    try:
        exporters = [type(p.span_exporter).__module__ for p in _processors(t)]
        assert exporters == ["opentelemetry.exporter.otlp.proto.http.trace_exporter"]
    finally:
        t.shutdown()


def test_from_env_keeps_the_callers_processors_when_the_env_says_nothing(clean_env):
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    t = Tracing.from_env("coralline-drafter", [SimpleSpanProcessor(exporter)])
    assert t.enabled is True
    t.start("x").end()
    assert [s.name for s in _spans(exporter)] == ["x"]
    assert _spans(exporter)[0].service == "coralline-drafter"
    t.shutdown()


def _processors(t: Tracing) -> list:
    return list(t.provider._active_span_processor._span_processors)


def test_from_env_rejects_an_unknown_exporter(clean_env):
    clean_env.setenv("OTEL_TRACES_EXPORTER", "console,zipkin")
    with pytest.raises(ValueError, match=r"unknown exporter 'zipkin' \(otlp, console\)"):
        Tracing.from_env("coralline-router")


@pytest.mark.parametrize(
    "var", ["OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"]
)
def test_from_env_rejects_an_unknown_protocol(clean_env, var):
    clean_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    clean_env.setenv(var, "http/json")
    with pytest.raises(ValueError, match=r"'http/json': use grpc or http/protobuf"):
        Tracing.from_env("coralline-router")


def test_service_name_default_and_override(clean_env):
    t, _ = Tracing.in_memory("coralline-drafter")
    attrs = t.provider.resource.attributes
    assert attrs["service.name"] == "coralline-drafter"
    assert attrs["service.namespace"] == "coralline"
    assert attrs["service.instance.id"].endswith(f":{os.getpid()}")
    clean_env.setenv("OTEL_SERVICE_NAME", "drafter-eu-1")
    t2, exporter = Tracing.in_memory("coralline-drafter")
    assert t2.provider.resource.attributes["service.name"] == "drafter-eu-1"
    t2.start("x").end()
    assert _spans(exporter)[0].service == "drafter-eu-1"


# ---------------------------------------------------------------------- propagation
def test_carrier_is_the_w3c_traceparent_of_the_span():
    t, _ = Tracing.in_memory("coralline-router")
    span = t.start("chat m", kind="SERVER")
    ctx = span.get_span_context()
    carrier = t.carrier(span)
    assert list(carrier) == ["traceparent"]  # no tracestate unless one came in
    version, trace_id, span_id, flags = carrier["traceparent"].split("-")
    assert (version, trace_id, span_id) == ("00", f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
    assert int(flags, 16) & 1  # sampled
    assert t.metadata(span) == (("traceparent", carrier["traceparent"]),)
    span.end()


@pytest.mark.parametrize("shape", ["dict", "metadata"])
def test_a_child_in_another_service_joins_the_trace(shape):
    router, rexp = Tracing.in_memory("coralline-router")
    verifier, vexp = Tracing.in_memory("coralline-verifier")
    client = router.start(tr.VERIFIER_RPC, kind="CLIENT")
    carrier = router.carrier(client) if shape == "dict" else router.metadata(client)
    if shape == "metadata":  # what grpc's invocation_metadata() looks like
        carrier = (("user-agent", "grpc-python"), *carrier, ("x-bin", b"\x00\x01"))
    server = verifier.start(tr.VERIFIER_RPC, parent=carrier, kind="SERVER")
    verifier.record(tr.VERIFIER_PREFILL, server, 100, 200)
    server.end()
    client.end()
    (c,) = _spans(rexp)
    v = {s.name: s for s in _spans(vexp)}
    assert v[tr.VERIFIER_RPC].trace_id == c.trace_id
    assert v[tr.VERIFIER_RPC].parent_id == c.span_id
    assert (v[tr.VERIFIER_RPC].kind, c.kind) == ("SERVER", "CLIENT")
    assert v[tr.VERIFIER_RPC].service == "coralline-verifier" and c.service == "coralline-router"
    prefill = v[tr.VERIFIER_PREFILL]
    assert prefill.parent_id == v[tr.VERIFIER_RPC].span_id and prefill.trace_id == c.trace_id
    assert (prefill.start_ns, prefill.end_ns) == (100, 200)


def test_tracestate_travels_and_no_parent_starts_a_trace():
    t, exp = Tracing.in_memory("coralline-verifier")
    upstream = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "vendor=abc",
    }
    child = t.start("child", parent=upstream)
    assert t.carrier(child)["tracestate"] == "vendor=abc"
    assert t.carrier(child)["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    child.end()
    for parent in (None, {}, ()):
        t.start("root", parent=parent).end()
    child_s, *roots = _spans(exp)
    assert child_s.parent_id == "b7ad6b7169203331"
    assert all(r.parent_id == "" for r in roots) and len(roots) == 3
    assert len({r.trace_id for r in roots}) == 3  # each a new trace


def test_carrier_of_metadata_keeps_only_the_trace_context():
    md = (
        ("user-agent", "grpc-python/1"),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ("tracestate", "a=1"),
        ("baggage", "k=v"),
        ("traceparent-bin", b"\x00"),
    )
    assert carrier_of_metadata(md) == {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "a=1",
    }
    assert carrier_of_metadata(None) == {} and carrier_of_metadata(()) == {}
    assert carrier_of_metadata((("x", "y"),)) == {}


def test_genai_request_attributes_and_span_name():
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=32, seed=7)
    attrs = tr.genai_request_attributes("chat", "m", params)
    assert attrs == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "m",
        "gen_ai.request.temperature": 0.7,
        "gen_ai.request.top_p": 0.9,
        "gen_ai.request.max_tokens": 32,
        "gen_ai.request.top_k": 20,
        "gen_ai.request.seed": 7,
    }
    plain = tr.genai_request_attributes("text_completion", "m", SamplingParams())
    assert "gen_ai.request.top_k" not in plain and "gen_ai.request.seed" not in plain
    assert tr.request_span_name("chat", "smollm2") == "chat smollm2"


def test_record_clamps_an_end_before_the_start():
    t, exp = Tracing.in_memory("coralline-verifier")
    t.record("x", None, 500, 400)
    (s,) = _spans(exp)
    assert (s.start_ns, s.end_ns) == (500, 500)


# ---------------------------------------------------------------------- SessionTelemetry
S0 = 1_700_000_000_000_000_000  # epoch ns of round 1's start

ROUNDS = [  # (stats, committed, wire)
    (
        RoundStats(
            1,
            4,
            2,
            3.0,
            3.75,
            forward_ms=2.0,
            accept_ms=1.25,
            commit_ms=0.5,
            start_ns=S0,
            tree_depth=3,
            prefill_ms=10.0,
        ),
        3,
        WireStats(bytes_to=120, bytes_from=300, drafter_ns=1_000_000),
    ),
    (
        RoundStats(
            2,
            1,
            0,
            0.5,
            2.0,
            fallback="no proposal within 0.5 s",
            forward_ms=1.5,
            accept_ms=0.25,
            commit_ms=0.25,
            start_ns=S0 + 20 * MS,
        ),
        1,
        WireStats(bytes_to=50, bytes_from=0, drafter_ns=0),
    ),
    (
        RoundStats(
            3,
            5,
            3,
            4.0,
            4.0,
            forward_ms=2.5,
            accept_ms=1.0,
            commit_ms=0.5,
            start_ns=S0 + 40 * MS,
            tree_depth=4,
        ),
        4,
        WireStats(bytes_to=80, bytes_from=400, drafter_ns=2_500_000),
    ),
]
SUMMARY = Summary(
    tokens=8,
    rounds=3,
    acceptance_length=1 + 5 / 3,
    tokens_per_second=123.456789,
    prefill_ms=10.0,
    draft_ms=7.5,
    verify_ms=9.75,
    finish_reason="length",
    verifier="greedy",
    drafter="coral",
    seed=11,
    prompt_tokens=6,
    fallback_rounds=1,
    cached_prompt_tokens=2,
)


def _session(tracing, metrics, parent=None) -> SessionTelemetry:
    return SessionTelemetry(
        tracing,
        metrics,
        rpc=tr.VERIFIER_RPC,
        parent=parent,
        attributes={"specdec.session_id": "s1"},
        prompt_tokens=6,
    )


class FakeRemote:
    """What SessionTelemetry sees of a RemoteDrafter."""

    def __init__(self) -> None:
        self.trace_context: dict[str, str] = {}


def test_session_spans_follow_the_round_stats():
    t, exp = Tracing.in_memory("coralline-verifier")
    router, _ = Tracing.in_memory("coralline-router")
    client = router.start(tr.VERIFIER_RPC, kind="CLIENT")
    tel = _session(t, VerifierMetrics(), parent=router.metadata(client))
    tel.remote = remote = FakeRemote()
    contexts = []
    for stats, committed, wire in ROUNDS:
        tel.round_started(stats.round)
        contexts.append(dict(remote.trace_context))
        tel.round_done(stats, committed, wire, cached=2)
    tel.end("finished", SUMMARY)
    spans = _spans(exp)
    request = _one(spans, tr.VERIFIER_RPC)
    assert request.kind == "SERVER" and request.status == "UNSET"
    assert request.parent_id == f"{client.get_span_context().span_id:016x}"
    assert {s.trace_id for s in spans} == {f"{client.get_span_context().trace_id:032x}"}

    rounds = sorted(
        (s for s in spans if s.name == tr.VERIFIER_ROUND),
        key=lambda s: s.attributes["specdec.round"],
    )
    assert [r.attributes["specdec.round"] for r in rounds] == [1, 2, 3]
    assert all(r.parent_id == request.span_id for r in rounds)
    # the drafter got each round's own context, before the round's proposal was asked for
    for r, ctx in zip(rounds, contexts, strict=True):
        assert list(ctx) == ["traceparent"]
        assert ctx["traceparent"].startswith(f"00-{r.trace_id}-{r.span_id}-")

    prefill = _one(spans, tr.VERIFIER_PREFILL)
    assert prefill.parent_id == request.span_id
    assert (prefill.start_ns, prefill.end_ns) == (S0 - 10 * MS, S0)
    assert prefill.attributes == {"specdec.prompt_tokens": 6, "specdec.cached_prompt_tokens": 2}

    phases = (tr.DRAFT_WAIT, tr.TARGET_FORWARD, tr.VERIFY, tr.KV_COMMIT)
    for r, (stats, committed, wire) in zip(rounds, ROUNDS, strict=True):
        children = {s.name: s for s in spans if s.parent_id == r.span_id}
        assert sorted(children) == sorted(phases)
        edge = stats.start_ns
        for name, ms in zip(
            phases,
            (stats.draft_ms, stats.forward_ms, stats.accept_ms, stats.commit_ms),
            strict=True,
        ):
            assert (children[name].start_ns, children[name].end_ns) == (edge, edge + int(ms * MS))
            edge += int(ms * MS)
        a = r.attributes
        assert a["specdec.tree_nodes"] == stats.tree_nodes
        assert a["specdec.tree_depth"] == stats.tree_depth
        assert a["specdec.accepted"] == stats.accepted
        assert a["specdec.committed"] == committed
        assert a["specdec.bytes_sent"] == wire.bytes_to
        assert a["specdec.bytes_received"] == wire.bytes_from
        assert a.get("specdec.fallback") == stats.fallback
        if wire.drafter_ns:
            assert a["specdec.drafter_ms"] == wire.drafter_ns / MS
            assert a["specdec.network_ms"] == stats.draft_ms - wire.drafter_ns / MS
        else:
            assert "specdec.drafter_ms" not in a and "specdec.network_ms" not in a
    assert rounds[0].attributes["specdec.network_ms"] == 2.0

    a = request.attributes
    assert a["specdec.session_id"] == "s1"
    assert a["gen_ai.usage.input_tokens"] == 6
    assert a["gen_ai.usage.output_tokens"] == 8
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["specdec.rounds"] == 3
    assert a["specdec.acceptance_length"] == round(1 + 5 / 3, 4)
    assert a["specdec.tokens_per_second"] == 123.457
    assert a["specdec.cached_prompt_tokens"] == 2
    assert a["specdec.fallback_rounds"] == 1
    assert a["specdec.drafter"] == "coral" and a["specdec.verifier"] == "greedy"
    assert a["gen_ai.request.seed"] == 11
    assert a["specdec.outcome"] == "finished"
    assert len(spans) == 1 + 1 + 3 * 5  # request, prefill, 3 rounds of 1 + 4


def test_session_metrics_follow_the_round_stats():
    m = VerifierMetrics()
    tel = _session(None, m)  # metrics only: no span is made
    assert tel.span is None
    for stats, committed, wire in ROUNDS:
        tel.round_started(stats.round)
        tel.round_done(stats, committed, wire, cached=2)
    get = m.registry.get_sample_value
    assert get("coralline:rounds_total") == 3
    assert get("coralline:spec_decode_num_drafts_total") == 2  # the fallback is no draft
    assert get("coralline:spec_decode_num_draft_tokens_total") == (4 - 1) + (5 - 1)
    assert get("coralline:spec_decode_num_accepted_tokens_total") == 5
    per_pos = "coralline:spec_decode_num_accepted_tokens_per_pos_total"
    assert [get(per_pos, {"position": str(p)}) for p in range(4)] == [2, 2, 1, 0]
    assert get("coralline:spec_decode_fallback_rounds_total") == 1
    assert get("coralline:generation_tokens_total") == 8
    assert get("coralline:prompt_tokens_total") == 6  # once per request, not per round
    assert get("coralline:cached_prompt_tokens_total") == 2
    assert get("coralline:drafter_link_bytes_total", {"direction": "sent"}) == 250
    assert get("coralline:drafter_link_bytes_total", {"direction": "received"}) == 700
    assert get("coralline:round_duration_seconds_count") == 3
    assert get("coralline:time_per_output_token_seconds_count") == 3
    assert get("coralline:draft_wait_seconds_count") == 3
    assert get("coralline:draft_wait_seconds_sum") == pytest.approx(0.0075)
    assert get("coralline:draft_network_seconds_count") == 2  # rounds the drafter answered
    assert get("coralline:draft_network_seconds_sum") == pytest.approx(0.002 + 0.0015)
    assert get("coralline:target_forward_seconds_sum") == pytest.approx(0.006)
    assert get("coralline:verify_duration_seconds_sum") == pytest.approx(0.0025)
    assert get("coralline:kv_commit_seconds_sum") == pytest.approx(0.00125)
    assert get("coralline:request_prefill_time_seconds_count") == 1
    assert get("coralline:request_prefill_time_seconds_sum") == pytest.approx(0.010)
    assert get("coralline:time_to_first_token_seconds_count") == 1
    assert get("coralline:requests_total", {"outcome": "finished"}) is None
    tel.end("finished", SUMMARY)
    assert get("coralline:requests_total", {"outcome": "finished"}) == 1
    assert get("coralline:request_success_total", {"finished_reason": "length"}) == 1
    assert get("coralline:e2e_request_latency_seconds_count") == 1


def test_deep_acceptances_count_in_the_last_position():
    m = VerifierMetrics()
    stats = RoundStats(1, 21, 20, 1.0, 1.0, start_ns=time.time_ns())
    _session(None, m).round_done(stats, 21, None)
    per_pos = "coralline:spec_decode_num_accepted_tokens_per_pos_total"
    assert m.registry.get_sample_value(per_pos, {"position": "14"}) == 1
    assert m.registry.get_sample_value(per_pos, {"position": "15"}) == 20 - 15
    # no wire (plain decoding): no link bytes, no network time
    assert m.registry.get_sample_value("coralline:draft_network_seconds_count") == 0
    assert (
        m.registry.get_sample_value("coralline:drafter_link_bytes_total", {"direction": "sent"})
        == 0
    )


def test_a_cancelled_request_is_not_an_error_a_failed_one_is():
    t, exp = Tracing.in_memory("coralline-verifier")
    m = VerifierMetrics()
    cancelled = _session(t, m)
    cancelled.round_started(1)  # the round in flight when the cancel came
    cancelled.end("cancelled", None, ServiceError(grpc.StatusCode.CANCELLED, "was cancelled"))
    failed = _session(t, m)
    failed.end("failed", None, RuntimeError("target exploded"))
    spans = _spans(exp)
    requests = [s for s in spans if s.name == tr.VERIFIER_RPC]
    c, f = sorted(requests, key=lambda s: s.attributes["specdec.outcome"])
    assert c.attributes["specdec.outcome"] == "cancelled" and c.status == "UNSET"
    assert "gen_ai.usage.output_tokens" not in c.attributes
    assert f.attributes["specdec.outcome"] == "failed" and f.status == "ERROR"
    assert f.status_message == "target exploded"
    (sdk_failed,) = [s for s in exp.get_finished_spans() if s.status.status_code.name == "ERROR"]
    (event,) = sdk_failed.events
    assert event.name == "exception"
    assert event.attributes["exception.type"] == "RuntimeError"
    (round_span,) = [s for s in spans if s.name == tr.VERIFIER_ROUND]
    assert round_span.parent_id == c.span_id  # ended with its request, not left open
    get = m.registry.get_sample_value
    assert get("coralline:requests_total", {"outcome": "cancelled"}) == 1
    assert get("coralline:requests_total", {"outcome": "failed"}) == 1
    assert get("coralline:request_success_total", {"finished_reason": ""}) is None
    assert get("coralline:e2e_request_latency_seconds_count") == 2


def test_disabled_tracing_makes_no_span_and_leaves_the_drafter_alone():
    tel = _session(Tracing.disabled(), None)
    tel.remote = remote = FakeRemote()
    stats, committed, wire = ROUNDS[0]
    tel.round_started(1)
    tel.round_done(stats, committed, wire)
    tel.end("finished", SUMMARY)
    assert tel.tracing is None and tel.span is None and remote.trace_context == {}


# ---------------------------------------------------------------------- record_round
def test_drafter_round_spans_convert_perf_times_to_epoch():
    t, exp = Tracing.in_memory("coralline-drafter")
    verifier, _ = Tracing.in_memory("coralline-verifier")
    round_span = verifier.start(tr.VERIFIER_ROUND)
    m = DrafterMetrics()
    start_ns, t0 = S0, 5_000_000_000  # epoch at the start; perf_counter ns at the start
    timeline = [
        ("lm_head", t0 + 1 * MS, t0 + 2 * MS),
        ("head", t0 + 2 * MS, t0 + 5 * MS),
        ("lm_head", t0 + 5 * MS, t0 + 6 * MS),
        ("head", t0 + 6 * MS, t0 + 8 * MS),
    ]
    attrs = {"specdec.round": 4, "specdec.tree_nodes": 9, "specdec.session_id": "s1"}
    record_round(
        t,
        m,
        parent=verifier.carrier(round_span),
        start_ns=start_ns,
        t0=t0,
        t1=t0 + 10 * MS,
        timeline=timeline,
        attributes=attrs,
    )
    round_span.end()
    spans = _spans(exp)
    top = _one(spans, tr.DRAFTER_ROUND)
    rctx = round_span.get_span_context()
    assert top.parent_id == f"{rctx.span_id:016x}" and top.trace_id == f"{rctx.trace_id:032x}"
    assert (top.start_ns, top.end_ns) == (S0, S0 + 10 * MS)
    assert top.attributes["specdec.round"] == 4 and top.attributes["specdec.tree_nodes"] == 9
    assert top.attributes["specdec.head_ms"] == 5.0
    assert top.attributes["specdec.lm_head_ms"] == 2.0
    assert top.attributes["specdec.tree_ms"] == 3.0
    children = sorted((s for s in spans if s.parent_id == top.span_id), key=lambda s: s.start_ns)
    assert [(c.name, c.start_ns - S0, c.end_ns - S0) for c in children] == [
        (tr.DRAFTER_LM_HEAD, 1 * MS, 2 * MS),
        (tr.DRAFTER_HEAD, 2 * MS, 5 * MS),
        (tr.DRAFTER_LM_HEAD, 5 * MS, 6 * MS),
        (tr.DRAFTER_HEAD, 6 * MS, 8 * MS),
        (tr.DRAFTER_TREE, 8 * MS, 10 * MS),  # from the last call to the round's end
    ]
    get = m.registry.get_sample_value
    assert get("coralline:drafter_proposals_total") == 1
    assert get("coralline:drafter_proposal_nodes_total") == 9
    assert get("coralline:drafter_round_seconds_sum") == pytest.approx(0.010)
    assert get("coralline:drafter_head_seconds_sum") == pytest.approx(0.005)
    assert get("coralline:drafter_lm_head_seconds_sum") == pytest.approx(0.002)
    assert get("coralline:drafter_tree_seconds_sum") == pytest.approx(0.003)


def test_drafter_round_without_a_timeline():
    """A drafter that records no phases: one span, no children, no phase histograms."""
    t, exp = Tracing.in_memory("coralline-drafter")
    m = DrafterMetrics()
    record_round(
        t,
        m,
        parent=None,
        start_ns=S0,
        t0=0,
        t1=4 * MS,
        timeline=None,
        attributes={"specdec.tree_nodes": 3},
    )
    (span,) = _spans(exp)
    assert span.name == tr.DRAFTER_ROUND and span.parent_id == ""
    assert (span.start_ns, span.end_ns) == (S0, S0 + 4 * MS)
    assert "specdec.head_ms" not in span.attributes
    get = m.registry.get_sample_value
    assert get("coralline:drafter_proposals_total") == 1
    assert get("coralline:drafter_proposal_nodes_total") == 3
    assert get("coralline:drafter_head_seconds_count") == 0
    assert get("coralline:drafter_round_seconds_count") == 1
    # tracing off: metrics still counted, no span
    record_round(
        Tracing.disabled(),
        m,
        parent=None,
        start_ns=S0,
        t0=0,
        t1=MS,
        timeline=[("head", 0, MS)],
        attributes={},
    )
    assert len(exp.get_finished_spans()) == 1
    assert get("coralline:drafter_proposals_total") == 2
    assert get("coralline:drafter_head_seconds_count") == 1


# ---------------------------------------------------------------------- /metrics
def test_metrics_endpoint_serves_text_format_with_colons_to_openmetrics_scrapers():
    m = VerifierMetrics(running=lambda: 3)
    m.rounds.inc(4)
    server, port = serve_metrics(m.registry)
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            content_type = resp.headers["Content-Type"]
            body = resp.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert content_type.startswith("text/plain") and "version=0.0.4" in content_type
    lines = body.splitlines()
    assert "coralline:rounds_total 4.0" in lines
    assert "coralline:num_requests_running 3.0" in lines
    assert "# TYPE coralline:rounds_total counter" in lines
    samples = [ln for ln in lines if ln and not ln.startswith("#")]
    assert samples and all(ln.startswith("coralline:") for ln in samples)
    assert "# EOF" not in lines  # not OpenMetrics
