"""errors.py: the gateway's error tree.

Every error raised on purpose is a ``GatewayError`` carrying an ``ErrorKind``. This module
knows nothing of HTTP or gRPC: ``status.py`` maps each kind to a status code once, for both
front ends. Messages are written for the client: they name the model, version and tensor.
"""

from __future__ import annotations

import enum
from typing import ClassVar

__all__ = [
    "ErrorKind",
    "GatewayError",
    "InvalidInputError",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "OverloadedError",
    "DeadlineExceededError",
    "ConflictError",
    "VersionConflictError",
    "FencedWriteError",
    "StoreUnavailableError",
    "PayloadTooLargeError",
    "UnsupportedMediaTypeError",
    "UnauthenticatedError",
    "PermissionDeniedError",
    "RateLimitedError",
    "UnimplementedError",
    "ModelExecutionError",
    "InternalError",
]


class ErrorKind(enum.Enum):
    INVALID_INPUT = "invalid_input"
    NOT_FOUND = "not_found"
    NOT_READY = "not_ready"
    OVERLOADED = "overloaded"
    DEADLINE = "deadline"
    CONFLICT = "conflict"
    TOO_LARGE = "too_large"
    UNSUPPORTED_MEDIA = "unsupported_media"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    UNIMPLEMENTED = "unimplemented"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class GatewayError(Exception):
    """Base of every error we raise on purpose."""

    kind: ClassVar[ErrorKind] = ErrorKind.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInputError(GatewayError, ValueError):
    """The request is malformed or does not match the model's signature."""

    kind = ErrorKind.INVALID_INPUT


class ModelNotFoundError(GatewayError, LookupError):
    """No model (or version) with that name is known."""

    kind = ErrorKind.NOT_FOUND


class ModelNotReadyError(GatewayError):
    """The model exists but cannot serve: loading, failed to load, unloading, or draining."""

    kind = ErrorKind.NOT_READY


class OverloadedError(GatewayError):
    """A bounded queue is full; the caller may retry later."""

    kind = ErrorKind.OVERLOADED


class DeadlineExceededError(GatewayError, TimeoutError):
    """The request's deadline passed before it could be answered."""

    kind = ErrorKind.DEADLINE


class ConflictError(GatewayError):
    """The operation conflicts with the current state (e.g. unloading a routed model)."""

    kind = ErrorKind.CONFLICT


class VersionConflictError(ConflictError):
    """A write expected a model's control-plane version that another writer already moved;
    re-read the state, re-validate and retry."""


class FencedWriteError(ConflictError):
    """A write carried a leader fencing token that is no longer current: another replica
    holds (or may hold) the controller lease, so this one must stop deciding."""


class StoreUnavailableError(GatewayError, ConnectionError):
    """The shared control-plane store cannot be reached; a write's outcome is not applied
    (or, for a timed-out commit, unknown). Inference is unaffected; retry the change later."""

    kind = ErrorKind.UNAVAILABLE


class PayloadTooLargeError(GatewayError):
    """The request body or a tensor exceeds a configured size limit."""

    kind = ErrorKind.TOO_LARGE


class UnsupportedMediaTypeError(GatewayError):
    """The request uses an encoding the gateway does not speak (e.g. a Content-Encoding)."""

    kind = ErrorKind.UNSUPPORTED_MEDIA


class UnauthenticatedError(GatewayError, PermissionError):
    """No credentials, or credentials that match no known principal."""

    kind = ErrorKind.UNAUTHENTICATED


class PermissionDeniedError(GatewayError, PermissionError):
    """Valid credentials whose role does not allow the operation."""

    kind = ErrorKind.FORBIDDEN


class RateLimitedError(GatewayError):
    """The caller exceeded its request rate (e.g. feedback per client); retry later."""

    kind = ErrorKind.RATE_LIMITED


class UnimplementedError(GatewayError, NotImplementedError):
    """A protocol feature this gateway does not implement (e.g. shared memory)."""

    kind = ErrorKind.UNIMPLEMENTED


class ModelExecutionError(GatewayError, RuntimeError):
    """The model runtime raised while running a request."""

    kind = ErrorKind.INTERNAL


class InternalError(GatewayError, RuntimeError):
    """An unexpected failure inside the gateway."""

    kind = ErrorKind.INTERNAL
