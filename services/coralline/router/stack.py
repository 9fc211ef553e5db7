"""`coralline serve`: the whole stack on this machine, on loopback, started and stopped as one.

    drafters (M processes) ─┐
    verifiers (N processes) ─┼─ Ray (loopback) ── Serve app "coralline": RouterReplica x R
                             └─ public port: the grpc.aio front (default) or Serve's gRPC proxy

Workers are `coralline drafter|verifier --port 0` processes (rpc/process.py; they die with this
process even when it is killed), found by static discovery; the session store is in the router
replica's memory unless `redis` is given (required for more than one router replica: replicas
share nothing else). `Stack.stop()` takes everything down in reverse order; SIGINT / SIGTERM
call it (`run()`).

Knows nothing about requests: it starts and stops processes and Ray.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from coralline.router.app import (
    APP_NAME,
    GRPC_SERVICER,
    LOOPBACK_HOOK,
    ReplicaConfig,
    loopback_ray_env,
)
from coralline.router.core import RouterConfig
from coralline.router.http import HttpConfig, HttpServer
from coralline.rpc.process import ServerProcess
from coralline.rpc.security import TlsConfig
from coralline.rpc.server import ServerOptions

log = logging.getLogger("coralline.serve")

INGRESSES = ("front", "proxy")
RAY_START_ATTEMPTS = 3
_RAY_START_TIMEOUT = "timed out during startup"  # ray 2.60 node.py: a fixed 30 s wait


def init_ray(attempts: int = RAY_START_ATTEMPTS, init=None, **kwargs) -> None:
    """`ray.init(**kwargs)`, tried again when the local node misses Ray's fixed 30 s start-up
    wait (its raylet not registered with the GCS in time: a loaded 2-core machine did this once
    in ~30 CI runs). The processes a failed attempt started (GCS, raylet, ...) are killed before
    the next one: the failed `ray.init` keeps no handle on them. Any other error, or the last
    timeout, is raised. `init` replaces `ray.init` (tests)."""
    import psutil

    if init is None:
        import ray

        init = ray.init
    me = psutil.Process()
    for attempt in range(1, attempts + 1):
        before = {p.pid for p in me.children(recursive=True)}
        try:
            init(**kwargs)
            return
        except Exception as e:
            if _RAY_START_TIMEOUT not in str(e) or attempt == attempts:
                raise
            left = [p for p in me.children(recursive=True) if p.pid not in before]
            log.warning(
                "Ray start-up attempt %d/%d timed out (%s); killing the %d processes it left "
                "and trying again", attempt, attempts, e, len(left),
            )  # fmt: skip
            kill_processes(left)


def kill_processes(procs: list, grace_s: float = 5.0) -> None:
    """SIGTERM `procs` (psutil.Process), then SIGKILL whatever is left after `grace_s`."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=grace_s)


@dataclass(frozen=True)
class StackConfig:
    port: int = 50051  # the public Generation port (0 = a free one)
    host: str = "127.0.0.1"  # the front's bind address (the proxy always binds [::])
    drafters: int = 1
    verifiers: int = 1
    redis: str | None = None  # redis://... : the session store (memory when None)
    model: str = "smollm2-135m-instruct"
    draft_checkpoint: str | None = None
    device: str = "cpu"
    max_sessions: int = 16  # per verifier
    verifier_threads: int = 1  # each verifier's torch threads (drafters keep 1; on a GPU node
    # this is only the host side)
    ingress: str = "front"  # "front" (grpc.aio on Serve handles) or "proxy" (Serve's gRPC proxy)
    replicas: ReplicaConfig = field(default_factory=ReplicaConfig)
    log_dir: str | None = None  # worker logs (default: a temporary folder)
    ray_cpus: int = 2
    telemetry: bool = True  # every service traced into the live view, /metrics on each worker
    dashboard_port: int = 8321  # the live view, the router's /metrics and the Prometheus HTTP
    # service discovery of every /metrics (0 = a free port); on `host`
    trace_file: str | None = None  # append every span there as OTLP/JSON lines (trace-report)
    tls_dir: str | None = None  # `coralline certs` folder: mutual TLS on every internal link,
    # TLS on the public port (clients verify it with ca.pem)
    api_tokens: frozenset[str] = frozenset()  # bearer tokens the public port accepts (none:
    # no auth); they stay in this process (workers' ports are mutual TLS, not tokens)
    verifier_extra: tuple[str, ...] = ()  # more `coralline verifier` arguments (limits:
    # --max-prompt-tokens, --max-new-tokens, ...)
    router_options: tuple[tuple[str, object], ...] = ()  # RouterConfig fields to set (limits:
    # max_prompt_tokens, max_new_tokens, max_request_s, max_queued, queue_timeout_s, ...)
    http_port: int | None = 8000  # the OpenAI-compatible HTTP API on `host` (0 = a free
    # port, None = off); served by the front ingress only

    def __post_init__(self) -> None:
        if self.ingress not in INGRESSES:
            raise ValueError(f"ingress must be one of {INGRESSES}, got {self.ingress!r}")
        if self.verifier_threads < 1:
            raise ValueError("verifier_threads must be >= 1")
        if self.verifiers < 1 or self.drafters < 0:
            raise ValueError("verifiers must be >= 1 and drafters >= 0")
        if (self.replicas.routers > 1 or self.replicas.autoscale_max) and not self.redis:
            raise ValueError(
                "several router replicas share sessions only through Redis: add --redis URL"
            )
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port must be in [0, 65535], got {self.http_port}")
        if not 0 <= self.dashboard_port < 65536:
            raise ValueError(f"dashboard_port must be in [0, 65535], got {self.dashboard_port}")
        # unknown or bad router options fail here, and TLS files that are missing or not PEM
        self.router_config_for((), ())

    def router_config_for(self, verifiers: tuple[str, ...], drafters: tuple[str, ...]):
        """The router replicas' RouterConfig for these workers (with router_options)."""
        base = RouterConfig(
            model=self.model,
            verifiers=verifiers or ("unset:0",),
            drafters=drafters,
            redis=self.redis,
            default_drafter="coral" if self.drafters else "none",
            tls=self.internal_tls,
        )
        known = {f.name for f in fields(RouterConfig)}
        unknown = sorted(k for k, _ in self.router_options if k not in known)
        if unknown:
            raise ValueError(f"unknown router options {unknown}; known: {sorted(known)}")
        return replace(base, **dict(self.router_options))

    @property
    def internal_tls(self) -> TlsConfig | None:
        """What every coralline process presents and checks on the internal links."""
        return None if self.tls_dir is None else TlsConfig.from_dir(self.tls_dir, "server")

    @property
    def public_tls(self) -> TlsConfig | None:
        """The public port: TLS with the service certificate; clients need only ca.pem."""
        tls = self.internal_tls
        return None if tls is None else TlsConfig(tls.cert, tls.key)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.log_dir = Path(config.log_dir or tempfile.mkdtemp(prefix="coralline-serve-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.drafters: list[ServerProcess] = []
        self.verifiers: list[ServerProcess] = []
        self.address = ""
        self.ingress = config.ingress
        self._front = None
        self._loop = None
        self._thread: threading.Thread | None = None
        self._ray = False
        self.spans = None  # the live view's SpanStore (telemetry on)
        self.receiver = None  # the OTLP receiver the services export to
        self.live = None  # the live view's HTTP server
        self._servicer = None  # the front's servicer (its RouterMetrics)
        self._http = None  # the OpenAI-compatible HTTP API (router/http.py)
        self.http_url = ""  # its base URL (".../v1"), when served

    # ------------------------------------------------------------------ telemetry
    def start_telemetry(self) -> None:
        """The span store and the OTLP receiver every service exports to (before the workers:
        their environment names it). The user's own OTLP endpoint, if set, still gets every
        span: the receiver forwards them."""
        if not self.config.telemetry or self.receiver is not None:
            return
        import os

        from coralline.telemetry.live import SpanStore
        from coralline.telemetry.receiver import OtlpReceiver
        from coralline.telemetry.tracing import env_enabled

        env, forward = os.environ, None
        if env_enabled():
            forward = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
                "OTEL_EXPORTER_OTLP_ENDPOINT"
            )
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
        )
        self.spans = SpanStore()
        # OTLP/HTTP: no gRPC server in this process, which forks workers and Ray's raylet later
        self.receiver = OtlpReceiver(
            self.spans.add,
            file=self.config.trace_file,
            forward=forward,
            forward_protocol="http/protobuf" if protocol == "http/protobuf" else "grpc",
        )
        self.receiver.start()

    def otel_env(self, service: str) -> dict[str, str]:
        """What a service's process needs to trace into the receiver (empty: telemetry off)."""
        if self.receiver is None:
            return {}
        from coralline.telemetry.tracing import SERVICES

        return {
            "OTEL_SDK_DISABLED": "false",
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": self.receiver.endpoint,
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": self.receiver.protocol,
            "OTEL_SERVICE_NAME": SERVICES[service],
            "OTEL_BSP_SCHEDULE_DELAY": "500",  # ms: the live view sees a round within a second
        }

    def prometheus_targets(self) -> list[dict]:
        """Prometheus HTTP service discovery: every /metrics of the stack, with its service."""
        from urllib.parse import urlparse

        groups = []
        for kind, procs in (("drafter", self.drafters), ("verifier", self.verifiers)):
            for p in procs:
                if p.metrics_url:
                    url = urlparse(p.metrics_url)
                    groups.append(
                        {"targets": [url.netloc], "labels": {"service": kind, "worker": p.address}}
                    )
        if self.live is not None and self._servicer is not None:
            router = f"{self.config.host}:{self.live.port}"
            groups.append({"targets": [router], "labels": {"service": "router"}})
        return groups

    def start_live(self) -> str:
        """The live view on dashboard_port (after the router: it serves the router's metrics)."""
        if self.spans is None:
            return ""
        from coralline.telemetry.live import LiveServer

        metrics = getattr(self._servicer, "metrics", None)
        self.live = LiveServer(
            self.spans,
            self.config.host,
            self.config.dashboard_port,
            registry=metrics.registry if metrics is not None else None,
            targets=self.prometheus_targets,
        )
        return self.live.start()

    # ------------------------------------------------------------------ workers
    def _worker_args(self) -> list[str]:
        cfg = self.config
        metrics = ["--metrics-port", "0"] if cfg.telemetry else []
        tls = ["--tls-dir", cfg.tls_dir] if cfg.tls_dir else []
        return ["--model", cfg.model, "--device", cfg.device, *metrics, *tls]

    def _verifier_args(self) -> list[str]:
        cfg = self.config
        args = [*self._worker_args(), "--no-drafter", "--max-sessions", str(cfg.max_sessions)]
        args += list(cfg.verifier_extra)
        return args + (["--sessions", cfg.redis] if cfg.redis else [])

    def start_workers(self, timeout_s: float = 180.0) -> None:
        """Start every worker process at once (from this thread), then wait for all."""
        cfg = self.config
        extra = ["--draft-checkpoint", cfg.draft_checkpoint] if cfg.draft_checkpoint else []
        self.start_telemetry()
        for _ in range(cfg.drafters):
            self.drafters.append(
                ServerProcess(
                    "drafter",
                    [*self._worker_args(), *extra],
                    self.log_dir,
                    self.otel_env("drafter"),
                )
            )
        for _ in range(cfg.verifiers):
            self.verifiers.append(
                ServerProcess(
                    "verifier",
                    self._verifier_args(),
                    self.log_dir,
                    {**self.otel_env("verifier"), "CORALLINE_THREADS": str(cfg.verifier_threads)},
                )
            )
        for p in [*self.drafters, *self.verifiers]:
            p.wait_ready(timeout_s)

    def router_config(self) -> RouterConfig:
        return self.config.router_config_for(
            tuple(p.address for p in self.verifiers), tuple(p.address for p in self.drafters)
        )

    # ------------------------------------------------------------------ Ray Serve
    def start_router(self, ingress: str | None = None, http: bool = True) -> str:
        """Ray, Serve and the public port (`ingress` overrides the config's). The HTTP API
        (unless http_port is None or http=False) is served by the front itself, or with the
        proxy ingress by Serve's HTTP proxy through the HttpIngress deployment."""
        loopback_ray_env()
        from ray import serve
        from ray.serve.config import gRPCOptions

        from coralline.router.app import build_app

        cfg = self.config
        ingress = ingress or cfg.ingress
        if ingress not in INGRESSES:
            raise ValueError(f"ingress must be one of {INGRESSES}, got {ingress!r}")
        self.ingress = ingress
        init_ray(
            num_cpus=cfg.ray_cpus,
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
            namespace="coralline",
            runtime_env={
                "worker_process_setup_hook": LOOPBACK_HOOK,
                "env_vars": self.otel_env("router"),  # the replicas trace into the live view
            },
        )
        self._ray = True
        serve_http = http and cfg.http_port is not None
        if ingress == "proxy" and cfg.tls_dir:  # Serve's HTTP proxy has no TLS here
            serve_http = False
        if ingress == "proxy":
            port = cfg.port or _free_port()
            http_port = (cfg.http_port if serve_http else 0) or _free_port()
            serve.start(
                proxy_location="HeadOnly",
                http_options={"host": cfg.host, "port": http_port},
                grpc_options=gRPCOptions(port=port, grpc_servicer_functions=[GRPC_SERVICER]),
            )
            http_config = self.http_config() if serve_http else None
            serve.run(build_app(self.router_config(), cfg.replicas, http_config), name=APP_NAME)
            self.address = f"127.0.0.1:{port}"
            if serve_http:
                host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
                self.http_url = f"http://{host}:{http_port}/v1"
        else:
            serve.start(proxy_location="Disabled")
            handle = serve.run(
                build_app(self.router_config(), cfg.replicas), name=APP_NAME, route_prefix=None
            )
            self._start_front(handle, serve_http)
        return self.address

    def http_config(self) -> HttpConfig:
        cfg = self.config
        return HttpConfig(
            host=cfg.host,
            port=cfg.http_port or 0,
            models=(cfg.model,),
            api_tokens=cfg.api_tokens,
            tls=cfg.public_tls,
        )

    def _start_front(self, handle, http: bool) -> None:
        """The grpc.aio front on its own event-loop thread."""
        import asyncio

        from coralline.router.front import start_front

        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            try:
                self._front, self._servicer = await start_front(
                    handle,
                    ServerOptions(
                        host=self.config.host,
                        port=self.config.port,
                        tls=self.config.public_tls,
                        api_tokens=self.config.api_tokens,
                    ),
                    metrics=self.config.telemetry,
                )
                self.address = self._front.address
                if http:
                    self._http = HttpServer(self.http_config(), self._servicer, handle)
                    self.http_url = await self._http.start()
            except BaseException as e:
                failure.append(e)
            ready.set()

        thread = threading.Thread(target=loop.run_forever, name="front", daemon=True)
        thread.start()
        asyncio.run_coroutine_threadsafe(main(), loop)
        ready.wait(60)
        if failure:
            raise failure[0]
        self._loop, self._thread = loop, thread

    # ------------------------------------------------------------------ whole stack
    def start(self) -> str:
        t0 = time.perf_counter()
        try:
            self.start_workers()
            self.start_router()
            self.start_live()
        except BaseException:
            self.stop()
            raise
        log.info("stack up in %.1f s at %s", time.perf_counter() - t0, self.address)
        return self.address

    def stop(self) -> None:
        self.stop_router()
        for p in [*self.verifiers, *self.drafters]:
            p.stop()
        if self.live is not None:
            self.live.stop()
            self.live = None
        if self.receiver is not None:
            self.receiver.stop()
            self.receiver = None

    def stop_router(self) -> None:
        """The front, Serve and Ray (the workers keep running: start_router() again)."""
        import asyncio

        if self._http is not None and self._loop is not None:
            fut = asyncio.run_coroutine_threadsafe(self._http.stop(), self._loop)
            try:
                fut.result(15)
            except Exception as e:
                log.warning("HTTP API stop: %s", e)
            self._http, self.http_url = None, ""
        if self._front is not None and self._loop is not None:
            fut = asyncio.run_coroutine_threadsafe(self._front.stop(), self._loop)
            try:
                fut.result(15)
            except Exception as e:
                log.warning("front stop: %s", e)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
            self._front = self._loop = self._servicer = None
        self.http_url = ""  # the proxy ingress's HTTP API goes with Serve
        if self._ray:
            import ray
            from ray import serve

            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                self._ray = False

    def describe(self) -> list[str]:
        cfg = self.config
        lines = [f"coralline serve listening on {self.address} ({self.ingress} ingress)"]
        if self.http_url:
            lines.append(f"  OpenAI-compatible HTTP API {self.http_url}")
        if self.http_url and self.ingress == "proxy":
            lines.append("  (HTTP through Serve's HTTP proxy and the HttpIngress deployment)")
        if cfg.tls_dir:
            lines.append(
                f"  TLS on the public port (clients: ca {cfg.tls_dir}/ca.pem); mutual TLS "
                "between the services"
            )
        if cfg.api_tokens:
            lines.append(f"  bearer token required ({len(cfg.api_tokens)} accepted)")
        for p in self.drafters:
            lines.append(f"  drafter  {p.address} pid {p.pid}")
        for p in self.verifiers:
            lines.append(f"  verifier {p.address} pid {p.pid}")
        from coralline.session_redis import redact_url

        store = redact_url(cfg.redis) if cfg.redis else "memory (in the router replica)"
        lines.append(f"  sessions {store}; logs {self.log_dir}")
        if self.live is not None:
            lines.append(
                f"  live view {self.live.url} (metrics {self.live.url}metrics, Prometheus "
                f"targets {self.live.url}prometheus/targets)"
            )
        for p in [*self.drafters, *self.verifiers]:
            if p.metrics_url:
                lines.append(f"  {p.kind:8} metrics {p.metrics_url}")
        if self.config.trace_file:
            lines.append(f"  spans appended to {self.config.trace_file} (coralline trace-report)")
        return lines


def run(config: StackConfig, ready=print) -> int:
    """Start the stack, print the endpoint, wait for Ctrl-C / SIGTERM, stop everything."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stack = Stack(config)
    stack.start()
    try:
        for line in stack.describe():
            ready(line)
        reported: set[int] = set()
        while not stop.wait(0.5):
            for p in [*stack.verifiers, *stack.drafters]:
                if not p.alive() and p.pid not in reported:
                    reported.add(p.pid)
                    log.warning("%s %s (pid %d) ended", p.kind, p.address, p.pid)
    finally:
        stack.stop()
    return 0
