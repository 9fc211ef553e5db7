"""A verifier session's telemetry: its request span, one span per round with a child per hop,
and the Prometheus numbers of each round.

The engine measures the phases (RoundStats: start_ns, draft / forward / accept / commit ms)
without knowing OTel; this turns them into spans after the round, with their real times. The
round span itself starts when the engine starts the round (Engine.on_round_start), so its
context reaches the drafter in that round's Commit before the drafter starts drafting.

Knows nothing about gRPC: the verifier service hands it what it saw.
"""

from __future__ import annotations

import time

from coralline.telemetry import tracing as tr
from coralline.telemetry.metrics import VerifierMetrics
from coralline.telemetry.tracing import Tracing


class SessionTelemetry:
    def __init__(
        self,
        tracing: Tracing | None,
        metrics: VerifierMetrics | None,
        *,
        rpc: str,  # the span name: tracing.VERIFIER_RPC or GENERATION_RPC
        parent,  # the caller's W3C carrier (gRPC metadata) or None
        attributes: dict,
        prompt_tokens: int,
    ) -> None:
        self.tracing = tracing if tracing is not None and tracing.enabled else None
        self.metrics = metrics
        self.t0 = time.perf_counter()
        self.prompt_tokens = prompt_tokens
        self.first = True
        self.span = self.round = None
        self.remote = None  # the session's RemoteDrafter (gets each round's trace context)
        if self.tracing is not None:
            self.span = self.tracing.start(rpc, parent, "SERVER", attributes)

    def named(self, session_id: str, drafter: str) -> None:
        """The session's id and drafter, once the verifier has resolved them."""
        if self.span is not None:
            self.span.set_attributes({"specdec.session_id": session_id, "specdec.drafter": drafter})

    # ------------------------------------------------------------------ rounds
    def round_started(self, number: int) -> None:
        """Engine.on_round_start (in the round's thread, before the proposal is asked for)."""
        if self.tracing is None or self.span is None:  # off, or the request has ended
            return
        self.round = self.tracing.start(tr.VERIFIER_ROUND, self.span, attributes={
            "specdec.round": number})  # fmt: skip
        if self.remote is not None:
            self.remote.trace_context = self.tracing.carrier(self.round)

    def round_done(self, stats, committed: int, wire, cached: int = 0) -> None:
        """After the engine yielded the round's chunk (stats: engine.RoundStats)."""
        drafter_ms = wire.drafter_ns / 1e6 if wire is not None and wire.drafter_ns else None
        if self.first:
            self.first = False
            if self.metrics is not None:
                self.metrics.request_started(self.prompt_tokens, cached)
                self.metrics.first_token(time.perf_counter() - self.t0)
        if self.metrics is not None:
            self.metrics.round_done(
                seconds=(time.time_ns() - stats.start_ns) / 1e9,
                committed=committed,
                tree_nodes=stats.tree_nodes,
                accepted=stats.accepted,
                speculative=stats.tree_nodes > 1,
                fallback=stats.fallback is not None,
                plain=stats.plain,
                draft_s=stats.draft_ms / 1e3,
                drafter_s=drafter_ms / 1e3 if drafter_ms is not None else None,
                forward_s=stats.forward_ms / 1e3,
                verify_s=stats.accept_ms / 1e3,
                commit_s=stats.commit_ms / 1e3,
                bytes_sent=wire.bytes_to if wire is not None else 0,
                bytes_received=wire.bytes_from if wire is not None else 0,
                prefill_s=stats.prefill_ms / 1e3,
            )
        span, self.round = self.round, None
        if span is None:
            return
        t = self.tracing
        s0 = stats.start_ns
        if stats.prefill_ms:
            attrs = {"specdec.prompt_tokens": self.prompt_tokens,
                     "specdec.cached_prompt_tokens": cached}  # fmt: skip
            t.record(tr.VERIFIER_PREFILL, self.span, s0 - int(stats.prefill_ms * 1e6), s0, attrs)
        edges = [s0]
        for ms in (stats.draft_ms, stats.forward_ms, stats.accept_ms, stats.commit_ms):
            edges.append(edges[-1] + int(ms * 1e6))
        for name, a, b in zip(
            (tr.DRAFT_WAIT, tr.TARGET_FORWARD, tr.VERIFY, tr.KV_COMMIT),
            edges,
            edges[1:],
            strict=False,
        ):
            t.record(name, span, a, b)
        attrs = {
            "specdec.tree_nodes": stats.tree_nodes,
            "specdec.tree_depth": stats.tree_depth,
            "specdec.accepted": stats.accepted,
            "specdec.committed": committed,
        }
        if stats.fallback is not None:
            attrs["specdec.fallback"] = stats.fallback
        if stats.plain:
            attrs["specdec.plain"] = True
        if wire is not None:
            attrs["specdec.bytes_sent"] = wire.bytes_to
            attrs["specdec.bytes_received"] = wire.bytes_from
        if drafter_ms is not None:
            attrs["specdec.drafter_ms"] = round(drafter_ms, 3)
            attrs["specdec.network_ms"] = round(max(stats.draft_ms - drafter_ms, 0.0), 3)
        span.set_attributes(attrs)
        span.end()

    # ------------------------------------------------------------------ the end
    def end(self, outcome: str, summary=None, error: BaseException | str | None = None) -> None:
        """outcome: finished / cancelled / failed / rejected (refused before it ran: bad
        request, full, draining); summary: engine.Summary when finished."""
        if self.round is not None:  # the round in flight when it was cancelled or failed
            self.round.end()
            self.round = None
        if self.metrics is not None:
            reason = summary.finish_reason if summary is not None else ""
            self.metrics.request_done(outcome, reason, time.perf_counter() - self.t0)
        if self.span is None:
            return
        if summary is not None:
            self.span.set_attributes({
                "gen_ai.usage.input_tokens": summary.prompt_tokens,
                "gen_ai.usage.output_tokens": summary.tokens,
                "gen_ai.response.finish_reasons": [summary.finish_reason],
                "specdec.rounds": summary.rounds,
                "specdec.acceptance_length": round(summary.acceptance_length, 4),
                "specdec.tokens_per_second": round(summary.tokens_per_second, 3),
                "specdec.cached_prompt_tokens": summary.cached_prompt_tokens,
                "specdec.fallback_rounds": summary.fallback_rounds,
                "specdec.plain_rounds": summary.plain_rounds,
                "specdec.drafter": summary.drafter,
                "specdec.verifier": summary.verifier,
                "gen_ai.request.seed": summary.seed,
            })  # fmt: skip
        if error is not None and outcome in ("failed", "rejected"):
            tr.set_error(self.span, error)
        self.span.set_attribute("specdec.outcome", outcome)
        self.span.end()
        self.span = None
