"""The OpenAI-compatible HTTP API, served beside the gRPC front (same process, same event loop,
same router deployment handle): /v1/models, /v1/completions, /v1/chat/completions (with
server-sent-event streaming), /health and /metrics. A Starlette app under uvicorn.

Every generation goes through `FrontServicer.stream`, the path the gRPC API takes: the router's
placement, session store, limits and retry hints apply unchanged, and a caller that stops
listening cancels the session at the verifier. A streamed request whose client disconnects is
cancelled by Starlette at once (uvicorn reports the disconnect); a non-streamed one is watched
every `disconnect_poll_s`. Errors are the OpenAI shape (openai_api.py) with the HTTP status of
the gRPC status behind them; the bearer tokens of the gRPC API guard /v1/* (not /health and
/metrics, like the gRPC health service and the /metrics ports).

Knows nothing about routing or models: it translates and forwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
from dataclasses import dataclass

from coralline.router import openai_api as oa
from coralline.rpc.security import TlsConfig, Tokens

log = logging.getLogger("coralline.http")


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000  # 0 = a free one
    models: tuple[str, ...] = ("smollm2-135m-instruct",)  # the ids /v1/models lists
    max_body_bytes: int = 4 << 20  # a larger request body is refused with 413
    api_tokens: frozenset[str] = frozenset()  # bearer tokens /v1/* accepts (none: no auth)
    tls: TlsConfig | None = None  # HTTPS with this certificate and key
    disconnect_poll_s: float = 0.25  # non-streamed requests: how often to look for the client

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"http port must be in [0, 65535], got {self.port}")
        if not self.models or not all(self.models):
            raise ValueError("models must name at least one model")
        if self.max_body_bytes < 1024 or self.disconnect_poll_s <= 0:
            raise ValueError("max_body_bytes must be >= 1024 and disconnect_poll_s > 0")

    def __repr__(self) -> str:  # the tokens stay out of logs
        return (
            f"HttpConfig(host={self.host!r}, port={self.port}, models={self.models}, "
            f"tokens={len(self.api_tokens)}, tls={self.tls is not None})"
        )


def _json(body: dict, status: int = 200, headers: dict | None = None):
    from starlette.responses import Response

    data = json.dumps(body, ensure_ascii=False).encode()
    return Response(data, status, headers, media_type="application/json")


def _error(e: oa.ApiError):
    return _json(e.body(), e.status, e.headers())


def _carrier(request) -> dict | None:
    """The client's W3C trace context, from the HTTP headers."""
    ctx = {k: request.headers[k] for k in ("traceparent", "tracestate") if k in request.headers}
    return ctx or None


class HttpApi:
    """The routes; `servicer` is the gRPC front's FrontServicer (its stream and metrics),
    `handle` the router deployment (its status, for /health)."""

    def __init__(self, config: HttpConfig, servicer, handle) -> None:
        self.config = config
        self.servicer = servicer
        self.handle = handle
        self.tokens = Tokens(config.api_tokens) if config.api_tokens else None
        self.created = int(time.time())

    # ------------------------------------------------------------------ plumbing
    def app(self):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        async def not_found(request, exc: HTTPException):
            if exc.status_code == 405:
                return _error(oa.ApiError(405, f"{request.method} is not allowed on this path"))
            path = request.url.path
            return _error(oa.ApiError(exc.status_code, f"no route {path}", "not_found_error"))

        routes = [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]
        return Starlette(routes=routes, exception_handlers={HTTPException: not_found})

    def _authorize(self, request) -> None:
        if self.tokens is None:
            return
        value = request.headers.get("authorization")
        if not self.tokens.accepts(value):
            why = "no bearer token" if value is None else "the bearer token is not accepted"
            raise oa.ApiError(
                401,
                f"{why}: send 'Authorization: Bearer <token>'",
                "authentication_error",
                None,
                "invalid_api_key",
            )

    async def _body(self, request) -> object:
        limit = self.config.max_body_bytes
        too_big = oa.ApiError(
            413,
            f"the request body is larger than {limit} bytes (max_body_bytes)",
            "invalid_request_error",
            None,
            "request_too_large",
        )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_big
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > limit:
                raise too_big
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise oa.bad(f"the request body is not valid JSON: {e}") from None

    # ------------------------------------------------------------------ routes
    async def models(self, request):
        try:
            self._authorize(request)
        except oa.ApiError as e:
            return _error(e)
        return _json(oa.models_list(self.config.models, self.created))

    async def model(self, request):
        try:
            self._authorize(request)
            name = request.path_params["model"]
            if name not in self.config.models:
                raise oa.ApiError(
                    404, f"The model `{name}` does not exist", "not_found_error", "model",
                    "model_not_found",
                )  # fmt: skip
        except oa.ApiError as e:
            return _error(e)
        return _json(oa.models_list((name,), self.created)["data"][0])

    async def chat(self, request):
        return await self._generate(request, oa.CHAT)

    async def completions(self, request):
        return await self._generate(request, oa.COMPLETION)

    async def _generate(self, request, kind: str):
        try:
            self._authorize(request)
            parsed = oa.parse(await self._body(request), kind, self.config.models)
        except oa.ApiError as e:
            return _error(e)
        session_id = uuid.uuid4().hex
        parsed.request.session_id = session_id
        answer = oa.Answer(parsed, session_id)
        headers = {"x-coralline-session-id": session_id}
        responses = self.servicer.stream(parsed.request, _carrier(request))
        if not parsed.stream:
            return await self._whole(request, answer, responses, headers)
        # the first response before the headers: a refused request gets its HTTP status
        try:
            first = await anext(responses)
        except StopAsyncIteration:
            first = None
        except Exception as e:
            return _error(oa.api_error(e, kind))
        from starlette.responses import StreamingResponse

        return StreamingResponse(
            self._events(answer, first, responses),
            media_type="text/event-stream",
            headers=headers | {"cache-control": "no-cache"},
        )

    async def _events(self, answer: oa.Answer, first, responses):
        try:
            if (opening := answer.first_chunk()) is not None:
                yield oa.sse(opening)
            if first is not None:
                if (chunk := answer.chunk(first)) is not None:
                    yield oa.sse(chunk)
                async for response in responses:
                    if (chunk := answer.chunk(response)) is not None:
                        yield oa.sse(chunk)
            for chunk in answer.last_chunks():
                yield oa.sse(chunk)
            yield oa.DONE
        except Exception as e:  # after the headers: the error as an event, then the end
            yield oa.error_event(oa.api_error(e, answer.parsed.kind))
        finally:
            # a disconnect cancels this generator inside `responses`, which then cancels
            # the session; closing it here covers a consumer that simply stops
            await responses.aclose()

    async def _whole(self, request, answer: oa.Answer, responses, headers: dict):
        async def collect() -> None:
            async with contextlib.aclosing(responses) as stream:
                async for response in stream:
                    answer.tally.add(response)

        task = asyncio.ensure_future(collect())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.config.disconnect_poll_s)
                if done:
                    break
                if await request.is_disconnected():
                    task.cancel()  # the client left: the stream's cancel frees the session
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                    return _error(oa.ApiError(499, "the client closed the request", "cancelled"))
            task.result()
        except Exception as e:
            return _error(oa.api_error(e, answer.parsed.kind))
        finally:
            if not task.done():
                task.cancel()
        return _json(answer.response(), headers=headers)

    async def health(self, request):
        """200 while the router answers and a verifier is up; 503 otherwise (a load
        balancer's readiness check)."""
        try:
            status = await asyncio.wait_for(self.handle.status.remote(), 5.0)
        except Exception as e:
            body = {"status": "unavailable", "error": f"router: {type(e).__name__}: {e}"}
            return _json(body, 503)
        ok = status.get("verifiers_up", 0) > 0
        return _json({"status": "ok" if ok else "unavailable", **status}, 200 if ok else 503)

    async def metrics(self, request):
        from starlette.responses import Response

        metrics = getattr(self.servicer, "metrics", None)
        if metrics is None:
            off = oa.ApiError(404, "metrics are off (telemetry disabled)", "not_found_error")
            return _error(off)
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


class HttpServer:
    """uvicorn on the running event loop (the front's), on a socket bound here (port 0 works)."""

    def __init__(self, config: HttpConfig, servicer, handle) -> None:
        self.config = config
        self.api = HttpApi(config, servicer, handle)
        self._server = None
        self._task: asyncio.Task | None = None
        self.port = 0

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls else "http"
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self.port}/v1"

    async def start(self) -> str:
        import uvicorn

        cfg = self.config
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.host, cfg.port))
        except OSError as e:
            sock.close()
            raise OSError(f"cannot serve the HTTP API on {cfg.host}:{cfg.port}: {e}") from e
        self.port = sock.getsockname()[1]
        tls = {"ssl_certfile": cfg.tls.cert, "ssl_keyfile": cfg.tls.key} if cfg.tls else {}
        self._server = uvicorn.Server(
            uvicorn.Config(
                self.api.app(),
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=5,
                **tls,
            )
        )
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        for _ in range(200):
            if self._server.started or self._task.done():
                break
            await asyncio.sleep(0.025)
        if self._task.done():
            self._task.result()  # its start-up error
        if not self._server.started:
            raise RuntimeError("the HTTP API did not start within 5 s")
        return self.url

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, 10)
        except (TimeoutError, asyncio.CancelledError):
            self._task.cancel()
        self._server = self._task = None
