"""Placement: which verifier and which drafter serve a request. A pure function of the workers'
reported load, the request and the workers to avoid; no servers, no I/O (the router owns policy:
services only run forward passes).

    place(workers, request, exclude) -> Placement(verifier, drafter | None)

Verifier: a healthy one serving the request's target, not excluded (it failed this session
before), below its capacity; the one already holding the session's KV cache when it qualifies
(a conversation's next turn prefills only the new tokens), else the least loaded by active
sessions / capacity; ties are spread by a hash of (session, address), so equal workers share
sessions without a shared counter.
Drafter: among the qualifying drafters, the closest to the chosen verifier first (same node,
then same zone, when the labels are known), then the least loaded. No drafter left is not an
error: the request decodes plainly (`Placement.drafter is None`, `reason` says why), because a
request never fails for want of a drafter.
Errors: no verifier at all -> NoWorkers (UNAVAILABLE); every verifier full -> NoCapacity
(RESOURCE_EXHAUSTED) with a retry hint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

VERIFIER, DRAFTER = "verifier", "drafter"


@dataclass(frozen=True)
class Worker:
    address: str  # host:port
    kind: str  # VERIFIER or DRAFTER
    active: int = 0  # sessions it holds now (its Info / heartbeat)
    capacity: int = 1  # its session bound
    target: str = ""  # the target fingerprint it serves ("" = unknown: matches any)
    node: str = ""  # Kubernetes node name, when known
    zone: str = ""  # topology zone, when known
    healthy: bool = True

    def __post_init__(self) -> None:
        if self.kind not in (VERIFIER, DRAFTER):
            raise ValueError(f"kind must be {VERIFIER!r} or {DRAFTER!r}, got {self.kind!r}")
        if self.capacity < 1 or self.active < 0:
            raise ValueError("capacity must be >= 1 and active >= 0")

    @property
    def load(self) -> float:
        return self.active / self.capacity

    @property
    def full(self) -> bool:
        return self.active >= self.capacity


@dataclass(frozen=True)
class Request:
    session_id: str
    drafter: str = "coral"  # "none": no drafter is needed
    target: str = ""  # the target fingerprint the request needs ("" = any)
    holder: str = ""  # the verifier holding this session's KV cache (a conversation's turn)


@dataclass(frozen=True)
class Placement:
    verifier: Worker
    drafter: Worker | None  # None: decode plainly
    reason: str = ""  # why there is no drafter, or why the holder was not used


class NoWorkers(Exception):
    """No verifier can serve the request at all (UNAVAILABLE)."""


class NoCapacity(Exception):
    """Every verifier that could serve the request is full (RESOURCE_EXHAUSTED)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _matches(w: Worker, target: str) -> bool:
    return not target or not w.target or w.target == target


def _spread(session_id: str, address: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(f"{session_id}|{address}".encode(), digest_size=4).digest()
    )


def place(
    workers: Iterable[Worker],
    request: Request,
    exclude: Iterable[str] = (),
    retry_after_s: float = 1.0,  # the hint sent with RESOURCE_EXHAUSTED
) -> Placement:
    workers = list(workers)
    avoid = set(exclude)
    usable = [w for w in workers if w.healthy and w.address not in avoid]
    verifiers = [w for w in usable if w.kind == VERIFIER and _matches(w, request.target)]
    if not verifiers:
        raise NoWorkers(
            "no verifier is up for this target"
            + (f" (excluded after failures: {', '.join(sorted(avoid))})" if avoid else "")
        )
    open_ = [w for w in verifiers if not w.full]
    if not open_:
        raise NoCapacity(
            f"all {len(verifiers)} verifiers are full "
            f"({sum(w.active for w in verifiers)} sessions); retry in {retry_after_s:g} s",
            retry_after_s,
        )
    reason = ""
    holder = next((w for w in open_ if w.address == request.holder), None)
    if holder is not None:
        verifier = holder
    else:
        if request.holder:
            reason = f"the verifier holding the session ({request.holder}) is gone or full"
        verifier = min(open_, key=lambda w: (w.load, _spread(request.session_id, w.address)))
    if request.drafter == "none":
        return Placement(verifier, None, reason)
    drafters = [
        w for w in usable if w.kind == DRAFTER and not w.full and _matches(w, request.target)
    ]
    if not drafters:
        why = "no drafter is up with room for the session: decoding plainly"
        return Placement(verifier, None, f"{reason}; {why}" if reason else why)

    def distance(d: Worker) -> int:
        if verifier.node and d.node == verifier.node:
            return 0
        if verifier.zone and d.zone == verifier.zone:
            return 1
        return 2

    drafter = min(
        drafters, key=lambda d: (distance(d), d.load, _spread(request.session_id, d.address))
    )
    return Placement(verifier, drafter, reason)
