"""The drafter service: registered drafters (default the CORAL head) behind DrafterService.

One bidirectional `Draft` stream per session (protos/coralline/v1/drafter.proto): Open makes
the session's drafter and answers with the first Proposal; each Commit answers with the next;
Close, the end of the stream, a broken stream or `idle_timeout_s` without a message free it.
Drafting runs in a thread pool, off the event loop, so a slow session never stalls the others
(torch releases the GIL in its kernels); with `batch` (the default) the sessions drafting at
once share each head forward and LM-head call (draft/batch.py). The process holds each head,
its router and the target's embedding / LM-head rows (models.load_token_weights), never the
target's layers.

Knows nothing about verification: it turns DraftInputs into DraftProposals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import torch

import coralline
from coralline.draft.base import DraftInput
from coralline.draft.batch import DraftBatchConfig, DraftBatcher
from coralline.draft.pipeline import SpeculationCache
from coralline.draft.registry import DRAFTERS, drafter_factory, drafter_kind
from coralline.router.placement import DRAFTER
from coralline.rpc import codec
from coralline.rpc.errors import ServiceError, exhausted, not_found
from coralline.rpc.protos import drafter_pb2, drafter_pb2_grpc
from coralline.rpc.server import Server, ServerOptions
from coralline.telemetry import tracing as tr
from coralline.telemetry.drafter import record_round
from coralline.telemetry.metrics import DrafterMetrics
from coralline.telemetry.tracing import Tracing

log = logging.getLogger("coralline.drafter")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class DrafterServiceConfig:
    model: str = "smollm2-135m-instruct"  # the target whose token weights the heads share
    default_drafter: str = "coral"  # what an Open with an empty drafter name gets
    checkpoint: str | None = None  # a CORAL head folder (default: the one shipped for model)
    device: str = "cpu"  # "cuda" / "cuda:N" on a GPU node
    dtype: str = "float32"  # fp32 on CPU; bf16 / fp16 on GPU
    max_sessions: int = 64  # RESOURCE_EXHAUSTED past it: a head's state is ~1 MB per session
    idle_timeout_s: float = 300.0  # a session with no message for this long is freed
    workers: int = 2  # drafting threads without batching (one per core on this machine's 2
    # cores); with batching every open session may draft at once (a thread each, mostly waiting)
    batch: bool = True  # batch the head forwards and LM-head calls of the sessions drafting at
    # once (draft/batch.py): one call per step for all of them instead of one per session
    batch_wait_ms: float = 10.0  # the longest a draft step waits for the other sessions', and a
    # wave of drafting for the previous wave's sessions (draft/batch.py)
    metrics_port: int | None = None  # Prometheus /metrics on this port (0 = a free one); None =
    # no metrics recorded (tracing is configured by the OTEL_* variables: telemetry/tracing.py)
    pipeline: bool = False  # CORAL drafters pre-draft each session's next round for the outcome
    # they expect while the verifier verifies, and answer the Commit from it on a hit
    # (draft/pipeline.py: the same trees either way; off by default: on a CPU shared with the
    # verifier the pre-draft competes with the target's forward)
    server: ServerOptions = field(default_factory=ServerOptions)

    def __post_init__(self) -> None:
        if self.default_drafter not in DRAFTERS or self.default_drafter == "none":
            raise ValueError(
                f"default_drafter must be one of {', '.join(d for d in DRAFTERS if d != 'none')}"
            )
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.max_sessions < 1 or self.workers < 1:
            raise ValueError("max_sessions and workers must be >= 1")
        if not self.idle_timeout_s > 0:
            raise ValueError("idle_timeout_s must be > 0")
        if not self.batch_wait_ms >= 0:
            raise ValueError("batch_wait_ms must be >= 0")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")


@dataclass
class _Session:
    session_id: str
    name: str
    drafter: object
    params: object
    committed: int  # committed tokens (the root included)
    round: int  # the round of the last proposal sent
    opened: float = field(default_factory=time.monotonic)
    cost: object = None  # the drafter's own cost model (None: it has none)
    pre: object = None  # the running pre-draft (asyncio future; pipeline only)
    hint: list[tuple[int, float]] | None = None  # this round's CostHint from the verifier


def _pipelined(drafter):
    """A CORAL drafter in pipeline mode behind a speculation cache; other drafters as they are."""
    from dataclasses import replace

    from coralline.draft.coral_drafter import CoralDrafter

    if not isinstance(drafter, CoralDrafter):
        return drafter
    inner = CoralDrafter(drafter.head, replace(drafter.config, pipeline=True), drafter.cost)
    inner.batcher = drafter.batcher
    return SpeculationCache(inner)


def _hint(msg) -> list[tuple[int, float]] | None:
    """The message's CostHint as [(nodes, ms)], validated; None when absent."""
    if not msg.HasField("cost"):
        return None
    nodes, ms = list(msg.cost.nodes), list(msg.cost.ms)
    if not nodes or len(nodes) != len(ms):
        raise ValueError("CostHint needs as many ms as nodes, and at least one")
    if any(n < 1 for n in nodes) or nodes != sorted(set(nodes)):
        raise ValueError("CostHint.nodes must be distinct sizes >= 1, ascending")
    if not all(m > 0 and m < float("inf") for m in ms):
        raise ValueError("CostHint.ms must be positive and finite")
    return list(zip(nodes, ms, strict=True))


class DrafterService(drafter_pb2_grpc.DrafterServiceServicer):
    def __init__(self, config: DrafterServiceConfig, tracing: Tracing | None = None) -> None:
        """tracing: default from the OTEL_* variables (off unless they say otherwise)."""
        from coralline.models import load_token_weights

        self.config = config
        self.tracing = tracing or Tracing.from_env(tr.SERVICES["drafter"])
        self.metrics = None
        if config.metrics_port is not None:
            self.metrics = DrafterMetrics(
                sessions=lambda: len(self._sessions),
                queue=lambda: (
                    self._pool._work_queue.qsize()
                    + (self.batcher.waiting if self.batcher is not None else 0)
                ),
            )
        self.weights = load_token_weights(config.model, _DTYPES[config.dtype], config.device)
        self.fingerprint = self.weights.fingerprint
        self._factories: dict[str, object] = {}
        self._factory_lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self.batcher = None
        workers = config.workers
        if config.batch:
            self.batcher = DraftBatcher(DraftBatchConfig(max_wait_ms=config.batch_wait_ms))
            workers = max(workers, config.max_sessions)
            if self.metrics is not None:
                self.batcher.on_call = self.metrics.batch_steps.observe
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="draft")
        self.draining = False
        self._factory(config.default_drafter)  # load the default head now: fail at start-up

    # ------------------------------------------------------------------ drafters
    def _factory(self, name: str):
        with self._factory_lock:
            if name not in self._factories:
                self._factories[name] = drafter_factory(
                    name,
                    checkpoint=self.config.checkpoint,
                    weights=self.weights,
                    device=self.config.device,
                    dtype=_DTYPES[self.config.dtype],
                )
            return self._factories[name]

    # ------------------------------------------------------------------ sessions
    def _open(self, msg: drafter_pb2.Open) -> tuple[_Session, DraftInput]:
        name = msg.drafter or self.config.default_drafter
        if name not in DRAFTERS or name == "none":
            raise not_found(
                f"unknown drafter {name!r}; this service drafts with: "
                f"{', '.join(d for d in DRAFTERS if d != 'none')}"
            )
        if not msg.session_id:
            raise ValueError("Open needs a session_id")
        if self.draining:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the drafter is shutting down")
        if msg.session_id in self._sessions:
            raise ServiceError(
                grpc.StatusCode.ALREADY_EXISTS, f"session {msg.session_id!r} is already open"
            )
        if len(self._sessions) >= self.config.max_sessions:
            raise exhausted(
                f"the drafter holds {len(self._sessions)} sessions, its bound "
                f"(max_sessions={self.config.max_sessions}); retry later or add drafters"
            )
        if msg.target_fingerprint and msg.target_fingerprint != self.fingerprint:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this drafter serves target {self.weights.name!r} (fingerprint "
                f"{self.fingerprint}); the verifier's target has fingerprint "
                f"{msg.target_fingerprint}: run a drafter for that target",
            )
        try:
            factory = self._factory(name)
        except ValueError as e:  # e.g. a head trained for another target
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
        params = codec.sampling_from_pb(msg.sampling)
        if params.seed is None:
            raise ValueError("Open.sampling.seed must be set (the verifier resolves it)")
        ids = [int(t) for t in msg.prompt_ids]
        if not ids:
            raise ValueError("Open.prompt_ids is empty")
        if len(ids) > self.weights.max_context:
            raise ValueError(
                f"Open.prompt_ids has {len(ids)} tokens; the target's context window is "
                f"{self.weights.max_context}"
            )
        if min(ids) < 0 or max(ids) >= self.weights.vocab_size:
            raise ValueError(f"Open.prompt_ids must lie in [0, {self.weights.vocab_size})")
        feats = None
        if msg.HasField("features"):
            feats = codec.tensor_from_pb(
                msg.features, name="Open.features", rows=len(ids) - 1, cols=self.weights.hidden_size
            )
        drafter = factory()
        if hasattr(drafter, "batcher"):  # a CORAL drafter: its head calls join the others'
            drafter.batcher = self.batcher
        if self.config.pipeline:
            drafter = _pipelined(drafter)
        session = _Session(msg.session_id, name, drafter, params, len(ids), max(msg.round, 1))
        session.drafter.reset()
        session.cost = getattr(session.drafter, "cost", None)
        session.hint = _hint(msg)
        self._sessions[msg.session_id] = session
        log.info("open %s drafter=%s prompt=%d", msg.session_id, name, len(ids))
        return session, DraftInput(tuple(ids), feats, None)

    def _commit(self, session: _Session, msg: drafter_pb2.Commit) -> DraftInput:
        if msg.round <= session.round:  # rounds the verifier decoded without us leave gaps
            raise ValueError(
                f"Commit for round {msg.round}, expected a round after {session.round}"
            )
        ids = [int(t) for t in msg.new_ids]
        if not ids:
            raise ValueError("Commit.new_ids is empty: every round commits at least one token")
        if min(ids) < 0 or max(ids) >= self.weights.vocab_size:
            raise ValueError(f"Commit.new_ids must lie in [0, {self.weights.vocab_size})")
        if msg.committed_len and msg.committed_len != session.committed + len(ids):
            raise ValueError(
                f"Commit.committed_len is {msg.committed_len}, but the session has "
                f"{session.committed} + {len(ids)} committed tokens"
            )
        feats = None
        if msg.HasField("features"):
            feats = codec.tensor_from_pb(
                msg.features, name="Commit.features", rows=len(ids), cols=self.weights.hidden_size
            )
        if session.committed + len(ids) > self.weights.max_context:
            raise ValueError(
                f"the session would hold {session.committed + len(ids)} tokens; the target's "
                f"context window is {self.weights.max_context}"
            )
        session.committed += len(ids)
        session.round = msg.round
        session.hint = _hint(msg)
        accepted = tuple(int(a) for a in msg.accepted) or None
        return DraftInput(tuple(ids), feats, accepted)

    def _drafting(self, session: _Session):
        """The block in which a session drafts: batched with the others' (or not batched)."""
        if self.batcher is None:
            return contextlib.nullcontext()
        return self.batcher.drafting(session.session_id)

    def _predraft(self, session: _Session) -> None:
        """Runs in a pool thread after a proposal was sent (pipeline): never fails the stream."""
        try:
            with self._drafting(session):
                session.drafter.predraft(session.params)
        except Exception:  # the next propose drafts for the real commit
            log.exception("session %s: pre-draft failed", session.session_id)

    def _propose(self, session: _Session, step: DraftInput, parent) -> drafter_pb2.DraftResponse:
        """Runs in a pool thread. parent: the round's trace context (None: not traced)."""
        watched = self.metrics is not None or self.tracing.enabled
        start_ns, t0 = time.time_ns(), time.perf_counter_ns()
        drafter = session.drafter
        if watched and hasattr(drafter, "timeline"):
            drafter.timeline = []
        if session.cost is not None:  # the verifier's load sizes the tree (batching/costs.py)
            drafter.cost = session.cost.under_load(session.hint) if session.hint else session.cost
        cache = drafter.stats if isinstance(drafter, SpeculationCache) else None
        before = (cache.hits, cache.misses, cache.hidden_ms) if cache is not None else None
        with self._drafting(session):
            proposal = drafter.propose(step, session.params)
        if cache is not None and self.metrics is not None:
            m = self.metrics
            m.spec_cache.labels(outcome="hit").inc(cache.hits - before[0])
            m.spec_cache.labels(outcome="miss").inc(cache.misses - before[1])
            m.spec_hidden_s.inc((cache.hidden_ms - before[2]) / 1e3)
        out = drafter_pb2.DraftResponse()
        p = out.proposal
        p.round = session.round
        codec.tree_to_pb(proposal.tree, p.tree)
        if proposal.rows is not None:
            codec.rows_to_pb(proposal.rows, p.rows)
        p.tree_kind = drafter.tree_kind
        t1 = time.perf_counter_ns()
        p.draft_ns = t1 - t0
        if watched:
            tree = proposal.tree
            record_round(
                self.tracing,
                self.metrics,
                parent=parent,
                start_ns=start_ns,
                t0=t0,
                t1=t1,
                timeline=getattr(drafter, "timeline", None),
                attributes={
                    "specdec.round": session.round,
                    "specdec.session_id": session.session_id,
                    "specdec.drafter": session.name,
                    "specdec.tree_nodes": tree.num_nodes,
                    "specdec.tree_depth": tree.max_depth,
                },
            )
            if hasattr(drafter, "timeline"):
                drafter.timeline = None
        return out

    def _close(self, session: _Session, why: str) -> None:
        if self._sessions.get(session.session_id) is session:
            del self._sessions[session.session_id]
        if self.batcher is not None:
            self.batcher.forget(session.session_id)
        log.info("close %s (%s) after round %d", session.session_id, why, session.round)

    # ------------------------------------------------------------------ RPCs
    async def Draft(self, request_iterator, context):
        loop = asyncio.get_running_loop()
        requests = request_iterator.__aiter__()
        session, why, stream = None, "stream ended", None
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(
                        requests.__anext__(), timeout=self.config.idle_timeout_s
                    )
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    why = "idle"
                    raise ServiceError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"no message for {self.config.idle_timeout_s:g} s: session closed",
                    ) from None
                kind = msg.WhichOneof("kind")
                if kind == "close":
                    why = msg.close.reason or "closed"
                    break
                if session is None:
                    if kind != "open":
                        raise ValueError("the first message of a Draft stream must be Open")
                    session, step = self._open(msg.open)
                    if self.metrics is not None:
                        self.metrics.opened.inc()
                    if self.tracing.enabled:
                        stream = self.tracing.start(
                            tr.DRAFTER_RPC,
                            tr.carrier_of_metadata(context.invocation_metadata()),
                            "SERVER",
                            {"specdec.session_id": session.session_id,
                             "specdec.drafter": session.name},
                        )  # fmt: skip
                elif kind == "open":
                    raise ValueError("Open was already sent on this stream")
                elif kind == "commit":
                    step = self._commit(session, msg.commit)
                else:
                    raise ValueError("a DraftRequest must hold open, commit or close")
                parent = None
                if stream is not None:  # the verifier's round span, else the stream's
                    parent = dict(getattr(msg, kind).trace_context) or stream
                if session.pre is not None:  # the drafter is busy with the pre-draft
                    await session.pre
                    session.pre = None
                yield await loop.run_in_executor(self._pool, self._propose, session, step, parent)
                if isinstance(session.drafter, SpeculationCache):  # the proposal is on its way
                    session.pre = loop.run_in_executor(self._pool, self._predraft, session)
        except asyncio.CancelledError:
            why = "cancelled"
            raise
        except Exception as e:
            why = f"error: {e}"
            raise
        finally:
            if session is not None:
                self._close(session, why)
            if stream is not None:
                stream.set_attribute("specdec.close_reason", why)
                stream.end()

    async def Info(self, request, context):
        out = drafter_pb2.DrafterInfo(
            drafters=[d for d in DRAFTERS if d != "none"],
            default_drafter=self.config.default_drafter,
            target=self.weights.name,
            target_fingerprint=self.fingerprint,
            active_sessions=len(self._sessions),
            capacity=self.config.max_sessions,
            device=str(self.weights.embed.device),
            version=coralline.__version__,
        )
        return out

    @property
    def session_ids(self) -> list[str]:
        return list(self._sessions)


SERVICE_NAME = drafter_pb2.DESCRIPTOR.services_by_name["DrafterService"].full_name


async def start_drafter(
    config: DrafterServiceConfig, tracing: Tracing | None = None
) -> tuple[Server, DrafterService]:
    """Build the service, bind, start; returns (server, service). `server.address` is set.
    tracing: default from the OTEL_* variables."""
    service = DrafterService(config, tracing)
    server = Server(config.server, [SERVICE_NAME], public=())  # internal: mutual TLS, no tokens
    drafter_pb2_grpc.add_DrafterServiceServicer_to_server(service, server.server)
    await server.start()
    server.register(
        DRAFTER, config.max_sessions, service.fingerprint, lambda: len(service._sessions)
    )
    if service.metrics is not None:
        server.serve_metrics(service.metrics.registry, config.metrics_port)
    return server, service


async def serve(config: DrafterServiceConfig, ready=print) -> None:
    """Run until SIGTERM / Ctrl-C; `ready(line)` is called once with the bound address."""
    server, service = await start_drafter(config)
    kind = drafter_kind(config.default_drafter)[0]
    ready(
        f"coralline drafter listening on {server.address} (target {service.weights.name}, "
        f"default drafter {config.default_drafter} [{kind}], "
        f"device {config.device}){server.telemetry_note(service.tracing)}"
    )

    def drain() -> None:
        service.draining = True
        log.info("draining: %d sessions open", len(service.session_ids))

    await server.serve_until_signal(drain)
    service._pool.shutdown(wait=False, cancel_futures=True)
    service.tracing.shutdown()  # flush the last spans
