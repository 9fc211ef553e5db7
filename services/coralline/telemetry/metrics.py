"""Prometheus metrics of each service, served on an HTTP `/metrics` endpoint.

Names follow vLLM's where one exists (`vllm:` becomes `coralline:`), so dashboards and alerts
written for vLLM read ours: the speculative-decoding counters
`spec_decode_num_drafts / num_draft_tokens / num_accepted_tokens / num_accepted_tokens_per_pos`,
`time_to_first_token_seconds`, `time_per_output_token_seconds`, `e2e_request_latency_seconds`,
`num_requests_running / waiting`, `prompt_tokens`, `generation_tokens`, `request_success`.
What vLLM has no name for is ours: per-hop round latency, the drafter's phases, the router.

Formulas (PromQL over a window w):
  acceptance length (tau)  = 1 + rate(spec_decode_num_accepted_tokens_total[w])
                                 / rate(spec_decode_num_drafts_total[w])
  draft acceptance rate    = rate(num_accepted_tokens_total) / rate(num_draft_tokens_total)
  acceptance at depth d    = rate(num_accepted_tokens_per_pos_total{position="d-1"})
                                 / rate(num_drafts_total)  (the chance a round accepts >= d)
  tokens/s                 = rate(generation_tokens_total[w])
  network per round        = draft_wait - drafter time (coralline:draft_network_seconds)
A "draft" is a round that verified a drafter's proposal; rounds that verified the root alone
(no drafter, or a fallback) count in rounds_total but not in drafts, so tau here is the
speculating rounds' tau (Summary.acceptance_length averages over all rounds: the first one,
decoded in the prompt's forward, fallbacks and plain rounds included).

Each service owns a CollectorRegistry (several services in one test process never collide);
`serve_metrics` exposes one on 127.0.0.1 unless told otherwise. Recording costs a few
microseconds per round; a service without a metrics port records nothing (`metrics=None`).

Knows nothing about gRPC or the engine beyond the numbers it is handed.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

PREFIX = "coralline:"

# seconds; a CPU round is ~30-150 ms, a GPU round ~5-20 ms
STEP_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
    0.75, 1.0, 2.5, 5.0,
)  # fmt: skip
TTFT_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 40.0,
)  # fmt: skip
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0)
MAX_POSITIONS = 16  # accepted-per-position labels 0..15 (deeper acceptances count in 15)


def _c(registry, name, doc, labels=()):
    return Counter(PREFIX + name, doc, labels, registry=registry)


def _h(registry, name, doc, buckets=STEP_BUCKETS):
    return Histogram(PREFIX + name, doc, buckets=buckets, registry=registry)


def _g(registry, name, doc, fn: Callable[[], float] | None = None):
    g = Gauge(PREFIX + name, doc, registry=registry)
    if fn is not None:
        g.set_function(fn)
    return g


class VerifierMetrics:
    """The verifier: requests, rounds, acceptance, per-hop round latency."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        running: Callable[[], float] | None = None,
        waiting: Callable[[], float] | None = None,
        retained: Callable[[], float] | None = None,
    ) -> None:
        r = self.registry = registry or CollectorRegistry()
        _g(r, "num_requests_running", "Sessions decoding now (each holds a KV cache)", running)
        _g(r, "num_requests_waiting", "Rounds waiting for the target (forwards are serialised)",
           waiting)  # fmt: skip
        _g(r, "retained_sessions", "Idle sessions whose KV cache is kept for a next turn", retained)
        self.batch_sessions = _h(
            r, "batch_sessions", "Sessions' items in one batched forward (batching/)",
            (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
        )  # fmt: skip
        self.batch_tokens = _h(
            r, "batch_tokens", "Tokens in one batched forward (trees + prefill chunks)",
            (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        )  # fmt: skip
        self.batch_forward_s = _h(r, "batch_forward_seconds", "One batched forward")
        self.requests = _c(r, "requests", "Requests ended, by outcome", ("outcome",))
        self.success = _c(
            r, "request_success", "Requests finished, by finish reason", ("finished_reason",)
        )
        self.prompt_tokens = _c(r, "prompt_tokens", "Prompt tokens of requests started")
        self.cached_prompt_tokens = _c(
            r, "cached_prompt_tokens", "Prompt tokens found in a retained KV cache (not forwarded)"
        )
        self.generation_tokens = _c(r, "generation_tokens", "Tokens generated (committed)")
        self.rounds = _c(r, "rounds", "Target forwards after the prefill (all rounds)")
        self.drafts = _c(
            r, "spec_decode_num_drafts", "Rounds that verified a drafter's proposal (vLLM: drafts)"
        )
        self.draft_tokens = _c(
            r, "spec_decode_num_draft_tokens", "Draft tokens verified (tree nodes but the root)"
        )
        self.accepted = _c(
            r, "spec_decode_num_accepted_tokens", "Draft tokens accepted (tau = 1 + this / drafts)"
        )
        self.accepted_per_pos = _c(
            r,
            "spec_decode_num_accepted_tokens_per_pos",
            "Accepted draft tokens by tree depth (position 0 = depth 1)",
            ("position",),
        )
        self.fallbacks = _c(
            r,
            "spec_decode_fallback_rounds",
            "Rounds that verified the root alone in place of a proposal (late, invalid, lost "
            "drafter, context end): plain decoding, lossless",
        )
        self.plain_rounds = _c(
            r,
            "spec_decode_plain_rounds",
            "Rounds decoded plainly because speculation did not pay under the verifier's load "
            "(the drafter was not asked: batching/switch.py)",
        )
        self.link_bytes = _c(
            r, "drafter_link_bytes", "Bytes on the drafter link, by direction", ("direction",)
        )
        self.round_s = _h(r, "round_duration_seconds", "One round at the verifier, end to end")
        self.wait_s = _h(
            r, "draft_wait_seconds", "Waiting for the proposal: network + drafting, as seen here"
        )
        self.network_s = _h(
            r, "draft_network_seconds", "Proposal wait minus the drafter's own time: the network"
        )
        self.forward_s = _h(r, "target_forward_seconds", "The target's forward over the tree")
        self.verify_s = _h(r, "verify_duration_seconds", "Warping + traversal verification")
        self.commit_s = _h(r, "kv_commit_seconds", "Keeping the accepted path in the KV cache")
        self.prefill_s = _h(
            r, "request_prefill_time_seconds", "The prompt's forward pass", TTFT_BUCKETS
        )
        self.ttft_s = _h(r, "time_to_first_token_seconds", "Request to first chunk", TTFT_BUCKETS)
        self.tpot_s = _h(
            r, "time_per_output_token_seconds", "Round time / tokens it committed (per token)"
        )
        self.e2e_s = _h(r, "e2e_request_latency_seconds", "Request start to end", E2E_BUCKETS)
        self.measured = _MeasuredCollector()  # `--speculation measured`: watch(switch)
        r.register(self.measured)
        self._pos = [self.accepted_per_pos.labels(position=str(i)) for i in range(MAX_POSITIONS)]
        self._sent = self.link_bytes.labels(direction="sent")
        self._received = self.link_bytes.labels(direction="received")

    def request_started(self, prompt_tokens: int, cached: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_prompt_tokens.inc(cached)

    def round_done(
        self,
        *,
        seconds: float,  # the round at the verifier, wall
        committed: int,  # tokens it committed
        tree_nodes: int,
        accepted: int,
        speculative: bool,  # a drafter's proposal was verified (not the root alone)
        fallback: bool,
        draft_s: float,
        plain: bool = False,  # speculation was off this round (load-adaptive)
        drafter_s: float | None,  # the drafter's own time (None: no drafter answered)
        forward_s: float,
        verify_s: float,
        commit_s: float,
        bytes_sent: int = 0,
        bytes_received: int = 0,
        prefill_s: float = 0.0,  # round 1 only
    ) -> None:
        self.rounds.inc()
        self.generation_tokens.inc(committed)
        if speculative:
            self.drafts.inc()
            self.draft_tokens.inc(tree_nodes - 1)
            if accepted:
                self.accepted.inc(accepted)
                for d in range(accepted):
                    self._pos[min(d, MAX_POSITIONS - 1)].inc()
        if fallback:
            self.fallbacks.inc()
        if plain:
            self.plain_rounds.inc()
        self.round_s.observe(seconds)
        if committed:
            self.tpot_s.observe(seconds / committed)
        self.wait_s.observe(draft_s)
        if drafter_s is not None:
            self.network_s.observe(max(draft_s - drafter_s, 0.0))
        self.forward_s.observe(forward_s)
        self.verify_s.observe(verify_s)
        self.commit_s.observe(commit_s)
        if bytes_sent:
            self._sent.inc(bytes_sent)
        if bytes_received:
            self._received.inc(bytes_received)
        if prefill_s:
            self.prefill_s.observe(prefill_s)

    def first_token(self, seconds: float) -> None:
        self.ttft_s.observe(seconds)

    def request_done(self, outcome: str, finish_reason: str, seconds: float) -> None:
        """outcome: finished / cancelled / failed / rejected; finish_reason: eos / length /
        stop / context for finished requests."""
        self.requests.labels(outcome=outcome).inc()
        if outcome == "finished":
            self.success.labels(finished_reason=finish_reason).inc()
        self.e2e_s.observe(seconds)

    def batch(self, items: int, tokens: int, seconds: float) -> None:
        """One batched forward (the batch scheduler's on_batch)."""
        self.batch_sessions.observe(items)
        self.batch_tokens.observe(tokens)
        self.batch_forward_s.observe(seconds)


class _MeasuredCollector:
    """What a verifier's MeasuredSwitch (`--speculation measured`, batching/measured.py) chose
    and measured, read at each scrape. Without a switch: plain mode 0, no switches, no rates."""

    def __init__(self) -> None:
        self.switch = None  # a MeasuredSwitch, or anything with its snapshot()

    def watch(self, switch) -> None:
        self.switch = switch

    def collect(self):
        speculating, switches, rates = (
            self.switch.snapshot() if self.switch is not None else (True, 0, {})
        )
        plain = GaugeMetricFamily(
            PREFIX + "speculation_plain_mode",
            "1 while the measured switch has every session decode plainly (it measured plain "
            "decoding faster at this load), else 0",
            value=0.0 if speculating else 1.0,
        )
        count = CounterMetricFamily(
            PREFIX + "speculation_switches",
            "Changes of mode by the measured switch (speculation <-> plain decoding, probes "
            "included)",
            value=switches,
        )
        measured = GaugeMetricFamily(
            PREFIX + "speculation_measured_tokens_per_second",
            "The measured switch's running figure: aggregate committed tokens/s at a load level "
            "(sessions sharing the forwards, rounded up to a power of two), per mode",
            labels=("level", "mode"),
        )
        for (lvl, spec), rate in sorted(rates.items()):
            measured.add_metric([str(lvl), "speculative" if spec else "plain"], rate)
        return [plain, count, measured]


class DrafterMetrics:
    """The drafter: proposals, their phases, sessions and the drafting queue."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        sessions: Callable[[], float] | None = None,
        queue: Callable[[], float] | None = None,
    ) -> None:
        r = self.registry = registry or CollectorRegistry()
        _g(r, "drafter_sessions", "Draft streams open", sessions)
        _g(
            r,
            "drafter_queue_depth",
            "Proposals waiting for a drafting thread, and draft steps for their batched call",
            queue,
        )
        self.opened = _c(r, "drafter_sessions_opened", "Draft streams opened")
        self.proposals = _c(r, "drafter_proposals", "Proposals sent")
        self.nodes = _c(r, "drafter_proposal_nodes", "Tree nodes proposed, roots included")
        self.round_s = _h(r, "drafter_round_seconds", "One proposal inside the drafter")
        self.head_s = _h(r, "drafter_head_seconds", "A round's draft-head forwards")
        self.lm_head_s = _h(r, "drafter_lm_head_seconds", "A round's LM-head (grouped) matmuls")
        self.tree_s = _h(
            r, "drafter_tree_seconds", "A round's tree building: the rest of the proposal"
        )
        self.spec_cache = _c(
            r,
            "drafter_speculation_cache",
            "Pre-drafted rounds (--pipeline) by outcome: hit (answered the Commit) or miss",
            ["outcome"],
        )
        self.spec_hidden_s = _c(
            r, "drafter_speculation_hidden_seconds", "Drafting time of the pre-drafts that hit"
        )
        self.batch_steps = _h(
            r,
            "drafter_batch_steps",
            "Sessions' draft steps served by one batched head or LM-head call (draft/batch.py)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        for outcome in ("hit", "miss"):  # exported at 0 (a drafter without --pipeline)
            self.spec_cache.labels(outcome=outcome)

    def proposal(
        self, seconds: float, nodes: int, head_s: float | None, lm_head_s: float | None
    ) -> None:
        self.proposals.inc()
        self.nodes.inc(nodes)
        self.round_s.observe(seconds)
        if head_s is not None and lm_head_s is not None:
            self.head_s.observe(head_s)
            self.lm_head_s.observe(lm_head_s)
            self.tree_s.observe(max(seconds - head_s - lm_head_s, 0.0))


class RouterMetrics:
    """The router's public port: what clients see."""

    def __init__(
        self, registry: CollectorRegistry | None = None, running: Callable[[], float] | None = None
    ) -> None:
        r = self.registry = registry or CollectorRegistry()
        _g(r, "router_num_requests_running", "Requests streaming through the router", running)
        self.requests = _c(r, "router_requests", "Requests ended, by outcome", ("outcome",))
        self.generation_tokens = _c(r, "router_generation_tokens", "Tokens streamed to clients")
        self.failovers = _c(r, "router_failovers", "Sessions re-placed after a verifier failed")
        self.ttft_s = _h(
            r, "router_time_to_first_token_seconds", "Request to first chunk", TTFT_BUCKETS
        )
        self.tpot_s = _h(
            r,
            "router_time_per_output_token_seconds",
            "Between chunks, per token they carry, as clients see it",
        )
        self.e2e_s = _h(r, "router_e2e_request_latency_seconds", "Request to end", E2E_BUCKETS)

    def chunk(self, tokens: int, seconds_since_last: float | None, first: float | None) -> None:
        """A chunk relayed: `first` = seconds since the request for the first chunk."""
        self.generation_tokens.inc(tokens)
        if first is not None:
            self.ttft_s.observe(first)
        elif seconds_since_last is not None and tokens:
            self.tpot_s.observe(seconds_since_last / tokens)

    def request_done(self, outcome: str, seconds: float, failovers: int = 0) -> None:
        self.requests.labels(outcome=outcome).inc()
        self.e2e_s.observe(seconds)
        if failovers:
            self.failovers.inc(failovers)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # no line per scrape on stderr
        pass


def serve_metrics(registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0):
    """Serve `registry` on http://host:port/metrics in a daemon thread; returns (server, port).

    Always in the 0.0.4 text format: Prometheus 2.x asks for OpenMetrics, whose encoder in
    prometheus_client writes `coralline:x` as `coralline_x` in the sample lines but not in the
    TYPE lines (prometheus/client_python#1177), and no dashboard query would find the data."""
    app = make_wsgi_app(registry)

    def text_format(environ, start_response):
        environ.pop("HTTP_ACCEPT", None)
        return app(environ, start_response)

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
    server = make_server(host, port, text_format, server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server, server.server_address[1]
