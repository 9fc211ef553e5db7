"""Spans as plain data, and their OTLP encodings (protobuf and JSON).

One `Span` type serves everything that reads traces here: the live view's store (fed by the
in-process OTLP receiver or span processor), `coralline trace-report` (OTLP JSON files) and the
tests. The OTLP/JSON encoding follows the OTLP specification (not protobuf's default JSON
mapping): trace and span ids are lowercase hex, 64-bit integers are decimal strings, enums are
integers. What the OpenTelemetry Collector's file exporter writes (one
ExportTraceServiceRequest per line) reads back here, and `to_otlp_json` writes that shape.

Knows nothing about coralline's span names: see tracing.py for those.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER")  # OTLP numbers
STATUSES = ("UNSET", "OK", "ERROR")


@dataclass(frozen=True)
class Span:
    trace_id: str  # 32 lowercase hex digits
    span_id: str  # 16 lowercase hex digits
    parent_id: str  # "" for a root span
    name: str
    service: str  # the resource's service.name
    start_ns: int  # Unix epoch nanoseconds
    end_ns: int
    attributes: dict = field(default_factory=dict)  # str -> str | int | float | bool | list
    kind: str = "INTERNAL"  # one of KINDS
    status: str = "UNSET"  # one of STATUSES
    status_message: str = ""

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    def to_dict(self) -> dict:
        """JSON-ready (the live view's API)."""
        return {
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_id": self.parent_id,
            "name": self.name,
            "service": self.service,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "duration_ms": round(self.duration_ms, 3),
            "attributes": self.attributes,
            "kind": self.kind,
            "status": self.status,
            "status_message": self.status_message,
        }


# ---------------------------------------------------------------------- protobuf (OTLP/gRPC)
def _value_pb(v) -> object:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value_pb(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value_pb(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def _attrs_pb(attrs) -> dict:
    return {kv.key: _value_pb(kv.value) for kv in attrs}


def from_otlp_request(request) -> list[Span]:
    """The spans of an opentelemetry.proto ExportTraceServiceRequest."""
    out = []
    for rs in request.resource_spans:
        service = str(_attrs_pb(rs.resource.attributes).get("service.name", "unknown_service"))
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    Span(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(),
                        name=s.name,
                        service=service,
                        start_ns=int(s.start_time_unix_nano),
                        end_ns=int(s.end_time_unix_nano),
                        attributes=_attrs_pb(s.attributes),
                        kind=KINDS[s.kind] if 0 <= s.kind < len(KINDS) else "UNSPECIFIED",
                        status=STATUSES[s.status.code] if s.status.code < 3 else "UNSET",
                        status_message=s.status.message,
                    )
                )
    return out


# ---------------------------------------------------------------------- SDK spans
def from_sdk(span) -> Span:
    """A finished opentelemetry.sdk ReadableSpan (span processors, InMemorySpanExporter)."""
    ctx = span.context
    parent = span.parent
    return Span(
        trace_id=f"{ctx.trace_id:032x}",
        span_id=f"{ctx.span_id:016x}",
        parent_id=f"{parent.span_id:016x}" if parent is not None else "",
        name=span.name,
        service=str(span.resource.attributes.get("service.name", "unknown_service")),
        start_ns=int(span.start_time or 0),
        end_ns=int(span.end_time or 0),
        attributes={k: list(v) if isinstance(v, tuple) else v for k, v in span.attributes.items()},
        kind=span.kind.name,
        status=span.status.status_code.name,
        status_message=span.status.description or "",
    )


# ---------------------------------------------------------------------- OTLP/JSON
def _value_json(v: dict) -> object:
    if not v:
        return None
    (kind, x), *_ = v.items()
    if kind == "intValue":
        return int(x)
    if kind == "doubleValue":
        return float(x)
    if kind == "arrayValue":
        return [_value_json(e) for e in x.get("values", [])]
    if kind == "kvlistValue":
        return {kv["key"]: _value_json(kv.get("value", {})) for kv in x.get("values", [])}
    return x  # stringValue, boolValue, bytesValue (base64 text)


def _attrs_json(attrs: list | None) -> dict:
    return {kv["key"]: _value_json(kv.get("value", {})) for kv in attrs or []}


def _enum(value, names: tuple[str, ...], prefix: str) -> str:
    if isinstance(value, str):  # some writers spell enums by name
        name = value.removeprefix(prefix)
        return name if name in names else names[0]
    value = int(value or 0)
    return names[value] if 0 <= value < len(names) else names[0]


def from_otlp_json(obj: dict) -> list[Span]:
    """The spans of one ExportTraceServiceRequest in OTLP/JSON."""
    if not isinstance(obj, dict) or "resourceSpans" not in obj:
        raise ValueError("not an OTLP trace export: no 'resourceSpans'")
    out = []
    for rs in obj["resourceSpans"] or []:
        res = _attrs_json((rs.get("resource") or {}).get("attributes"))
        service = str(res.get("service.name", "unknown_service"))
        for ss in rs.get("scopeSpans") or []:
            for s in ss.get("spans") or []:
                status = s.get("status") or {}
                out.append(
                    Span(
                        trace_id=str(s["traceId"]).lower(),
                        span_id=str(s["spanId"]).lower(),
                        parent_id=str(s.get("parentSpanId") or "").lower(),
                        name=str(s.get("name", "")),
                        service=service,
                        start_ns=int(s.get("startTimeUnixNano", 0)),
                        end_ns=int(s.get("endTimeUnixNano", 0)),
                        attributes=_attrs_json(s.get("attributes")),
                        kind=_enum(s.get("kind", 0), KINDS, "SPAN_KIND_"),
                        status=_enum(status.get("code", 0), STATUSES, "STATUS_CODE_"),
                        status_message=str(status.get("message", "")),
                    )
                )
    return out


def read_otlp_json(path: str | Path) -> list[Span]:
    """Spans of a file holding one OTLP/JSON export, or one per line (JSON lines)."""
    text = Path(path).read_text()
    try:
        return from_otlp_json(json.loads(text))
    except json.JSONDecodeError:
        pass
    spans = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                spans.extend(from_otlp_json(json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e}") from None
    return spans


def _json_value(v) -> dict:
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        return {"doubleValue": v}
    if isinstance(v, list | tuple):
        return {"arrayValue": {"values": [_json_value(x) for x in v]}}
    return {"stringValue": str(v)}


def _json_attrs(attrs: dict) -> list[dict]:
    return [{"key": k, "value": _json_value(v)} for k, v in attrs.items()]


def to_otlp_json(spans: Iterable[Span]) -> dict:
    """One ExportTraceServiceRequest in OTLP/JSON (a resource per service)."""
    by_service: dict[str, list[dict]] = {}
    for s in spans:
        span = {
            "traceId": s.trace_id,
            "spanId": s.span_id,
            "name": s.name,
            "kind": KINDS.index(s.kind) if s.kind in KINDS else 0,
            "startTimeUnixNano": str(s.start_ns),
            "endTimeUnixNano": str(s.end_ns),
            "attributes": _json_attrs(s.attributes),
            "status": {"code": STATUSES.index(s.status) if s.status in STATUSES else 0},
        }
        if s.parent_id:
            span["parentSpanId"] = s.parent_id
        if s.status_message:
            span["status"]["message"] = s.status_message
        by_service.setdefault(s.service, []).append(span)
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": _json_attrs({"service.name": svc})},
                "scopeSpans": [{"scope": {"name": "coralline"}, "spans": spans}],
            }
            for svc, spans in by_service.items()
        ]
    }


def by_trace(spans: Iterable[Span]) -> Iterator[tuple[str, list[Span]]]:
    """(trace id, its spans by start time), traces in order of their first span."""
    groups: dict[str, list[Span]] = {}
    for s in spans:
        groups.setdefault(s.trace_id, []).append(s)
    for tid, group in sorted(groups.items(), key=lambda kv: min(s.start_ns for s in kv[1])):
        yield tid, sorted(group, key=lambda s: (s.start_ns, s.end_ns))


def root_of(spans: list[Span]) -> Span | None:
    """The earliest (then longest) span whose parent is not in the trace: the request's root,
    or the top of what has arrived so far of a trace still growing; None for no spans."""
    ids = {s.span_id for s in spans}
    tops = [s for s in spans if not s.parent_id or s.parent_id not in ids] or spans
    return min(tops, key=lambda s: (s.start_ns, -s.end_ns)) if tops else None


def first_attr(root: Span | None, spans: Iterable[Span], key: str) -> object:
    """The root's value of an attribute, else the first span's (in the given order) that has
    it, else None."""
    if root is not None and key in root.attributes:
        return root.attributes[key]
    return next((s.attributes[key] for s in spans if key in s.attributes), None)
