"""The public port: a `grpc.aio` Generation server in front of the Ray Serve router deployment.

Why not Serve's own gRPC proxy (docs/router.md has the measurements): the proxy binds every
interface (hard-coded `[::]`), and a client's cancel reached the replica's generator in only
some trials, leaving the verifier decoding for nobody. This front binds the address it is given
(loopback by default), and when a client goes away it cancels the deployment stream AND sends
CancelSession for the session (the front names every session before the call, so it knows the
id even before the first chunk): the verifier's session is freed within milliseconds.

Errors: a ServiceError raised in a replica comes back as a RayTaskError whose cause is the
ServiceError; it is re-raised here so the ErrorInterceptor sends its status. Serve's own
refusals map to UNAVAILABLE / RESOURCE_EXHAUSTED.

Knows nothing about routing: it forwards requests to the deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import grpc

from coralline.rpc.errors import ServiceError
from coralline.rpc.protos import generation_pb2, generation_pb2_grpc
from coralline.rpc.server import Server, ServerOptions
from coralline.telemetry.metrics import RouterMetrics
from coralline.telemetry.tracing import carrier_of_metadata

log = logging.getLogger("coralline.front")

SERVICE_NAMES = [generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name]


def _unwrap(e: BaseException) -> BaseException:
    """The exception a replica raised (Ray wraps it), or a ServiceError for Serve's own."""
    from ray import exceptions as ray_exc
    from ray.serve import exceptions as serve_exc

    cause = getattr(e, "cause", None)
    if isinstance(e, ray_exc.RayTaskError) and cause is not None:
        e = cause
    if isinstance(e, ServiceError | ValueError):
        return e
    if isinstance(e, serve_exc.BackPressureError):
        return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), retry_after_s=1.0)
    if isinstance(e, ray_exc.RayActorError | serve_exc.DeploymentUnavailableError):
        return ServiceError(grpc.StatusCode.UNAVAILABLE, f"router replica unavailable: {e}")
    return e


class FrontServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, handle, metrics: RouterMetrics | None = None) -> None:
        self.handle = handle  # DeploymentHandle of the router deployment
        self._stream = handle.options(stream=True)
        self._cancels: set[asyncio.Task] = set()
        self.metrics = metrics  # what clients see (the router's Prometheus numbers)
        self.running = 0

    async def Generate(self, request, context):
        # the client's trace context (if any) goes to the replica, which opens the spans
        parent = carrier_of_metadata(context.invocation_metadata()) or None
        async with contextlib.aclosing(self.stream(request, parent)) as responses:
            async for response in responses:
                yield response

    async def stream(self, request, parent: dict | None = None):
        """The deployment's responses to one Generate request (named here when it has no
        session id), with the replica's errors unwrapped; a caller that stops listening
        (cancellation, a closed generator) cancels the session. The HTTP API shares it."""
        if not request.session_id:
            named = generation_pb2.GenerateRequest()
            named.CopyFrom(request)
            named.session_id = uuid.uuid4().hex
            request = named
        responses = self._stream.Generate.remote(request, trace_context=parent)
        done, outcome, failovers = False, "cancelled", 0
        t0 = last = time.perf_counter()
        first = True
        self.running += 1
        try:
            async for response in responses:
                if self.metrics is not None:
                    now = time.perf_counter()
                    self.metrics.chunk(
                        len(response.token_ids), now - last, now - t0 if first else None
                    )
                    first, last = False, now
                    if response.HasField("summary"):
                        failovers = response.summary.failovers
                yield response
            done, outcome = True, "finished"
        except asyncio.CancelledError:
            raise
        except Exception as e:
            done = True
            e = _unwrap(e)
            cancelled = isinstance(e, ServiceError) and e.code == grpc.StatusCode.CANCELLED
            outcome = "cancelled" if cancelled else "failed"
            raise e from None
        finally:
            self.running -= 1
            if self.metrics is not None:
                self.metrics.request_done(outcome, time.perf_counter() - t0, failovers)
            if not done:  # the caller went away (or the server stops): stop the session
                responses.cancel()
                task = asyncio.get_running_loop().create_task(self._cancel(request.session_id))
                self._cancels.add(task)
                task.add_done_callback(self._cancels.discard)

    async def _cancel(self, session_id: str) -> None:
        try:
            await self.handle.CancelSession.remote(
                generation_pb2.CancelSessionRequest(session_id=session_id)
            )
        except Exception as e:  # finished meanwhile, or never started: nothing to free
            log.info("cancel of %s after the client left: %s", session_id, _unwrap(e))

    async def GetSession(self, request, context):
        try:
            return await self.handle.GetSession.remote(request)
        except Exception as e:
            raise _unwrap(e) from None

    async def CancelSession(self, request, context):
        try:
            return await self.handle.CancelSession.remote(request)
        except Exception as e:
            raise _unwrap(e) from None


async def start_front(handle, options: ServerOptions, metrics: bool = False):
    """(server, servicer); metrics=True records RouterMetrics (servicer.metrics.registry)."""
    server = Server(options, SERVICE_NAMES)
    servicer = FrontServicer(handle)
    if metrics:
        servicer.metrics = RouterMetrics(running=lambda: servicer.running)
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server.server)
    await server.start()
    return server, servicer
