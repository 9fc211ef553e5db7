"""An in-process OTLP/gRPC trace receiver: what `coralline serve` points its workers at.

Each export is decoded into Spans and handed to `on_spans` (the live view's store); it can also
be appended to an OTLP/JSON-lines file (what `coralline trace-report` reads) and forwarded
unchanged to another collector (the user's own OTEL_EXPORTER_OTLP_ENDPOINT), so the live view
never takes traces away from a real backend.

Knows nothing about coralline's spans.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from coralline.telemetry.spans import Span, from_otlp_request, to_otlp_json

log = logging.getLogger("coralline.telemetry")


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(self, request, context):
        try:
            self.receiver.received(request)
        except Exception:  # a bad export never stops the receiver
            log.exception("OTLP export could not be handled")
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    def __init__(
        self,
        on_spans: Callable[[list[Span]], None],
        host: str = "127.0.0.1",
        port: int = 0,
        file: str | Path | None = None,  # append each export as one OTLP/JSON line
        forward: str | None = None,  # host:port (or http://host:port) of another collector
    ) -> None:
        self.on_spans = on_spans
        self.host, self.port = host, port
        self.file = Path(file) if file else None
        self._file_lock = threading.Lock()
        self._forward = None
        if forward:
            target = forward.removeprefix("http://").removeprefix("https://").rstrip("/")
            self._forward_pool = ThreadPoolExecutor(1, thread_name_prefix="otlp-forward")
            self._forward = trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(target))
        self.server = None
        self.endpoint = ""
        self.spans = 0  # received so far

    def start(self) -> str:
        """Bind and serve; returns the endpoint for OTEL_EXPORTER_OTLP_TRACES_ENDPOINT."""
        self.server = grpc.server(ThreadPoolExecutor(2, thread_name_prefix="otlp"))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(self), self.server)
        port = self.server.add_insecure_port(f"{self.host}:{self.port}")
        if port == 0:
            raise OSError(f"cannot bind {self.host}:{self.port}")
        self.server.start()
        self.endpoint = f"http://{self.host}:{port}"
        return self.endpoint

    def received(self, request) -> None:
        spans = from_otlp_request(request)
        self.spans += len(spans)
        self.on_spans(spans)
        if self.file is not None and spans:
            line = json.dumps(to_otlp_json(spans), separators=(",", ":"))
            with self._file_lock, self.file.open("a") as f:
                f.write(line + "\n")
        if self._forward is not None:
            self._forward_pool.submit(self._send, request)

    def _send(self, request) -> None:
        try:
            self._forward.Export(request, timeout=10)
        except grpc.RpcError as e:
            log.warning("forwarding spans failed: %s", e.code().name)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(1).wait(5)
            self.server = None
