"""The generated protobuf / gRPC modules of coralline.v1, imported in one place.

`make protos` generates them into coralline/_proto (gitignored). Imports grpc and protobuf
only: the client SDK uses this module without torch.
"""

from __future__ import annotations

try:
    from coralline._proto.coralline.v1 import (
        common_pb2,
        drafter_pb2,
        drafter_pb2_grpc,
        generation_pb2,
        generation_pb2_grpc,
        verifier_pb2,
        verifier_pb2_grpc,
    )
except ImportError as e:  # pragma: no cover - only in a checkout without `make protos`
    raise ImportError(
        "coralline's gRPC code is not generated: run `make protos` (it writes "
        "services/coralline/_proto from protos/coralline/v1)"
    ) from e

__all__ = [
    "common_pb2",
    "drafter_pb2",
    "drafter_pb2_grpc",
    "generation_pb2",
    "generation_pb2_grpc",
    "verifier_pb2",
    "verifier_pb2_grpc",
]
