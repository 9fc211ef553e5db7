"""The Redis heartbeat registry against a real redis-server."""

import json
import time

import pytest

from coralline.router.placement import DRAFTER, VERIFIER, Worker
from coralline.router.registry import PREFIX, RedisRegistry

pytestmark = pytest.mark.redis


@pytest.fixture()
def registry(redis_url):
    reg = RedisRegistry(redis_url, ttl_s=0.6)
    reg.client.flushdb()
    return reg


def test_heartbeats_register_workers_with_their_load(registry):
    v = Worker("10.0.0.1:50051", VERIFIER, active=3, capacity=16, target="abc", node="n1")
    d = Worker("10.0.0.2:50052", DRAFTER, active=1, capacity=64)
    registry.heartbeat(v)
    registry.heartbeat(d)
    assert sorted(registry.discover(), key=lambda w: w.address) == [v, d]
    registry.heartbeat(Worker(v.address, VERIFIER, active=5, capacity=16, target="abc"))
    assert {w.address: w.active for w in registry.discover()}[v.address] == 5
    registry.remove(d)
    assert [w.address for w in registry.discover()] == [v.address]


def test_a_silent_worker_expires_after_its_ttl(registry):
    registry.heartbeat(Worker("10.0.0.9:1", VERIFIER))
    assert len(registry.discover()) == 1
    time.sleep(0.9)
    assert registry.discover() == []


def test_malformed_entries_are_ignored(registry):
    registry.client.set(f"{PREFIX}verifier:bad", "{not json")
    registry.client.set(f"{PREFIX}verifier:bad2", json.dumps({"address": "x", "kind": "router"}))
    registry.heartbeat(Worker("10.0.0.1:50051", VERIFIER))
    assert [w.address for w in registry.discover()] == ["10.0.0.1:50051"]


def test_ttl_must_be_positive(redis_url):
    with pytest.raises(ValueError, match="ttl_s"):
        RedisRegistry(redis_url, ttl_s=0)
