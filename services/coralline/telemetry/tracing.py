"""OpenTelemetry tracing for the services: configured from the standard `OTEL_*` variables, off by
default, and free when off (callers test `tracing.enabled` before building any span).

On when any of these is set (and `OTEL_SDK_DISABLED` is not `true`):
  OTEL_TRACES_EXPORTER            otlp (the default exporter), console, or a comma list; none = off
  OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT   e.g. http://collector:4317
The rest is read by the SDK and the exporter as usual: OTEL_SERVICE_NAME (default
coralline-router / -verifier / -drafter), OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER (+ _ARG;
default parentbased_always_on), OTEL_EXPORTER_OTLP_PROTOCOL (grpc, the default, or
http/protobuf), OTEL_EXPORTER_OTLP_HEADERS, OTEL_EXPORTER_OTLP_INSECURE, OTEL_BSP_* (batching).
`coralline serve` adds its own span processor (the live view) and points its workers at its
in-process OTLP receiver.

One trace per request across processes: the router's `chat {model}` span (GenAI conventions)
-> a CLIENT span per verifier attempt -> the verifier's SERVER span (W3C context in the gRPC
metadata) -> one `verifier.round` span per round -> the drafter's `drafter.round` (context in
the Open / Commit message's `trace_context` field: a bidirectional stream carries metadata only
once). The names below are the contract the live view, `coralline trace-report` and the
dashboards read.

Knows nothing about the services: they call it with their numbers.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping

import coralline

# span names (kinds: SERVER for a service's request, CLIENT for an outgoing call)
ROUTER_PLACE = "router.place"
VERIFIER_RPC = "coralline.v1.VerifierService/Generate"  # CLIENT in the router, SERVER in verifier
GENERATION_RPC = "coralline.v1.Generation/Generate"  # the verifier's own public API (SERVER)
VERIFIER_PREFILL = "verifier.prefill"
VERIFIER_ROUND = "verifier.round"
DRAFT_WAIT = "verifier.draft_wait"  # the proposal: network + drafting, as the verifier saw it
TARGET_FORWARD = "verifier.target_forward"
VERIFY = "verifier.verify"  # warping + traversal verification
KV_COMMIT = "verifier.kv_commit"
DRAFTER_RPC = "coralline.v1.DrafterService/Draft"  # one SERVER span per stream
DRAFTER_ROUND = "drafter.round"  # child of the verifier's round span
DRAFTER_HEAD = "drafter.head"  # one per draft-head forward
DRAFTER_LM_HEAD = "drafter.lm_head"  # one per LM-head call
DRAFTER_TREE = "drafter.tree"  # the tree selection after the last head call

SERVICES = {"router": "coralline-router", "verifier": "coralline-verifier",
            "drafter": "coralline-drafter"}  # fmt: skip


def request_span_name(operation: str, model: str) -> str:
    """GenAI convention: `{gen_ai.operation.name} {gen_ai.request.model}`."""
    return f"{operation} {model}"


def genai_request_attributes(operation: str, model: str, params) -> dict:
    """gen_ai.request.* of a SamplingParams (max_tokens = max_new_tokens)."""
    attrs = {
        "gen_ai.operation.name": operation,
        "gen_ai.request.model": model,
        "gen_ai.request.temperature": float(params.temperature),
        "gen_ai.request.top_p": float(params.top_p),
        "gen_ai.request.max_tokens": int(params.max_new_tokens),
    }
    if params.top_k:
        attrs["gen_ai.request.top_k"] = int(params.top_k)
    if params.seed is not None:
        attrs["gen_ai.request.seed"] = int(params.seed)
    return attrs


def env_enabled(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def _exporters(env: Mapping[str, str]) -> list:
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",")]
    out = []
    for name in filter(None, names):
        if name == "otlp":
            var = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
            if var not in env:
                var = "OTEL_EXPORTER_OTLP_PROTOCOL"
            protocol = env.get(var, "grpc")
            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            elif protocol == "http/protobuf":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            else:
                raise ValueError(f"{var}={protocol!r}: use grpc or http/protobuf")
            out.append(OTLPSpanExporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            out.append(ConsoleSpanExporter())
        elif name != "none":
            raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (otlp, console)")
    return out


class Tracing:
    """A service's tracer. `enabled` False (the default): no provider, no spans, no cost."""

    def __init__(self, provider=None) -> None:
        self.provider = provider
        self.enabled = provider is not None
        self.tracer = provider.get_tracer("coralline", coralline.__version__) if provider else None
        if self.enabled:
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )

            self._propagator = TraceContextTextMapPropagator()

    # ------------------------------------------------------------------ construction
    @classmethod
    def disabled(cls) -> Tracing:
        return cls(None)

    @classmethod
    def from_env(cls, service: str, processors: Iterable = ()) -> Tracing:
        """Exporters from the OTEL_* variables (batched), plus `processors` (span processors
        of the caller's, e.g. the live view's). Off when neither applies."""
        if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls.disabled()  # the SDK would hand out a no-op tracer anyway
        processors = list(processors)
        exporters = _exporters(os.environ) if env_enabled() else []
        if not exporters and not processors:
            return cls.disabled()
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        return cls.with_processors(
            service, [*processors, *(BatchSpanProcessor(e) for e in exporters)]
        )

    @classmethod
    def with_processors(cls, service: str, processors: Iterable) -> Tracing:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        attrs = {
            "service.namespace": "coralline",
            "service.version": coralline.__version__,
            "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
        }
        resource = Resource.create(attrs)  # + OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": service}))  # our default
        provider = TracerProvider(resource=resource)
        for p in processors:
            provider.add_span_processor(p)
        return cls(provider)

    @classmethod
    def in_memory(cls, service: str):
        """(Tracing, InMemorySpanExporter) with synchronous export: for tests."""
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        exporter = InMemorySpanExporter()
        return cls.with_processors(service, [SimpleSpanProcessor(exporter)]), exporter

    def shutdown(self) -> None:
        """Flush and stop the exporters (end of the process)."""
        if self.provider is not None:
            self.provider.shutdown()

    # ------------------------------------------------------------------ spans
    def start(
        self,
        name: str,
        parent=None,
        kind: str = "INTERNAL",
        attributes: Mapping | None = None,
        start_ns: int | None = None,
    ):
        """Start a span. parent: a span, a Context, a W3C carrier (dict / gRPC metadata), or
        None (a new trace)."""
        from opentelemetry.trace import SpanKind

        return self.tracer.start_span(
            name,
            context=self._context(parent),
            kind=SpanKind[kind],
            attributes=dict(attributes or {}),
            start_time=start_ns,
        )

    def record(self, name: str, parent, start_ns: int, end_ns: int, attributes=None) -> None:
        """A finished child span with the given times (phases measured without OTel)."""
        span = self.start(name, parent, attributes=attributes, start_ns=start_ns)
        span.end(end_time=max(end_ns, start_ns))

    def carrier(self, span) -> dict[str, str]:
        """The W3C trace context (traceparent, tracestate) of a span, for a message or
        metadata."""
        out: dict[str, str] = {}
        self._propagator.inject(out, context=self._context(span))
        return out

    def metadata(self, span) -> tuple[tuple[str, str], ...]:
        return tuple(self.carrier(span).items())

    def _context(self, parent):
        from opentelemetry import trace
        from opentelemetry.context import Context

        if parent is None or isinstance(parent, Context):
            return parent
        if isinstance(parent, trace.Span):
            return trace.set_span_in_context(parent)
        if not isinstance(parent, Mapping):  # gRPC metadata: a sequence of (key, value)
            parent = {k: v for k, v in parent if isinstance(v, str)}
        return self._propagator.extract(parent) if parent else None


def carrier_of_metadata(metadata) -> dict[str, str]:
    """traceparent / tracestate of gRPC invocation metadata ({} when absent)."""
    if not metadata:
        return {}
    return {k: v for k, v in metadata if k in ("traceparent", "tracestate") and isinstance(v, str)}


def set_error(span, error: BaseException | str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, str(error)))
    if isinstance(error, BaseException):
        span.record_exception(error)
