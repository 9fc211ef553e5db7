"""What every coralline gRPC server shares: an aio server on one address with the error
interceptor, message-size limits, keepalive settings, the standard health service and server
reflection, and a graceful stop on SIGTERM / Ctrl-C (health NOT_SERVING, then drain). With
`tls`, the port is TLS (mutual when the config names a CA); with `api_tokens`, the public
services ask for a bearer token (rpc/security.py).

Knows nothing about the services it hosts.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coralline.rpc.errors import ErrorInterceptor
from coralline.rpc.security import BearerAuth, TlsConfig, Tokens

MiB = 1 << 20


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"  # loopback unless told otherwise: nothing is exposed by accident
    port: int = 0  # 0 = a free port, printed once the server is ready
    max_message_bytes: int = 64 * MiB  # re-opening a long session sends fp32 features of
    # every committed token (2.3 KB each for SmolLM2): 2048 tokens = 4.7 MB, over gRPC's 4 MiB
    grace_s: float = 5.0  # SIGTERM: how long running streams may finish before they are cut
    keepalive_ms: int = 30_000  # pings on idle links so a dead peer is noticed
    registry: str | None = None  # redis://... : register this server there with a TTL and its
    # load (router/registry.py), so routers discover it
    advertise: str | None = None  # the address others should dial (default: the bound one)
    tls: TlsConfig | None = None  # TLS on this port (mutual TLS when it names a CA); also what
    # this process presents when it dials other coralline services
    api_tokens: frozenset[str] = frozenset()  # bearer tokens the public services accept
    # (empty: no auth); never logged

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_message_bytes < MiB:
            raise ValueError("max_message_bytes must be at least 1 MiB")
        if self.grace_s < 0:
            raise ValueError("grace_s must be >= 0")


def channel_options(max_message_bytes: int = 64 * MiB, keepalive_ms: int = 30_000) -> list:
    """Options for channels between coralline services (both sides set keepalive together)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


class Server:
    """An aio server hosting services; `start()` binds and returns the bound address."""

    def __init__(
        self,
        options: ServerOptions,
        service_names: Iterable[str],
        public: Iterable[str] | None = None,
    ) -> None:
        """public: the services that ask for a bearer token when options.api_tokens is set
        (default: all of service_names; the health service never does)."""
        self.options = options
        self.service_names = list(service_names)
        interceptors: list = []
        if options.api_tokens:
            protected = self.service_names if public is None else list(public)
            interceptors.append(BearerAuth(Tokens(options.api_tokens), protected))
        interceptors.append(ErrorInterceptor())
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                *channel_options(options.max_message_bytes, options.keepalive_ms),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, reflection.SERVICE_NAME, health.SERVICE_NAME], self.server
        )
        self.address = ""
        self.metrics_url = ""  # http://host:port/metrics once serve_metrics() ran
        self._metrics = None
        self._stopping = asyncio.Event()
        self._heartbeat = None

    async def start(self) -> str:
        bind = f"{self.options.host}:{self.options.port}"
        tls = self.options.tls
        if tls is None:
            port = self.server.add_insecure_port(bind)
        else:
            port = self.server.add_secure_port(bind, tls.server_credentials())
        if port == 0:
            raise OSError(f"cannot bind {self.options.host}:{self.options.port}")
        await self.server.start()
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        host = self.options.host
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return self.address

    def register(self, kind: str, capacity: int, target: str, active: Callable[[], int]) -> None:
        """With `options.registry`, keep this server registered there as a router Worker of
        `kind` with its current load (`active()` sessions of `capacity`), its target fingerprint
        and the node / zone labels from $CORALLINE_NODE / $CORALLINE_ZONE."""
        if not self.options.registry:
            return
        from coralline.router.placement import Worker
        from coralline.router.registry import Heartbeat, RedisRegistry

        address = self.options.advertise or self.address
        node, zone = os.environ.get("CORALLINE_NODE", ""), os.environ.get("CORALLINE_ZONE", "")

        def describe() -> Worker:
            return Worker(address, kind, active(), capacity, target, node, zone)

        self._heartbeat = Heartbeat(RedisRegistry(self.options.registry), describe)
        self._heartbeat.start()

    def serve_metrics(self, registry, port: int) -> str:
        """Prometheus /metrics of `registry` on this server's host (HTTP, its own thread)."""
        from coralline.telemetry.metrics import serve_metrics

        self._metrics, bound = serve_metrics(registry, self.options.host, port)
        host = self.options.host
        self.metrics_url = f"http://{f'[{host}]' if ':' in host else host}:{bound}/metrics"
        return self.metrics_url

    def telemetry_note(self, tracing) -> str:
        """What the ready line says of metrics and tracing (the line ServerProcess parses)."""
        note = f", metrics {self.metrics_url}" if self.metrics_url else ""
        return note + (", tracing on" if tracing.enabled else "")

    def stop_on_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)

    async def stop(self, on_drain: Callable[[], None] | None = None) -> None:
        """NOT_SERVING first (load balancers stop sending), then let streams finish."""
        if self._heartbeat is not None:  # routers stop placing sessions here first
            await self._heartbeat.stop()
        await self.health.enter_graceful_shutdown()
        if on_drain is not None:
            on_drain()
        await self.server.stop(self.options.grace_s)
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()
            self._metrics = None

    async def serve_until_signal(self, on_drain: Callable[[], None] | None = None) -> None:
        self.stop_on_signals()
        await self._stopping.wait()
        await self.stop(on_drain)
