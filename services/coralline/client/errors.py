"""Typed exceptions for the gRPC status codes the coralline services send.

Knows the status codes and that the server's human message is in the call's details(); knows
nothing about which RPC failed or whether it may be retried (that is _common.py's business).
"""

from __future__ import annotations

import grpc


class CorallineError(Exception):
    """A failed coralline RPC. `.code` is the grpc.StatusCode, `.message` the server's text."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(CorallineError):
    """INVALID_ARGUMENT: the request is malformed (bad prompt, sampling or limits)."""


class NotFound(CorallineError):
    """NOT_FOUND: an unknown session id or drafter name."""


class AlreadyExists(CorallineError):
    """ALREADY_EXISTS: the session id is in use."""


class ResourceExhausted(CorallineError):
    """RESOURCE_EXHAUSTED: the server is full or the message too large. `.retry_after_s`: when
    the server suggests retrying (its `retry-after-ms` trailer), None when it gave no hint."""

    retry_after_s: float | None = None


class FailedPrecondition(CorallineError):
    """FAILED_PRECONDITION: the server is not in a state to run the request."""


class Unavailable(CorallineError):
    """UNAVAILABLE: the server cannot be reached or is shutting down (retried when safe)."""


class Unauthenticated(CorallineError):
    """UNAUTHENTICATED: no valid bearer token."""


class PermissionDenied(CorallineError):
    """PERMISSION_DENIED: the token is valid but not allowed to do this."""


class DeadlineExceeded(CorallineError):
    """DEADLINE_EXCEEDED: the call's deadline (the client's timeout) passed."""


class Cancelled(CorallineError):
    """CANCELLED: the session or the call was cancelled."""


class Internal(CorallineError):
    """INTERNAL: a server bug (the message says what), or a reply that breaks the protocol."""


class OtherError(CorallineError):
    """Any other status code (UNKNOWN, ABORTED, OUT_OF_RANGE, UNIMPLEMENTED, DATA_LOSS, ...)."""


_BY_CODE: dict[grpc.StatusCode, type[CorallineError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.INTERNAL: Internal,
}


def error_class(code: grpc.StatusCode) -> type[CorallineError]:
    """The exception class for a status code (OtherError for codes without their own)."""
    return _BY_CODE.get(code, OtherError)


def from_rpc_error(e: grpc.RpcError) -> CorallineError:
    """The typed exception for a failed call (grpc sync or grpc.aio), with the server's message."""
    code_fn = getattr(e, "code", None)
    details_fn = getattr(e, "details", None)
    code = code_fn() if callable(code_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    message = details_fn() if callable(details_fn) else None
    if message is None:
        message = str(e)
    err = error_class(code)(code, message)
    if isinstance(err, ResourceExhausted):
        err.retry_after_s = _retry_after(e)
    return err


def _retry_after(e: grpc.RpcError) -> float | None:
    """The `retry-after-ms` trailer in seconds (None: absent or not a number)."""
    trailers_fn = getattr(e, "trailing_metadata", None)
    try:
        trailers = trailers_fn() if callable(trailers_fn) else None
        for key, value in trailers or ():
            if key == "retry-after-ms":
                return max(0.0, int(value) / 1e3)
    except (TypeError, ValueError):
        return None
    return None


__all__ = [
    "AlreadyExists",
    "Cancelled",
    "CorallineError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OtherError",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "error_class",
    "from_rpc_error",
]
