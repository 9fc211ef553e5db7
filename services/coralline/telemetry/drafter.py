"""A drafter round's telemetry: the `drafter.round` span (a child of the verifier's round span,
whose context came in the Open / Commit message) with one child per head forward and LM-head
call and the tree selection after them, and the round's Prometheus numbers.

The drafter records its phases as (phase, t0, t1) in perf_counter ns (CoralDrafter.timeline);
this converts them to epoch times with one clock reading per round.

Knows nothing about gRPC or the drafter's algorithm beyond the phase names.
"""

from __future__ import annotations

from coralline.telemetry import tracing as tr
from coralline.telemetry.metrics import DrafterMetrics
from coralline.telemetry.tracing import Tracing

_SPAN = {"head": tr.DRAFTER_HEAD, "lm_head": tr.DRAFTER_LM_HEAD}


def record_round(
    tracing: Tracing | None,
    metrics: DrafterMetrics | None,
    *,
    parent,  # the round's W3C carrier (from the message) or the stream span
    start_ns: int,  # epoch ns at the round's start
    t0: int,  # perf_counter ns at the round's start
    t1: int,  # perf_counter ns at its end
    timeline: list[tuple[str, int, int]] | None,
    attributes: dict,
) -> None:
    seconds = (t1 - t0) / 1e9
    head = lm = None
    if timeline is not None:
        head = sum(b - a for p, a, b in timeline if p == "head") / 1e9
        lm = sum(b - a for p, a, b in timeline if p == "lm_head") / 1e9
    if metrics is not None:
        metrics.proposal(seconds, int(attributes.get("specdec.tree_nodes", 1)), head, lm)
    if tracing is None or not tracing.enabled:
        return
    attrs = dict(attributes)
    if head is not None:
        attrs["specdec.head_ms"] = round(head * 1e3, 3)
        attrs["specdec.lm_head_ms"] = round(lm * 1e3, 3)
        attrs["specdec.tree_ms"] = round(max(seconds - head - lm, 0.0) * 1e3, 3)
    span = tracing.start(tr.DRAFTER_ROUND, parent, attributes=attrs, start_ns=start_ns)
    last = t0
    for phase, a, b in timeline or ():
        tracing.record(_SPAN.get(phase, f"drafter.{phase}"), span, start_ns + a - t0,
                       start_ns + b - t0)  # fmt: skip
        last = max(last, b)
    if timeline:
        tracing.record(tr.DRAFTER_TREE, span, start_ns + last - t0, start_ns + t1 - t0)
    span.end(end_time=start_ns + t1 - t0)
