"""Session records: what a session is, and where its metadata lives.

`SessionRecord` is the metadata every front (the verifier's Generation service, the router)
keeps per session: state, this turn's prompt, the committed ids and text so far, the summary,
and the router's placement / KV-cache holder / failover bookkeeping. `SessionStore` is the
protocol; `MemorySessionStore` keeps records in this process; `session_redis.RedisSessionStore`
keeps them in Redis, shared by router replicas.

The contract every store keeps:
- `get` returns a copy: mutating it does not change the store (and `create` stores a copy).
- `append` only extends a RUNNING session; with `expected_len` it is a compare-and-append, so
  two writers can neither interleave nor duplicate tokens (`SessionConflict`).
- Every write refreshes `updated_unix_ns` (and the record's time-to-live where there is one).
- `StoreUnavailable` means the store could not be reached; `KeyError` an unknown session;
  `SessionConflict` a guarded write that lost a race; `ValueError` a malformed call.

Knows nothing about models, drafting or gRPC (the summary is an opaque `engine.Summary`).
"""

from __future__ import annotations

import copy
import dataclasses
import operator
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

RUNNING, FINISHED, CANCELLED, FAILED = "running", "finished", "cancelled", "failed"
STATES = frozenset({RUNNING, FINISHED, CANCELLED, FAILED})
ENDED = frozenset({FINISHED, CANCELLED, FAILED})

# update(): the fields a front may change on a live record, and the type each must have
UPDATABLE: dict[str, type] = {
    "placement": str,
    "drafter_address": str,
    "holder": str,
    "cached_tokens": int,
    "failovers": int,
    "verifier": str,
    "sampling": dict,
}
_INT32_MAX = 2**31 - 1


class StoreUnavailable(Exception):
    """The store cannot be reached (connection refused, timeout, loading, authentication
    failed); a router maps it to gRPC UNAVAILABLE."""


class SessionConflict(Exception):
    """A guarded write found another state: `append(expected_len=...)` found another committed
    length (`committed` holds it), or `begin_turn` found the session still running."""

    def __init__(self, message: str, committed: int | None = None) -> None:
        super().__init__(message)
        self.committed = committed


@dataclass
class SessionRecord:
    session_id: str
    prompt_tokens: int
    drafter: str
    verifier: str = ""
    state: str = RUNNING
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    summary: object | None = None  # engine.Summary once finished
    error: str = ""
    created_unix_ns: int = field(default_factory=time.time_ns)
    # the router's metadata (multi-turn sessions, placement, failover)
    prompt_ids: list[int] = field(default_factory=list)  # this turn's prompt (whole history)
    sampling: dict = field(default_factory=dict)  # JSON-able SamplingParams fields + seed
    placement: str = ""  # the verifier address serving this turn
    drafter_address: str = ""  # the drafter address serving this turn ("" = plain)
    holder: str = ""  # the verifier address holding the KV cache of prompt_ids + token_ids
    cached_tokens: int = 0  # tokens in that cache
    turns: int = 1  # requests in this conversation
    failovers: int = 0  # times this turn moved to another verifier
    cancel_requested: bool = False
    updated_unix_ns: int = field(default_factory=time.time_ns)


class SessionStore(Protocol):
    """Where session records live. Implementations are thread-safe."""

    def create(self, record: SessionRecord) -> None:
        """Stores (a copy of) `record`. KeyError if a RUNNING record with that id exists; a
        finished, cancelled or failed one is replaced."""
        ...

    def get(self, session_id: str) -> SessionRecord | None:
        """A copy of the record, or None for an unknown (or expired) session."""
        ...

    def append(
        self, session_id: str, token_ids: list[int], text: str, expected_len: int | None = None
    ) -> int:
        """Extends the committed ids and text of a RUNNING session; returns the new length.
        KeyError for an unknown or not-running session; SessionConflict when `expected_len`
        is given and differs from the committed length before the append (nothing written).
        An empty append still refreshes the record (a heartbeat)."""
        ...

    def finish(self, session_id: str, state: str, summary=None, error: str = "") -> None:
        """Ends a RUNNING session with `state` (FINISHED, CANCELLED or FAILED), its summary and
        error; a no-op for an unknown or not-running session."""
        ...

    def update(self, session_id: str, **fields) -> None:
        """Sets metadata fields of a session in any state. Only the names in `UPDATABLE`
        (placement, drafter_address, holder, cached_tokens, failovers, verifier, sampling);
        ValueError for any other name, TypeError for a value of the wrong type; KeyError for an
        unknown session."""
        ...

    def begin_turn(
        self, session_id: str, prompt_ids: list[int], sampling: dict, drafter: str
    ) -> SessionRecord:
        """A conversation's next request: an ended session becomes RUNNING with `prompt_ids`
        (prompt_tokens = its length), `sampling` and `drafter`; token_ids, text, summary,
        error, the cancel flag and the per-turn fields (placement, drafter_address, failovers)
        are cleared; turns += 1; holder and cached_tokens are kept. Returns the new record.
        KeyError for an unknown session; SessionConflict if it is running."""
        ...

    def release_holder(self, session_id: str, holder: str) -> None:
        """Clears holder and cached_tokens only if the holder still equals `holder` (that
        verifier evicted the cache; a compare-and-set). A no-op otherwise or when unknown."""
        ...

    def request_cancel(self, session_id: str) -> bool:
        """Sets the cancel flag of a RUNNING session: True; False when it is not running;
        KeyError for an unknown session."""
        ...

    def cancel_requested(self, session_id: str) -> bool:
        """Whether a cancel was requested for this turn (False for an unknown session)."""
        ...

    def running(self) -> list[str]:
        """The ids of the RUNNING sessions."""
        ...


def validate_token_ids(token_ids: Iterable[int]) -> list[int]:
    """The ids as Python ints; ValueError unless each is in [0, 2**31) (the stores keep int32)."""
    out = [operator.index(t) for t in token_ids]
    for t in out:
        if not 0 <= t <= _INT32_MAX:
            raise ValueError(f"token id {t} is outside [0, 2**31)")
    return out


def validate_state(state: str, allowed: frozenset[str] = STATES) -> None:
    if state not in allowed:
        raise ValueError(f"state must be one of {sorted(allowed)}, got {state!r}")


def validate_update(fields: dict) -> None:
    """ValueError for a field `update` may not set, TypeError for a value of the wrong type."""
    for name, value in fields.items():
        kind = UPDATABLE.get(name)
        if kind is None:
            raise ValueError(f"update() cannot set {name!r}; only {sorted(UPDATABLE)}")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TypeError(f"{name} must be {kind.__name__}, got {type(value).__name__}")


def copy_record(record: SessionRecord) -> SessionRecord:
    """A copy sharing no mutable state with `record`."""
    return dataclasses.replace(
        record,
        token_ids=list(record.token_ids),
        prompt_ids=list(record.prompt_ids),
        sampling=copy.deepcopy(record.sampling),
        summary=copy.copy(record.summary),
    )


class MemorySessionStore:
    """Records in this process. At most `history` ended records are kept (oldest dropped
    first); with `ttl_s`, a record not written for ttl_s seconds expires (checked lazily on
    every call)."""

    def __init__(self, history: int = 1024, ttl_s: float | None = None) -> None:
        if history < 0:
            raise ValueError("history must be >= 0")
        if ttl_s is not None and not ttl_s > 0:
            raise ValueError("ttl_s must be > 0 (or None)")
        self.history = history
        self.ttl_s = ttl_s
        self._records: dict[str, SessionRecord] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()  # oldest first
        self._written: OrderedDict[str, float] = OrderedDict()  # monotonic, oldest first
        self._lock = threading.Lock()

    # internals (called with the lock held)

    def _expire(self) -> None:
        if self.ttl_s is None:
            return
        deadline = time.monotonic() - self.ttl_s
        while self._written:
            sid, at = next(iter(self._written.items()))
            if at > deadline:
                break
            self._drop(sid)

    def _drop(self, session_id: str) -> None:
        self._records.pop(session_id, None)
        self._ended.pop(session_id, None)
        self._written.pop(session_id, None)

    def _touch(self, record: SessionRecord) -> None:
        record.updated_unix_ns = time.time_ns()
        self._written[record.session_id] = time.monotonic()
        self._written.move_to_end(record.session_id)

    def _mark_ended(self, session_id: str) -> None:
        self._ended[session_id] = None
        self._ended.move_to_end(session_id)
        while len(self._ended) > self.history:
            oldest = next(iter(self._ended))
            self._drop(oldest)

    def _record(self, session_id: str) -> SessionRecord:
        self._expire()
        rec = self._records.get(session_id)
        if rec is None:
            raise KeyError(f"unknown session {session_id!r}")
        return rec

    # the protocol

    def create(self, record: SessionRecord) -> None:
        validate_state(record.state)
        rec = copy_record(record)
        rec.token_ids = validate_token_ids(rec.token_ids)
        with self._lock:
            self._expire()
            old = self._records.get(rec.session_id)
            if old is not None and old.state == RUNNING:
                raise KeyError(f"session {rec.session_id!r} is already running")
            self._drop(rec.session_id)
            self._records[rec.session_id] = rec
            self._touch(rec)
            if rec.state != RUNNING:
                self._mark_ended(rec.session_id)

    def get(self, session_id: str) -> SessionRecord | None:
        with self._lock:
            self._expire()
            rec = self._records.get(session_id)
            return None if rec is None else copy_record(rec)

    def append(
        self, session_id: str, token_ids: list[int], text: str, expected_len: int | None = None
    ) -> int:
        ids = validate_token_ids(token_ids)
        with self._lock:
            rec = self._record(session_id)
            if rec.state != RUNNING:
                raise KeyError(f"session {session_id!r} is not running ({rec.state})")
            n = len(rec.token_ids)
            if expected_len is not None and expected_len != n:
                raise SessionConflict(
                    f"session {session_id!r} has {n} committed tokens, not {expected_len}", n
                )
            rec.token_ids.extend(ids)
            rec.text += text
            self._touch(rec)
            return len(rec.token_ids)

    def finish(self, session_id: str, state: str, summary=None, error: str = "") -> None:
        validate_state(state, ENDED)
        with self._lock:
            self._expire()
            rec = self._records.get(session_id)
            if rec is None or rec.state != RUNNING:
                return
            rec.state, rec.summary, rec.error = state, summary, error
            self._touch(rec)
            self._mark_ended(session_id)

    def update(self, session_id: str, **fields) -> None:
        validate_update(fields)
        with self._lock:
            rec = self._record(session_id)
            for name, value in fields.items():
                setattr(rec, name, copy.deepcopy(value))
            self._touch(rec)

    def begin_turn(
        self, session_id: str, prompt_ids: list[int], sampling: dict, drafter: str
    ) -> SessionRecord:
        prompt = validate_token_ids(prompt_ids)
        with self._lock:
            rec = self._record(session_id)
            if rec.state == RUNNING:
                raise SessionConflict(f"session {session_id!r} is still running")
            rec.state, rec.prompt_ids, rec.prompt_tokens = RUNNING, prompt, len(prompt)
            rec.sampling, rec.drafter = copy.deepcopy(sampling), drafter
            rec.token_ids, rec.text, rec.summary, rec.error = [], "", None, ""
            rec.placement, rec.drafter_address, rec.failovers = "", "", 0
            rec.cancel_requested = False
            rec.turns += 1
            self._ended.pop(session_id, None)
            self._touch(rec)
            return copy_record(rec)

    def release_holder(self, session_id: str, holder: str) -> None:
        with self._lock:
            self._expire()
            rec = self._records.get(session_id)
            if rec is None or not holder or rec.holder != holder:
                return
            rec.holder, rec.cached_tokens = "", 0
            self._touch(rec)

    def request_cancel(self, session_id: str) -> bool:
        with self._lock:
            rec = self._record(session_id)
            if rec.state != RUNNING:
                return False
            rec.cancel_requested = True
            self._touch(rec)
            return True

    def cancel_requested(self, session_id: str) -> bool:
        with self._lock:
            self._expire()
            rec = self._records.get(session_id)
            return rec is not None and rec.cancel_requested

    def running(self) -> list[str]:
        with self._lock:
            self._expire()
            return [sid for sid, rec in self._records.items() if rec.state == RUNNING]
