"""The router as a Ray Serve application: `RouterReplica` deployments around RouterCore.

Each replica hosts one RouterCore (stateless between requests: sessions live in the store), so
Serve may run several and autoscale them on ongoing requests. Its methods are named after the
public `Generation` RPCs, which is what both ingresses call:
  - the `grpc.aio` front (front.py, the default): deployment handles, loopback only;
  - Ray Serve's own gRPC proxy (`gRPCOptions.grpc_servicer_functions`): binds every interface
    and cancels unreliably (docs/router.md has the measurements), kept for comparison.
A ServiceError raised here carries its status through either path: the proxy reads it from
`grpc_context`, the front from the exception Ray re-raises.

Ray must be imported after `loopback_ray_env()`, and its workers started with the
`loopback_serve_grpc` setup hook (stack.py does both): then nothing Ray or Serve opens listens
beyond 127.0.0.1, the front included.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from coralline.router.core import RouterConfig

APP_NAME = "coralline"
GRPC_SERVICER = "coralline._proto.coralline.v1.generation_pb2_grpc.add_GenerationServicer_to_server"


def loopback_ray_env() -> None:
    """Keep every Ray listener on 127.0.0.1 and Ray quiet (set before `import ray`)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def loopback_serve_grpc() -> None:
    """Ray worker setup hook (`runtime_env["worker_process_setup_hook"]`): the gRPC servers
    Ray Serve starts inside its workers (each replica's inter-deployment server and the gRPC
    proxy) hard-code `[::]` (every interface; ray 2.60); bind them to 127.0.0.1 instead. Ray's
    own listeners already stay on loopback with `loopback_ray_env()`."""
    import sys

    import ray._common.tls_utils as tls
    import ray.serve._private.default_impl as impl

    def loopback(address: str) -> str:
        return "127.0.0.1:" + address[len("[::]:") :] if address.startswith("[::]:") else address

    add_port = tls.add_port_to_grpc_server
    if getattr(add_port, "coralline_loopback", False):
        return

    def add_port_loopback(server, address):
        return add_port(server, loopback(address))

    def add_grpc_address_loopback(grpc_server, server_address: str) -> None:
        grpc_server.add_insecure_port(loopback(server_address))

    add_port_loopback.coralline_loopback = True
    tls.add_port_to_grpc_server = add_port_loopback
    impl.add_grpc_address = add_grpc_address_loopback
    replica = sys.modules.get("ray.serve._private.replica")  # imported it by name already
    if replica is not None:
        replica.add_port_to_grpc_server = add_port_loopback


LOOPBACK_HOOK = f"{__name__}.loopback_serve_grpc"


@dataclass(frozen=True)
class ReplicaConfig:
    routers: int = 1  # replicas (fixed), unless autoscaling
    autoscale_max: int = 0  # > 0: autoscale between `routers` and this on ongoing requests
    target_ongoing_requests: float = 8.0  # per replica, when autoscaling
    max_ongoing_requests: int = 64  # per replica; Serve queues beyond it

    def __post_init__(self) -> None:
        if self.routers < 1:
            raise ValueError("routers must be >= 1")
        if self.autoscale_max and self.autoscale_max < self.routers:
            raise ValueError("autoscale_max must be >= routers")


class RouterReplica:
    """One Serve replica: the public Generation RPCs over RouterCore."""

    def __init__(self, config: RouterConfig) -> None:
        import logging

        from coralline.router.core import RouterCore

        logging.getLogger("coralline").setLevel(os.environ.get("CORALLINE_LOG", "WARNING"))
        self.core = RouterCore(config)

    @staticmethod
    def _fail(e: BaseException, grpc_context) -> None:
        if grpc_context is not None:  # the Serve proxy path: the status it must send
            from coralline.rpc.errors import status_of

            code, message = status_of(e)
            grpc_context.set_code(code)
            grpc_context.set_details(message)

    async def Generate(self, request, grpc_context=None, trace_context=None):
        """trace_context: the client's W3C context, from the front (the proxy path reads the
        call's metadata)."""
        if trace_context is None and grpc_context is not None and self.core.tracing.enabled:
            from coralline.telemetry.tracing import carrier_of_metadata

            trace_context = carrier_of_metadata(grpc_context.invocation_metadata())
        try:
            async for response in self.core.generate(request, trace_context):
                yield response
        except Exception as e:
            self._fail(e, grpc_context)
            raise

    async def GetSession(self, request, grpc_context=None):
        try:
            return await self.core.get_session(request.session_id)
        except Exception as e:
            self._fail(e, grpc_context)
            raise

    async def CancelSession(self, request, grpc_context=None):
        from coralline.rpc.protos import generation_pb2

        try:
            cancelled = await self.core.cancel_session(request.session_id)
        except Exception as e:
            self._fail(e, grpc_context)
            raise
        return generation_pb2.CancelSessionResponse(cancelled=cancelled)

    async def status(self) -> dict:
        """RouterCore.status (the HTTP API's /health)."""
        return await self.core.status()

    async def check_health(self) -> None:
        pass


def from_args(args: dict):
    """A Serve application builder (`import_path: coralline.router.app:from_args` in a Serve
    config, e.g. a KubeRay RayService's serveConfigV2): `args` are RouterConfig's fields
    (lists for the address tuples) plus ReplicaConfig's. `$VAR` / `${VAR}` in string values
    are expanded from the replica's environment, so a Redis password stays in a Secret
    (`redis: redis://:${REDIS_PASSWORD}@redis:6379/0`); `tls` is a mapping of TlsConfig's
    fields (certificate files mounted in the pod). Ingress there is Serve's gRPC proxy
    (`grpc_options` in the same config); nothing is forced onto loopback. `http` (a mapping of
    HttpConfig's models, max_body_bytes, api_tokens, disconnect_poll_s; `{}` for the defaults)
    adds the OpenAI-compatible HTTP API on Serve's HTTP proxy (`http_options`); without
    `api_tokens` the bearer tokens come from $CORALLINE_API_TOKENS in the replica's
    environment (a Secret), as for `coralline serve`; none there: no auth."""
    from dataclasses import fields

    router_keys = {f.name for f in fields(RouterConfig)}
    replica_keys = {f.name for f in fields(ReplicaConfig)}
    args = {k: os.path.expandvars(v) if isinstance(v, str) else v for k, v in (args or {}).items()}
    http = args.pop("http", None)
    unknown = sorted(set(args) - router_keys - replica_keys)
    if unknown:
        raise ValueError(
            f"unknown router args {unknown}; known: {sorted(router_keys | replica_keys)}"
        )
    router = {
        k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if k in router_keys
    }
    if isinstance(router.get("tls"), dict):  # {cert, key, ca, server_name}: paths in the pod
        from coralline.rpc.security import TlsConfig

        router["tls"] = TlsConfig(**router["tls"])
    replicas = {k: v for k, v in args.items() if k in replica_keys}
    config = RouterConfig(**router)
    return build_app(config, ReplicaConfig(**replicas), _http_config(http, config.model))


def _http_config(http, model: str):
    """from_args' `http` mapping -> HttpConfig (None: no HTTP API)."""
    if http is None or http is False:
        return None
    from coralline.router.http import HttpConfig

    if http is True:
        http = {}
    if not isinstance(http, dict):
        raise ValueError(f"http must be a mapping of HttpConfig fields, got {http!r}")
    allowed = {"models", "max_body_bytes", "api_tokens", "disconnect_poll_s"}
    unknown = sorted(set(http) - allowed)
    if unknown:
        raise ValueError(f"unknown http args {unknown}; known: {sorted(allowed)}")
    from coralline.rpc.security import check_token, load_tokens

    kw = dict(http)
    if "api_tokens" in kw:
        kw["api_tokens"] = frozenset(check_token(t, "http.api_tokens") for t in kw["api_tokens"])
    else:
        kw["api_tokens"] = load_tokens(None)  # $CORALLINE_API_TOKENS, if set
    kw["models"] = tuple(kw.get("models") or (model.rstrip("/").rsplit("/", 1)[-1],))
    return HttpConfig(**kw)


def build_app(config: RouterConfig, replicas: ReplicaConfig | None = None, http=None):
    """The Serve application (bind it with serve.run). With `http` (an HttpConfig) its ingress
    is `HttpIngress` in front of the Router deployment: the OpenAI-compatible HTTP API through
    Serve's HTTP proxy, and the Generation RPCs of Serve's gRPC proxy forwarded (one hop more);
    without, the Router deployment is the ingress."""
    from ray import serve

    replicas = replicas or ReplicaConfig()
    options: dict = {
        "name": "Router",
        "ray_actor_options": {"num_cpus": 0},
        "max_ongoing_requests": replicas.max_ongoing_requests,
    }
    if replicas.autoscale_max:
        options["autoscaling_config"] = {
            "min_replicas": replicas.routers,
            "max_replicas": replicas.autoscale_max,
            "target_ongoing_requests": replicas.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = replicas.routers
    router = serve.deployment(RouterReplica).options(**options).bind(config)
    if http is None:
        return router
    from coralline.router.http_ingress import HttpIngress

    ingress = serve.deployment(serve.ingress()(HttpIngress))
    return ingress.options(**{**options, "name": "Http"}).bind(router, http)
