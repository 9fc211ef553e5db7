"""The live view of `coralline serve`: recent traces in memory and an HTTP server for them.

`SpanStore` keeps the spans of the most recent traces (fed by whatever receives spans: the OTLP
receiver's threads or a span processor) and summarises each trace on read: one line per request
(tokens, rounds, acceptance length, tokens/s). `LiveServer` serves a self-contained page
(static/live.html: the request table and a per-service timeline of the selected request), the
JSON API behind it, OTLP/JSON downloads for `coralline trace-report`, and optionally a
Prometheus `/metrics` registry and an HTTP service-discovery target list.

Knows the attribute names the services put on their spans (`specdec.*`, `gen_ai.*`) and that a
round is a `verifier.round` span; knows nothing about how spans arrive or what serve starts.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import logging
import math
import re
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from .spans import Span, first_attr, root_of, to_otlp_json

log = logging.getLogger("coralline.live")

ROUND = "verifier.round"
FAVICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    b'<rect x="1" y="3" width="9" height="3" fill="#4e79a7"/>'
    b'<rect x="4" y="7" width="11" height="3" fill="#f28e2b"/>'
    b'<rect x="6" y="11" width="6" height="3" fill="#59a14f"/></svg>'
)


# ---------------------------------------------------------------------- summaries
def _number(v) -> float | int | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return v if math.isfinite(v) else None


def _present(spans: list[Span], key: str) -> list[float | int]:
    """The attribute's numeric values over the spans that carry it."""
    values = (_number(s.attributes.get(key)) for s in spans)
    return [v for v in values if v is not None]


def summarize(spans: list[Span]) -> dict:
    """One request's line: the root's attributes first, then the earliest span's carrying
    them, derived from its `verifier.round` spans where no span has them."""
    root = root_of(spans)
    if root is None:
        raise ValueError("a trace has at least one span")
    by_start = sorted(spans, key=lambda s: (s.start_ns, -s.end_ns))

    def attr(key: str):
        """The root's value, else the earliest span's that has one (the verifier puts the
        request's totals on its own server span, under the router's root)."""
        return first_attr(root, by_start, key)

    rounds_spans = [s for s in spans if s.name == ROUND]
    rounds = _number(attr("specdec.rounds"))
    if rounds is None and rounds_spans:
        rounds = len(rounds_spans)
    accepted = _present(rounds_spans, "specdec.accepted")
    committed = _present(rounds_spans, "specdec.committed")
    tau = _number(attr("specdec.acceptance_length"))
    if tau is None and accepted:
        tau = round(1 + sum(accepted) / len(accepted), 3)
    out_tokens = _number(attr("gen_ai.usage.output_tokens"))
    if out_tokens is None and committed:
        out_tokens = sum(committed)
    tps = _number(attr("specdec.tokens_per_second"))
    root_s = (root.end_ns - root.start_ns) / 1e9
    if tps is None and out_tokens is not None and root_s > 0:
        tps = round(out_tokens / root_s, 2)
    finish = attr("gen_ai.response.finish_reasons")
    if isinstance(finish, list | tuple):
        finish = ",".join(str(f) for f in finish)
    start = min(s.start_ns for s in spans)
    session = attr("specdec.session_id")
    model = attr("gen_ai.request.model")
    return {
        "trace_id": root.trace_id,
        "start_ns": start,
        "duration_ms": round((max(s.end_ns for s in spans) - start) / 1e6, 3),
        "name": root.name,
        "services": sorted({s.service for s in spans}),
        "spans": len(spans),
        "session_id": None if session is None else str(session),
        "model": None if model is None else str(model),
        "input_tokens": _number(attr("gen_ai.usage.input_tokens")),
        "output_tokens": out_tokens,
        "finish_reason": None if finish is None else str(finish),
        "rounds": rounds,
        "acceptance_length": tau,
        "tokens_per_second": tps,
        "status": "ERROR" if any(s.status == "ERROR" for s in spans) else "OK",
    }


class SpanStore:
    """Recent traces in memory, thread-safe (spans arrive from OTLP receiver threads)."""

    def __init__(self, max_traces: int = 200) -> None:
        if max_traces < 1:
            raise ValueError(f"max_traces must be >= 1, not {max_traces}")
        self.max_traces = max_traces
        self._lock = threading.Lock()
        self._traces: OrderedDict[str, dict[str, Span]] = OrderedDict()  # by first arrival
        self._summaries: dict[str, dict] = {}  # cache, dropped for a trace on add

    def add(self, spans: Iterable[Span]) -> None:
        """Store spans (a span id seen again replaces the earlier copy); evicts the oldest
        traces beyond max_traces, oldest by first arrival."""
        with self._lock:
            for s in spans:
                self._traces.setdefault(s.trace_id, {})[s.span_id] = s
                self._summaries.pop(s.trace_id, None)
            while len(self._traces) > self.max_traces:
                tid, _ = self._traces.popitem(last=False)
                self._summaries.pop(tid, None)

    def traces(self, limit: int = 50) -> list[dict]:
        """Summaries of the newest `limit` traces, newest (by start time) first."""
        with self._lock:
            out = []
            for tid, group in self._traces.items():
                if tid not in self._summaries:
                    self._summaries[tid] = summarize(list(group.values()))
                out.append(self._summaries[tid])
        out.sort(key=lambda t: t["start_ns"], reverse=True)
        return out[: max(limit, 0)]

    def trace(self, trace_id: str) -> list[Span] | None:
        """The trace's spans sorted by start, or None when it is not (or no longer) stored."""
        with self._lock:
            group = self._traces.get(trace_id)
            spans = list(group.values()) if group is not None else None
        return None if spans is None else sorted(spans, key=lambda s: (s.start_ns, -s.end_ns))

    def spans(self) -> list[Span]:
        """Every stored span."""
        with self._lock:
            return [s for group in self._traces.values() for s in group.values()]


# ---------------------------------------------------------------------- HTTP
def _finite(obj):
    """JSON has no NaN or Infinity (the browser's JSON.parse rejects them): null instead."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _json_bytes(obj) -> bytes:
    try:
        text = json.dumps(obj, allow_nan=False, default=str)
    except ValueError:
        text = json.dumps(_finite(obj), default=str)
    return text.encode()


def _page() -> bytes:
    return (importlib.resources.files("coralline.telemetry") / "static" / "live.html").read_bytes()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # a connection per request: stop() ends them all

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, extra: dict | None = None) -> None:
        self._send(status, _json_bytes(obj), "application/json", extra)

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._json({"error": message, "status": int(status)}, int(status))

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        except Exception:
            log.exception("live view: %s failed", self.path)
            with contextlib.suppress(OSError):
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (see the log)")

    def _route(self) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        live = self.server.live
        store = live.store
        if not parts:
            self._send(200, _page(), "text/html; charset=utf-8")
        elif parts == ["favicon.ico"]:
            self._send(200, FAVICON, "image/svg+xml", {"Cache-Control": "max-age=86400"})
        elif parts == ["healthz"]:
            self._send(200, b"ok", "text/plain; charset=utf-8")
        elif parts == ["api", "traces"]:
            raw = parse_qs(url.query).get("limit", ["50"])[-1]
            try:
                limit = int(raw)
            except ValueError:
                return self._error(HTTPStatus.BAD_REQUEST, f"limit must be an integer: {raw!r}")
            self._json({"traces": store.traces(max(0, min(limit, store.max_traces)))})
        elif len(parts) in (3, 4) and parts[:2] == ["api", "traces"]:
            tid = parts[2].lower()
            spans = store.trace(tid)
            if spans is None:
                return self._error(HTTPStatus.NOT_FOUND, f"no trace {tid!r} is stored")
            if len(parts) == 3:
                body = {"trace_id": tid, "summary": summarize(spans)}
                self._json(body | {"spans": [s.to_dict() for s in spans]})
            elif parts[3] == "otlp":
                self._otlp(spans, f"trace-{re.sub(r'[^0-9a-zA-Z_-]', '', tid)[:64]}")
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such path: {url.path}")
        elif parts == ["api", "otlp"]:
            self._otlp(store.spans(), "coralline-traces")
        elif parts == ["metrics"] and live.registry is not None:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            self._send(200, generate_latest(live.registry), CONTENT_TYPE_LATEST)
        elif parts == ["prometheus", "targets"]:
            self._json(list(live.targets()) if live.targets is not None else [])
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such path: {url.path}")

    def _otlp(self, spans: list[Span], stem: str) -> None:
        disposition = f'attachment; filename="{stem}.otlp.json"'
        self._json(to_otlp_json(spans), extra={"Content-Disposition": disposition})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    live: LiveServer

    def handle_error(self, request, client_address) -> None:
        log.debug("live view: error serving %s", client_address, exc_info=True)


class LiveServer:
    """The live view's HTTP server, on a daemon thread (stdlib http.server)."""

    def __init__(
        self,
        store: SpanStore,
        host: str = "127.0.0.1",
        port: int = 0,
        registry=None,
        targets: Callable[[], list[dict]] | None = None,
    ) -> None:
        self.store = store
        self.host = host
        self.port = port
        self.registry = registry  # a prometheus_client CollectorRegistry, or None: no /metrics
        self.targets = targets  # Prometheus HTTP SD target groups, or None: []
        self.url = ""
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Bind and serve; returns the page's URL."""
        if self._httpd is not None:
            return self.url
        server_cls = _Server
        if ":" in self.host:
            server_cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        httpd = server_cls((self.host, self.port), _Handler)
        httpd.live = self
        self._httpd = httpd
        self.port = httpd.server_address[1]
        shown = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(self.host)
        shown = shown or (f"[{self.host}]" if ":" in self.host else self.host)
        self.url = f"http://{shown}:{self.port}/"
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="coralline-live",
            daemon=True,
        )
        self._thread.start()
        log.info("live view on %s", self.url)
        return self.url

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
