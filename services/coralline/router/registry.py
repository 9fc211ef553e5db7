"""RedisRegistry: the third discovery source. Services started with `--registry redis://...`
register themselves under a key with a TTL, refreshed by a heartbeat that also carries their
load (active sessions, capacity); `discover()` lists the workers whose key has not expired, so
a worker that dies disappears within one TTL without anyone removing it.

    key   coralline:worker:<kind>:<address>     (a Redis string, SET ... EX ttl)
    value {"address", "kind", "active", "capacity", "target", "node", "zone"}  (JSON)

Knows nothing about placement or gRPC; the URL carries AUTH and TLS (redis://user:pass@host,
rediss:// for TLS), as redis-py reads it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict

from coralline.router.placement import Worker

PREFIX = "coralline:worker:"
log = logging.getLogger("coralline.registry")


def _key(worker: Worker) -> str:
    return f"{PREFIX}{worker.kind}:{worker.address}"


class RedisRegistry:
    def __init__(self, url: str, ttl_s: float = 10.0) -> None:
        import redis

        if not ttl_s > 0:
            raise ValueError("ttl_s must be > 0")
        self.url, self.ttl_s = url, ttl_s
        self.client = redis.Redis.from_url(url, socket_timeout=5, decode_responses=True)

    def heartbeat(self, worker: Worker) -> None:
        """Register (or refresh) a worker and its load for one TTL."""
        self.client.set(_key(worker), json.dumps(asdict(worker)), px=int(self.ttl_s * 1000))

    def remove(self, worker: Worker) -> None:
        self.client.delete(_key(worker))

    def discover(self) -> list[Worker]:
        keys = sorted(self.client.scan_iter(match=f"{PREFIX}*", count=500))
        out = []
        for key, raw in zip(keys, self.client.mget(keys) if keys else [], strict=True):
            if raw is None:  # expired between SCAN and MGET
                continue
            try:
                out.append(Worker(**json.loads(raw)))
            except (ValueError, TypeError) as e:
                log.warning("ignoring a malformed registry entry %s: %s", key, e)
        return out


class Heartbeat:
    """Refreshes a service's registry entry every ttl/3 seconds from `worker()` (its current
    load) on the running event loop; `stop()` removes the entry (a clean shutdown)."""

    def __init__(self, registry: RedisRegistry, worker) -> None:
        self.registry, self.worker = registry, worker
        self._task: asyncio.Task | None = None

    async def _beat(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.registry.heartbeat, self.worker())
            except Exception as e:  # Redis away: keep serving, keep trying
                log.warning("registry heartbeat failed: %s", e)
            await asyncio.sleep(self.registry.ttl_s / 3)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._beat())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        try:
            await asyncio.to_thread(self.registry.remove, self.worker())
        except Exception as e:
            log.warning("registry removal failed: %s", e)
