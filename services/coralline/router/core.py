"""The router's request path, without Ray: what one replica does for each public call.

    Generate(request)  tokenize (chat template) -> create the session in the store, or start
                       the next turn of a conversation -> place it -> stream from the chosen
                       verifier's Generate (with the chosen drafter) -> append committed ids to
                       the record per round -> finish. A verifier that fails mid-stream is
                       excluded and the session re-placed with prompt + committed ids as its
                       prompt and the remaining budget: the client's stream goes on with no gap
                       and no duplicate (failover).
    GetSession         the record, from the store.
    CancelSession      sets the record's cancel flag and cancels the verifier's session
                       directly (whichever replica streams it sees the stream end CANCELLED).

A replica keeps no session state between requests: everything a later request (or another
replica) needs is in the store. While a request streams, the replica holds its turn in memory
(`_Turn`) and writes it through; a write the store refuses for being unreachable (Redis
restarting) is kept and retried each round, and a record that vanished (Redis restarted empty)
is written again whole, so the record is never partial: the stream itself goes on.

Knows nothing about Ray (app.py hosts it) and nothing about models beyond the tokenizer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from coralline.router.discovery import StaticDiscovery
from coralline.router.placement import (
    DRAFTER,
    VERIFIER,
    NoCapacity,
    NoWorkers,
    Placement,
    Request,
    place,
)
from coralline.router.workers import WorkerPool
from coralline.rpc import codec
from coralline.rpc.errors import PromptTooLong, ServiceError, exhausted, not_found
from coralline.rpc.protos import common_pb2, generation_pb2, verifier_pb2
from coralline.rpc.security import TlsConfig
from coralline.sampling import fresh_seed
from coralline.session import (
    CANCELLED,
    FAILED,
    FINISHED,
    RUNNING,
    SessionConflict,
    SessionRecord,
    StoreUnavailable,
)
from coralline.telemetry import tracing as tr
from coralline.telemetry.router import RequestTrace
from coralline.telemetry.tracing import Tracing

log = logging.getLogger("coralline.router")

# a verifier call ending with one of these moves the session to another verifier
_FAILOVER = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.CANCELLED,  # the verifier went away (not our cancel: that is checked first)
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
}


@dataclass(frozen=True)
class RouterConfig:
    model: str = "smollm2-135m-instruct"  # whose tokenizer and chat template (no weights read)
    verifiers: tuple[str, ...] = ()  # static discovery: verifier addresses
    drafters: tuple[str, ...] = ()  # static discovery: drafter addresses
    redis: str | None = None  # the session store (and, without static verifiers, the registry)
    kubernetes_namespace: str | None = None  # discover workers from this namespace's
    # EndpointSlices (in a cluster: the Helm chart and k8s/ set it) instead of a static list
    kubernetes_selector: str = ""  # extra label selector ANDed with the component's
    # (e.g. app.kubernetes.io/instance=coralline: one release's workers only)
    session_ttl_s: float = 3600.0  # a record idle this long expires (Redis store)
    history: int = 1024  # finished records kept by the memory store
    default_drafter: str = "coral"  # a request with an empty drafter name gets this
    max_failovers: int = 3  # verifier failures one request survives
    refresh_s: float = 0.25  # how stale the workers' loads may be
    retry_after_s: float = 1.0  # the hint sent with RESOURCE_EXHAUSTED
    max_message_bytes: int = 64 << 20
    # limits (INVALID_ARGUMENT / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED, each naming itself)
    max_prompt_tokens: int = 0  # a longer prompt (a conversation's history included) is
    # refused; 0 = only the verifiers' context window bounds it
    max_new_tokens: int = 4096  # a request asking for more is refused
    max_request_s: float = 600.0  # a request still running after this ends with
    # DEADLINE_EXCEEDED and its verifier session is freed (0 = no bound)
    max_queued: int = 64  # requests of this replica waiting for a verifier with room; past it
    # RESOURCE_EXHAUSTED at once, with the retry hint
    queue_timeout_s: float = 10.0  # the longest a request waits there (0 = refuse when full)
    tls: TlsConfig | None = None  # mutual TLS to the verifiers and drafters (rpc/security.py)

    def __post_init__(self) -> None:
        if not self.verifiers and not self.redis and not self.kubernetes_namespace:
            raise ValueError(
                "the router needs verifier addresses, a Redis registry (--redis) or a Kubernetes "
                "namespace to discover them in"
            )
        if self.verifiers and self.kubernetes_namespace:
            raise ValueError("give verifier addresses or a Kubernetes namespace, not both")
        if self.max_failovers < 0 or self.refresh_s < 0 or self.session_ttl_s <= 0:
            raise ValueError("max_failovers and refresh_s must be >= 0, session_ttl_s > 0")
        if min(self.max_prompt_tokens, self.max_queued) < 0 or self.max_new_tokens < 1:
            raise ValueError("max_prompt_tokens and max_queued must be >= 0, max_new_tokens >= 1")
        if min(self.max_request_s, self.queue_timeout_s, self.retry_after_s) < 0:
            raise ValueError("max_request_s, queue_timeout_s and retry_after_s must be >= 0")


def make_store(config: RouterConfig):
    if config.redis:
        from coralline.session_redis import RedisSessionStore

        return RedisSessionStore(config.redis, ttl_s=config.session_ttl_s)
    from coralline.session import MemorySessionStore

    return MemorySessionStore(config.history, ttl_s=config.session_ttl_s)


def make_discovery(config: RouterConfig):
    if config.verifiers:
        return StaticDiscovery(config.verifiers, config.drafters)
    if config.kubernetes_namespace:
        from coralline.router.discovery import KubernetesDiscovery

        extra = f",{config.kubernetes_selector}" if config.kubernetes_selector else ""
        return KubernetesDiscovery(
            config.kubernetes_namespace,
            verifier_selector=f"app.kubernetes.io/component=verifier{extra}",
            drafter_selector=f"app.kubernetes.io/component=drafter{extra}",
        )
    from coralline.router.registry import RedisRegistry

    return RedisRegistry(config.redis)


@dataclass
class _Turn:
    """One request's state while it streams (the store's copy is written through)."""

    record: SessionRecord  # as created / begun
    prompt: list[int]
    params: object  # SamplingParams, seed fixed
    drafter: str  # the drafter name asked for ("none": plain)
    verifier: str  # the verification method asked for ("" = default)
    ids: list[int] = dataclasses.field(default_factory=list)  # generated this turn
    text: str = ""
    stored: int = 0  # how many of `ids` the store has
    stored_text: int = 0  # how much of `text` the store has
    rounds: int = 0
    accepted: int = 0
    draft_ns: int = 0
    verify_ns: int = 0
    failovers: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)
    trace: RequestTrace | None = None  # its spans, when tracing

    @property
    def sid(self) -> str:
        return self.record.session_id


class RouterCore:
    """One router replica's logic; every method runs on the replica's event loop."""

    def __init__(
        self, config: RouterConfig, store=None, discovery=None, tracing: Tracing | None = None
    ) -> None:
        """tracing: default from the OTEL_* variables (off unless they say otherwise)."""
        from coralline import models

        self.config = config
        self.tracing = tracing or Tracing.from_env(tr.SERVICES["router"])
        self.store = store if store is not None else make_store(config)
        self.pool = WorkerPool(
            discovery if discovery is not None else make_discovery(config),
            refresh_s=config.refresh_s,
            max_message_bytes=config.max_message_bytes,
            tls=config.tls,
        )
        self.tokenizer = models.load_tokenizer(config.model)
        self.queued = 0  # requests in the admission queue (waiting for a verifier with room)

    # ------------------------------------------------------------------ the store, off-loop
    async def _store(self, fn, *args, **kwargs):
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except StoreUnavailable as e:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"session store: {e}") from None

    # ------------------------------------------------------------------ requests
    def _prompt(self, request, history: list[int] | None) -> list[int]:
        from coralline.conversation import messages_ids, next_turn_ids, prompt_ids

        kind = request.WhichOneof("prompt")
        if kind == "messages":
            return messages_ids(self.tokenizer, request, history)
        if kind == "text":
            chat = request.chat_template if request.HasField("chat_template") else True
            if history is not None:
                return next_turn_ids(self.tokenizer, history, request.text, self._eos(), chat)
            return prompt_ids(self.tokenizer, request.text, chat)
        if kind == "token_ids":
            ids = [int(t) for t in request.token_ids.ids]
            if not ids:
                raise ValueError("the prompt is empty")
            return (history or []) + ids
        raise ValueError("the request has no prompt: set text, token_ids or messages")

    def _check_prompt(self, prompt: list[int]) -> list[int]:
        limit = self.config.max_prompt_tokens
        if limit and len(prompt) > limit:
            raise PromptTooLong(
                f"the prompt has {len(prompt)} tokens (a conversation's history included); this "
                f"router accepts at most {limit} (max_prompt_tokens)"
            )
        return prompt

    def _eos(self) -> frozenset[int]:
        eos = self.tokenizer.eos_token_id
        return frozenset() if eos is None else frozenset([int(eos)])

    async def _begin(self, request) -> _Turn:
        limit = request.max_new_tokens if request.HasField("max_new_tokens") else None
        if limit is not None and limit <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {limit}")
        params = codec.sampling_from_pb(request.sampling, limit, list(request.stop))
        if params.max_new_tokens > self.config.max_new_tokens:
            raise ValueError(
                f"max_new_tokens is {params.max_new_tokens}; this router allows at most "
                f"{self.config.max_new_tokens} (max_new_tokens)"
            )
        if params.seed is None:  # fixed here, so a failover continues the same random stream
            params = dataclasses.replace(params, seed=fresh_seed())
        drafter = request.drafter or self.config.default_drafter
        sampling = {
            "temperature": params.temperature,
            "top_k": params.top_k,
            "top_p": params.top_p,
            "seed": params.seed,
            "max_new_tokens": params.max_new_tokens,
            "stop": list(params.stop),
            "ignore_eos": params.ignore_eos,
        }
        sid = request.session_id
        if request.continue_session:
            if not sid:
                raise ValueError("continue_session needs the session_id of the conversation")
            old = await self._store(self.store.get, sid)
            if old is None:
                raise not_found(f"unknown session {sid!r} (never made, or expired)")
            if old.state == RUNNING:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"session {sid!r} is still running: wait for its stream to end",
                )
            prompt = self._check_prompt(
                self._prompt(request, list(old.prompt_ids) + list(old.token_ids))
            )
            try:
                rec = await self._store(self.store.begin_turn, sid, prompt, sampling, drafter)
            except SessionConflict:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION, f"session {sid!r} is already running"
                ) from None
        else:
            prompt = self._check_prompt(self._prompt(request, None))
            sid = sid or uuid.uuid4().hex
            rec = SessionRecord(
                sid, len(prompt), drafter, request.verifier, prompt_ids=prompt, sampling=sampling
            )
            try:
                await self._store(self.store.create, rec)
            except KeyError:
                raise ServiceError(
                    grpc.StatusCode.ALREADY_EXISTS, f"session {sid!r} is already running"
                ) from None
        return _Turn(rec, prompt, params, drafter, request.verifier)

    async def _place(self, turn: _Turn, exclude: set[str], busy: set[str]) -> Placement:
        """A verifier with room (and a drafter), avoiding `exclude` (failed this request) and
        `busy` (refused it as full). When every verifier is full the request waits in this
        replica's admission queue (at most max_queued requests, each at most queue_timeout_s,
        polling the workers' loads), then RESOURCE_EXHAUSTED with the retry hint."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        deadline, queued = None, False
        try:
            while True:
                workers = await self.pool.workers()
                try:
                    p = place(
                        workers,
                        Request(turn.sid, turn.drafter, holder=turn.record.holder),
                        exclude | busy,
                        cfg.retry_after_s,
                    )
                    break
                except NoWorkers as e:
                    if not busy:
                        raise ServiceError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
                    busy.clear()  # full a moment ago: wait for room as for any full one
                    full = NoCapacity(
                        f"every verifier refused the session as full; retry in "
                        f"{cfg.retry_after_s:g} s",
                        cfg.retry_after_s,
                    )
                except NoCapacity as e:
                    full = e
                if deadline is None:
                    if self.queued >= cfg.max_queued or cfg.queue_timeout_s <= 0:
                        raise exhausted(
                            f"{full}; the admission queue is full ({self.queued} waiting)",
                            full.retry_after_s,
                        )
                    deadline, queued = loop.time() + cfg.queue_timeout_s, True
                    self.queued += 1
                left = deadline - loop.time()
                request_left = self._time_left(turn)
                if request_left is not None:
                    left = min(left, request_left)
                if left <= 0:
                    raise exhausted(
                        f"{full} (waited {cfg.queue_timeout_s:g} s in the admission queue)",
                        full.retry_after_s,
                    )
                await asyncio.sleep(min(max(cfg.refresh_s, 0.05), left))
        finally:
            if queued:
                self.queued -= 1
        self.pool.placed(p.verifier.address, p.drafter.address if p.drafter else "")
        if p.reason:
            log.info("session %s: %s", turn.sid, p.reason)
        return p

    def _time_left(self, turn: _Turn) -> float | None:
        """Seconds left of the request's max_request_s (None: unbounded); past it, the error."""
        bound = self.config.max_request_s
        if not bound:
            return None
        left = bound - (time.perf_counter() - turn.started)
        if left <= 0:
            raise self._overtime(turn)
        return left

    def _overtime(self, turn: _Turn) -> ServiceError:
        return ServiceError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"session {turn.sid} ran longer than this router allows ({self.config.max_request_s:g}"
            f" s, max_request_s) after {len(turn.ids)} tokens; its verifier session was freed",
        )

    def _verify_request(self, turn: _Turn, p: Placement) -> verifier_pb2.VerifyRequest:
        params = turn.params
        req = verifier_pb2.VerifyRequest(
            session_id=turn.sid,
            prompt_ids=turn.prompt + turn.ids,
            max_new_tokens=params.max_new_tokens - len(turn.ids),
            stop=list(params.stop),
            drafter=turn.drafter if p.drafter is not None else "none",
            drafter_endpoint=p.drafter.address if p.drafter is not None else "",
            verifier=turn.verifier,
            retain=True,
        )
        codec.sampling_to_pb(params, req.sampling)
        return req

    # ------------------------------------------------------------------ write-through
    def _write(self, turn: _Turn) -> bool:
        """Bring the store's record up to the turn (in a worker thread); True if it is there."""
        store = self.store
        pending, text = turn.ids[turn.stored :], turn.text[turn.stored_text :]
        try:
            if pending or text:
                store.append(turn.sid, pending, text, expected_len=turn.stored)
            turn.stored, turn.stored_text = len(turn.ids), len(turn.text)
            return True
        except StoreUnavailable:
            return False  # kept; retried next round
        except KeyError:  # the record vanished (the store restarted empty): write it whole
            rec = dataclasses.replace(
                turn.record,
                token_ids=list(turn.ids),
                text=turn.text,
                state=RUNNING,
                failovers=turn.failovers,
            )
            try:
                store.create(rec)
            except (StoreUnavailable, KeyError):
                return False
            log.warning("session %s: its record was gone from the store; rewritten", turn.sid)
            turn.stored, turn.stored_text = len(turn.ids), len(turn.text)
            return True
        except SessionConflict as e:
            if e.committed == turn.stored + len(pending):  # our append landed, its reply lost
                turn.stored, turn.stored_text = len(turn.ids), len(turn.text)
                return True
            # another writer: never overwrite what it wrote
            log.error("session %s: the store's record changed under this router: %s", turn.sid, e)
            turn.stored, turn.stored_text = len(turn.ids), len(turn.text)
            return False

    def _round(self, turn: _Turn) -> bool:
        """Write the round through and read the cancel flag (one thread hop per round)."""
        self._write(turn)
        try:
            return self.store.cancel_requested(turn.sid)
        except StoreUnavailable:
            return False

    def _finish(self, turn: _Turn, state: str, summary, error: str, holder: str) -> None:
        for attempt in range(3):  # a restarting store gets a few seconds
            if self._write(turn):
                try:
                    if holder:
                        self.store.update(
                            turn.sid,
                            holder=holder,
                            cached_tokens=len(turn.prompt) + len(turn.ids) - 1,
                            failovers=turn.failovers,
                        )
                    self.store.finish(turn.sid, state, summary, error)
                    return
                except (StoreUnavailable, KeyError):
                    pass
            time.sleep(0.5 * (attempt + 1))
        log.error("session %s: could not record its end (%s) in the session store", turn.sid, state)

    # ------------------------------------------------------------------ Generate
    async def generate(
        self, request, trace_context=None
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """trace_context: the client's W3C context (a dict or gRPC metadata), if any."""
        trace = None
        if self.tracing.enabled:
            trace = RequestTrace(self.tracing, request, self.config.model, trace_context)
        try:
            turn = await self._begin(request)
        except Exception as e:
            if trace is not None:
                trace.end(None, FAILED, None, e)
            raise
        if trace is not None:
            turn.trace = trace
            trace.begun(turn.sid, turn.params, len(turn.prompt))
        state, error, summary, holder, failure = CANCELLED, "", None, "", None
        try:
            async for response, done in self._stream(turn):
                if done is not None:
                    summary, holder = done
                    state = FINISHED
                yield response
        except ServiceError as e:
            state = CANCELLED if e.code == grpc.StatusCode.CANCELLED else FAILED
            error, failure = ("" if state == CANCELLED else e.message), e
            raise
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            state, error, failure = FAILED, f"{type(e).__name__}: {e}", e
            raise
        finally:
            if trace is not None:
                trace.end(turn, state, summary, failure)
            await asyncio.shield(
                asyncio.to_thread(self._finish, turn, state, summary, error, holder)
            )

    async def _stream(self, turn: _Turn):
        """(GenerateResponse, None | (Summary, holder address)) per round, failing over."""
        exclude: set[str] = set()  # verifiers that failed this request
        busy: set[str] = set()  # verifiers that refused it as full
        trace, attempt = turn.trace, 0
        while True:
            attempt += 1
            t_place = time.time_ns()
            p = await self._place(turn, exclude, busy)
            address = p.verifier.address
            if trace is not None:
                trace.placed(t_place, p, attempt)
            fields = {"placement": address, "failovers": turn.failovers}
            fields["drafter_address"] = p.drafter.address if p.drafter is not None else ""
            await self._store(self.store.update, turn.sid, **fields)
            span, metadata = trace.call(address, attempt) if trace is not None else (None, ())
            call = self.pool.verifier(address).Generate(
                self._verify_request(turn, p), metadata=metadata, timeout=self._time_left(turn)
            )
            segment_start, failure = len(turn.ids), None
            try:
                async for chunk in call:
                    response = self._relay(turn, chunk, segment_start)
                    if await asyncio.to_thread(self._round, turn):
                        call.cancel()
                        raise ServiceError(
                            grpc.StatusCode.CANCELLED, f"session {turn.sid} was cancelled"
                        )
                    if chunk.HasField("summary"):
                        yield response, (codec.summary_from_pb(response.summary), address)
                        return
                    yield response, None
                raise ServiceError(
                    grpc.StatusCode.INTERNAL, f"verifier {address} ended the stream early"
                )
            except grpc.aio.AioRpcError as e:
                failure = e
                code = e.code()
                if code == grpc.StatusCode.CANCELLED and await self._cancel_requested(turn):
                    raise ServiceError(
                        grpc.StatusCode.CANCELLED, f"session {turn.sid} was cancelled"
                    ) from None
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    busy.add(address)  # full since its last Info: another one, or the queue
                    continue
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and self.config.max_request_s:
                    raise self._overtime(turn) from None  # the call's timeout: our bound
                if code not in _FAILOVER:
                    raise ServiceError(code, e.details() or code.name) from None
                self.pool.failed(address)
                exclude.add(address)
                turn.failovers += 1
                log.warning(
                    "session %s: verifier %s failed (%s: %s) after %d tokens; failover %d",
                    turn.sid,
                    address,
                    code.name,
                    e.details(),
                    len(turn.ids),
                    turn.failovers,
                )
                if turn.failovers > self.config.max_failovers:
                    raise ServiceError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"session {turn.sid}: {turn.failovers} verifiers failed; giving up",
                    ) from None
            finally:
                call.cancel()  # a no-op once it ended; frees the verifier's session otherwise
                if span is not None:
                    trace.call_done(span, failure)

    async def _cancel_requested(self, turn: _Turn) -> bool:
        try:
            return await asyncio.to_thread(self.store.cancel_requested, turn.sid)
        except StoreUnavailable:
            return False

    def _relay(self, turn: _Turn, chunk, segment_start: int) -> generation_pb2.GenerateResponse:
        """The client's response for a verifier chunk; after a failover, rounds are renumbered
        and the text is re-derived from all ids (the new verifier saw only its own tokens)."""
        ids = list(chunk.token_ids)
        turn.ids.extend(ids)
        if turn.failovers and segment_start:
            full = self.tokenizer.decode(turn.ids, skip_special_tokens=True)
            text = full[len(turn.text) :] if full.startswith(turn.text) else chunk.text
        else:
            text = chunk.text
        turn.text += text
        turn.rounds += 1
        turn.accepted += chunk.stats.accepted
        turn.draft_ns += chunk.stats.draft_ns
        turn.verify_ns += chunk.stats.verify_ns
        stats = common_pb2.RoundStats()
        stats.CopyFrom(chunk.stats)
        stats.round = turn.rounds
        out = generation_pb2.GenerateResponse(
            session_id=turn.sid, token_ids=ids, text=text, stats=stats
        )
        if chunk.HasField("summary"):
            s = out.summary
            s.CopyFrom(chunk.summary)
            s.failovers = turn.failovers
            if turn.failovers:  # the last verifier saw only its segment
                elapsed = time.perf_counter() - turn.started
                s.tokens = len(turn.ids)
                s.rounds = turn.rounds
                s.acceptance_length = 1.0 + turn.accepted / turn.rounds
                s.tokens_per_second = len(turn.ids) / elapsed if elapsed > 0 else 0.0
                s.draft_ns, s.verify_ns = turn.draft_ns, turn.verify_ns
                s.prompt_tokens = len(turn.prompt)
        return out

    # ------------------------------------------------------------------ other calls
    async def get_session(self, session_id: str) -> generation_pb2.Session:
        rec = await self._store(self.store.get, session_id)
        if rec is None:
            raise not_found(f"unknown session {session_id!r} (never made, or expired)")
        return codec.session_to_pb(rec)

    async def cancel_session(self, session_id: str) -> bool:
        try:
            running = await self._store(self.store.request_cancel, session_id)
        except KeyError:
            raise not_found(f"unknown session {session_id!r} (never made, or expired)") from None
        if not running:
            return False
        rec = await self._store(self.store.get, session_id)
        if rec is not None and rec.placement:  # free its verifier session now
            try:
                await self.pool.verifier(rec.placement).Cancel(
                    verifier_pb2.CancelRequest(session_id=session_id), timeout=2.0
                )
            except grpc.aio.AioRpcError as e:  # not placed yet, or gone: the flag stops it
                log.info("cancel %s at %s: %s", session_id, rec.placement, e.code().name)
        return True

    async def status(self) -> dict:
        """What the router sees: the verifiers and drafters up (healthy) and known, the
        sessions the verifiers hold and can hold, requests in the admission queue."""
        workers = await self.pool.workers()
        out: dict = {"queued": self.queued, "model": self.config.model}
        for kind in (VERIFIER, DRAFTER):
            up = [w for w in workers if w.kind == kind and w.healthy]
            out[f"{kind}s_up"] = len(up)
            out[f"{kind}s_known"] = sum(w.kind == kind for w in workers)
            if kind == VERIFIER:
                out["sessions"] = sum(w.active for w in up)
                out["capacity"] = sum(w.capacity for w in up)
        return out

    async def close(self) -> None:
        await self.pool.close()
