"""The batch scheduler: continuous batching of the target's forwards across sessions.

Every session's runner (`TargetRunner` over a `PooledKV`) submits its forwards here and blocks
until they ran; one scheduler thread runs them in batches, each ONE ragged forward
(forward.py) over a KV pool slot per session (pool.py):

- Gathering: when work is pending, the batch starts as soon as every session of the previous
  batch that still holds its slot has submitted again (they are busy verifying, committing and
  drafting in between), or when the oldest pending forward has waited long enough for them
  (`gather_wait`): `max_wait_ms`, or longer where those sessions usually take longer to come
  back (a speculating session's round trip to its drafter: ~30-50 ms on the 2-core CPU), but
  never longer than a forward takes. Without that, sessions that miss one batch by a drafter
  round trip split into groups whose forwards alternate and never merge again (4 speculating
  sessions here: 1.9-2.0 sessions per forward; waiting for them: 3.4; docs/batching.md).
  Sessions join (their first prefill chunk) and leave (their slot is freed) between batches.
- Composition: trees first (decoding sessions), in arrival order, then prefill chunks, while the
  batch holds at most `max_batch_tokens` tokens (the first item always runs). A prompt enters
  in chunks of at most `prefill_chunk` tokens, one chunk per batch, so a long prompt never
  stalls the others for more than one bounded chunk.
- A session freed while its forward waits gets `SessionGone` in its thread; one freed while its
  forward is in the running batch keeps its slot until the batch ends (nothing else writes it).

The engine above is unchanged: each session still runs the reference round loop in its own
thread (warping, verification with its own keyed coins, the KV commit), so a session's output
is its single-session output (greedy: the same tokens up to floating-point rounding of a larger
matrix product; T > 0: the same law). tests/batching compares the two.

Knows nothing about drafting, verification or gRPC.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from coralline.batching import cpu_attention
from coralline.batching.forward import Item, Projections, ragged_forward, unsupported
from coralline.batching.pool import KVPool, PoolFull
from coralline.tree import TokenTree

log = logging.getLogger(__name__)
R = TypeVar("R")


@dataclass(frozen=True)
class BatchConfig:
    slots: int = 24  # sessions holding a KV cache at once (generating + retained idle ones)
    slot_tokens: int = 0  # tokens per slot; 0 = the model's context window (CPU buffers are
    # reserved address space: only the tokens in use become resident)
    max_batch_tokens: int = 512  # tokens in one forward: bounds a batch's latency
    prefill_chunk: int = 128  # a prompt's tokens per batch: what a new session may add to the
    # others' round (SmolLM2 fp32, 2-core CPU: ~0.1 s)
    fused_projections: bool = True  # q / k / v and gate / up as one linear each (forward.py:
    # faster, for a copy of those weights)
    cpu_attention: bool = True  # decode steps' attention on the CPU kernel where it builds
    # (cpu_attention.py: CPU float32 pools; else, or False, PyTorch's SDPA)
    max_wait_ms: float = 20.0  # how long a pending forward waits for the rest of the batch at
    # least (plain decoding resubmits within ~1-15 ms here: verification, commit, streaming)
    adaptive_wait: bool = True  # wait longer for sessions that usually come back later
    # (gap_factor x their usual resubmit gap), up to one forward's time (gather_wait)
    gap_factor: float = 1.5  # margin over a session's usual resubmit gap

    def __post_init__(self) -> None:
        if self.slots < 1 or self.max_batch_tokens < 1 or self.prefill_chunk < 1:
            raise ValueError("slots, max_batch_tokens and prefill_chunk must be >= 1")
        if self.slot_tokens < 0 or self.max_wait_ms < 0:
            raise ValueError("slot_tokens and max_wait_ms must be >= 0")
        if not self.gap_factor >= 1:
            raise ValueError("gap_factor must be >= 1")


GAP_SMOOTHING = 0.3  # weight of a session's newest resubmit gap in its running figure


def gather_wait(floor_s: float, gaps: Sequence[float], forward_s: float, factor: float) -> float:
    """Seconds a pending forward waits for the last batch's sessions still missing (pure).

    gaps: those sessions' usual resubmit gaps (from their last forward's end to their next
    submission); forward_s: what a forward takes now. At least `floor_s`; else `factor` x the
    longest gap, but never more than `forward_s`: a late session run in a forward of its own
    costs about a forward, so waiting longer than one cannot pay. A session that usually comes
    back later than a forward takes (a slow client, a distant drafter) is not waited for past
    the floor: it joins the batch after next without costing a forward, and waiting for it
    would delay everyone else's every other round."""
    near = [g for g in gaps if g <= forward_s]
    if not near:
        return floor_s
    return max(floor_s, min(factor * max(near), forward_s))


class SessionGone(RuntimeError):
    """The session's slot was freed while its forward waited."""


@dataclass
class _Work:
    item: Item
    tree: bool  # a tree (decoding) rather than a prefill chunk
    queued: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple[torch.Tensor, torch.Tensor | None] | None = None
    error: BaseException | None = None


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    tokens: int = 0
    forward_s: float = 0.0
    wait_s: float = 0.0  # pending forwards' time in the queue, summed
    mixed: int = 0  # batches holding both trees and prefill chunks
    sessions_hist: dict[int, int] = field(default_factory=dict)  # items per batch -> batches


class BatchScheduler:
    """Gathers the forwards of every session over one model into ragged batches."""

    def __init__(self, model, config: BatchConfig | None = None) -> None:
        why = unsupported(model)
        if why is not None:
            raise ValueError(f"batched verification cannot run this model: {why}")
        self.model = model
        self.config = config or BatchConfig()
        ctx = int(getattr(model.config, "max_position_embeddings", 2048))
        tokens = self.config.slot_tokens or ctx
        self.pool = KVPool.for_model(model, self.config.slots, min(tokens, ctx))
        self.projections = Projections(model) if self.config.fused_projections else None
        # built (once per machine) or loaded now, not in the first batch
        self.cpu_kernel = self.config.cpu_attention and cpu_attention.usable(self.pool.keys[0])
        self.stats = BatchStats()
        self._cond = threading.Condition()
        self._pending: list[_Work] = []
        self._calls: deque[tuple[Callable[[], object], Future]] = deque()  # run by call()
        self._running: set[int] = set()  # slots in the batch in flight
        self._release_after: set[int] = set()  # slots freed during the batch in flight
        self._expected: set[int] = set()  # slots of the last batch, still held
        self._thread: threading.Thread | None = None
        self._closed = False
        self._free_since = 0.0  # perf_counter when the last batch ended
        self._done_at: dict[int, float] = {}  # slot -> when its last tree's forward ended
        self._gap: dict[int, float] = {}  # slot -> its running resubmit gap (s)
        self.recent: deque[tuple[int, float]] = deque(maxlen=32)  # (tokens, seconds) of the
        # last batches (the speculation switch reads how loaded the machine is from them)
        # called as on_batch(items, tokens, forward seconds) after each batch (metrics)
        self.on_batch: Callable[[int, int, float], None] | None = None

    # ------------------------------------------------------------------ slots
    def acquire(self) -> int:
        with self._cond:
            return self.pool.acquire()

    def release(self, slot: int) -> None:
        """Free a slot: its pending forwards fail with SessionGone; a running one finishes."""
        with self._cond:
            for w in [w for w in self._pending if w.item.slot == slot]:
                self._pending.remove(w)
                w.error = SessionGone(f"KV slot {slot} was freed while its forward waited")
                w.done.set()
            self._expected.discard(slot)
            self._done_at.pop(slot, None)
            self._gap.pop(slot, None)
            if slot in self._running:
                self._release_after.add(slot)
            else:
                self.pool.release(slot)
            self._cond.notify_all()

    def park(self, slot: int) -> None:
        """The slot's session pauses (it keeps its entries): batches stop waiting for it."""
        with self._cond:
            self._expected.discard(slot)
            self._cond.notify_all()

    def sessions(self) -> int:
        """Sessions sharing the forwards now: the last batch's (still held), the queued ones
        and the running batch's (what the load-adaptive budget divides by: costs.py)."""
        with self._cond:
            return len(self._expected | self._running | {w.item.slot for w in self._pending})

    @property
    def waiting(self) -> int:
        """Forwards waiting for a batch (the verifier's queue depth)."""
        return len(self._pending)

    # ------------------------------------------------------------------ forwards
    def run(self, item: Item, tree: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Submit one item and wait for its batch; -> (hidden [n, d], logits [n, V] | None)."""
        if item.size > self.config.max_batch_tokens and tree:
            raise ValueError(
                f"a tree of {item.size} nodes exceeds max_batch_tokens "
                f"({self.config.max_batch_tokens})"
            )
        work = _Work(item, tree)
        with self._cond:
            self._started()
            done_at = self._done_at.pop(item.slot, None)
            if tree and done_at is not None:  # how long this session took to come back
                gap, old = work.queued - done_at, self._gap.get(item.slot)
                self._gap[item.slot] = gap if old is None else old + GAP_SMOOTHING * (gap - old)
            self._pending.append(work)
            self._cond.notify_all()
        work.done.wait()
        if work.error is not None:
            raise work.error
        assert work.result is not None
        return work.result

    def call(self, fn: Callable[[], R]) -> R:
        """Run fn() on the scheduler's thread between two batches; -> its result (or raise its
        exception). That thread is the one whose torch ops use every OpenMP thread (threads.py:
        the serving threads use one), so work that must run as fast as a batch does, such as
        measuring the forward's cost (costs.py), runs here."""
        done: Future[R] = Future()
        with self._cond:
            self._started()
            self._calls.append((fn, done))
            self._cond.notify_all()
        return done.result()

    def _started(self) -> None:  # under self._cond
        if self._closed:
            raise RuntimeError("the batch scheduler is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="batch", daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for w in self._pending:
                w.error = RuntimeError("the batch scheduler is closed")
                w.done.set()
            self._pending.clear()
            for _, done in self._calls:
                done.set_exception(RuntimeError("the batch scheduler is closed"))
            self._calls.clear()
            self._cond.notify_all()

    def _ready(self) -> bool:
        """Every session of the last batch that still holds its slot has submitted again."""
        pending = {w.item.slot for w in self._pending}
        return self._expected <= pending

    def _wait_s(self) -> float:  # under self._cond
        """How long the pending forwards wait for the missing sessions (gather_wait)."""
        cfg = self.config
        floor = cfg.max_wait_ms / 1e3
        if not cfg.adaptive_wait or not self.recent:
            return floor
        missing = self._expected - {w.item.slot for w in self._pending}
        gaps = [self._gap[s] for s in missing if s in self._gap]
        forward = statistics.median(s for _, s in list(self.recent)[-8:])
        return gather_wait(floor, gaps, forward, cfg.gap_factor)

    def _take(self) -> list[_Work]:
        budget = self.config.max_batch_tokens
        order = [w for w in self._pending if w.tree] + [w for w in self._pending if not w.tree]
        batch, used, slots = [], 0, set()
        for w in order:
            if w.item.slot in slots:  # one item per session per batch
                continue
            if batch and used + w.item.size > budget:
                continue
            batch.append(w)
            slots.add(w.item.slot)
            used += w.item.size
        for w in batch:
            self._pending.remove(w)
        return batch

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._calls and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                if self._calls:
                    call = self._calls.popleft()
                else:
                    call = None
                    # the wait counts from when the scheduler is free: a forward queued while
                    # the last batch ran has not waited for the others yet
                    since = max(min(w.queued for w in self._pending), self._free_since)
                    while not self._ready() and not self._closed:
                        left = since + self._wait_s() - time.perf_counter()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    if self._closed:
                        return
                    batch = self._take()
                    if not batch:  # their sessions left while the batch gathered
                        continue
                    self._running = {w.item.slot for w in batch}
            if call is not None:
                fn, done = call
                try:
                    done.set_result(fn())
                except BaseException as exc:  # raised in the caller's thread
                    done.set_exception(exc)
                continue
            t0 = time.perf_counter()
            try:
                items = [w.item for w in batch]
                results = ragged_forward(
                    self.model, self.pool, items, self.projections, self.cpu_kernel
                )
                error = None
            except BaseException as exc:  # handed to the sessions' threads
                log.exception("batched forward failed")
                results, error = None, exc
            t1 = time.perf_counter()
            with self._cond:
                st = self.stats
                st.batches += 1
                st.items += len(batch)
                st.tokens += sum(w.item.size for w in batch)
                st.forward_s += t1 - t0
                self.recent.append((sum(w.item.size for w in batch), t1 - t0))
                st.wait_s += sum(t0 - w.queued for w in batch)
                st.sessions_hist[len(batch)] = st.sessions_hist.get(len(batch), 0) + 1
                st.mixed += len({w.tree for w in batch}) == 2
                gone = self._release_after
                self._expected = {w.item.slot for w in batch if w.tree} - gone
                for i, w in enumerate(batch):
                    if w.item.slot in gone:
                        w.error = SessionGone(f"KV slot {w.item.slot} was freed during its batch")
                    elif error is None:
                        assert results is not None
                        w.result = results[i]
                        self.pool.lengths[w.item.slot] = w.item.start + w.item.size
                        if w.tree:
                            self._done_at[w.item.slot] = t1
                    else:
                        w.error = error
                    w.done.set()
                for slot in gone:
                    self.pool.release(slot)
                self._release_after = set()
                self._running = set()
                self._free_since = time.perf_counter()
            if self.on_batch is not None:
                try:
                    self.on_batch(len(batch), sum(w.item.size for w in batch), t1 - t0)
                except Exception:
                    log.exception("on_batch failed")


class PooledKV:
    """A session's cache in one slot of the scheduler's pool (the `KVCache` protocol of
    target.py). The slot is taken at the first forward and given back by clear()."""

    def __init__(self, scheduler: BatchScheduler) -> None:
        self.scheduler = scheduler
        self.lock = _QueueDepth(scheduler)  # forwards are not serialised: they are batched
        self.max_context = scheduler.pool.slot_tokens
        self.slot: int | None = None

    def fork(self) -> PooledKV:
        return PooledKV(self.scheduler)

    def length(self) -> int:
        return 0 if self.slot is None else self.scheduler.pool.lengths[self.slot]

    def forward(
        self,
        ids: torch.Tensor,  # [n] int64
        positions: torch.Tensor,  # [n] int64
        tree: TokenTree | None,
        logits: bool,
        logits_from: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.slot is None:
            try:
                self.slot = self.scheduler.acquire()
            except PoolFull as exc:
                raise PoolFull(f"{exc}: raise --kv-slots or lower max_sessions") from exc
        s = self.scheduler
        if tree is not None:
            item = Item(
                self.slot, self.length(), ids, positions, tree.ancestor_mask, logits, logits_from
            )
            return s.run(item, tree=True)
        step = s.config.prefill_chunk
        hidden, rows = [], []
        for a in range(0, int(ids.shape[0]), step):
            chunk = ids[a : a + step]  # [m]
            want = logits and a + int(chunk.shape[0]) > logits_from  # rows of it are asked for
            item = Item(
                self.slot,
                self.length(),
                chunk,
                positions[a : a + step],
                None,
                want,
                max(0, logits_from - a) if want else 0,
            )
            h, r = s.run(item, tree=False)
            hidden.append(h)
            if r is not None:
                rows.append(r)
        return torch.cat(hidden), (torch.cat(rows) if logits else None)

    def keep(self, start: int, accepted: Sequence[int]) -> None:
        self.scheduler.pool.keep(self._held(), start, accepted)

    def crop(self, length: int) -> None:
        if self.slot is not None and length < self.length():
            self.scheduler.pool.lengths[self.slot] = length

    def park(self) -> None:
        """The session pauses between turns, holding its entries (see BatchScheduler.park)."""
        if self.slot is not None:
            self.scheduler.park(self.slot)

    def clear(self) -> None:
        if self.slot is not None:
            slot, self.slot = self.slot, None
            self.scheduler.release(slot)

    def _held(self) -> int:
        if self.slot is None:
            raise RuntimeError("this session holds no KV slot")
        return self.slot


class _QueueDepth:
    """Stands where DynamicKV's lock stands: nothing to serialise; `waiting` is the queue."""

    def __init__(self, scheduler: BatchScheduler) -> None:
        self._scheduler = scheduler

    @property
    def waiting(self) -> int:
        return self._scheduler.waiting

    def __enter__(self) -> _QueueDepth:
        return self

    def __exit__(self, *exc) -> None:
        return None


def pooled(runner, config: BatchConfig | None = None):
    """A TargetRunner over the same model whose forks share one batch scheduler and KV pool."""
    from coralline.target import TargetRunner

    kv = PooledKV(BatchScheduler(runner.model, config))
    return TargetRunner(runner.model, runner.tokenizer, runner.config, kv=kv)
