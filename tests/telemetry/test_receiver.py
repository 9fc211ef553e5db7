"""The OTLP receiver over both transports, with the real OTLP exporters: protobuf and JSON
bodies, bad exports (the receiver keeps serving), the JSON-lines file, and forwarding to
another collector."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from coralline.telemetry.receiver import OtlpReceiver
from coralline.telemetry.spans import Span, read_otlp_json, to_otlp_json
from coralline.telemetry.tracing import Tracing


class Sink:
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()

    def __call__(self, spans) -> None:
        with self.lock:
            self.spans.extend(spans)

    def wait(self, n: int, timeout: float = 10.0) -> list[Span]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.spans) >= n:
                    return list(self.spans)
            time.sleep(0.02)
        raise AssertionError(f"{len(self.spans)} spans arrived, expected {n}")


def _exporter(receiver: OtlpReceiver):
    if receiver.transport == "http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=receiver.endpoint)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True)


def _trace_two_spans(receiver: OtlpReceiver, service: str = "coralline-verifier") -> str:
    tracing = Tracing.with_processors(service, [SimpleSpanProcessor(_exporter(receiver))])
    root = tracing.start("root", kind="SERVER", attributes={"specdec.round": 3})
    tracing.record("child", root, 1_000, 2_000, {"specdec.accepted": 2})
    root.end()
    tracing.shutdown()
    return f"{root.get_span_context().trace_id:032x}"


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_exports_arrive_as_spans_and_in_the_file(tmp_path, transport):
    sink, path = Sink(), tmp_path / "spans.jsonl"
    receiver = OtlpReceiver(sink, file=path, transport=transport)
    receiver.start()
    try:
        trace_id = _trace_two_spans(receiver)
        spans = sink.wait(2)
    finally:
        receiver.stop()
    assert {s.name for s in spans} == {"root", "child"}
    assert {s.trace_id for s in spans} == {trace_id}
    assert all(s.service == "coralline-verifier" for s in spans)
    child = next(s for s in spans if s.name == "child")
    assert child.start_ns == 1_000 and child.attributes == {"specdec.accepted": 2}
    assert receiver.spans == 2
    assert sorted(s.name for s in read_otlp_json(path)) == ["child", "root"]


def test_http_takes_json_and_refuses_bad_exports_but_keeps_serving():
    sink = Sink()
    receiver = OtlpReceiver(sink)
    url = receiver.start()
    span = Span("ab" * 16, "cd" * 8, "", "j", "svc", 1, 2, {"k": 1})
    try:
        body = json.dumps(to_otlp_json([span])).encode()
        req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200
        for bad, ctype in [
            (b"\xff\x00garbage", "application/x-protobuf"),
            (b"{", "application/json"),
        ]:
            req = urllib.request.Request(url, bad, {"Content-Type": ctype})
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=5)
            assert err.value.code == 400
        wrong = urllib.request.Request(url.replace("/v1/traces", "/v1/logs"), b"x")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(wrong, timeout=5)
        assert err.value.code == 404
        _trace_two_spans(receiver)  # still serving
        spans = sink.wait(3)
    finally:
        receiver.stop()
    assert spans[0] == span and {s.name for s in spans[1:]} == {"root", "child"}


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_forwards_every_export_to_another_collector(protocol):
    downstream_sink = Sink()
    downstream = OtlpReceiver(downstream_sink, transport="grpc" if protocol == "grpc" else "http")
    target = downstream.start()
    local = Sink()
    receiver = OtlpReceiver(local, forward=target, forward_protocol=protocol)
    receiver.start()
    try:
        trace_id = _trace_two_spans(receiver)
        forwarded = downstream_sink.wait(2)
    finally:
        receiver.stop()
        downstream.stop()
    assert {s.trace_id for s in forwarded} == {trace_id}
    assert sorted(s.name for s in forwarded) == sorted(s.name for s in local.wait(2))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="transport"):
        OtlpReceiver(print, transport="udp")
    with pytest.raises(ValueError, match="forward_protocol"):
        OtlpReceiver(print, forward="x:1", forward_protocol="thrift")
