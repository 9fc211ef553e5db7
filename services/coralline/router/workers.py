"""WorkerPool: the workers a router can place sessions on, with their current load.

Discovery says where workers are; each one's Info (active sessions, capacity, target
fingerprint) says how loaded it is. The pool asks every discovered worker's Info at most once
per `refresh_s` (concurrently, each bounded by `info_timeout_s`); a worker that does not answer
is reported unhealthy until it answers again. Between refreshes, sessions this router placed
count against the worker at once (`placed()`), so a burst of requests is spread before the
next Info shows it. One gRPC channel per address, reused by the request path.

Knows nothing about sessions or placement policy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import replace

import grpc

from coralline.router.discovery import Discovery
from coralline.router.placement import VERIFIER, Worker
from coralline.rpc.protos import drafter_pb2, drafter_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from coralline.rpc.security import TlsConfig, aio_channel
from coralline.rpc.server import channel_options

log = logging.getLogger("coralline.router")


class WorkerPool:
    def __init__(
        self,
        discovery: Discovery,
        refresh_s: float = 0.25,
        info_timeout_s: float = 1.0,
        max_message_bytes: int = 64 << 20,
        tls: TlsConfig | None = None,
    ) -> None:
        """tls: mutual TLS to the workers (None: insecure channels)."""
        self.discovery = discovery
        self.tls = tls
        self.refresh_s, self.info_timeout_s = refresh_s, info_timeout_s
        self.max_message_bytes = max_message_bytes
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._workers: list[Worker] = []
        self._stamp = -float("inf")
        self._pending: Counter[str] = Counter()  # placed since the last refresh
        self._lock = asyncio.Lock()

    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = aio_channel(
                address, self.tls, channel_options(self.max_message_bytes)
            )
        return self._channels[address]

    def verifier(self, address: str) -> verifier_pb2_grpc.VerifierServiceStub:
        return verifier_pb2_grpc.VerifierServiceStub(self.channel(address))

    async def _info(self, w: Worker) -> Worker:
        try:
            if w.kind == VERIFIER:
                info = await self.verifier(w.address).Info(
                    verifier_pb2.VerifierInfoRequest(), timeout=self.info_timeout_s
                )
            else:
                info = await drafter_pb2_grpc.DrafterServiceStub(self.channel(w.address)).Info(
                    drafter_pb2.DrafterInfoRequest(), timeout=self.info_timeout_s
                )
        except grpc.aio.AioRpcError as e:
            if w.healthy:
                log.warning("%s %s does not answer: %s", w.kind, w.address, e.code().name)
            return replace(w, healthy=False)
        return replace(
            w,
            active=int(info.active_sessions),
            capacity=max(1, int(info.capacity)),
            target=info.target_fingerprint or w.target,
            healthy=True,
        )

    async def workers(self) -> list[Worker]:
        """Every discovered worker with its load (refreshed at most every refresh_s)."""
        async with self._lock:
            if time.monotonic() - self._stamp >= self.refresh_s:
                found = await asyncio.to_thread(self.discovery.discover)
                self._workers = list(await asyncio.gather(*(self._info(w) for w in found)))
                self._stamp = time.monotonic()
                self._pending.clear()
            return [
                replace(w, active=w.active + self._pending[w.address]) if w.healthy else w
                for w in self._workers
            ]

    def placed(self, *addresses: str) -> None:
        """Count a session placed on these workers until the next refresh shows it."""
        self._pending.update(a for a in addresses if a)

    def failed(self, address: str) -> None:
        """A call to this worker failed: ask again at the next request."""
        self._stamp = -float("inf")

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
