"""Errors -> gRPC status codes, in one interceptor.

Servicers raise; they never pick status codes by hand. `ServiceError(code, message)` says
exactly which status to send; a plain ValueError is bad input (INVALID_ARGUMENT); anything
else is a bug (INTERNAL, logged with its traceback, the message still sent). The process keeps
serving in every case. Knows nothing about what the services do.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

log = logging.getLogger("coralline.rpc")


RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata: when a refused request may retry
PUSHBACK_KEY = "grpc-retry-pushback-ms"  # the same, for gRPC's own retry policy


class ServiceError(Exception):
    """An error with the gRPC status it must be sent with (and, for a full server, when to
    retry: sent as the `retry-after-ms` and `grpc-retry-pushback-ms` trailers)."""

    def __init__(
        self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # crosses process boundaries intact (Ray Serve replicas -> front)
        return (ServiceError, (self.code, self.message, self.retry_after_s))

    def trailers(self) -> tuple[tuple[str, str], ...]:
        if self.retry_after_s is None:
            return ()
        ms = str(max(0, round(self.retry_after_s * 1e3)))
        return ((RETRY_AFTER_KEY, ms), (PUSHBACK_KEY, ms))


class PromptTooLong(ValueError):
    """A prompt over a token limit (INVALID_ARGUMENT, as any bad input): its own type so the
    HTTP API can name it (`context_length_exceeded`)."""


def not_found(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, message)


def exhausted(message: str, retry_after_s: float | None = 1.0) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, retry_after_s)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    log.exception("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


_PASS = (asyncio.CancelledError, grpc.aio.AbortError, GeneratorExit)


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    code, message = status_of(exc)
    if isinstance(exc, ServiceError) and exc.trailers():
        await context.abort(code, message, trailing_metadata=exc.trailers())
    await context.abort(code, message)


class Malformed:
    """Stands for a request message that does not parse (bad wire format, invalid UTF-8 in a
    string field): the handler then answers INVALID_ARGUMENT instead of gRPC's INTERNAL."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer):
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:  # DecodeError, UnicodeDecodeError, ...
            return Malformed(e)

    return parse


def _parsed(request):
    if isinstance(request, Malformed):
        e = request.error
        raise ValueError(f"the request message does not parse: {type(e).__name__}: {e}")
    return request


async def _parsed_stream(requests):
    async for request in requests:
        yield _parsed(request)


def _wrap_unary(fn, streamed_requests: bool):
    async def handler(request, context):
        try:
            request = _parsed_stream(request) if streamed_requests else _parsed(request)
            return await fn(request, context)
        except _PASS:
            raise
        except Exception as e:
            await _abort(context, e)

    return handler


def _wrap_stream(fn, streamed_requests: bool):
    async def handler(request, context):
        try:
            request = _parsed_stream(request) if streamed_requests else _parsed(request)
            async for item in fn(request, context):
                yield item
        except _PASS:
            raise
        except Exception as e:
            await _abort(context, e)

    return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by async handlers to statuses (see the module docstring), and a
    request message that does not parse to INVALID_ARGUMENT."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        lenient = {"request_deserializer": _lenient(handler.request_deserializer)}
        if handler.unary_unary and asyncio.iscoroutinefunction(handler.unary_unary):
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary, False), **lenient)
        if handler.stream_unary and asyncio.iscoroutinefunction(handler.stream_unary):
            return handler._replace(stream_unary=_wrap_unary(handler.stream_unary, True), **lenient)
        if handler.unary_stream and _is_async_gen(handler.unary_stream):
            return handler._replace(
                unary_stream=_wrap_stream(handler.unary_stream, False), **lenient
            )
        if handler.stream_stream and _is_async_gen(handler.stream_stream):
            return handler._replace(
                stream_stream=_wrap_stream(handler.stream_stream, True), **lenient
            )
        return handler


def _is_async_gen(fn) -> bool:
    import inspect

    return inspect.isasyncgenfunction(fn)
