"""An in-process OTLP trace receiver: what `coralline serve` points its services at.

Each export is decoded into Spans and handed to `on_spans` (the live view's store); it can also
be appended to an OTLP/JSON-lines file (what `coralline trace-report` reads) and forwarded
unchanged to another collector (the user's own OTEL_EXPORTER_OTLP_ENDPOINT), so the live view
never takes traces away from a real backend.

Two transports:
  http (the default): OTLP/HTTP, `POST /v1/traces` with protobuf (optionally gzip) or OTLP/JSON
       bodies, on a stdlib HTTP server. `coralline serve` uses it because the process forks
       (its workers, Ray's raylet) after the receiver starts, and a gRPC server's poller threads
       in a forking process made children die before exec (gRPC's fork handlers are skipped
       while its threads are busy: seen as "epoll_wait error: Bad file descriptor" and a
       raylet that never started).
  grpc: OTLP/gRPC (TraceService/Export), for a process that forks nothing afterwards (tests).
Forwarding opens its connection lazily, at the first export.

Knows nothing about coralline's spans.
"""

from __future__ import annotations

import gzip
import json
import logging
import threading
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from coralline.telemetry.spans import Span, from_otlp_json, from_otlp_request, to_otlp_json

log = logging.getLogger("coralline.telemetry")

TRANSPORTS = ("http", "grpc")
MAX_BODY = 64 << 20  # bytes of one export


def _request_type():
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    return trace_service_pb2


class _Handler(BaseHTTPRequestHandler):
    receiver: OtlpReceiver  # set on the subclass made per receiver
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:
        log.debug("otlp http: " + format, *args)

    def _reply(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/traces":
            self._reply(HTTPStatus.NOT_FOUND, b"only /v1/traces", "text/plain")
            return
        size = int(self.headers.get("Content-Length") or 0)
        if not 0 < size <= MAX_BODY:
            self._reply(HTTPStatus.BAD_REQUEST, b"a body of 1 B .. 64 MiB", "text/plain")
            return
        body = self.rfile.read(size)
        try:
            if self.headers.get("Content-Encoding", "").lower() == "gzip":
                body = gzip.decompress(body)
            pb = _request_type()
            if "json" in self.headers.get("Content-Type", ""):
                self.receiver.received_json(json.loads(body))
                self._reply(HTTPStatus.OK, b"{}", "application/json")
            else:
                self.receiver.received(pb.ExportTraceServiceRequest.FromString(body))
                out = pb.ExportTraceServiceResponse().SerializeToString()
                self._reply(HTTPStatus.OK, out, "application/x-protobuf")
        except Exception as e:  # a bad export never stops the receiver
            log.warning("bad OTLP export: %s: %s", type(e).__name__, e)
            self._reply(HTTPStatus.BAD_REQUEST, f"bad export: {e}".encode(), "text/plain")


class OtlpReceiver:
    def __init__(
        self,
        on_spans: Callable[[list[Span]], None],
        host: str = "127.0.0.1",
        port: int = 0,
        file: str | Path | None = None,  # append each export as one OTLP/JSON line
        forward: str | None = None,  # another collector: host:port / http://host:port (gRPC)
        forward_protocol: str = "grpc",  # or http/protobuf (forward = its base URL)
        transport: str = "http",
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if forward_protocol not in ("grpc", "http/protobuf"):
            raise ValueError("forward_protocol must be grpc or http/protobuf")
        self.on_spans = on_spans
        self.host, self.port, self.transport = host, port, transport
        self.file = Path(file) if file else None
        self._file_lock = threading.Lock()
        self.forward, self.forward_protocol = forward, forward_protocol
        self._forward_pool = ThreadPoolExecutor(1, thread_name_prefix="otlp-forward")
        self._stub = None
        self._server = None
        self.endpoint = ""  # for OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (with the protocol below)
        self.protocol = "http/protobuf" if transport == "http" else "grpc"
        self.spans = 0  # received so far

    def start(self) -> str:
        """Bind and serve in background threads; returns `endpoint`."""
        if self.transport == "http":
            handler = type("Handler", (_Handler,), {"receiver": self})
            self._server = ThreadingHTTPServer((self.host, self.port), handler)
            self._server.daemon_threads = True
            threading.Thread(
                target=self._server.serve_forever, name="otlp-http", daemon=True
            ).start()
            port = self._server.server_address[1]
            self.endpoint = f"http://{self.host}:{port}/v1/traces"
        else:
            import grpc
            from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

            receiver = self

            class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
                def Export(self, request, context):
                    try:
                        receiver.received(request)
                    except Exception:
                        log.exception("OTLP export could not be handled")
                    return _request_type().ExportTraceServiceResponse()

            self._server = grpc.server(ThreadPoolExecutor(2, thread_name_prefix="otlp"))
            trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self._server)
            port = self._server.add_insecure_port(f"{self.host}:{self.port}")
            if port == 0:
                raise OSError(f"cannot bind {self.host}:{self.port}")
            self._server.start()
            self.endpoint = f"http://{self.host}:{port}"
        return self.endpoint

    # ------------------------------------------------------------------ exports
    def received(self, request) -> None:
        """An ExportTraceServiceRequest (protobuf)."""
        spans = from_otlp_request(request)
        self._deliver(spans)
        if self.forward:
            self._forward_pool.submit(self._send, request)

    def received_json(self, obj: dict) -> None:
        spans = from_otlp_json(obj)
        self._deliver(spans)
        if self.forward and spans:
            self._forward_pool.submit(self._send_json, obj)

    def _deliver(self, spans: list[Span]) -> None:
        self.spans += len(spans)
        self.on_spans(spans)
        if self.file is not None and spans:
            line = json.dumps(to_otlp_json(spans), separators=(",", ":"))
            with self._file_lock, self.file.open("a") as f:
                f.write(line + "\n")

    # ------------------------------------------------------------------ forwarding
    def _send(self, request) -> None:
        try:
            if self.forward_protocol == "grpc":
                self._grpc_stub().Export(request, timeout=10)
            else:
                self._post(request.SerializeToString(), "application/x-protobuf")
        except Exception as e:
            log.warning("forwarding spans to %s failed: %s", self.forward, e)

    def _send_json(self, obj: dict) -> None:
        try:
            if self.forward_protocol == "grpc":
                from google.protobuf import json_format

                pb = _request_type().ExportTraceServiceRequest()
                json_format.ParseDict(_proto_json(obj), pb)
                self._grpc_stub().Export(pb, timeout=10)
            else:
                self._post(json.dumps(obj).encode(), "application/json")
        except Exception as e:
            log.warning("forwarding spans to %s failed: %s", self.forward, e)

    def _grpc_stub(self):
        if self._stub is None:
            import grpc
            from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

            target = self.forward.removeprefix("http://").removeprefix("https://").rstrip("/")
            self._stub = trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(target))
        return self._stub

    def _post(self, body: bytes, ctype: str) -> None:
        url = self.forward.rstrip("/")
        if not url.endswith("/v1/traces"):
            url += "/v1/traces"
        req = urllib.request.Request(url, body, {"Content-Type": ctype}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()

    def stop(self) -> None:
        if self._server is None:
            return
        if self.transport == "http":
            self._server.shutdown()
            self._server.server_close()
        else:
            self._server.stop(1).wait(5)
        self._server = None
        self._forward_pool.shutdown(wait=False, cancel_futures=True)


def _proto_json(obj: dict) -> dict:
    """OTLP/JSON (hex ids) to protobuf's JSON mapping (base64 bytes)."""
    import base64

    def b64(h: str) -> str:
        return base64.b64encode(bytes.fromhex(h)).decode() if h else ""

    out = json.loads(json.dumps(obj))
    for rs in out.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for s in ss.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in s:
                        s[key] = b64(s[key])
    return out
