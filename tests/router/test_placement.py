"""Placement, table-driven, without servers."""

from collections import Counter

import pytest

from coralline.router.placement import (
    DRAFTER,
    VERIFIER,
    NoCapacity,
    NoWorkers,
    Request,
    Worker,
    place,
)


def V(addr, active=0, cap=4, **kw):
    return Worker(addr, VERIFIER, active, cap, **kw)


def D(addr, active=0, cap=8, **kw):
    return Worker(addr, DRAFTER, active, cap, **kw)


CASES = [
    # (name, workers, request, exclude, verifier, drafter)
    ("least loaded by ratio", [V("v1", 2, 4), V("v2", 1, 4), D("d1")], Request("s"), (),
     "v2", "d1"),
    ("ratio, not count", [V("v1", 3, 8), V("v2", 1, 2), D("d1")], Request("s"), (), "v1", "d1"),
    ("full verifiers are skipped", [V("v1", 4, 4), V("v2", 3, 4), D("d1")], Request("s"), (),
     "v2", "d1"),
    ("excluded after a failure", [V("v1"), V("v2", 3), D("d1")], Request("s"), ("v1",), "v2",
     "d1"),
    ("unhealthy skipped", [V("v1", healthy=False), V("v2", 3), D("d1")], Request("s"), (), "v2",
     "d1"),
    ("KV holder first, even if busier", [V("v1", 3), V("v2", 0), D("d1")],
     Request("s", holder="v1"), (), "v1", "d1"),
    ("full holder: another verifier", [V("v1", 4), V("v2", 0), D("d1")],
     Request("s", holder="v1"), (), "v2", "d1"),
    ("target mismatch skipped", [V("v1", target="A"), V("v2", 3, target="B"), D("d1", target="B")],
     Request("s", target="B"), (), "v2", "d1"),
    ("drafter on the same node", [V("v1", node="n1", zone="z"), D("d1", 0, node="n2", zone="z"),
     D("d2", 7, node="n1", zone="z")], Request("s"), (), "v1", "d2"),
    ("then the same zone", [V("v1", node="n1", zone="z1"), D("d1", 0, zone="z2"),
     D("d2", 5, zone="z1")], Request("s"), (), "v1", "d2"),
    ("then the least loaded drafter", [V("v1"), D("d1", 6), D("d2", 2)], Request("s"), (), "v1",
     "d2"),
    ("full drafter skipped", [V("v1", node="n1"), D("d1", 8, node="n1"), D("d2", 7)],
     Request("s"), (), "v1", "d2"),
    ("excluded drafter skipped", [V("v1"), D("d1"), D("d2", 5)], Request("s"), ("d1",), "v1",
     "d2"),
    ("no drafter: plain", [V("v1"), D("d1", 8)], Request("s"), (), "v1", None),
    ("no drafter wanted", [V("v1"), D("d1")], Request("s", drafter="none"), (), "v1", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("workers", "request_", "exclude", "verifier", "drafter"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_placement_table(workers, request_, exclude, verifier, drafter):
    p = place(workers, request_, exclude)
    assert p.verifier.address == verifier
    assert (p.drafter.address if p.drafter else None) == drafter
    if drafter is None and request_.drafter != "none":
        assert "plainly" in p.reason
    if request_.holder and request_.holder != verifier:
        assert "gone or full" in p.reason


def test_everything_full_is_resource_exhausted_with_a_retry_hint():
    with pytest.raises(NoCapacity, match="retry in 2 s") as e:
        place([V("v1", 4), V("v2", 4), D("d1")], Request("s"), retry_after_s=2.0)
    assert e.value.retry_after_s == 2.0


@pytest.mark.parametrize(
    ("workers", "exclude"),
    [([D("d1")], ()), ([V("v1", healthy=False)], ()), ([V("v1")], ("v1",))],
    ids=["no verifiers", "none healthy", "all excluded"],
)
def test_no_verifier_is_unavailable(workers, exclude):
    with pytest.raises(NoWorkers, match="no verifier"):
        place(workers, Request("s"), exclude)


def test_equal_workers_share_sessions():
    """Ties are spread by a hash of (session, address): deterministic per session, balanced
    across sessions."""
    workers = [V(f"v{i}") for i in range(4)] + [D("d1")]
    counts = Counter(place(workers, Request(f"s{k}")).verifier.address for k in range(400))
    assert set(counts) == {"v0", "v1", "v2", "v3"} and min(counts.values()) > 60
    assert place(workers, Request("s7")) == place(workers, Request("s7"))


def test_workers_are_validated():
    with pytest.raises(ValueError, match="kind"):
        Worker("x", "router")
    with pytest.raises(ValueError, match="capacity"):
        Worker("x", VERIFIER, capacity=0)
