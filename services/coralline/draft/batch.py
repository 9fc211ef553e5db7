"""Batched drafting: the head forwards and LM-head calls of many sessions, one call each.

A drafter service drafts for many sessions at once. A CORAL round is a few small steps (sync the
commit through the head, then per tree layer one head forward and one LM-head call), each over a
handful of rows: on a CPU most of a step is per-call overhead (SmolLM2's head, one session:
~3.7 ms of head forward and ~2 ms of LM head per round, for ~5 rows). Drafted one after the
other, 16 sessions take ~16 rounds of that, and their trees reach the verifier one by one, which
splits its batches. `DraftBatcher` gathers the pending steps of every session drafting now and
runs each kind as ONE call:

  head forward   `head_forward_many`: the rows of every pending forward go through the input
                 projection, q / k / v / o, the MLP and the norms once ([N, d]); attention runs
                 per session over its own DynamicCache with its own mask (a few rows each)
  LM head        `logits_many`: every pending row through the router and the grouped head (or
                 the full head) in one call: each group's matmul covers every session's rows that
                 chose it

Each session still runs its own drafter (tree building, warping, its keyed draws) in its own
thread; only the tensor work is shared, so a session's proposal is the one it drafts alone up to
the rounding of a larger matrix product (tests/draft/test_batch.py: identical trees and rows in
float64; `head_forward_many` against CoralHead.forward call by call). Losslessness never depends
on it: the verifier checks whatever tree and rows it is sent.

Gathering, in waves: a batch runs when every session drafting now waits on a step (none is still
building its tree), and, while a wave gathers, once every session of the previous wave has come
back or `max_wait_ms` has passed since the wave began. A wave ends when no session is drafting;
the sessions of a wave are the ones the next wave waits for (their Commits arrive together when
the verifier verified them together: the two sides stay in step). No step waits longer than
`max_wait_ms` for the others: a session slow to come back (its thread starved of the GIL, say)
delays the rest by at most that, and joins the next call. The thread that finds a batch ready
runs it; the others sleep until their step is done.

Knows nothing about gRPC or trees: a drafter hands it tensors (coral_drafter.py `batcher`).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DraftBatchConfig:
    max_wait_ms: float = 10.0  # the longest a step waits for the other sessions' steps, and a
    # wave for the previous wave's sessions (their Commits arrive within a few ms of each other
    # when verified in one batch)

    def __post_init__(self) -> None:
        if not self.max_wait_ms >= 0:
            raise ValueError("max_wait_ms must be >= 0")


@dataclass(frozen=True)
class HeadCall:
    """One session's head forward: its rows after the entries its cache holds."""

    tokens: torch.Tensor  # [n] int64, token_{t+1} per row
    features: torch.Tensor  # [n, d] f_t per row (the head's dtype and device)
    positions: torch.Tensor  # [n] int64
    mask: torch.Tensor | None  # [1, 1, n, past + n] float additive; None: n == 1 attends to all
    cache: object  # the session's DynamicCache (one layer), updated in place

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])


@torch.inference_mode()
def head_forward_many(head, calls: list[HeadCall]) -> list[torch.Tensor]:
    """CoralHead.forward of every call in one pass; -> per call its draft features [n, d].

    The arithmetic of CoralHead.forward (fc over [embedding, normed feature], one Llama decoder
    layer without its input norm, the final norm) with the rows of all calls concatenated;
    attention per call over its own cache, as transformers' SDPA path computes it."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    if not calls:
        return []
    dev, dtype = head.fc.weight.device, head.fc.weight.dtype
    bounds = list(itertools.accumulate((c.size for c in calls), initial=0))
    total = bounds[-1]
    ids = torch.cat([c.tokens for c in calls]).to(dev)  # [N]
    feats = torch.cat([c.features for c in calls]).to(dev, dtype)  # [N, d]
    pos = torch.cat([c.positions for c in calls]).to(dev)[None]  # [1, N]
    emb = F.embedding(ids, head._need(head._embed)).to(dtype)  # [N, d]
    x = head.fc(torch.cat([emb, head.feature_in(feats)], dim=-1))[None]  # [1, N, d]
    cos, sin = head.rotary(x, pos)  # [1, N, hd]
    layer = head.layer
    attn = layer.self_attn
    hd = attn.head_dim
    h = layer.input_layernorm(x)  # Identity (EAGLE), kept for the layer's own arithmetic
    q = attn.q_proj(h).view(1, total, -1, hd).transpose(1, 2)  # [1, H, N, hd]
    k = attn.k_proj(h).view(1, total, -1, hd).transpose(1, 2)  # [1, kvH, N, hd]
    v = attn.v_proj(h).view(1, total, -1, hd).transpose(1, 2)  # [1, kvH, N, hd]
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    o = torch.empty_like(q)  # [1, H, N, hd]
    for i, c in enumerate(calls):
        a, b = bounds[i], bounds[i + 1]
        keys, values = c.cache.update(k[:, :, a:b].clone(), v[:, :, a:b].clone(), 0)
        mask = None if c.mask is None else c.mask.to(dev, dtype)
        o[:, :, a:b] = F.scaled_dot_product_attention(
            q[:, :, a:b],
            keys,
            values,
            attn_mask=mask,
            scale=attn.scaling,
            is_causal=mask is None and b - a > 1,  # as transformers' SDPA path
            enable_gqa=True,
        )
    x = x + attn.o_proj(o.transpose(1, 2).reshape(1, total, -1))
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    out = head.norm(x)[0]  # [N, d]
    return [out[bounds[i] : bounds[i + 1]] for i in range(len(calls))]


@torch.inference_mode()
def logits_many(head, grouped: bool, feats: list[torch.Tensor]):
    """The draft logits of every call's rows in one call; -> per call (token ids [n, S] or None
    for the full vocabulary, logits [n, S]), as CoralHead.grouped_logits / full_logits."""
    bounds = list(itertools.accumulate((int(f.shape[0]) for f in feats), initial=0))
    rows = torch.cat(feats)  # [N, d]
    ids, logits = head.grouped_logits(rows) if grouped else (None, head.full_logits(rows))
    cut = [slice(bounds[i], bounds[i + 1]) for i in range(len(feats))]
    return [(None if ids is None else ids[s], logits[s]) for s in cut]


@dataclass
class _Step:
    key: tuple  # steps with the same key run as one call
    run_many: Callable[[list], list]  # payloads -> results, in order
    payload: object
    queued: float = field(default_factory=time.perf_counter)
    done: bool = False
    result: object = None
    error: BaseException | None = None


@dataclass
class DraftBatchStats:
    batches: int = 0  # calls made (one per kind of step in a batch)
    steps: int = 0  # session steps they served
    sessions_hist: dict[int, int] = field(default_factory=dict)  # steps per call -> calls


class DraftBatcher:
    """Gathers the draft steps of the sessions drafting now into one call per kind."""

    def __init__(self, config: DraftBatchConfig | None = None) -> None:
        self.config = config or DraftBatchConfig()
        self.stats = DraftBatchStats()
        self._cond = threading.Condition()
        self._local = threading.local()
        self._active: dict[str, int] = {}  # sessions drafting now -> their drafting threads
        self._pending: list[_Step] = []
        self._wave: set[str] = set()  # sessions of the wave in progress
        self._expected: set[str] = set()  # the previous wave's sessions not back yet
        self._wave_start = 0.0
        self._running = False
        self.on_call: Callable[[int], None] | None = None  # called with each call's steps
        # (the drafter service's metrics)

    @property
    def waiting(self) -> int:
        """Draft steps waiting for their batched call (the drafter's queue depth)."""
        return len(self._pending)

    # ------------------------------------------------------------------ sessions
    @contextmanager
    def drafting(self, session: str) -> Iterator[None]:
        """The calling thread drafts for `session` until the block ends: its steps are batched
        with the other sessions'; a batch waits for it while it is inside."""
        if getattr(self._local, "session", None) is not None:
            raise RuntimeError("this thread is already drafting for a session")
        with self._cond:
            if not self._active:  # a new wave: it waits for the previous one's sessions
                self._expected, self._wave = set(self._wave), set()
                self._wave_start = time.perf_counter()
            self._active[session] = self._active.get(session, 0) + 1
            self._wave.add(session)
            self._expected.discard(session)
        self._local.session = session
        try:
            yield
        finally:
            self._local.session = None
            with self._cond:
                left = self._active[session] - 1
                if left:
                    self._active[session] = left
                else:
                    del self._active[session]
                self._cond.notify_all()  # the others may all be waiting now

    def forget(self, session: str) -> None:
        """The session closed: no wave waits for it."""
        with self._cond:
            self._wave.discard(session)
            self._expected.discard(session)
            self._cond.notify_all()

    # ------------------------------------------------------------------ steps
    def head(self, head, call: HeadCall) -> torch.Tensor:  # [n, d]
        return self._run(("head", id(head)), lambda calls: head_forward_many(head, calls), call)

    def logits(self, head, grouped: bool, feats: torch.Tensor):
        """(token ids [n, S] or None, logits [n, S]) for feats [n, d]."""
        key = ("logits", id(head), grouped)
        return self._run(key, lambda fs: logits_many(head, grouped, fs), feats)

    def _run(self, key: tuple, run_many: Callable[[list], list], payload):
        if getattr(self._local, "session", None) is None:
            raise RuntimeError("draft steps are batched only inside DraftBatcher.drafting()")
        step = _Step(key, run_many, payload)
        with self._cond:
            self._pending.append(step)
            self._cond.notify_all()
            while not step.done:
                wait = self._ready()
                if wait == 0.0:
                    self._execute()
                else:
                    self._cond.wait(wait)
        if step.error is not None:
            raise step.error
        return step.result

    def _ready(self) -> float | None:
        """0: a batch can run now; else how long to wait (None: until notified)."""
        if self._running or not self._pending:
            return None
        wait = self.config.max_wait_ms / 1e3
        deadline = min(s.queued for s in self._pending) + wait  # no step waits longer
        if len(self._pending) >= sum(self._active.values()):  # nobody is building a tree
            deadline = min(deadline, self._wave_start + wait if self._expected else 0.0)
        left = deadline - time.perf_counter()
        return 0.0 if left <= 0 else left

    def _execute(self) -> None:
        """Run every pending step (called with the lock held; released while computing)."""
        batch, self._pending = self._pending, []
        self._running = True
        groups: dict[tuple, list[_Step]] = {}
        for s in batch:
            groups.setdefault(s.key, []).append(s)
        self._cond.release()
        try:
            for steps in groups.values():
                try:
                    results = steps[0].run_many([s.payload for s in steps])
                    for s, r in zip(steps, results, strict=True):
                        s.result = r
                except BaseException as exc:  # handed to each session's thread
                    for s in steps:
                        s.error = exc
        finally:
            self._cond.acquire()
            st = self.stats
            for steps in groups.values():
                st.batches += 1
                st.steps += len(steps)
                st.sessions_hist[len(steps)] = st.sessions_hist.get(len(steps), 0) + 1
                if self.on_call is not None:
                    self.on_call(len(steps))
            for s in batch:
                s.done = True
            self._running = False
            self._cond.notify_all()
