"""The OpenAI-compatible HTTP API through Ray Serve's own proxies (Kubernetes' RayService,
`coralline serve --ingress proxy`): a Serve ingress deployment in front of the Router
deployment. Serve's HTTP proxy hands it the HTTP requests (the Starlette app of router/http.py,
built at replica start); Serve's gRPC proxy hands it the Generation RPCs, which it forwards to
the Router deployment the way the front does (`FrontServicer.stream`: the session is named
first and cancelled when the caller goes away).

With the default `front` ingress none of this runs: the front process serves both APIs itself
(router/stack.py). Knows nothing about routing: it forwards.
"""

from __future__ import annotations

import contextlib


class HttpIngress:
    """Serve ingress: `serve.ingress()(HttpIngress)`; `router` is the Router deployment's
    handle, `http` the HttpConfig (its host, port and TLS are Serve's proxy's business)."""

    def __init__(self, router, http) -> None:
        from coralline.router.front import FrontServicer
        from coralline.router.http import HttpApi

        self.router = router
        self.servicer = FrontServicer(router)
        self.api = HttpApi(http, self.servicer, router)

    def __serve_build_asgi_app__(self):
        return self.api.app()

    @staticmethod
    def _fail(e: BaseException, grpc_context) -> BaseException:
        """The replica's error unwrapped, with its status set for Serve's gRPC proxy."""
        from coralline.router.app import RouterReplica
        from coralline.router.front import _unwrap

        e = _unwrap(e)
        RouterReplica._fail(e, grpc_context)
        return e

    # the Generation RPCs of Serve's gRPC proxy, forwarded to the Router deployment
    async def Generate(self, request, grpc_context=None):
        from coralline.telemetry.tracing import carrier_of_metadata

        parent = None
        if grpc_context is not None:
            parent = carrier_of_metadata(grpc_context.invocation_metadata()) or None
        try:
            async with contextlib.aclosing(self.servicer.stream(request, parent)) as responses:
                async for response in responses:
                    yield response
        except Exception as e:
            raise self._fail(e, grpc_context) from None

    async def GetSession(self, request, grpc_context=None):
        try:
            return await self.router.GetSession.remote(request)
        except Exception as e:
            raise self._fail(e, grpc_context) from None

    async def CancelSession(self, request, grpc_context=None):
        try:
            return await self.router.CancelSession.remote(request)
        except Exception as e:
            raise self._fail(e, grpc_context) from None

    async def check_health(self) -> None:
        pass
