"""config.py: the gateway's settings, built once from a TOML file plus environment overrides.

Input: an optional TOML file and ``GATEWAY_*`` environment variables (nested fields use a
double underscore: ``GATEWAY_HTTP__PORT=9000``). Output: one frozen ``Settings``. Invalid
settings fail at start-up with msgspec's path to the bad field. Nobody else reads
``os.environ``; components receive only their slice (``ModelPolicy``, ``RuntimeSettings``).
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from gateway.errors import InvalidInputError
from gateway.listener_settings import (
    MIN_TOKEN_CHARS,
    AdminToken,
    ClientToken,
    DataAuthSettings,
    LimitsSettings,
    ModelControlSettings,
    TlsSettings,
    check_tokens,
    parse_duration,
)

__all__ = [
    "ModelPolicy",
    "FeatureRule",
    "RuntimeSettings",
    "HttpSettings",
    "RouteSettings",
    "ShadowSettings",
    "DriftSettings",
    "AdminSettings",
    "StoreSettings",
    "AdminToken",
    "AlertSettings",
    "PredictionLogSettings",
    "FeedbackSettings",
    "GrpcSettings",
    "LimitsSettings",
    "parse_duration",
    "TlsSettings",
    "ModelControlSettings",
    "ClientToken",
    "DataAuthSettings",
    "Settings",
    "ConfigError",
    "load_settings",
    "load_model_policy",
    "EXAMPLE_REPOSITORY",
    "ENV_PREFIX",
    "CLIENT_ENV",
    "MIN_TOKEN_CHARS",
]

ENV_PREFIX: Final = "GATEWAY_"
CLIENT_ENV: Final = frozenset(
    {"GATEWAY_ADMIN_URL", "GATEWAY_ADMIN_TOKEN", "GATEWAY_ADMIN_TOKEN_FILE"}
)
"""Variables of the admin client (``gateway admin``), never settings: a shell that exports
them for the client can still start the server."""
EXAMPLE_REPOSITORY: Final = Path(__file__).parent / "examples" / "models"
MODEL_SETTINGS_FILE: Final = "config.toml"


class ConfigError(InvalidInputError):
    """A settings file or override is invalid; the message names the field."""


class _Base(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """As ``listener_settings.SettingsBase`` (spelled out so linters see a msgspec Struct)."""


class FeatureRule(_Base, frozen=True):
    """Declared valid values of one input feature (schema validation at ingestion)."""

    min: float | None = None
    """Smallest valid value (inclusive); None: no lower bound."""
    max: float | None = None
    """Largest valid value (inclusive); None: no upper bound."""
    categories: list[float] | None = None
    """The only valid values (codes of a categorical feature); None: any value."""


class ModelPolicy(_Base, frozen=True):
    """Per-model serving policy: from ``<repo>/<model>/config.toml``, then ``[models.<name>]``."""

    max_batch_size: int = 64
    """Largest batch (rows) one model call takes; requests above it get 400. 64 fills a CPU
    core's caches for typical tabular models; 0 turns batching off."""
    dynamic_batching: bool = True
    """Merge concurrent requests into one model call. Off: each request runs alone (the
    model still accepts any batch up to max_batch_size)."""
    max_queue_delay_us: int = 0
    """How long (µs) the oldest queued request may wait for company before its batch runs.
    0 is work-conserving: a batch runs as soon as an instance is free (measured best)."""
    preferred_batch_sizes: list[int] = []
    """Batch sizes the scheduler aims for when it waits (only with max_queue_delay_us > 0)."""
    fill_batch_size: int = -1
    """Under load (a batch already running), the next batch waits until this many rows are
    queued (or, with a second instance free, as many as the smallest running batch holds
    if that is fewer, but at least half this size) or no batch is running, so batches grow
    to the size the hardware rewards and every instance keeps working; a lone request on
    an idle model is never held back. -1: measured at warm-up for models in the
    inference pool (the smallest batch within 10% of the best rows/s); 0: off."""
    max_queue_size: int = 1024
    """Queued requests per model version before new ones get 503 at once."""
    default_timeout_ms: int = 0
    """Deadline (ms) applied to requests that carry none; 0 means no deadline."""
    instances: int = 1
    """Model calls that may run at once for this version (each on a pool thread)."""
    execution: Literal["auto", "inline", "pool"] = "auto"
    """Where a batch runs: on the event loop ("inline", for models that take microseconds),
    in the inference pool ("pool"), or chosen from the warm-up timing ("auto")."""
    inline_max_us: int = 150
    """With execution="auto": a CPU model runs inline when a full batch took at most this
    many µs at warm-up (a thread hand-off costs about 100 µs); a GPU model never does."""
    intra_op_threads: int = 0
    """ONNX Runtime intra-op threads for this model; 0 uses runtime.intra_op_threads."""
    default_version: str = ""
    """Version served when a request names none; "" means the highest version number."""
    schema: dict[str, FeatureRule] = {}
    """Valid ranges or categories per feature of the model's first numeric input, by
    feature name (from <model>/feature_names.json, else f0, f1, ...). A NaN violates any
    rule. Violations are counted per feature (gateway_schema_violations_total)."""
    reject_invalid: bool = False
    """Reject a request that violates the schema with 400 naming the feature, instead of
    only counting it."""


class RuntimeSettings(_Base, frozen=True):
    """ONNX Runtime execution: thread counts and providers."""

    inference_workers: int = 2
    """Threads in the inference pool; with intra_op_threads=1 this matches 2 cores."""
    intra_op_threads: int = 1
    """Threads ONNX Runtime may use inside one call; 1 keeps calls from fighting over cores."""
    inter_op_threads: int = 1
    """Threads for parallel graph branches; 1 is right for sequential MLP-style graphs."""
    execution_providers: list[str] = msgspec.field(default_factory=lambda: ["CPUExecutionProvider"])
    """Providers in preference order; add "CUDAExecutionProvider" with onnxruntime-gpu."""
    warmup: bool = True
    """Run each model once at load so the first request does not pay the initialisation."""


class HttpSettings(_Base, frozen=True):
    """The REST listener (KServe V2 over HTTP/1.1)."""

    host: str = "0.0.0.0"
    """Address to bind; 0.0.0.0 so load balancers and containers can reach it."""
    port: int = 8000
    """TCP port; 0 picks a free one (tests). 8000 is the V2 convention."""
    max_request_bytes: int = 64 * 1024 * 1024
    """Largest request body accepted (after decompression); larger ones get 413."""
    access_log: bool = False
    """uvicorn's access log; off because it costs about 0.03 ms per request."""
    tls: TlsSettings = TlsSettings()
    """HTTPS (and mTLS) on this listener."""
    internal_endpoints: Literal["data", "admin"] = "data"
    """Where ``/metrics``, ``/v2/models/<m>/route`` and ``/v2/models/<m>/outcomes`` are
    served: "data" on this listener and the admin listener, "admin" on the admin listener
    only. "data" is the default because the route view exists for external load balancers
    and splitters that only reach the data port, and existing scrapers use it; set "admin"
    whenever the data port faces clients you do not trust (these pages name features,
    routes and accuracy)."""


class GrpcSettings(_Base, frozen=True):
    """The gRPC listener (inference.GRPCInferenceService and grpc.health.v1.Health)."""

    host: str = "0.0.0.0"
    """Address to bind."""
    port: int = 8001
    """TCP port; 0 picks a free one. 8001 is the V2 convention."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest message received or sent; larger requests get RESOURCE_EXHAUSTED."""
    tls: TlsSettings = TlsSettings()
    """TLS (and mTLS) on this listener."""


class DriftSettings(_Base, frozen=True):
    """Inline drift monitoring (DRIFT.md): binning, windows, test levels."""

    bins: int = 20
    """Bins per numeric feature when a profile is built; 20 keeps PSI power at n=1000 (§4.3)."""
    sub_window_s: float = 5.0
    """Sub-window length in s: the unit of sliding, expiry and replica merging (DRIFT.md §1.3)."""
    sub_windows: int = 12
    """Sub-windows per sliding window: 12 x 5 s gives the 60 s window of DRIFT.md §1.3."""
    tick_s: float = 1.0
    """Aggregator period in s: sealed sub-windows reach the window within a second."""
    alpha: float = 0.01
    """False-alarm rate per report, split over features (Bonferroni); PSI and KS each get it."""
    min_samples: int = 1000
    """Rows in the window before any verdict against the reference (DRIFT.md §4.4)."""
    min_samples_per_arm: int = 2000
    """Rows per window before a canary-vs-stable verdict: two-window variance doubles (§4.3)."""
    max_rows_per_request: int = 256
    """Rows counted per request, every k-th row beyond it: 1024 x 256 unsampled costs 1.2 ms."""
    enabled: bool = True
    """Off makes observe() return at once and start() start nothing."""


class PredictionLogSettings(_Base, frozen=True):
    """Sampled prediction logging: what share of requests, where, and how files rotate."""

    enabled: bool = False
    """Off by default: logging payloads writes request data to disk, an explicit choice."""
    directory: str = ""
    """Folder the ``<model>/<version>/`` sub-folders go under; "" means the composition
    root's choice (``<data_dir>/predictions``), resolved before the logger is built."""
    sample_rate: float = 0.01
    """Share of requests logged, 0..1; 1% is ~500 records/s at 50k req/s, enough for a
    reference sample within minutes without a disk that keeps up with every request."""
    max_queue: int = 10_000
    """Records waiting for the writer before new ones are dropped and counted; 20 s of
    the 1% example above, which absorbs a slow disk's stall."""
    max_file_bytes: int = 64 * 1024 * 1024
    """A file rotates before it would grow past this many bytes (64 MiB: small enough to
    copy and load whole, large enough to keep the file count low)."""
    max_file_age_s: float = 3600.0
    """A file rotates once open this many seconds, so hourly files can be shipped or
    deleted while serving goes on."""
    flush_interval_s: float = 1.0
    """Seconds between flushes of open files: how stale a reader's view may be."""
    keep_files: int = 48
    """Rotated files kept per model version; older ones are deleted (0 keeps all). 48
    hourly files are two days of samples."""
    keep_age_s: float = 7 * 24 * 3600.0
    """Rotated files older than this are deleted (0 keeps them regardless of age)."""

    def __post_init__(self) -> None:
        # msgspec turns a ValueError here into a ValidationError with the field's path
        # when the settings are decoded, so bad values fail at start-up.
        if not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError("sample_rate must be within 0..1")
        if self.max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        if self.max_file_bytes < 1:
            raise ValueError("max_file_bytes must be >= 1")
        if not self.max_file_age_s > 0 or not self.flush_interval_s > 0:
            raise ValueError("max_file_age_s and flush_interval_s must be > 0")


class FeedbackSettings(_Base, frozen=True):
    """Ground-truth feedback: how long and how much of the served predictions to remember."""

    enabled: bool = True
    """Off makes remember() return at once; join() then finds nothing."""
    ttl_s: float = 3600.0
    """How long (s) a prediction waits for its ground truth; an hour covers clicks and
    human review loops while bounding memory by traffic x an hour."""
    capacity: int = 200_000
    """Predictions remembered at most (oldest evicted first). With the default max_bytes it
    never binds (a small answer takes about 470 B); it caps the count when max_bytes is
    raised."""
    max_bytes: int = 32 * 1024 * 1024
    """Estimated memory (bytes) of the remembered predictions at most: the rule that sizes
    the memory. 32 MiB holds about 70k small answers (20 min at 55 req/s) and costs about
    36 MB of RSS once full (measured over 1M requests), inside the 64 MB a default server
    may grow after warm-up whether or not feedback is ever sent. Raise it with the
    traffic x ttl_s a feedback loop needs."""
    max_rows: int = 1024
    """Requests with more rows are not remembered (counted as too_large): a 1024 x 1024
    float32 answer is already 4 MiB."""
    max_values_per_row: int = 1024
    """Predictions with more classes or outputs per row are not remembered (too_large)."""
    max_batch: int = 10_000
    """Feedback items per join call at most; a larger call is refused with 413 so one call
    holds the event loop for no more than a few tens of ms."""


class ShadowSettings(_Base, frozen=True):
    """A shadow version of a routed model."""

    version: str
    """The version that receives copies; its answers are compared, never returned."""
    sample_rate: float = 1.0
    """Share of routed requests copied to it, 0..1."""


class RouteSettings(_Base, frozen=True):
    """How requests for one model that name no version are split."""

    variants: dict[str, float] = {}
    """Version -> weight (any non-negative scale; 90/10 and 0.9/0.1 are the same split)."""
    shadows: list[ShadowSettings] = []
    """Versions that get a sampled copy of the traffic."""


class AdminSettings(_Base, frozen=True):
    """The admin listener: rollouts, routes, audit trail, drift, metrics, dashboard."""

    host: str = "127.0.0.1"
    """Loopback by default, so a public load balancer never exposes it."""
    port: int = 8002
    """TCP port; 0 picks a free one."""
    tokens: list[AdminToken] = []
    """Who may call it. No tokens: every API call is refused (401); metrics and the
    dashboard page stay readable."""
    history_interval_s: float = 10.0
    """How often the dashboard's server-side history samples the metrics."""
    history_span_s: float = 3600.0
    """How far back that history reaches (the dashboard draws it on load)."""
    tls: TlsSettings = TlsSettings()
    """HTTPS (and mTLS) on the admin listener; without it a non-loopback ``host`` logs a
    warning at start (tokens would cross the network in clear text)."""


class AlertSettings(_Base, frozen=True):
    """Webhooks told about automatic rollbacks (JSON POST, retried, never blocking)."""

    webhooks: list[str] = []
    """URLs to POST the generic JSON event to."""
    slack_webhooks: list[str] = []
    """Slack incoming-webhook URLs: the event as a message (``text`` and a section block)."""
    teams_webhooks: list[str] = []
    """Microsoft Teams workflow or incoming-webhook URLs: the event as an Adaptive Card."""
    timeout_s: float = 2.0
    """Per attempt."""
    retries: int = 3
    """Attempts after the first, with exponential backoff."""
    backoff_s: float = 0.5
    """First retry delay; doubles each time."""


class StoreSettings(_Base, frozen=True):
    """Where the control plane (routes, rollouts, audit trail, controller lease) lives."""

    url: str = ""
    """"" keeps it embedded in ``<data_dir>/control.sqlite3`` (one process). A
    ``redis://host:port/db`` URL (Redis or Valkey; GATEWAY_STORE__URL) shares it between
    replicas and worker processes: every change reaches all of them."""
    cluster: str = "gateway"
    """Key prefix in Redis: replicas with the same URL and cluster share one control plane."""
    lease_ttl_s: float = 2.0
    """Controller lease: a crashed leader is replaced after about this long."""
    resync_interval_s: float = 5.0
    """Each replica re-reads the whole state this often (and after every reconnect)."""
    heartbeat_ttl_s: float = 5.0
    """A replica that stops beating leaves the registry and the pooled signals after this."""


class Settings(_Base, frozen=True):
    """Everything the gateway needs to start, frozen once built."""

    model_repository: str = ""
    """Folder of ``<model>/<version>/model.onnx``; "" serves the bundled example models."""
    server_name: str = "gateway"
    """Name reported by server metadata."""
    grace_period_s: float = 30.0
    """On SIGTERM, how long in-flight requests may take to finish before exit."""
    log_level: str = "INFO"
    """Python logging level name."""
    http: HttpSettings = HttpSettings()
    grpc: GrpcSettings = GrpcSettings()
    limits: LimitsSettings = LimitsSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    routes: dict[str, RouteSettings] = {}
    """Traffic splits by model name (weighted A/B, canary, shadows); the admin API changes
    them at run time."""
    shadow_max_in_flight: int = 32
    """Mirror calls running at once across all shadows; beyond it copies are dropped and
    counted, so a slow shadow can never queue work without bound."""
    shadow_cpu_share: float = 0.005
    """Share of one core's time that mirror calls may use on average (a token bucket of
    seconds, all shadows together, each call charged the time it ran; 0 turns the budget
    off); copies beyond it are dropped and counted (``over_budget``). A running mirror slows
    the primary requests beside it (they share the cores' caches): the share bounds how many
    it touches (``bench.routing``: a shadow 1000x slower than the primary at 100% sampling).
    0.5% of a core runs 100 calls a second of a 50 µs shadow; raise it for a slow one."""
    drift: DriftSettings = DriftSettings()
    data_dir: str = "gateway-data"
    """Folder for durable control-plane state (routes, rollouts, the audit trail) and
    prediction logs; relative paths are relative to the working directory."""
    admin: AdminSettings = AdminSettings()
    model_control: ModelControlSettings = ModelControlSettings()
    auth: DataAuthSettings = DataAuthSettings()
    predictions: PredictionLogSettings = PredictionLogSettings()
    feedback: FeedbackSettings = FeedbackSettings()
    log_format: Literal["json", "text"] = "json"
    """Log lines as JSON objects (for log pipelines) or as plain text."""
    access_log_sample_rate: float = 0.01
    """Share of successful inference requests logged as JSON access lines; every failed
    one is logged. 1% keeps a busy replica's logs readable."""
    alerts: AlertSettings = AlertSettings()
    store: StoreSettings = StoreSettings()
    models: dict[str, dict[str, Any]] = {}
    """Per-model policy fields (see ``ModelPolicy``), keyed by model name; the fields set
    here win over the model's own ``config.toml``."""

    def repository_path(self) -> Path:
        return Path(self.model_repository) if self.model_repository else EXAMPLE_REPOSITORY


def _set_path(tree: dict[str, Any], path: list[str], value: str) -> None:
    node = tree
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = _parse_env_value(value)


def _parse_env_value(value: str) -> Any:
    """Environment values are TOML scalars or arrays when they parse as such, then JSON
    arrays or objects, else strings."""
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    if value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except ValueError:
            raise ConfigError(
                f"environment value {value[:40]!r} is neither a TOML nor a JSON array/table"
            ) from None
    return value


def load_settings(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build ``Settings`` from a TOML file, then ``GATEWAY_*`` variables, then overrides.

    ``overrides`` maps dotted field paths ("http.port") to values (command-line flags).
    Raises ``ConfigError`` naming the file and field on any invalid value.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            tree = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read settings file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"settings file {path} is not valid TOML: {exc}") from None
    for key, value in (os.environ if env is None else env).items():
        if key.startswith(ENV_PREFIX) and len(key) > len(ENV_PREFIX) and key not in CLIENT_ENV:
            parts = key[len(ENV_PREFIX) :].lower().split("__")
            _set_path(tree, parts, value)
    for dotted, value in (overrides or {}).items():
        node = tree
        parts = dotted.split(".")
        for key in parts[:-1]:
            node = node.setdefault(key, {})
        node[parts[-1]] = value
    try:
        settings = msgspec.convert(tree, Settings, strict=False)
    except msgspec.ValidationError as exc:
        source = f"settings file {path}" if path else "settings"
        raise ConfigError(f"invalid {source}: {exc}") from None
    _check(settings)
    return settings


# Keys whose value must be above the range's low end, not equal to it.
_OPEN_LOW: Final = frozenset(
    {"drift.sub_window_s", "drift.tick_s", "drift.alpha", "alerts.timeout_s"}
)
# (dotted key, lowest, highest): ranges checked after decoding, so ``check-config`` and
# ``serve`` refuse the same values with one line naming the key, the value and the range.
_RANGES: Final[tuple[tuple[str, float, float], ...]] = (
    ("http.port", 0, 65535),
    ("grpc.port", 0, 65535),
    ("admin.port", 0, 65535),
    ("http.max_request_bytes", 1, math.inf),
    ("grpc.max_message_bytes", 1, math.inf),
    ("runtime.inference_workers", 1, 1024),
    ("runtime.intra_op_threads", 0, 1024),
    ("runtime.inter_op_threads", 0, 1024),
    ("grace_period_s", 0, math.inf),
    ("shadow_max_in_flight", 0, math.inf),
    ("access_log_sample_rate", 0, 1),
    ("drift.bins", 2, 1000),
    ("drift.sub_window_s", 0, math.inf),
    ("drift.sub_windows", 1, 10_000),
    ("drift.tick_s", 0, math.inf),
    ("drift.alpha", 0, 0.5),
    ("drift.min_samples", 1, math.inf),
    ("drift.min_samples_per_arm", 1, math.inf),
    ("drift.max_rows_per_request", 1, math.inf),
    ("predictions.sample_rate", 0, 1),
    ("feedback.ttl_s", 0, math.inf),
    ("feedback.capacity", 1, math.inf),
    ("feedback.max_bytes", 1, math.inf),
    ("alerts.timeout_s", 0, math.inf),
    ("admin.history_interval_s", 0.01, 3600),
    ("admin.history_span_s", 0.01, 86400),
    ("alerts.retries", 0, 100),
    ("alerts.backoff_s", 0, math.inf),
)


def _value(settings: Settings, dotted: str) -> Any:
    node: Any = settings
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _check(settings: Settings) -> None:
    store = settings.store
    if store.url and not store.url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("store.url must be a redis://, rediss:// or unix:// URL (or empty)")
    if store.lease_ttl_s <= 0 or store.resync_interval_s <= 0 or store.heartbeat_ttl_s <= 0:
        raise ConfigError("store: lease_ttl_s, resync_interval_s and heartbeat_ttl_s must be > 0")
    for dotted, low, high in _RANGES:
        value = _value(settings, dotted)
        open_low = dotted in _OPEN_LOW
        if not (low < value if open_low else low <= value) or not value <= high:  # NaN too
            upper = f"{high:g}]" if high < math.inf else "inf)"
            shown = f"{'(' if open_low else '['}{low:g}, {upper}"
            raise ConfigError(f"{dotted} = {value!r} is outside the allowed range {shown}")
    for shadows in settings.routes.values():
        for shadow in shadows.shadows:
            if not 0 <= shadow.sample_rate <= 1:
                raise ConfigError(
                    f"routes shadow sample_rate = {shadow.sample_rate!r} is outside 0..1"
                )
    try:
        check_tokens(settings.admin.tokens, settings.auth.clients)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    alerts = settings.alerts
    for key, urls in (
        ("webhooks", alerts.webhooks),
        ("slack_webhooks", alerts.slack_webhooks),
        ("teams_webhooks", alerts.teams_webhooks),
    ):
        for url in urls:
            if not url.startswith(("http://", "https://")):
                # Only the scheme is shown: webhook URLs carry secrets.
                shown = url.split("://", 1)[0] if "://" in url else "no scheme"
                raise ConfigError(f"alerts.{key}: a URL must be http:// or https://, not {shown}")
    for name, fields in settings.models.items():
        try:
            policy = msgspec.convert(fields, ModelPolicy, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"invalid settings for models.{name}: {exc}") from None
        check_policy(policy, f"models.{name}")


def check_policy(policy: ModelPolicy, where: str) -> None:
    """Reject values that cannot work, naming the field."""
    if policy.max_batch_size < 0:
        raise ConfigError(f"{where}.max_batch_size = {policy.max_batch_size} must be >= 0")
    if policy.instances < 1:
        raise ConfigError(f"{where}.instances = {policy.instances} must be >= 1")
    if policy.max_queue_size < 1:
        raise ConfigError(f"{where}.max_queue_size = {policy.max_queue_size} must be >= 1")
    if policy.max_queue_delay_us < 0 or policy.default_timeout_ms < 0:
        raise ConfigError(
            f"{where}: max_queue_delay_us = {policy.max_queue_delay_us} and "
            f"default_timeout_ms = {policy.default_timeout_ms} must be >= 0"
        )
    if not -1 <= policy.fill_batch_size <= max(policy.max_batch_size, 0):
        raise ConfigError(f"{where}.fill_batch_size: must be -1, 0 or 1..max_batch_size")
    for size in policy.preferred_batch_sizes:
        if not 1 <= size <= max(policy.max_batch_size, 1):
            raise ConfigError(f"{where}.preferred_batch_sizes: {size} is outside 1..max_batch_size")


def load_model_policy(
    model_dir: Path,
    override: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> ModelPolicy:
    """The policy for one model: its ``config.toml`` (if any), then ``extra`` (a load
    request's parameters), then the server config's ``[models.<name>]`` override."""
    tree: dict[str, Any] = {}
    file = model_dir / MODEL_SETTINGS_FILE
    if file.is_file():
        try:
            tree = tomllib.loads(file.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"model settings {file}: {exc}") from None
    if extra:
        tree.update(extra)
    if override:
        tree.update(override)
    try:
        policy = msgspec.convert(tree, ModelPolicy, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"model settings for '{model_dir.name}': {exc}") from None
    check_policy(policy, model_dir.name)
    return policy
