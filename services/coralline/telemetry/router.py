"""A router request's spans: the GenAI `chat {model}` / `text_completion {model}` SERVER span
(the request's root unless the client sent a trace context), a `router.place` span per
placement and a CLIENT span per verifier attempt, whose context goes to the verifier in the
call's metadata. A failover shows as a second placement and a second CLIENT span.

Knows nothing about placement or the store: the router hands it what happened.
"""

from __future__ import annotations

import time

from coralline.telemetry import tracing as tr
from coralline.telemetry.tracing import Tracing


def operation(request) -> str:
    """GenAI operation of a GenerateRequest: chat (text through the chat template) or
    text_completion (raw text or token ids)."""
    if request.WhichOneof("prompt") == "text":
        chat = request.chat_template if request.HasField("chat_template") else True
        return "chat" if chat else "text_completion"
    return "text_completion"


class RequestTrace:
    def __init__(self, tracing: Tracing, request, model: str, parent) -> None:
        self.tracing = tracing
        self.model = model
        self.op = operation(request)
        self.span = tracing.start(
            tr.request_span_name(self.op, model),
            parent,
            "SERVER",
            {"gen_ai.operation.name": self.op, "gen_ai.request.model": model},
        )

    def begun(self, session_id: str, params, prompt_tokens: int) -> None:
        attrs = tr.genai_request_attributes(self.op, self.model, params)
        attrs["specdec.session_id"] = session_id
        attrs["gen_ai.usage.input_tokens"] = prompt_tokens
        self.span.set_attributes(attrs)

    def placed(self, start_ns: int, placement, attempt: int) -> None:
        attrs = {"specdec.verifier": placement.verifier.address, "specdec.attempt": attempt}
        if placement.drafter is not None:
            attrs["specdec.drafter_endpoint"] = placement.drafter.address
        if placement.reason:
            attrs["specdec.placement_reason"] = placement.reason
        self.tracing.record(tr.ROUTER_PLACE, self.span, start_ns, time.time_ns(), attrs)

    def call(self, address: str, attempt: int):
        """(CLIENT span, gRPC metadata carrying it) of one verifier attempt."""
        span = self.tracing.start(
            tr.VERIFIER_RPC,
            self.span,
            "CLIENT",
            {
                "rpc.system": "grpc",
                "rpc.service": "coralline.v1.VerifierService",
                "rpc.method": "Generate",
                "server.address": address,
                "specdec.attempt": attempt,
            },
        )
        return span, self.tracing.metadata(span)

    def call_done(self, span, error: BaseException | None = None) -> None:
        if error is not None:
            tr.set_error(span, error)
        span.end()

    def end(self, turn, state: str, summary, error: BaseException | None) -> None:
        attrs = {"specdec.outcome": state}
        if turn is not None:
            attrs["gen_ai.usage.output_tokens"] = len(turn.ids)
            attrs["specdec.rounds"] = turn.rounds
            attrs["specdec.failovers"] = turn.failovers
            if turn.rounds:
                attrs["specdec.acceptance_length"] = round(1.0 + turn.accepted / turn.rounds, 4)
            elapsed = time.perf_counter() - turn.started
            if elapsed > 0:
                attrs["specdec.tokens_per_second"] = round(len(turn.ids) / elapsed, 3)
        if summary is not None:
            attrs["gen_ai.response.finish_reasons"] = [summary.finish_reason]
            attrs["specdec.drafter"] = summary.drafter
            attrs["specdec.verifier"] = summary.verifier
        self.span.set_attributes(attrs)
        if error is not None and state != "cancelled":
            tr.set_error(self.span, error)
        self.span.end()
