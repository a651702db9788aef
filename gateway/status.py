"""status.py: the one table from ErrorKind to (HTTP status, gRPC code), and the one HTTP error
renderer.

Both front ends read this table, so one failure gets the same answer on both protocols; the
V2 REST front end and the admin API render every HTTP error through ``render_error`` (raw ASGI
parts) or ``error_response`` (a Starlette response built from the same parts), so the body
``{"error": message}`` and the headers an error kind calls for are written in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, NamedTuple

import grpc
import msgspec
from starlette.responses import Response

from gateway.errors import ErrorKind, GatewayError

__all__ = [
    "STATUS",
    "HttpError",
    "http_status",
    "grpc_code",
    "error_body",
    "render_error",
    "error_response",
]

STATUS: Final[Mapping[ErrorKind, tuple[int, grpc.StatusCode]]] = {
    ErrorKind.INVALID_INPUT: (400, grpc.StatusCode.INVALID_ARGUMENT),
    ErrorKind.NOT_FOUND: (404, grpc.StatusCode.NOT_FOUND),
    ErrorKind.NOT_READY: (503, grpc.StatusCode.UNAVAILABLE),
    ErrorKind.OVERLOADED: (503, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ErrorKind.DEADLINE: (504, grpc.StatusCode.DEADLINE_EXCEEDED),
    ErrorKind.CONFLICT: (409, grpc.StatusCode.FAILED_PRECONDITION),
    ErrorKind.TOO_LARGE: (413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ErrorKind.UNSUPPORTED_MEDIA: (415, grpc.StatusCode.INVALID_ARGUMENT),
    ErrorKind.UNAUTHENTICATED: (401, grpc.StatusCode.UNAUTHENTICATED),
    ErrorKind.FORBIDDEN: (403, grpc.StatusCode.PERMISSION_DENIED),
    ErrorKind.RATE_LIMITED: (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
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


AUTH_CHALLENGE: Final = 'Bearer realm="gateway-admin"'
# Headers an error kind calls for: RFC 7694 (which encodings we accept) and RFC 6750 (how to
# authenticate, and that the token lacks the scope).
_KIND_HEADERS: Final[Mapping[ErrorKind, tuple[tuple[bytes, bytes], ...]]] = {
    ErrorKind.UNSUPPORTED_MEDIA: ((b"accept-encoding", b"gzip, deflate"),),
    ErrorKind.UNAUTHENTICATED: ((b"www-authenticate", AUTH_CHALLENGE.encode()),),
    ErrorKind.FORBIDDEN: (
        (b"www-authenticate", f'{AUTH_CHALLENGE}, error="insufficient_scope"'.encode()),
    ),
    ErrorKind.RATE_LIMITED: ((b"retry-after", b"1"),),
}
_JSON: Final = b"application/json"


class HttpError(NamedTuple):
    """An HTTP error as raw ASGI parts: status, headers (content-length included), body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def render_error(error: GatewayError | tuple[int, str], request_id: str = "") -> HttpError:
    """The one HTTP error renderer: a ``GatewayError`` (status from the table, the headers its
    kind calls for) or a plain ``(status, message)`` (routing errors: 404, 405), with the
    request id echoed when there is one."""
    if isinstance(error, GatewayError):
        status, message = http_status(error.kind), error.message
        extra = _KIND_HEADERS.get(error.kind, ())
    else:
        (status, message), extra = error, ()
    body = error_body(message)
    headers = [(b"content-type", _JSON)]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    headers.extend(extra)
    headers.append((b"content-length", str(len(body)).encode()))
    return HttpError(status, headers, body)


def error_response(error: GatewayError | tuple[int, str]) -> Response:
    """``render_error`` as a Starlette response (for Starlette routes and handlers)."""
    status, headers, body = render_error(error)
    return Response(body, status, headers={k.decode(): v.decode() for k, v in headers})
