"""auth.py: who may call the data listeners, checked before any body is decoded.

In: the data-plane client tokens (``[auth]``), the model-control settings and the admin
tokens (operators may control models), and where internal endpoints are served. Out: the
check the V2 REST front end calls first with every request's scope (``check_http``) and a
grpc.aio server interceptor (installed only when data-plane
tokens or identities exist) that refuse a call before its handler runs, and the
model-control check the gRPC repository calls make in their servicer:

- repository load/unload/index: 403 / PERMISSION_DENIED while ``model_control.enabled`` is
  false; when on, an admin token with the operator role, and (HTTP) no cross-site request:
  a foreign ``Origin`` or a form-like content type (what a web page can send without a CORS
  preflight) is refused;
- inference and metadata: an ``infer`` credential once any exists; feedback: a
  ``feedback`` credential once any exists (a credential has one scope: an inference caller
  cannot grade), and a rate per client (token or identity name, else the peer address)
  beyond which feedback gets 429 / RESOURCE_EXHAUSTED. A credential is a bearer token or
  an mTLS identity: ``CN=``, ``URI=`` or ``DNS=`` of the client certificate the listener
  verified (HTTP: ``scope["extensions"]["tls"]["client_identities"]``, set by
  ``servers.py``; gRPC: the call's ``auth_context()``, read in a wrapper of the handler
  that runs before the request message is decoded, only when identities are configured
  and the metadata alone does not pass);
- ``/metrics``, ``.../route``, ``.../outcomes``: 404 on the data port when internal
  endpoints are served on the admin listener only.

401 / UNAUTHENTICATED: no token or an unknown one; 403 / PERMISSION_DENIED: a known token
whose role or scope does not allow the call. Secrets are compared as SHA-256 digests in
constant time against every known token and never logged. With nothing configured an
inference call costs one path test here, and without identity rules nothing reads a
certificate.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Literal

import grpc

from gateway.config import AdminToken, ClientToken, DataAuthSettings, ModelControlSettings
from gateway.errors import (
    ErrorKind,
    GatewayError,
    PermissionDeniedError,
    RateLimitedError,
    UnauthenticatedError,
    UnsupportedMediaTypeError,
)
from gateway.listener_settings import normalize_identity
from gateway.status import grpc_code

__all__ = ["DataPlaneGuard", "RateLimiter", "CONTROL_DISABLED"]

logger = logging.getLogger(__name__)

CONTROL_DISABLED: Final = (
    "model control is disabled on the data listeners (model_control.enabled = false); "
    "use the admin API (/admin/v1/models/<model>/load|unload) or enable it"
)
_MAX_CLIENTS: Final = 10_000  # rate-limit buckets kept; the least recently used go first
# Content types a web page may POST cross-site without a CORS preflight (Fetch standard).
_SIMPLE_TYPES: Final = (b"text/plain", b"application/x-www-form-urlencoded", b"multipart/form")
_REPOSITORY_RPCS: Final = frozenset(
    {"RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"}
)
_OPEN_RPCS: Final = frozenset({"ServerLive", "ServerReady", "ServerMetadata", "Check", "Watch"})
_INTERNAL_SUFFIXES: Final = ("/route", "/outcomes")


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def _bearer(header: str | None) -> bytes | None:
    if not header:
        return None
    scheme, _, secret = header.strip().partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        return None
    return _digest(secret.encode("latin-1", errors="replace"))


class _Keyring:
    """Digests of known secrets and who holds them (a name and a role or scope)."""

    def __init__(self, entries: Iterable[tuple[str, str, str]]) -> None:
        self._known = [(_digest(secret.encode()), name, kind) for secret, name, kind in entries]

    def __bool__(self) -> bool:
        return bool(self._known)

    def match(self, header: str | None) -> tuple[str, str] | None:
        """(name, role or scope) of the header's bearer token, None when unknown."""
        given = _bearer(header)
        if given is None:
            return None
        found = None
        for known, name, kind in self._known:  # every token, no early exit
            if hmac.compare_digest(given, known):
                found = (name, kind)
        return found


class RateLimiter:
    """A token bucket per client: ``rate`` calls per second, ``burst`` at once."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate
        self._burst = float(max(burst, 1))
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, client: str) -> bool:
        if self._rate <= 0:
            return True
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(client, (self._burst, now))
            tokens = min(self._burst, tokens + (now - last) * self._rate)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            self._buckets[client] = (tokens, now)
            if len(self._buckets) > _MAX_CLIENTS:
                self._buckets.popitem(last=False)
        return allowed


class DataPlaneGuard:
    """The checks of the module docstring, for both protocols."""

    def __init__(
        self,
        auth: DataAuthSettings,
        control: ModelControlSettings,
        admin_tokens: Sequence[AdminToken],
        *,
        internal_endpoints: Literal["data", "admin"] = "data",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        clients: Sequence[ClientToken] = auth.clients
        self._infer = any(c.scope == "infer" for c in clients)
        self._feedback = any(c.scope == "feedback" for c in clients)
        self._all = _Keyring((c.token, c.name, c.scope) for c in clients if c.token)
        self._identities: dict[str, tuple[str, str]] = {
            normalize_identity(c.identity): (c.name, c.scope) for c in clients if c.identity
        }
        self._operators = _Keyring((t.token, t.name, t.role) for t in admin_tokens)
        self._control_enabled = control.enabled
        self._hide_internal = internal_endpoints == "admin"
        self.feedback_rate = RateLimiter(auth.feedback_rate, auth.feedback_burst, clock)

    # -- checks shared by both protocols ------------------------------------------------

    def check_control(self, authorization: str | None) -> str:
        """The operator's name, or the error: disabled, no token, not an operator."""
        if not self._control_enabled:
            raise PermissionDeniedError(CONTROL_DISABLED)
        found = self._operators.match(authorization)
        if found is None:
            raise UnauthenticatedError("model control needs an admin bearer token (operator)")
        name, role = found
        if role != "operator":
            raise PermissionDeniedError(f"token '{name}' is a {role}; model control needs operator")
        return name

    @property
    def identity_rules(self) -> bool:
        """True when some client is known by its certificate rather than a token."""
        return bool(self._identities)

    def _check_scope(
        self, authorization: str | None, scope: str, identities: Iterable[str] | None
    ) -> str:
        """The rate-limit key of the credential that holds ``scope``: the bearer token's
        or the peer certificate's (either may; the other may hold another scope)."""
        found: list[tuple[str, str, str]] = []  # (kind, name, scope held)
        token = self._all.match(authorization)
        if token is not None:
            if token[1] == scope:
                return f"token:{token[0]}"
            found.append(("token", *token))
        if identities is not None and self._identities:
            for identity in identities:
                holder = self._identities.get(identity)
                if holder is not None:
                    found.append(("identity", *holder))
        for kind, name, held in found:
            if held == scope:
                return f"{kind}:{name}"
        if not found:
            what = "bearer token or client certificate" if self._identities else "bearer token"
            raise UnauthenticatedError(f"a valid {what} with scope '{scope}' is required")
        kind, name, held = found[0]
        raise PermissionDeniedError(f"{kind} '{name}' has scope '{held}'; this needs '{scope}'")

    def check_infer(
        self, authorization: str | None, identities: Iterable[str] | None = None
    ) -> None:
        if self._infer:
            self._check_scope(authorization, "infer", identities)

    def check_feedback(
        self,
        authorization: str | None,
        peer: str | None,
        identities: Iterable[str] | None = None,
    ) -> None:
        """The feedback credential (when any exists) and the client's rate: by token or
        identity name, else by ``peer`` (HTTP: the address); None with no credential
        means no rate check here (gRPC: ``check_grpc_feedback_peer`` in the servicer)."""
        client = peer
        if self._feedback:
            client = self._check_scope(authorization, "feedback", identities)
        if client is not None and not self.feedback_rate.allow(client):
            raise RateLimitedError("feedback rate limit exceeded for this client; retry later")

    def check_grpc_feedback_peer(self, peer: str) -> None:
        """The feedback rate of an anonymous gRPC client, by address (the interceptor sees
        no peer; with feedback tokens the interceptor already limited by token)."""
        if not self._feedback and not self.feedback_rate.allow(peer):
            raise RateLimitedError("feedback rate limit exceeded for this client; retry later")

    # -- HTTP -------------------------------------------------------------------------------

    def check_http(self, scope: Mapping[str, Any]) -> None:
        """Raise the ``GatewayError`` an HTTP request gets before its body is read (the
        REST front end calls it first for every request); return when it may proceed."""
        path: str = scope["path"]
        if path.startswith("/v2/repository"):
            if not self._control_enabled:
                raise PermissionDeniedError(CONTROL_DISABLED)
            _same_site(scope, strict_type=True)
            self.check_control(_header(scope, b"authorization"))
            return
        if path.endswith("/infer"):
            if self._infer:
                self.check_infer(_header(scope, b"authorization"), self._peer(scope))
            return
        if path.startswith("/v2/models/"):
            if path.endswith("/feedback"):
                _same_site(scope, strict_type=False)
                client = scope.get("client")
                self.check_feedback(
                    _header(scope, b"authorization"), client[0] if client else "", self._peer(scope)
                )
                return
            if self._hide_internal and path.endswith(_INTERNAL_SUFFIXES):
                raise _HiddenError("Not Found")
            if self._infer:
                self.check_infer(_header(scope, b"authorization"), self._peer(scope))
            return
        if path == "/metrics" and self._hide_internal:
            raise _HiddenError("Not Found")

    def _peer(self, scope: Mapping[str, Any]) -> frozenset[str] | None:
        """The verified client certificate's identities (servers.py), read only when
        identity rules exist."""
        if not self._identities:
            return None
        identities: frozenset[str] | None = (
            scope.get("extensions", {}).get("tls", {}).get("client_identities")
        )
        return identities

    # -- gRPC -------------------------------------------------------------------------------

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The interceptor when data-plane credentials exist; none otherwise: an interceptor
        costs about 0.03 ms of CPU per call (8% of a small gRPC inference), and without
        them the only gRPC check, model control, runs in the servicer
        (``check_control_metadata``)."""
        return [_Interceptor(self)] if self._infer or self._feedback else []

    def check_control_metadata(self, metadata: Sequence[tuple[str, Any]] | None) -> None:
        """Model control over gRPC, from the call's metadata (raises when refused)."""
        self.check_control(_metadata(metadata, "authorization"))

    def check_grpc(
        self,
        rpc: str,
        metadata: Sequence[tuple[str, Any]] | None,
        identities: Iterable[str] | None = None,
    ) -> None:
        if rpc in _OPEN_RPCS:
            return
        authorization = _metadata(metadata, "authorization")
        if rpc in _REPOSITORY_RPCS:
            self.check_control(authorization)
        elif rpc == "Submit":
            self.check_feedback(authorization, None, identities)
        else:
            self.check_infer(authorization, identities)


class _HiddenError(GatewayError):
    """An internal endpoint asked for on the data port while it is served on admin only."""

    kind = ErrorKind.NOT_FOUND


def _header(scope: Mapping[str, Any], name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return None


def _same_site(scope: Mapping[str, Any], *, strict_type: bool) -> None:
    """Refuse what a foreign web page can make a browser send: a request whose ``Origin``
    is not this host, and (``strict_type``) a body typed as a form or plain text."""
    origin = host = content_type = None
    for key, value in scope["headers"]:
        if key == b"origin":
            origin = value
        elif key == b"host":
            host = value
        elif key == b"content-type":
            content_type = value
    if origin is not None:
        netloc = origin.partition(b"://")[2].rstrip(b"/")
        if origin == b"null" or netloc.lower() != (host or b"").lower():
            raise PermissionDeniedError("cross-site request refused: Origin does not match Host")
    if (
        strict_type
        and content_type is not None
        and content_type.split(b";")[0].strip().lower().startswith(_SIMPLE_TYPES)
    ):
        raise UnsupportedMediaTypeError("model control requests must be sent as application/json")


def _metadata(metadata: Sequence[tuple[str, Any]] | None, key: str) -> str | None:
    for name, value in metadata or ():
        if name == key:
            return value if isinstance(value, str) else bytes(value).decode("latin-1")
    return None


class _Interceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Runs ``DataPlaneGuard.check_grpc`` before the handler; a refused call is answered
    by a handler that only aborts (the request message is never decoded)."""

    def __init__(self, guard: DataPlaneGuard) -> None:
        self._guard = guard

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        rpc = method.rpartition("/")[2]
        metadata = handler_call_details.invocation_metadata
        try:
            self._guard.check_grpc(rpc, metadata)
        except (UnauthenticatedError, PermissionDeniedError) as exc:
            if not self._guard.identity_rules or rpc in _REPOSITORY_RPCS:
                return _refusal(rpc, exc)
            # The peer certificate is only on the servicer context: check it there.
            handler = await continuation(handler_call_details)
            return _checked_in_context(handler, self._guard, rpc, metadata)
        except GatewayError as exc:
            return _refusal(rpc, exc)
        return await continuation(handler_call_details)


def grpc_peer_identities(context: grpc.aio.ServicerContext[Any, Any]) -> frozenset[str]:
    """``CN=`` and SAN ``URI=`` / ``DNS=`` of the call's verified client certificate."""
    auth = context.auth_context()
    found = [f"CN={v.decode('utf-8', 'replace')}" for v in auth.get("x509_common_name", ())]
    for key, kind in (("peer_uri", "URI"), ("peer_dns", "DNS")):
        found += [f"{kind}={v.decode('utf-8', 'replace')}" for v in auth.get(key, ())]
    return frozenset(found)


def _checked_in_context(
    handler: grpc.RpcMethodHandler | None,
    guard: DataPlaneGuard,
    rpc: str,
    metadata: Sequence[tuple[str, Any]] | None,
) -> grpc.RpcMethodHandler | None:
    """``handler`` behind the credential check with the peer certificate; a unary request
    is decoded only after the check passes (a stream's first message is read after it)."""
    if handler is None:
        return None

    async def check(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        try:
            guard.check_grpc(rpc, metadata, grpc_peer_identities(context))
        except GatewayError as exc:
            await context.abort(grpc_code(exc.kind), exc.message)

    if handler.unary_unary is not None:
        behavior, decode = handler.unary_unary, handler.request_deserializer

        async def unary(raw: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await check(context)
            try:
                request = decode(raw) if decode else raw
            except Exception:  # what grpc answers when it decodes itself
                await context.abort(grpc.StatusCode.INTERNAL, "Exception deserializing request!")
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result

        return grpc.unary_unary_rpc_method_handler(
            unary, response_serializer=handler.response_serializer
        )
    if handler.stream_stream is not None and inspect.isasyncgenfunction(handler.stream_stream):
        streamer = handler.stream_stream

        async def streaming(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await check(context)
            async for response in streamer(requests, context):
                yield response

        return grpc.stream_stream_rpc_method_handler(
            streaming,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return _refusal(rpc, UnauthenticatedError("this call needs a bearer token"))


def _refusal(rpc: str, exc: GatewayError) -> grpc.RpcMethodHandler:
    code, message = grpc_code(exc.kind), exc.message

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)
        yield None  # pragma: no cover - abort raises

    if rpc in ("ModelStreamInfer",):
        return grpc.stream_stream_rpc_method_handler(streaming)
    if rpc == "Watch":
        return grpc.unary_stream_rpc_method_handler(streaming)
    return grpc.unary_unary_rpc_method_handler(unary)
