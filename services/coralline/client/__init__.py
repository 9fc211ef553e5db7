"""coralline.client: the Python SDK of the coralline Generation service (coralline.v1).

    from coralline.client import Client
    with Client("localhost:50051", token="...") as c:
        result = c.generate("Hello", max_new_tokens=64)
        print(result.text, result.stats)

`Client` (blocking) and `AsyncClient` (asyncio) call Generate / GetSession / CancelSession and
return the frozen dataclasses of coralline.client.types; every RPC failure is a
coralline.client.errors.CorallineError subclass carrying the server's message. Imports grpc,
protobuf and the generated coralline.v1 modules only: no torch, numpy or server code. Knows
nothing about how the server generates.
"""

from __future__ import annotations

from coralline.client._async import AsyncClient
from coralline.client._common import DEFAULT
from coralline.client._sync import Client
from coralline.client.errors import (
    AlreadyExists,
    Cancelled,
    CorallineError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OtherError,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from coralline.client.types import Chunk, GenerationResult, RoundStats, SessionInfo, Summary

__all__ = [
    "DEFAULT",
    "AlreadyExists",
    "AsyncClient",
    "Cancelled",
    "Chunk",
    "Client",
    "CorallineError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "GenerationResult",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OtherError",
    "PermissionDenied",
    "ResourceExhausted",
    "RoundStats",
    "SessionInfo",
    "Summary",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]
