"""Session records: what a session is, and where its metadata lives.

`SessionRecord` is the metadata every front (the verifier's Generation service now, the router
later) keeps per request: state, prompt size, the committed ids and text so far, the summary.
`SessionStore` is the protocol; `MemorySessionStore` keeps records in this process, running
ones until they end and finished ones in a bounded most-recent-first history (GetSession works
for a while after a generation ends). A Redis store implements the same protocol (router issue).

Knows nothing about models, drafting or gRPC.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

RUNNING, FINISHED, CANCELLED, FAILED = "running", "finished", "cancelled", "failed"


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
    def create(self, record: SessionRecord) -> None: ...
    def get(self, session_id: str) -> SessionRecord | None: ...
    def append(self, session_id: str, token_ids: list[int], text: str) -> None: ...
    def finish(self, session_id: str, state: str, summary=None, error: str = "") -> None: ...
    def running(self) -> list[str]: ...


class MemorySessionStore:
    """Records in this process; at most `history` finished records are kept."""

    def __init__(self, history: int = 1024) -> None:
        if history < 0:
            raise ValueError("history must be >= 0")
        self.history = history
        self._running: dict[str, SessionRecord] = {}
        self._done: OrderedDict[str, SessionRecord] = OrderedDict()
        self._lock = threading.Lock()

    def create(self, record: SessionRecord) -> None:
        with self._lock:
            if record.session_id in self._running:
                raise KeyError(f"session {record.session_id!r} is already running")
            self._done.pop(record.session_id, None)
            self._running[record.session_id] = record

    def get(self, session_id: str) -> SessionRecord | None:
        with self._lock:
            return self._running.get(session_id) or self._done.get(session_id)

    def append(self, session_id: str, token_ids: list[int], text: str) -> None:
        with self._lock:
            rec = self._running[session_id]
            rec.token_ids.extend(token_ids)
            rec.text += text

    def finish(self, session_id: str, state: str, summary=None, error: str = "") -> None:
        with self._lock:
            rec = self._running.pop(session_id, None)
            if rec is None:
                return
            rec.state, rec.summary, rec.error = state, summary, error
            self._done[session_id] = rec
            while len(self._done) > self.history:
                self._done.popitem(last=False)

    def running(self) -> list[str]:
        with self._lock:
            return list(self._running)
