"""listener_settings.py: the settings parts that bound and guard the listeners.

``LimitsSettings`` (header, body, connection and gRPC limits; durations parsed by
``parse_duration``), ``TlsSettings`` (TLS and mTLS per listener), ``DataAuthSettings`` and
``ClientToken`` (data-plane bearer tokens and mTLS identities), ``AdminToken`` and
``check_tokens`` (the admin listener's) and ``ModelControlSettings`` (the V2 repository
extension on the data port). Frozen msgspec Structs that ``config.Settings`` is built
from; they validate their own values and know nothing of the file or the environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal

import msgspec

from gateway.errors import InvalidInputError

__all__ = [
    "MIN_TOKEN_CHARS",
    "AdminToken",
    "check_tokens",
    "SettingsBase",
    "TlsSettings",
    "LimitsSettings",
    "parse_duration",
    "ModelControlSettings",
    "ClientToken",
    "normalize_identity",
    "DataAuthSettings",
]


MIN_TOKEN_CHARS: Final = 20
"""Shortest admin token secret accepted (``gateway admin token create`` makes 43)."""


class SettingsBase(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every settings part: frozen, keyword-only, unknown fields refused."""


class TlsSettings(SettingsBase, frozen=True):
    """TLS for one listener: off unless ``cert`` and ``key`` are set; mTLS with ``client_ca``.
    The files are re-read when they change on disk or on SIGHUP (no restart, no dropped
    connections: only new handshakes use the new certificate)."""

    cert: str = ""
    """PEM certificate chain the listener presents; "" serves plain TCP."""
    key: str = ""
    """PEM private key of ``cert``."""
    client_ca: str = ""
    """PEM bundle of CAs whose client certificates are required (mTLS); "" asks for none."""
    reload_interval_s: float = 5.0
    """How often (s) the files' modification times are checked; 0 reloads on SIGHUP only."""

    @property
    def enabled(self) -> bool:
        return bool(self.cert)

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("cert and key must be set together")
        if self.client_ca and not self.cert:
            raise ValueError("client_ca (mTLS) needs cert and key")
        if self.reload_interval_s < 0:
            raise ValueError("reload_interval_s must be >= 0")


_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: float | str) -> float:
    """Seconds from a duration setting: a number of seconds (``10``, ``0.5``) or a string
    with a unit (``"10s"``, ``"250ms"``, ``"5m"``, ``"1h"``). ``ValueError`` for anything
    else, a negative value, NaN or infinity."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip().lower()
        for unit in ("ms", "s", "m", "h"):
            if text.endswith(unit):
                number = text[: -len(unit)].strip()
                break
        else:
            unit, number = "s", text
        try:
            seconds = float(number) * _DURATION_UNITS[unit]
        except ValueError:
            raise ValueError(
                f"not a duration: {value!r} (use seconds, or a number with ms, s, m or h)"
            ) from None
    if not 0.0 <= seconds < float("inf"):
        raise ValueError(f"a duration must be finite and >= 0, got {value!r}")
    return seconds


class LimitsSettings(SettingsBase, frozen=True):
    """Bounds on every listener and route, so no client can take more than its share.

    Durations are seconds or strings with a unit ("10s", "250ms", "5m"); 0 turns a
    timeout or a count limit off. Defaults follow nginx and Envoy where they have one.
    """

    max_header_bytes: int = 64 * 1024
    """Request line plus headers of one HTTP request at most; more gets 431 and the
    connection closed (Envoy's default is 60 KiB, nginx's 4 x 8 KiB)."""
    max_headers: int = 100
    """Header fields of one HTTP request at most; more gets 431 (Envoy's default)."""
    header_timeout: float | str = "10s"
    """Time from a connection's (or a request's) first byte to the end of its headers; a
    connection that sends nothing, or trickles its headers (slowloris), is closed then."""
    keep_alive_timeout: float | str = "30s"
    """Idle time between requests on a kept-alive HTTP connection before it is closed."""
    max_connections: int = -1
    """Open HTTP connections per listener at most; one more is answered 503 and closed at
    once, so idle sockets cannot use up the process's file descriptors. -1: three
    quarters of the soft RLIMIT_NOFILE shared by the three listeners (a quarter each);
    0: no limit."""
    max_concurrency: int = 0
    """HTTP requests being served at once per listener before new ones get 503 (uvicorn's
    limit_concurrency); 0: no limit (the per-model queues bound the work)."""
    body_timeout: float | str = "30s"
    """A client that stops sending mid-body gets 400 after this long."""
    feedback_body_bytes: int = 8 * 1024 * 1024
    """Largest feedback body (REST); larger ones get 413 before they are read whole.
    ``feedback.max_batch`` items of a few hundred bytes each fit."""
    control_body_bytes: int = 1024 * 1024
    """Largest body of every other POST (repository index, load, unload; the admin API)."""
    offload_decode_bytes: int = 1024 * 1024
    """JSON inference bodies at least this large are decoded on a worker thread, so a
    large body does not hold the event loop (and every other client) while it decodes."""
    grpc_max_concurrent_streams: int = 1024
    """Calls in flight on one gRPC connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS)."""
    grpc_keepalive_time: float | str = "2h"
    """Interval of the server's keep-alive pings on an idle gRPC connection (gRPC's
    default); a peer that does not answer within grpc_keepalive_timeout is dropped."""
    grpc_keepalive_timeout: float | str = "20s"
    """How long a keep-alive ping may go unanswered."""
    grpc_min_ping_interval: float | str = "10s"
    """Clients pinging more often than this without data get GOAWAY (ping flood)."""
    grpc_max_connection_idle: float | str = "5m"
    """A gRPC connection with no call for this long gets GOAWAY and is closed; 0: never."""
    grpc_max_connection_age: float | str = 0
    """A gRPC connection is closed after this long, calls in flight allowed
    grpc_max_connection_age_grace to finish (spreads load behind an L4 balancer); 0: never."""
    grpc_max_connection_age_grace: float | str = "30s"
    """Time calls in flight get when a connection reaches grpc_max_connection_age."""
    stream_max_unanswered: int = 256
    """ModelStreamInfer requests of one stream admitted but not yet written to the client;
    at the limit the stream stops reading, so a client that never reads holds at most this
    many answers."""

    def __post_init__(self) -> None:
        for name in (
            "header_timeout",
            "keep_alive_timeout",
            "body_timeout",
            "grpc_keepalive_time",
            "grpc_keepalive_timeout",
            "grpc_min_ping_interval",
            "grpc_max_connection_idle",
            "grpc_max_connection_age",
            "grpc_max_connection_age_grace",
        ):
            parse_duration(getattr(self, name))
        if self.max_connections < -1:
            raise ValueError("max_connections must be -1 (automatic), 0 (off) or > 0")
        for name in (
            "max_header_bytes",
            "max_headers",
            "feedback_body_bytes",
            "control_body_bytes",
            "offload_decode_bytes",
            "stream_max_unanswered",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_concurrency < 0 or self.grpc_max_concurrent_streams < 0:
            raise ValueError("max_concurrency and grpc_max_concurrent_streams must be >= 0")

    def seconds(self, name: str) -> float:
        """A duration field in seconds (validated when the settings were built)."""
        return parse_duration(getattr(self, name))


class ModelControlSettings(SettingsBase, frozen=True):
    """The V2 repository extension (load, unload, index) on the data listeners."""

    enabled: bool = False
    """Off (as Triton's ``--model-control-mode=none``): the data port answers 403 /
    PERMISSION_DENIED; the admin API's model routes still work. On: each call needs an
    admin token with the operator role (``Authorization: Bearer``, gRPC metadata too)."""
    max_batch_size: int = 4096
    """Largest ``max_batch_size`` a load request's config may set (warm-up allocates it)."""
    max_queue_delay_us: int = 100_000
    """Largest ``max_queue_delay_microseconds`` a load request may set (100 ms)."""
    max_instances: int = 8
    """Largest ``instance_group[0].count`` a load request may set."""
    max_queue_size: int = 65_536
    """Largest queue size a load request may set."""

    def check_load(self, fields: Mapping[str, Any]) -> None:
        """Refuse load-time policy values beyond the bounds, naming the field."""
        bounds = {
            "max_batch_size": self.max_batch_size,
            "max_queue_delay_us": self.max_queue_delay_us,
            "instances": self.max_instances,
            "max_queue_size": self.max_queue_size,
        }
        for name, bound in bounds.items():
            if name not in fields:
                continue
            value = fields[name]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidInputError(f"load config field '{name}' must be a number")
            if not 0 <= value <= bound:
                raise InvalidInputError(
                    f"load config field '{name}' = {value} is outside 0..{bound} "
                    f"(model_control.{'max_instances' if name == 'instances' else name})"
                )


class ClientToken(SettingsBase, frozen=True):
    """A data-plane client: a bearer token or an mTLS identity (exactly one), and what it
    may do."""

    name: str
    """The client's name (logs, feedback rate limit); the secret is never logged."""
    scope: Literal["infer", "feedback"]
    """infer: inference and metadata; feedback: ground truth only. A credential holds one scope,
    so a caller that can infer cannot also grade (give a client two tokens for both)."""
    token: str = ""
    """The secret (prefer GATEWAY_AUTH__CLIENTS in the environment)."""
    identity: str = ""
    """A verified client certificate instead of a token (needs ``client_ca`` on the
    listener): ``CN=<common name>``, ``URI=<SAN URI>`` or ``DNS=<SAN DNS name>``."""

    def __post_init__(self) -> None:
        if bool(self.token) == bool(self.identity):
            raise ValueError(f"auth.clients {self.name!r}: set exactly one of token and identity")
        if self.identity:
            normalize_identity(self.identity)  # raises on a malformed one


_IDENTITY_KINDS: Final = ("CN", "URI", "DNS")


def normalize_identity(text: str) -> str:
    """``CN=x``, ``URI=x`` / ``URI:x``, ``DNS=x`` / ``DNS:x`` as ``KIND=x`` (what a peer's
    certificate yields, see ``tls.peer_identities``)."""
    kind, sep, value = text.strip().partition("=")
    if kind.upper() not in _IDENTITY_KINDS:
        kind, sep, value = text.strip().partition(":")
    if not sep or kind.upper() not in _IDENTITY_KINDS or not value.strip():
        raise ValueError(f"identity {text!r}: expected CN=<name>, URI=<uri> or DNS=<name>")
    return f"{kind.upper()}={value.strip()}"


class DataAuthSettings(SettingsBase, frozen=True):
    """Optional bearer tokens on the data listeners, checked before the body is decoded."""

    clients: list[ClientToken] = []
    """Known clients. Inference needs an infer credential (token or identity) once any
    exists; feedback needs a feedback credential once any exists (each scope is on by
    itself)."""
    feedback_rate: float = 50.0
    """Feedback calls per second per client (token or identity, else peer address); beyond the burst
    calls get 429 / RESOURCE_EXHAUSTED. 0 turns the limit off."""
    feedback_burst: int = 100
    """Feedback calls a client may make at once before the rate applies."""


class AdminToken(SettingsBase, frozen=True):
    """A bearer token for the admin API."""

    name: str
    """Who holds it: recorded in the audit trail (the secret never is)."""
    role: Literal["viewer", "operator"]
    """viewer reads; operator also changes routes and rollouts."""
    token: str
    """The secret. Prefer GATEWAY_ADMIN__TOKENS in the environment to a file."""


def check_tokens(tokens: list[AdminToken], clients: list[ClientToken]) -> None:
    """Long admin secrets, and one secret per holder and scope: a shared secret cannot tell
    roles apart, and an inference token must never also grade or operate."""
    secrets = [c.token for c in clients if not c.identity] + [t.token for t in tokens]
    identities = [normalize_identity(c.identity) for c in clients if c.identity]
    if len(set(identities)) != len(identities):
        raise ValueError("auth.clients: an identity is listed twice; each holds one scope")
    if any(not secret for secret in secrets):
        raise ValueError("auth.clients and admin.tokens: a token must not be empty")
    if len(set(secrets)) != len(secrets):
        raise ValueError(
            "auth.clients and admin.tokens: two holders share one secret; each must be distinct"
        )
    seen: dict[str, str] = {}
    for token in tokens:
        if len(token.token) < MIN_TOKEN_CHARS:
            raise ValueError(
                f"admin.tokens: token of {token.name!r} has {len(token.token)} characters, "
                f"at least {MIN_TOKEN_CHARS} are required (gateway admin token create makes one)"
            )
        if token.token in seen:
            raise ValueError(
                f"admin.tokens: {seen[token.token]!r} and {token.name!r} share one secret; "
                "give each holder and role its own"
            )
        seen[token.token] = token.name
