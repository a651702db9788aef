"""status.py: the one table from ErrorKind to (HTTP status, gRPC code), and the error body.

Both front ends read this table, so one failure gets the same answer on both protocols.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import grpc
import msgspec

from gateway.errors import ErrorKind

__all__ = ["STATUS", "http_status", "grpc_code", "error_body"]

STATUS: Final[Mapping[ErrorKind, tuple[int, grpc.StatusCode]]] = {
    ErrorKind.INVALID_INPUT: (400, grpc.StatusCode.INVALID_ARGUMENT),
    ErrorKind.NOT_FOUND: (404, grpc.StatusCode.NOT_FOUND),
    ErrorKind.NOT_READY: (503, grpc.StatusCode.UNAVAILABLE),
    ErrorKind.OVERLOADED: (503, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ErrorKind.DEADLINE: (504, grpc.StatusCode.DEADLINE_EXCEEDED),
    ErrorKind.CANCELLED: (499, grpc.StatusCode.CANCELLED),
    ErrorKind.CONFLICT: (409, grpc.StatusCode.FAILED_PRECONDITION),
    ErrorKind.TOO_LARGE: (413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ErrorKind.UNSUPPORTED_MEDIA: (415, grpc.StatusCode.INVALID_ARGUMENT),
    ErrorKind.UNAUTHENTICATED: (401, grpc.StatusCode.UNAUTHENTICATED),
    ErrorKind.FORBIDDEN: (403, grpc.StatusCode.PERMISSION_DENIED),
    ErrorKind.UNIMPLEMENTED: (501, grpc.StatusCode.UNIMPLEMENTED),
    ErrorKind.UNAVAILABLE: (503, grpc.StatusCode.UNAVAILABLE),
    ErrorKind.INTERNAL: (500, grpc.StatusCode.INTERNAL),
}

_encode = msgspec.json.Encoder().encode


def http_status(kind: ErrorKind) -> int:
    return STATUS[kind][0]


def grpc_code(kind: ErrorKind) -> grpc.StatusCode:
    return STATUS[kind][1]


def error_body(message: str) -> bytes:
    """The V2 error body, ``{"error": message}``, as JSON bytes."""
    return _encode({"error": message})
