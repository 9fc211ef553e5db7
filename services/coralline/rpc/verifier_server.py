"""The verifier service: the target model, the round loop with a remote drafter, streaming.

Hosts two gRPC services in one process:
  VerifierService  Generate from token ids (what the router calls), Cancel, Info
  Generation       the public API (text or ids, chat template): one verifier + one drafter is
                   a usable deployment; the router fronts many of them later
Each session gets its own TargetRunner fork (own KV cache, shared weights) and, unless it asks
for plain decoding, a RemoteDrafter on the drafter link; the engine's round loop (engine.py)
runs in a worker thread, one `next()` per round, so the event loop keeps serving. Forward
passes are serialised by the runner's lock: one round at a time here (batching across
sessions comes with the scheduler). Cancellation (Cancel / CancelSession, or a client that
goes away) stops the session between rounds and frees its cache and its drafter session.

Retained sessions (VerifyRequest.retain): a session that FINISHES keeps its runner, idle, in a
least-recently-used map bounded by `retain_sessions` caches and `retain_tokens` tokens; past
either bound the least recent is reset and `on_evict(session_id)` is called. A later request
with that session_id takes the runner back and prefills only what its cache does not hold (a
conversation's next turn: prompt + output + new tokens). A cancelled or failed session is never
retained; idle caches do not count against max_sessions.

Knows nothing about the algorithms: it validates, adapts messages and calls the engine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

import coralline
from coralline.batching.costs import LoadPolicy, load_or_measure
from coralline.batching.measured import MeasuredSwitch
from coralline.batching.scheduler import BatchConfig, pooled
from coralline.batching.switch import SpeculationSwitch
from coralline.conversation import messages_ids, next_turn_ids
from coralline.draft.registry import DRAFTERS
from coralline.engine import Chunk, Engine, EngineConfig
from coralline.router.placement import VERIFIER
from coralline.rpc import codec
from coralline.rpc.errors import PromptTooLong, ServiceError, exhausted, not_found
from coralline.rpc.protos import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    verifier_pb2,
    verifier_pb2_grpc,
)
from coralline.rpc.remote_drafter import RemoteDrafter, RemoteDrafterConfig, WireStats
from coralline.rpc.security import aio_channel
from coralline.rpc.server import Server, ServerOptions, channel_options
from coralline.sampling import SamplingParams
from coralline.session import (
    CANCELLED,
    FAILED,
    FINISHED,
    RUNNING,
    MemorySessionStore,
    SessionRecord,
)
from coralline.telemetry import tracing as tr
from coralline.telemetry.metrics import VerifierMetrics
from coralline.telemetry.tracing import Tracing
from coralline.telemetry.verifier import SessionTelemetry
from coralline.threads import one_thread_here

log = logging.getLogger("coralline.verifier")


@dataclass(frozen=True)
class VerifierServiceConfig:
    model: str = "smollm2-135m-instruct"  # a built-in name or a local Hugging Face folder
    device: str = "cpu"  # "cuda" / "cuda:N" on a GPU node
    dtype: str = "float32"  # fp32 on CPU (bf16 is ~4x slower there); bf16 on GPU
    drafter_endpoint: str | None = None  # host:port of the default drafter service
    default_drafter: str | None = None  # None: "coral" with a drafter link, else "none"
    max_sessions: int = 16  # RESOURCE_EXHAUSTED past it (each holds a KV cache)
    max_tree_nodes: int = 256  # a proposal above this (root included) is not verified
    max_prompt_tokens: int = 0  # a longer prompt is refused (0: the context window decides)
    max_new_tokens: int = 4096  # a request asking for more is refused
    round_timeout_s: float = 2.0  # per-round deadline for a proposal (see RemoteDrafterConfig)
    open_timeout_s: float = 10.0
    max_reconnects: int = 2
    history: int = 1024  # finished sessions kept for GetSession
    retain_sessions: int = 8  # idle KV caches kept for sessions that asked (0 = none)
    retain_tokens: int = 8192  # tokens across those idle caches (SmolLM2: ~46 KB each in fp32)
    sessions_url: str | None = None  # redis://... : the routers' session store; an evicted
    # cache clears its session's KV holder there (when it still names this verifier)
    metrics_port: int | None = None  # Prometheus /metrics on this port (0 = a free one); None =
    # no metrics recorded (tracing is configured by the OTEL_* variables: telemetry/tracing.py)
    batching: BatchConfig | None = field(default_factory=BatchConfig)  # the rounds of all
    # sessions in one batched forward over a KV pool (batching/); None = one session's forward
    # at a time, each session with its own growing cache (the reference path)
    adaptive_budget: bool = True  # batching only: each round tells the drafter the round's
    # cost under the current load (batching/costs.py), so trees shrink as sessions grow; at
    # T > 0 a seed then reproduces a generation at the same load (the law never changes)
    plain_switch: bool = False  # with adaptive_budget: a session decodes plainly, without asking
    # the drafter, while speculation is predicted slower at the current load (batching/switch.py;
    # off by default: on the 2-core CPU measured it cost 7-35% from 2 to 8 sessions)
    measured_switch: bool = True  # with batching: every session speculates or decodes plainly
    # together, whichever gave more tokens/s at this load level when measured
    # (batching/measured.py; one session always speculates). The default since it was measured
    # ahead of the budget alone at 2, 8 and 16 sessions in three runs, mixed at 4
    # (docs/batching.md)
    server: ServerOptions = field(default_factory=ServerOptions)

    def __post_init__(self) -> None:
        if self.default_drafter is not None and self.default_drafter not in DRAFTERS:
            raise ValueError(f"unknown drafter {self.default_drafter!r}: {', '.join(DRAFTERS)}")
        if self.default_drafter not in (None, "none") and not self.drafter_endpoint:
            raise ValueError("a default drafter needs a drafter endpoint")
        if self.max_sessions < 1 or self.max_tree_nodes < 1 or self.max_new_tokens < 1:
            raise ValueError("max_sessions, max_tree_nodes and max_new_tokens must be >= 1")
        if self.max_prompt_tokens < 0:
            raise ValueError("max_prompt_tokens must be >= 0")
        if self.retain_sessions < 0 or self.retain_tokens < 0:
            raise ValueError("retain_sessions and retain_tokens must be >= 0")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        b = self.batching
        if b is not None and b.slots < self.max_sessions + self.retain_sessions:
            raise ValueError(
                f"the KV pool's {b.slots} slots must cover max_sessions + retain_sessions "
                f"({self.max_sessions} + {self.retain_sessions})"
            )
        if b is not None and self.max_tree_nodes > b.max_batch_tokens:
            raise ValueError(
                f"max_tree_nodes ({self.max_tree_nodes}) must not exceed the batch's "
                f"max_batch_tokens ({b.max_batch_tokens})"
            )

    @property
    def drafter(self) -> str:
        if self.default_drafter is not None:
            return self.default_drafter
        return "coral" if self.drafter_endpoint else "none"


@dataclass
class _Live:
    """A running session: its engine generator and what must be freed when it ends."""

    record: SessionRecord  # as created (the store keeps its own copy, which grows)
    runner: object
    gen: object
    remote: RemoteDrafter | None
    retain: bool = False  # keep the runner idle (its KV cache) when the session finishes
    turn: int = 1  # requests served from this session's cache (1 = a fresh cache)
    lock: threading.Lock = field(default_factory=threading.Lock)
    cancelled: threading.Event = field(default_factory=threading.Event)
    closed: bool = False
    tokens: int = 0  # generated so far (what the store's append reported)
    telemetry: SessionTelemetry | None = None  # spans / metrics (None: both off)


@dataclass(frozen=True)
class Step:
    """One round as the servicers stream it."""

    session_id: str
    chunk: Chunk
    stats: common_pb2.RoundStats
    summary: common_pb2.Summary | None


class CountingLock:
    """A lock that counts the threads waiting for it: the target's lock (forward passes are
    serialised), so `waiting` is the verifier's queue depth in rounds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = threading.Lock()
        self.waiting = 0

    def __enter__(self) -> CountingLock:
        if not self._lock.acquire(blocking=False):
            with self._count:
                self.waiting += 1
            self._lock.acquire()
            with self._count:
                self.waiting -= 1
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


class VerifierCore:
    """Sessions over one target; shared by the two servicers."""

    def __init__(
        self,
        config: VerifierServiceConfig,
        on_evict: Callable[[str], None] | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        """on_evict(session_id) is called (in a worker thread) when a retained cache is
        dropped; its exceptions are logged. tracing: default from the OTEL_* variables."""
        from coralline.target import TargetConfig, TargetRunner

        self.config = config
        self.target = TargetRunner.load(
            TargetConfig(model=config.model, dtype=config.dtype, device=config.device)
        )
        self.load_policy: LoadPolicy | None = None
        if config.batching is not None:  # forks are sessions of one batch scheduler
            self.target = pooled(self.target, config.batching)
            if config.adaptive_budget:
                table = load_or_measure(self.target.kv.scheduler, self.target.fingerprint, log)
                self.load_policy = LoadPolicy(table)
        else:
            self.target.lock = CountingLock()  # forks share it: forwards are serialised
        self.measured: MeasuredSwitch | None = None
        if config.batching is not None and config.measured_switch:
            self.measured = MeasuredSwitch(self.target.kv.scheduler.sessions)
        self.tracing = tracing or Tracing.from_env(tr.SERVICES["verifier"])
        self.metrics = None
        if config.metrics_port is not None:
            self.metrics = VerifierMetrics(
                running=lambda: len(self.live),
                waiting=lambda: self.target.lock.waiting,
                retained=lambda: len(self._idle),
            )
        if self.metrics is not None and config.batching is not None:
            self.target.kv.scheduler.on_batch = self.metrics.batch
        if self.metrics is not None and self.measured is not None:
            self.metrics.measured.watch(self.measured)
        self.fingerprint = self.target.fingerprint
        self.store = MemorySessionStore(config.history)
        self.live: dict[str, _Live] = {}
        # batched: the sessions' threads sample and verify on one OpenMP thread, leaving the
        # scheduler's thread the only one with a team (threads.py); serialised forwards run in them
        init = one_thread_here if config.batching is not None else None
        self._pool = ThreadPoolExecutor(
            config.max_sessions + 1, thread_name_prefix="verify", initializer=init
        )
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.draining = False
        self.on_evict = on_evict
        # idle retained caches, least recently used first: session_id -> (runner, turns)
        self._idle: OrderedDict[str, tuple[TargetRunner, int]] = OrderedDict()
        self._idle_lock = threading.Lock()  # runs end in pool threads and on the event loop

    # ------------------------------------------------------------------ retained caches
    @property
    def retained(self) -> list[str]:
        """Idle sessions whose KV cache is kept, least recently used first."""
        with self._idle_lock:
            return list(self._idle)

    @property
    def retained_tokens(self) -> int:
        with self._idle_lock:
            return sum(r.num_cached for r, _ in self._idle.values())

    def _retain(self, session_id: str, runner, turns: int) -> None:
        with self._idle_lock:
            self._idle[session_id] = (runner, turns)
            self._idle.move_to_end(session_id)
        self._enforce_retain_bounds()

    def _take(self, session_id: str):
        """(runner, turns so far) of the session's retained cache (no longer idle), or None."""
        with self._idle_lock:
            return self._idle.pop(session_id, None)

    def _enforce_retain_bounds(self) -> None:
        """Evict the least recently used idle caches beyond retain_sessions / retain_tokens."""
        cfg, evicted = self.config, []
        with self._idle_lock:
            tokens = sum(r.num_cached for r, _ in self._idle.values())
            while self._idle and (
                len(self._idle) > cfg.retain_sessions or tokens > cfg.retain_tokens
            ):
                sid, (runner, _) = self._idle.popitem(last=False)
                tokens -= runner.num_cached
                runner.reset()
                evicted.append(sid)
        for sid in evicted:
            log.info("session %s: retained KV cache evicted", sid)
            if self.on_evict is not None:
                self._pool.submit(self._notify_evicted, sid)

    def _notify_evicted(self, session_id: str) -> None:
        try:
            self.on_evict(session_id)
        except Exception:
            log.exception("on_evict(%r) failed", session_id)

    # ------------------------------------------------------------------ sessions
    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        if endpoint not in self._channels:
            # round_robin: a name with several addresses (a Kubernetes headless Service of
            # drafters) spreads the sessions' streams over all of them, not the first
            options = [
                *channel_options(self.config.server.max_message_bytes),
                ("grpc.lb_policy_name", "round_robin"),
            ]
            self._channels[endpoint] = aio_channel(endpoint, self.config.server.tls, options)
        return self._channels[endpoint]

    def _start(
        self,
        session_id: str,
        prompt: list[int],
        params: SamplingParams,
        drafter: str,
        endpoint: str,
        verifier: str,
        retain: bool = False,
        parent=None,
        rpc: str = tr.VERIFIER_RPC,
    ) -> _Live:
        """A running session; a refused request is counted and traced as `rejected`."""
        tel = self._telemetry(rpc, parent, session_id, params, drafter, len(prompt))
        try:
            args = (session_id, prompt, params, drafter, endpoint, verifier, retain)
            return self._start_session(*args, tel)
        except Exception as e:
            if tel is not None:
                tel.end("rejected", error=e)
            raise

    def _start_session(
        self, session_id, prompt, params, drafter, endpoint, verifier, retain, tel
    ) -> _Live:
        cfg, target = self.config, self.target
        if self.draining:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the verifier is shutting down")
        # an empty prompt or ids outside the vocabulary: Engine.generate below says so
        if cfg.max_prompt_tokens and len(prompt) > cfg.max_prompt_tokens:
            raise PromptTooLong(
                f"the prompt has {len(prompt)} tokens; this verifier accepts at most "
                f"{cfg.max_prompt_tokens} (max_prompt_tokens)"
            )
        if params.max_new_tokens > cfg.max_new_tokens:
            raise ValueError(
                f"max_new_tokens is {params.max_new_tokens}; this verifier allows at most "
                f"{cfg.max_new_tokens} (max_new_tokens)"
            )
        if len(prompt) + params.max_new_tokens > target.max_context:
            raise ValueError(
                f"the prompt ({len(prompt)} tokens) plus max_new_tokens "
                f"({params.max_new_tokens}) exceeds the context window of {target.max_context}"
            )
        name = drafter or cfg.drafter
        if name not in DRAFTERS:
            raise not_found(f"unknown drafter {name!r}; choose one of: {', '.join(DRAFTERS)}")
        endpoint = endpoint or cfg.drafter_endpoint or ""
        if name != "none" and not endpoint:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"drafter {name!r} asked for, but this verifier has no drafter link: use "
                "drafter 'none' or start it with --drafter-endpoint",
            )
        if len(self.live) >= cfg.max_sessions:
            raise exhausted(
                f"the verifier runs {len(self.live)} sessions, its bound (max_sessions="
                f"{cfg.max_sessions}); retry in a few seconds or add verifiers"
            )
        session_id = session_id or uuid.uuid4().hex
        if session_id in self.live:
            raise ServiceError(
                grpc.StatusCode.ALREADY_EXISTS, f"session {session_id!r} is already running"
            )
        retained = self._take(session_id)  # (runner, turns) of its retained cache, or None
        self._enforce_retain_bounds()  # the other idle caches (a no-op unless bounds changed)
        if tel is not None:
            tel.named(session_id, name)
        try:
            runner, turn = (retained[0], retained[1] + 1) if retained else (target.fork(), 1)
            remote = self._remote(name, endpoint, session_id, turn, tel)
            engine = Engine(runner, remote, EngineConfig(verifier=verifier or None))
            if tel is not None:
                tel.remote = remote
                if tel.tracing is not None:
                    engine.on_round_start = tel.round_started
            if remote is not None and self.measured is not None:
                engine.speculate = self.measured
            elif remote is not None and self.load_policy is not None and cfg.plain_switch:
                sched, policy = self.target.kv.scheduler, self.load_policy
                engine.speculate = SpeculationSwitch(
                    policy, sched.sessions, slowdown=lambda: policy.slowdown(list(sched.recent))
                )
            # validates the pair before anything runs; reuse keeps the cache's common prefix
            gen = engine.generate(prompt, params, reuse_cache=retained is not None)
        except Exception:
            if retained is not None:  # nothing ran: the cache is still good
                self._retain(session_id, *retained)
            raise
        record = SessionRecord(session_id, len(prompt), name, prompt_ids=list(prompt), turns=turn)
        self.store.create(record)
        live = _Live(record, runner, gen, remote, retain, turn, telemetry=tel)
        self.live[session_id] = live
        log.info(
            "session %s start (turn %d): prompt %d tokens, %d in a retained cache, drafter %s, "
            "T=%g",
            session_id,
            turn,
            len(prompt),
            runner.num_cached,
            name,
            params.temperature,
        )
        return live

    def _telemetry(self, rpc, parent, session_id, params, drafter, prompt_tokens):
        """The session's spans / metrics, or None when both are off (then nothing is built)."""
        if not self.tracing.enabled and self.metrics is None:
            return None
        attrs = {}
        if self.tracing.enabled:
            attrs = tr.genai_request_attributes("text_completion", self.config.model, params)
        return SessionTelemetry(
            self.tracing,
            self.metrics,
            rpc=rpc,
            parent=parent,
            attributes=attrs,
            prompt_tokens=prompt_tokens,
        )

    def _remote(
        self, name: str, endpoint: str, session_id: str, turn: int, tel=None
    ) -> RemoteDrafter | None:
        """The session's drafter link (None for plain decoding). A retained session's later
        turns open the drafter session "<id>#<turn>": the previous turn's Close may still be
        on its way when the next turn opens."""
        cfg = self.config
        remote = None
        if name != "none":
            remote = RemoteDrafter(
                self._channel(endpoint),
                asyncio.get_running_loop(),
                RemoteDrafterConfig(
                    name=name,
                    round_timeout_s=cfg.round_timeout_s,
                    open_timeout_s=cfg.open_timeout_s,
                    max_reconnects=cfg.max_reconnects,
                    max_nodes=cfg.max_tree_nodes,
                ),
                session_id=session_id if turn == 1 else f"{session_id}#{turn}",
                target_fingerprint=self.fingerprint,
                vocab_size=self.target.vocab_size,
                # the stream's metadata carries the request span (each round's message its
                # round span)
                metadata=tel.tracing.metadata(tel.span) if tel and tel.tracing else (),
            )
            policy = self.load_policy
            if policy is not None:
                sched = self.target.kv.scheduler
                remote.cost_hint = lambda: policy.hint(sched.sessions(), cfg.max_tree_nodes)
        return remote

    @staticmethod
    def _next(live: _Live) -> Chunk | None:
        with live.lock:
            if live.closed:
                return None
            try:
                return next(live.gen)
            except StopIteration:
                return None

    def _free(self, live: _Live, state: str, error: str = "") -> None:
        """Frees the session's cache (or keeps it idle: a retained session that finished) and
        its drafter session. In a pool thread after its round, or directly once the engine has
        ended (then no round holds the lock)."""
        keep = live.retain and state == FINISHED
        with live.lock:
            if live.closed:
                return
            live.closed = True
            live.gen.close()
            if not keep:
                live.runner.reset()
            if live.remote is not None:
                live.remote.close(state)
        sid = live.record.session_id
        self.store.finish(sid, state, live.record.summary, error)
        self.live.pop(sid, None)
        if keep:
            park = getattr(live.runner.kv, "park", None)
            if park is not None:
                park()  # idle until its next turn: batches do not wait for it
            self._retain(sid, live.runner, live.turn)
        log.info(
            "session %s %s: %d tokens%s",
            sid,
            state,
            live.tokens,
            f", {live.runner.num_cached} cached tokens retained" if keep else "",
        )

    async def run(
        self,
        session_id: str,
        prompt: list[int],
        params: SamplingParams,
        drafter: str = "",
        endpoint: str = "",
        verifier: str = "",
        retain: bool = False,
        parent=None,
        rpc: str = tr.VERIFIER_RPC,
    ):
        """Async iterator of Steps, one per round; raises ServiceError(CANCELLED) when the
        session is cancelled. The session is freed however the iteration ends; retain=True
        keeps its KV cache idle when it finishes (a next turn with this session_id reuses it).
        A finished session is freed before its last Step is yielded, so a next turn may
        follow at once."""
        loop = asyncio.get_running_loop()
        live = self._start(
            session_id, prompt, params, drafter, endpoint, verifier, retain, parent, rpc
        )
        sid = live.record.session_id
        state, error, failure = CANCELLED, "", None
        try:
            while True:
                if live.cancelled.is_set():
                    raise ServiceError(grpc.StatusCode.CANCELLED, f"session {sid} was cancelled")
                chunk = await loop.run_in_executor(self._pool, self._next, live)
                if chunk is None:
                    state = FINISHED
                    self._free(live, state)  # the engine has ended: no round holds the lock
                    return
                live.tokens = self.store.append(sid, chunk.token_ids, chunk.text)
                wire = live.remote.wire if live.remote is not None else WireStats()
                if live.telemetry is not None:
                    live.telemetry.round_done(
                        chunk.stats, len(chunk.token_ids), wire, cached=live.runner.reused
                    )
                stats = codec.stats_to_pb(
                    chunk.stats,
                    bytes_to=wire.bytes_to,
                    bytes_from=wire.bytes_from,
                    drafter_ns=wire.drafter_ns,
                )
                summary = None
                if chunk.summary is not None:
                    live.record.summary = chunk.summary
                    summary = codec.summary_to_pb(chunk.summary, reconnects=wire.reconnects)
                    state = FINISHED
                    self._free(live, state)  # the engine has ended: no round holds the lock
                yield Step(sid, chunk, stats, summary)
                if summary is not None:
                    return
        except ServiceError as e:
            failure = e
            raise
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            state, error, failure = FAILED, f"{type(e).__name__}: {e}", e
            raise
        finally:
            if live.record.summary is not None:
                state = FINISHED
            if not live.closed:
                self._pool.submit(self._free, live, state, error)
            if live.telemetry is not None:
                live.telemetry.end(state, live.record.summary, failure)

    def cancel(self, session_id: str) -> bool:
        live = self.live.get(session_id)
        if live is None:
            if self.store.get(session_id) is None:
                raise not_found(f"unknown session {session_id!r}")
            return False  # already finished
        live.cancelled.set()
        return True

    def parent(self, context) -> dict[str, str] | None:
        """The caller's trace context (gRPC metadata), when tracing."""
        if not self.tracing.enabled:
            return None
        return tr.carrier_of_metadata(context.invocation_metadata())

    def encode(self, text: str, chat: bool) -> list[int]:
        return self.target.encode(text, chat=chat)

    def drain(self) -> None:
        """Refuse new sessions; running ones may finish within the server's grace period
        (then gRPC cancels them, which frees them like any cancellation)."""
        self.draining = True
        log.info("draining: %d sessions running", len(self.live))


def _params(request) -> SamplingParams:
    """SamplingParams of a VerifyRequest or GenerateRequest (the same field names)."""
    limit = request.max_new_tokens if request.HasField("max_new_tokens") else None
    if limit is not None and limit <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {limit}")
    return codec.sampling_from_pb(request.sampling, limit, list(request.stop))


def _response(message_type, step: Step):
    """A VerifyChunk or GenerateResponse of one round (the two share these field names)."""
    out = message_type(
        session_id=step.session_id,
        token_ids=step.chunk.token_ids,
        text=step.chunk.text,
        stats=step.stats,
    )
    if step.summary is not None:
        out.summary.CopyFrom(step.summary)
    return out


class VerifierServicer(verifier_pb2_grpc.VerifierServiceServicer):
    def __init__(self, core: VerifierCore) -> None:
        self.core = core

    async def Generate(self, request, context):
        params = _params(request)
        async for step in self.core.run(
            request.session_id,
            [int(t) for t in request.prompt_ids],
            params,
            request.drafter,
            request.drafter_endpoint,
            request.verifier,
            request.retain,
            parent=self.core.parent(context),
        ):
            yield _response(verifier_pb2.VerifyChunk, step)

    async def Cancel(self, request, context):
        return verifier_pb2.CancelResponse(cancelled=self.core.cancel(request.session_id))

    async def Info(self, request, context):
        core, cfg = self.core, self.core.config
        return verifier_pb2.VerifierInfo(
            target=cfg.model,
            target_fingerprint=core.fingerprint,
            active_sessions=len(core.live),
            capacity=cfg.max_sessions,
            drafter_endpoint=cfg.drafter_endpoint or "",
            default_drafter=cfg.drafter,
            device=str(core.target.device),
            max_context=core.target.max_context,
            vocab_size=core.target.vocab_size,
            version=coralline.__version__,
            session_ids=list(core.live),
            retained_session_ids=core.retained,
            retained_tokens=core.retained_tokens,
        )


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    """The public API, served by the verifier process itself."""

    def __init__(self, core: VerifierCore) -> None:
        self.core = core

    def _history(self, request) -> list[int] | None:
        """The conversation so far (prompt + output ids) for continue_session, else None."""
        if not request.continue_session:
            return None
        sid = request.session_id
        if not sid:
            raise ValueError("continue_session needs the session_id of the conversation")
        old = self.core.store.get(sid)
        if old is None:
            raise not_found(f"unknown session {sid!r}")
        if old.state == RUNNING:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION, f"session {sid!r} is still running"
            )
        return list(old.prompt_ids) + list(old.token_ids)

    async def Generate(self, request, context):
        history = self._history(request)
        kind = request.WhichOneof("prompt")
        if kind == "text":
            chat = request.chat_template if request.HasField("chat_template") else True
            if history is None:
                prompt = self.core.encode(request.text, chat)
            else:
                target = self.core.target
                prompt = next_turn_ids(
                    target.tokenizer, history, request.text, target.eos_token_ids, chat
                )
        elif kind == "token_ids":
            prompt = (history or []) + [int(t) for t in request.token_ids.ids]
        elif kind == "messages":
            prompt = messages_ids(self.core.target.tokenizer, request, history)
        else:
            raise ValueError("the request has no prompt: set text, token_ids or messages")
        params = _params(request)
        # this service's own sessions keep their KV cache (bounded LRU) for a next turn
        async for step in self.core.run(
            request.session_id,
            prompt,
            params,
            request.drafter,
            "",
            request.verifier,
            retain=True,
            parent=self.core.parent(context),
            rpc=tr.GENERATION_RPC,
        ):
            yield _response(generation_pb2.GenerateResponse, step)

    async def GetSession(self, request, context):
        rec = self.core.store.get(request.session_id)
        if rec is None:
            raise not_found(f"unknown session {request.session_id!r}")
        return codec.session_to_pb(rec)

    async def CancelSession(self, request, context):
        return generation_pb2.CancelSessionResponse(cancelled=self.core.cancel(request.session_id))


SERVICE_NAMES = [
    verifier_pb2.DESCRIPTOR.services_by_name["VerifierService"].full_name,
    generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
]


def _release_holder(url: str, address) -> Callable[[str], None]:
    """on_evict for a verifier behind routers: the session record stops naming it as the
    holder of the session's KV cache (compare-and-set: a newer holder is left alone)."""
    from coralline.session_redis import RedisSessionStore

    store = RedisSessionStore(url)
    return lambda session_id: store.release_holder(session_id, address())


async def start_verifier(
    config: VerifierServiceConfig,
    on_evict: Callable[[str], None] | None = None,
    tracing: Tracing | None = None,
) -> tuple[Server, VerifierCore]:
    """tracing: default from the OTEL_* variables."""
    # the Generation service is public (bearer tokens when configured); VerifierService is the
    # router's internal link (mutual TLS)
    server = Server(config.server, SERVICE_NAMES, public=SERVICE_NAMES[1:])
    if on_evict is None and config.sessions_url:
        advertised = config.server.advertise
        on_evict = _release_holder(config.sessions_url, lambda: advertised or server.address)
    core = VerifierCore(config, on_evict, tracing)
    verifier_pb2_grpc.add_VerifierServiceServicer_to_server(VerifierServicer(core), server.server)
    generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(core), server.server)
    await server.start()
    server.register(VERIFIER, config.max_sessions, core.fingerprint, lambda: len(core.live))
    if core.metrics is not None:
        server.serve_metrics(core.metrics.registry, config.metrics_port)
    return server, core


async def serve(config: VerifierServiceConfig, ready=print) -> None:
    """Run until SIGTERM / Ctrl-C; `ready(line)` is called once with the bound address."""
    t0 = time.perf_counter()
    server, core = await start_verifier(config)
    link = config.drafter_endpoint or "none (plain decoding)"
    ready(
        f"coralline verifier listening on {server.address} (target {config.model}, drafter "
        f"link {link}, default drafter {config.drafter}, device {config.device}, ready in "
        f"{time.perf_counter() - t0:.1f} s){server.telemetry_note(core.tracing)}"
    )
    await server.serve_until_signal(core.drain)
    for channel in core._channels.values():
        await channel.close()
    core.tracing.shutdown()  # flush the last spans
