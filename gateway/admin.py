"""admin.py: the admin API (JSON under ``/admin/v1/``) on its own listener: models, routes,
rollouts and their manual actions, drift reports, the audit trail, and ``apply`` (a declarative
rollout/route spec, planned by ``admin_apply`` and carried out through the same controller
methods).

In: a ``RolloutController``, the ``Store``, bearer tokens (viewer or operator) and two
callables for models and drift reports. Out: a Starlette app. Every mutation goes through the
controller's methods, the same path automatic decisions take, in a worker thread (each is an
fsynced write). Paths, auth and status codes live here; rollout logic does not.

Auth: ``Authorization: Bearer <token>``. Tokens are compared in constant time against every
known token (and, through ``stored_tokens``, the SHA-256 digests of the token file), never
logged, never stored; failed attempts are logged and audited (rate-limited,
so a flood of bad requests cannot turn into a flood of fsyncs). ``GET openapi.json`` needs no
token. Extra routes (``/metrics``, a dashboard) are mounted as given, without auth.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeAlias, TypeVar

import msgspec
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.admin_apply import SpecError, check_spec, outcome
from gateway.errors import (
    ConflictError,
    GatewayError,
    InternalError,
    InvalidInputError,
    PayloadTooLargeError,
    PermissionDeniedError,
    StoreUnavailableError,
    UnauthenticatedError,
)
from gateway.rollout.controller import RolloutController
from gateway.rollout.policy import RolloutPolicy, RolloutState
from gateway.status import error_response
from gateway.store import MAX_AUDIT_LIMIT, Store
from gateway.types import ModelControl, ModelIndexEntry, ParamValue

__all__ = [
    "PREFIX",
    "OPENAPI_PATH",
    "Role",
    "Token",
    "ReasonBody",
    "WeightsBody",
    "StartRolloutBody",
    "LoadBody",
    "ApplyBody",
    "ModelLister",
    "DriftReporter",
    "build_admin_app",
]

logger = logging.getLogger(__name__)

PREFIX: Final = "/admin/v1"
OPENAPI_PATH: Final = Path(__file__).with_name("openapi_admin.json")
MAX_BODY_BYTES: Final = 64 * 1024  # a start request with a full policy is under 2 KiB
MAX_REASON_CHARS: Final = 2000
AUTH_AUDIT_BURST: Final = 20  # failed attempts audited per window; the rest are counted
AUTH_AUDIT_WINDOW_S: Final = 60.0
UNKNOWN_ACTOR: Final = "unknown"
MAX_LOGGED_PATH: Final = 256  # every admin path is under 100 characters
_JSON: Final = "application/json"

Role: TypeAlias = Literal["viewer", "operator"]
ModelLister: TypeAlias = Callable[[], Sequence[ModelIndexEntry]]
"""The repository index: every model version, its state and the reason if not ready."""
DriftReporter: TypeAlias = Callable[[str, "str | None"], Mapping[str, object]]
"""``report(model, version or None)``: a JSON-able drift report; raises
``ModelNotFoundError`` for an unknown model or version. May block briefly (runs in a thread)."""

_encode = msgspec.json.Encoder().encode
StoredTokens: TypeAlias = Callable[[], Sequence[tuple[bytes, "Token"]]]
"""Tokens kept outside the settings (the token file): (SHA-256 of the secret, holder),
asked on every authentication so revocations apply at once."""
Reason = Annotated[str, msgspec.Meta(max_length=MAX_REASON_CHARS)]


@dataclass(frozen=True, slots=True)
class Token:
    """Who a bearer token belongs to. The secret is the key of the tokens mapping, never
    a field here, so a ``Token`` can be logged and audited safely."""

    name: str
    role: Role


class ReasonBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of pause, resume, promote, approve and rollback (may be empty)."""

    reason: Reason = ""


class WeightsBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``PUT routes/{model}/weights``: relative weights by version."""

    weights: dict[str, float]
    reason: Reason = ""


class LoadBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``POST models/{model}/load``: V2 load parameters (``config`` as a JSON
    string, bounded by ``[model_control]``)."""

    parameters: dict[str, str | int | float | bool] = {}
    reason: Reason = ""


class StartRolloutBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``POST rollouts``; fields of ``policy`` left out take their defaults."""

    model: str
    stable: str
    candidate: str
    policy: RolloutPolicy = RolloutPolicy()
    reason: Reason = ""


class ApplyBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``POST apply``: a rollout/route spec (``gateway admin apply``'s file as
    JSON); ``dry_run`` only reports the changes."""

    spec: dict[str, Any]
    dry_run: bool = False
    reason: Reason = ""


class _LocalCaller:
    """The four admin calls a spec plan makes, answered by the controller in process."""

    def __init__(self, controller: RolloutController, actor: str) -> None:
        self._controller = controller
        self._actor = actor

    def call(self, method: str, path: str, body: Any = None) -> Any:
        c = self._controller
        if (method, path) == ("GET", "/rollouts"):
            return msgspec.to_builtins({"rollouts": c.rollouts()})
        if (method, path) == ("GET", "/routes"):
            return msgspec.to_builtins({"routes": c.routes()})
        if method == "PUT" and path.startswith("/routes/"):
            model = urllib.parse.unquote(path.split("/")[2])
            route = c.set_weights(model, body["weights"], self._actor, body["reason"])
            return msgspec.to_builtins(route)
        if (method, path) == ("POST", "/rollouts"):
            try:
                policy = msgspec.convert(body["policy"], RolloutPolicy)
            except msgspec.ValidationError as exc:
                raise InvalidInputError(f"rollouts.{body['model']}.policy: {exc}") from None
            state = c.start_rollout(
                body["model"],
                body["stable"],
                body["candidate"],
                policy,
                self._actor,
                body["reason"],
            )
            return msgspec.to_builtins(state)
        raise InternalError(f"spec plan made an unexpected call {method} {path}")


def _apply_spec(controller: RolloutController, body: ApplyBody, actor: str) -> dict[str, Any]:
    try:
        check_spec(body.spec)
    except SpecError as exc:
        raise InvalidInputError(f"invalid spec: {exc}") from None
    caller = _LocalCaller(controller, actor)
    result = outcome(caller, body.spec, not body.dry_run, body.reason)
    if not body.dry_run and not result["applied"]:
        conflicts = [
            f"{r['model']}: {r['detail']}" for r in result["changes"] if r["action"] == "conflict"
        ]
        raise ConflictError("spec conflicts with active rollouts: " + "; ".join(conflicts))
    return result


def _json(payload: object, status: int = 200) -> Response:
    return Response(_encode(payload), status_code=status, media_type=_JSON)


def _path(request: Request) -> str:
    """The request path, bounded: it is caller-controlled and goes to logs and the audit."""
    path = request.url.path
    return path if len(path) <= MAX_LOGGED_PATH else path[:MAX_LOGGED_PATH] + "..."


def _digest(secret: bytes) -> bytes:
    # Comparing fixed-length digests keeps compare_digest's time independent of the length
    # of the secret a caller guessed.
    return hashlib.sha256(secret).digest()


class _Auth:
    """Resolves a request's bearer token; audits failures within a budget per window."""

    def __init__(
        self,
        tokens: Mapping[str, Token],
        store: Store,
        clock: Callable[[], float],
        stored: StoredTokens | None = None,
    ):
        self._stored = stored
        for token in tokens.values():
            if token.role not in ("viewer", "operator"):
                raise InvalidInputError(f"admin token {token.name!r} has unknown role")
        self._known = [(_digest(secret.encode()), token) for secret, token in tokens.items()]
        if not self._known and not (stored and stored()):
            logger.warning(
                "admin API has no tokens: every request will get 401 "
                "(create one with: gateway admin token create --name NAME --role operator)"
            )
        self._store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._window_start = float("-inf")
        self._in_window = 0
        self._suppressed = 0

    def _match(self, header: str) -> Token | None:
        scheme, _, secret = header.strip().partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            return None
        # Starlette decodes headers as latin-1; this recovers the bytes the client sent.
        given = _digest(secret.encode("latin-1", errors="replace"))
        found = None
        for known, token in self._known:  # every token, no early exit
            if hmac.compare_digest(given, known):
                found = token
        for known, token in self._stored() if self._stored else ():
            if hmac.compare_digest(given, known):
                found = token
        return found

    async def check(self, request: Request, role: Role) -> Token:
        """The caller's ``Token``; raises ``UnauthenticatedError`` (401) without a known
        token, ``PermissionDeniedError`` (403) when its role is below ``role``."""
        header = request.headers.get("authorization", "")
        token = self._match(header)
        if token is None:
            why = "missing bearer token" if not header else "unknown bearer token"
            await self._failed(request, UNKNOWN_ACTOR, why)
            raise UnauthenticatedError("a valid bearer token is required")
        if role == "operator" and token.role != "operator":
            why = f"role {token.role} may not {request.method} {_path(request)}"
            await self._failed(request, token.name, why)
            raise PermissionDeniedError(f"token '{token.name}' is a viewer; this needs operator")
        return token

    async def _failed(self, request: Request, actor: str, reason: str) -> None:
        client = request.client.host if request.client else ""
        now = self._clock()
        with self._lock:
            if now - self._window_start >= AUTH_AUDIT_WINDOW_S:
                self._window_start, self._in_window = now, 0
            if self._in_window >= AUTH_AUDIT_BURST:
                self._suppressed += 1
                return
            self._in_window += 1
            suppressed, self._suppressed = self._suppressed, 0
        logger.warning(
            "admin auth failed: %s %s from %s (%s)",
            request.method,
            _path(request),
            client or "?",
            reason,
        )
        details: dict[str, object] = {
            "method": request.method[:16],
            "path": _path(request),
            "client": client,
        }
        if suppressed:
            details["suppressed_since_last"] = suppressed
        await run_in_threadpool(
            self._store.append_audit, actor, "auth_failed", "", reason, details=details, ts=now
        )


_Handler: TypeAlias = Callable[[Request, Token], Awaitable[Response]]
_T = TypeVar("_T")


async def _read_body(request: Request, kind: type[_T]) -> _T:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PayloadTooLargeError(f"request body exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    data = b"".join(chunks) or b"{}"
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as exc:
        raise InvalidInputError(f"invalid request body: {exc}") from None
    except msgspec.DecodeError:
        raise InvalidInputError("request body is not valid JSON") from None


def _float_param(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InvalidInputError(f"query parameter '{name}' must be unix seconds")
    return value


def _models_view(
    index: Sequence[ModelIndexEntry], controller: RolloutController
) -> list[dict[str, object]]:
    routes = controller.routes()
    rollouts = {s.model: s for s in controller.rollouts()}
    by_name: dict[str, list[dict[str, object]]] = {}
    for entry in index:
        by_name.setdefault(entry.name, []).append(
            {
                "version": entry.version,
                "state": entry.state,
                "ready": entry.state == "READY",
                "reason": entry.reason,
            }
        )
    models: list[dict[str, object]] = []
    for name in sorted(by_name):
        route = routes.get(name)
        rollout = rollouts.get(name)
        models.append(
            {
                "name": name,
                "versions": by_name[name],
                "weights": route.weights() if route else None,
                "rollout": None if rollout is None else rollout.status,
            }
        )
    return models


def build_admin_app(
    controller: RolloutController,
    store: Store,
    tokens: Mapping[str, Token],
    list_models: ModelLister,
    drift_report: DriftReporter,
    *,
    extra_routes: Sequence[BaseRoute] = (),
    clock: Callable[[], float] = time.time,
    control: ModelControl | None = None,
    stored_tokens: StoredTokens | None = None,
    fleet: Callable[[], Mapping[str, Any]] | None = None,
) -> Starlette:
    """The admin app. ``tokens`` maps each secret to its ``Token``; ``extra_routes`` (e.g.
    ``/metrics``, a dashboard) are appended as given, outside the auth. ``clock`` times the
    auth-failure audit budget. ``control`` adds model load, unload and index (operator;
    audited before the change runs, so no change goes unrecorded); ``stored_tokens`` are
    the hashed tokens of ``gateway admin token``; ``fleet`` lists the replicas sharing the
    control plane (GET .../fleet; one unshared process without it). Reads
    ``openapi_admin.json`` once, here."""
    auth = _Auth(tokens, store, clock, stored_tokens)
    openapi = OPENAPI_PATH.read_bytes()

    def endpoint(role: Role, handler: _Handler) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            try:
                token = await auth.check(request, role)
                return await handler(request, token)
            except GatewayError as exc:
                return error_response(exc)
            except Exception:
                # The one place unexpected failures are logged, with the traceback.
                logger.exception("admin %s %s failed", request.method, request.url.path)
                return error_response(InternalError("internal error"))

        return run

    async def get_models(request: Request, token: Token) -> Response:
        return _json({"models": _models_view(list_models(), controller)})

    async def get_routes(request: Request, token: Token) -> Response:
        return _json({"routes": controller.route_table()})

    async def put_weights(request: Request, token: Token) -> Response:
        body = await _read_body(request, WeightsBody)
        model = request.path_params["model"]
        route = await run_in_threadpool(
            controller.set_weights, model, body.weights, token.name, body.reason
        )
        return _json(route)

    async def get_rollouts(request: Request, token: Token) -> Response:
        return _json({"rollouts": controller.rollouts()})

    async def get_rollout(request: Request, token: Token) -> Response:
        return _json(controller.status(request.path_params["model"]))

    async def post_rollout(request: Request, token: Token) -> Response:
        body = await _read_body(request, StartRolloutBody)
        state = await run_in_threadpool(
            controller.start_rollout,
            body.model,
            body.stable,
            body.candidate,
            body.policy,
            token.name,
            body.reason,
        )
        return _json(state, 201)

    def action(method: Callable[[str, str, str], RolloutState]) -> _Handler:
        async def post_action(request: Request, token: Token) -> Response:
            body = await _read_body(request, ReasonBody)
            model = request.path_params["model"]
            state = await run_in_threadpool(method, model, token.name, body.reason)
            return _json(state)

        return post_action

    async def post_apply(request: Request, token: Token) -> Response:
        body = await _read_body(request, ApplyBody)
        return _json(await run_in_threadpool(_apply_spec, controller, body, token.name))

    async def get_history(request: Request, token: Token) -> Response:
        model = request.path_params["model"]
        return _json({"model": model, "history": controller.history(model)})

    async def get_drift(request: Request, token: Token) -> Response:
        model = request.path_params["model"]
        version = request.path_params.get("version")
        report = await run_in_threadpool(drift_report, model, version)
        return _json(report)

    async def get_fleet(request: Request, token: Token) -> Response:
        if fleet is None:
            return _json({"shared": False, "replicas": []})
        return _json(await run_in_threadpool(fleet))

    async def get_audit(request: Request, token: Token) -> Response:
        raw_limit = request.query_params.get("limit") or "100"
        try:
            limit = int(raw_limit)
        except ValueError:
            raise InvalidInputError(f"limit must be an integer 1..{MAX_AUDIT_LIMIT}") from None
        entries = await run_in_threadpool(
            store.audit,
            request.query_params.get("model") or None,
            _float_param(request, "since"),
            _float_param(request, "until"),
            limit,
        )
        return _json({"entries": entries})

    async def get_verify(request: Request, token: Token) -> Response:
        return _json(await run_in_threadpool(store.verify_audit))

    async def model_change(request: Request, token: Token) -> Response:
        assert control is not None
        model = request.path_params["model"]
        verb = request.url.path.rsplit("/", 1)[1]
        body: LoadBody | ReasonBody
        if verb == "load":
            body = await _read_body(request, LoadBody)
            params: dict[str, ParamValue] = dict(body.parameters)
        else:
            body, params = await _read_body(request, ReasonBody), {}
        details: dict[str, object] = {"parameters": params} if params else {}
        # Recorded first: a change that cannot be audited does not run (503).
        try:
            await run_in_threadpool(
                store.append_audit, token.name, f"model_{verb}", model, body.reason, details=details
            )
        except GatewayError:
            raise
        except Exception as exc:
            logger.error("model %s of %s not audited, so not run: %s", verb, model, exc)
            raise StoreUnavailableError(
                f"{verb} of model '{model}' was not run: the audit trail could not record it "
                f"({type(exc).__name__}); nothing changed"
            ) from exc
        try:
            if verb == "load":
                await control.load(model, params)
            else:
                await control.unload(model)
        except GatewayError as exc:
            await run_in_threadpool(
                store.append_audit,
                token.name,
                f"model_{verb}_failed",
                model,
                exc.message[:MAX_REASON_CHARS],
            )
            raise
        return _json(
            {"model": model, "action": verb, "models": _models_view(control.index(), controller)}
        )

    async def post_index(request: Request, token: Token) -> Response:
        assert control is not None
        return _json({"models": _models_view(control.index(), controller)})

    async def get_openapi(request: Request) -> Response:
        return Response(openapi, media_type=_JSON)

    p = PREFIX
    routes: list[BaseRoute] = [
        Route(f"{p}/openapi.json", get_openapi, methods=["GET"]),
        Route(f"{p}/models", endpoint("viewer", get_models), methods=["GET"]),
        Route(f"{p}/routes", endpoint("viewer", get_routes), methods=["GET"]),
        Route(f"{p}/routes/{{model}}/weights", endpoint("operator", put_weights), methods=["PUT"]),
        Route(f"{p}/rollouts", endpoint("viewer", get_rollouts), methods=["GET"]),
        Route(f"{p}/rollouts", endpoint("operator", post_rollout), methods=["POST"]),
        Route(f"{p}/apply", endpoint("operator", post_apply), methods=["POST"]),
        Route(f"{p}/rollouts/{{model}}", endpoint("viewer", get_rollout), methods=["GET"]),
        Route(f"{p}/rollouts/{{model}}/history", endpoint("viewer", get_history), methods=["GET"]),
        Route(f"{p}/drift/{{model}}", endpoint("viewer", get_drift), methods=["GET"]),
        Route(f"{p}/fleet", endpoint("viewer", get_fleet), methods=["GET"]),
        Route(f"{p}/drift/{{model}}/{{version}}", endpoint("viewer", get_drift), methods=["GET"]),
        Route(f"{p}/audit", endpoint("viewer", get_audit), methods=["GET"]),
        Route(f"{p}/audit/verify", endpoint("viewer", get_verify), methods=["GET"]),
    ]
    for verb, method in (
        ("pause", controller.pause),
        ("resume", controller.resume),
        ("promote", controller.promote),
        ("approve", controller.approve),
        ("rollback", controller.rollback),
    ):
        routes.append(
            Route(
                f"{p}/rollouts/{{model}}/{verb}",
                endpoint("operator", action(method)),
                methods=["POST"],
            )
        )
    if control is not None:
        for verb in ("load", "unload"):
            routes.append(
                Route(
                    f"{p}/models/{{model}}/{verb}",
                    endpoint("operator", model_change),
                    methods=["POST"],
                )
            )
        routes.append(Route(f"{p}/models/index", endpoint("viewer", post_index), methods=["POST"]))
    routes.extend(extra_routes)

    async def http_error(request: Request, exc: Exception) -> Response:
        # Unknown paths and methods get the same JSON error body as everything else.
        assert isinstance(exc, HTTPException)
        response = error_response((exc.status_code, str(exc.detail)))
        if exc.headers and "Allow" in exc.headers:  # RFC 9110: a 405 names the methods
            response.headers["Allow"] = exc.headers["Allow"]
        return response

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})
