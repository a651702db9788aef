"""metrics.py: every Prometheus metric the gateway exports, defined once.

Nothing is counted here: the request path already keeps plain counters (per-version batcher
statistics, per-variant traffic, front-end status codes, drift windows, rollout state), and
this collector turns a snapshot of them into metric families when Prometheus scrapes, so
exporting costs the request path nothing. ``Snapshot`` is the seam: ``app.py`` builds it
from the live components; this module imports nothing from the gateway.

Label sets are bounded: model and version come from the repository, status codes from the
status table, and drift exports only each version's top-k features.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = [
    "CONTENT_TYPE",
    "BatcherSample",
    "VariantSample",
    "DriftSample",
    "OutcomeSample",
    "Snapshot",
    "GatewayCollector",
    "render",
    "DRIFT_TOP_K",
    "LATENCY_BUCKETS_S",
    "export_buckets",
]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
DRIFT_TOP_K: Final = 10  # features per model version exported with their own label
LATENCY_BUCKETS_S: Final[tuple[float, ...]] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
"""Exported latency bounds: 16 round numbers (0.5 ms to 60 s), so dashboards and alert
rules can name a bound (le="0.1") and series stay few. The request path keeps finer
buckets (26% apart) for the rollout's p99; they are merged into these at scrape time."""


def export_buckets(
    upper_ms: Sequence[float], counts: Sequence[int], bounds_s: Sequence[float] = LATENCY_BUCKETS_S
) -> list[tuple[str, int]]:
    """Cumulative (le label, count) pairs at ``bounds_s`` from fine buckets (``counts`` has
    one overflow bucket last). A fine bucket counts under the first export bound at or
    above its upper edge, so a bound never undercounts what lies below it by more than one
    fine bucket's width (26%), and never counts what lies above it."""
    pairs: list[tuple[str, int]] = []
    i = acc = 0
    for bound in bounds_s:
        limit_ms = bound * 1000.0 * (1 + 1e-9)
        while i < len(upper_ms) and i < len(counts) and upper_ms[i] <= limit_ms:
            acc += counts[i]
            i += 1
        pairs.append((f"{bound:g}", acc))
    pairs.append(("+Inf", sum(counts)))
    return pairs


@dataclass(frozen=True, slots=True)
class BatcherSample:
    model: str
    version: str
    queue_depth: int
    requests_ok: int
    requests_failed: int
    rows: int
    executions: int
    rejected: int
    expired: int
    queue_ns: int
    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int
    batch_sizes: dict[int, int]  # rows per execution -> executions
    schema_violations: dict[str, int] = field(default_factory=dict)  # feature -> requests


@dataclass(frozen=True, slots=True)
class VariantSample:
    model: str
    version: str
    requests: int
    errors: int
    latency_bucket_ms: Sequence[float]  # upper bounds
    latency_counts: Sequence[int]  # per bucket, plus one overflow bucket last
    latency_sum_ms: float
    weight: float | None  # share of routed traffic, None when unrouted
    shadow_sent: int = 0
    shadow_dropped: int = 0
    shadow_errors: int = 0
    shadow_agreement: float | None = None
    shadow_over_budget: int = 0  # of the dropped: the shadows' CPU budget was spent


@dataclass(frozen=True, slots=True)
class DriftSample:
    model: str
    version: str
    rows: int
    verdict: str
    drifting_features: int
    max_psi: float
    top: Sequence[tuple[str, float, float]]  # (feature, psi, ks), worst first


@dataclass(frozen=True, slots=True)
class OutcomeSample:
    model: str
    version: str
    samples: int
    accuracy: float | None
    mae: float | None


@dataclass(frozen=True, slots=True)
class FleetGauges:
    """This replica in a fleet: live replicas, whether it holds the controller lease, and
    how far (change-log seconds) it trails the most advanced replica."""

    replicas: int
    is_leader: bool
    lag_s: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    batchers: Sequence[BatcherSample] = ()
    variants: Sequence[VariantSample] = ()
    drift: Sequence[DriftSample] = ()
    responses: dict[tuple[str, str], int] = field(default_factory=dict)
    """(protocol, status code) -> responses."""
    rollouts: dict[str, str] = field(default_factory=dict)
    """model -> rollout status."""
    ready: bool = True
    outcomes: Sequence[OutcomeSample] = ()
    feedback: dict[str, int] = field(default_factory=dict)
    route_missing_versions: dict[str, list[str]] = field(default_factory=dict)
    """model -> versions its route names that were not loaded and ready at start."""
    """Feedback items by result (matched, unknown, expired, duplicate, invalid)."""
    alerts: dict[str, int] = field(default_factory=dict)
    """Alert webhook deliveries by result (sent, failed, dropped)."""
    fleet: FleetGauges | None = None
    """Set when the control plane is shared with other replicas."""


_ROLLOUT_STATES: Final = ("canary", "paused", "awaiting_approval", "promoted", "rolled_back")


def _families(s: Snapshot) -> Iterator[Metric]:
    mv = ["model", "version"]
    up = GaugeMetricFamily("gateway_ready", "1 when the gateway accepts traffic")
    up.add_metric([], 1.0 if s.ready else 0.0)
    yield up

    responses = CounterMetricFamily(
        "gateway_responses",
        "Inference responses by protocol and status code",
        labels=["protocol", "code"],
    )
    for (protocol, code), n in sorted(s.responses.items()):
        responses.add_metric([protocol, code], n)
    yield responses

    ok = CounterMetricFamily(
        "gateway_model_requests",
        "Requests that reached a model version's queue, by outcome",
        labels=[*mv, "outcome"],
    )
    rows = CounterMetricFamily("gateway_model_rows", "Rows inferred", labels=mv)
    execs = CounterMetricFamily("gateway_model_executions", "Model calls (batches)", labels=mv)
    rejected = CounterMetricFamily(
        "gateway_queue_rejected", "Requests refused because the queue was full", labels=mv
    )
    expired = CounterMetricFamily(
        "gateway_queue_expired", "Requests whose deadline passed in the queue", labels=mv
    )
    depth = GaugeMetricFamily("gateway_queue_depth", "Requests waiting", labels=mv)
    stage = CounterMetricFamily(
        "gateway_stage_seconds", "Cumulative time per request stage", labels=[*mv, "stage"]
    )
    batch = HistogramMetricFamily("gateway_batch_size", "Rows per model call", labels=mv)
    for b in s.batchers:
        key = [b.model, b.version]
        ok.add_metric([*key, "success"], b.requests_ok)
        ok.add_metric([*key, "failure"], b.requests_failed)
        rows.add_metric(key, b.rows)
        execs.add_metric(key, b.executions)
        rejected.add_metric(key, b.rejected)
        expired.add_metric(key, b.expired)
        depth.add_metric(key, b.queue_depth)
        for name, ns in (
            ("queue", b.queue_ns),
            ("compute_input", b.compute_input_ns),
            ("compute_infer", b.compute_infer_ns),
            ("compute_output", b.compute_output_ns),
        ):
            stage.add_metric([*key, name], ns / 1e9)
        bounds = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
        cumulative = []
        total = 0
        sizes = sorted(b.batch_sizes.items())
        for bound in bounds:
            total = sum(n for size, n in sizes if size <= bound)
            cumulative.append((str(bound), total))
        cumulative.append(("+Inf", sum(n for _, n in sizes)))
        batch.add_metric(key, cumulative, sum(size * n for size, n in sizes))
    schema = CounterMetricFamily(
        "gateway_schema_violations",
        "Requests that broke a declared feature rule",
        labels=[*mv, "feature"],
    )
    for b in s.batchers:
        for feature, n in sorted(b.schema_violations.items()):
            schema.add_metric([b.model, b.version, feature], n)
    yield from (ok, rows, execs, rejected, expired, depth, stage, batch, schema)

    requests = CounterMetricFamily(
        "gateway_variant_requests", "Requests served per variant", labels=mv
    )
    errors = CounterMetricFamily("gateway_variant_errors", "Failed requests per variant", labels=mv)
    latency = HistogramMetricFamily(
        "gateway_request_duration_seconds",
        "Latency from routing to response, per variant",
        labels=mv,
    )
    weight = GaugeMetricFamily(
        "gateway_route_weight", "Share of routed traffic per variant", labels=mv
    )
    shadow = CounterMetricFamily(
        "gateway_shadow_requests", "Mirrored requests by outcome", labels=[*mv, "outcome"]
    )
    agreement = GaugeMetricFamily(
        "gateway_shadow_agreement_ratio",
        "Share of compared rows where the shadow agreed",
        labels=mv,
    )
    for v in s.variants:
        key = [v.model, v.version]
        requests.add_metric(key, v.requests)
        errors.add_metric(key, v.errors)
        buckets = export_buckets(v.latency_bucket_ms, v.latency_counts)
        latency.add_metric(key, buckets, v.latency_sum_ms / 1000)
        if v.weight is not None:
            weight.add_metric(key, v.weight)
        if v.shadow_sent or v.shadow_dropped:
            shadow.add_metric([*key, "sent"], v.shadow_sent)
            shadow.add_metric([*key, "dropped"], v.shadow_dropped)
            shadow.add_metric([*key, "error"], v.shadow_errors)
            shadow.add_metric([*key, "over_budget"], v.shadow_over_budget)
        if v.shadow_agreement is not None:
            agreement.add_metric(key, v.shadow_agreement)
    yield from (requests, errors, latency, weight, shadow, agreement)

    psi = GaugeMetricFamily(
        "gateway_drift_psi",
        "PSI of the top drifting features against the reference profile",
        labels=[*mv, "feature"],
    )
    ks = GaugeMetricFamily(
        "gateway_drift_ks", "Binned KS of the top drifting features", labels=[*mv, "feature"]
    )
    max_psi = GaugeMetricFamily("gateway_drift_max_psi", "Largest PSI over all features", labels=mv)
    drifting = GaugeMetricFamily(
        "gateway_drift_features_drifting", "Features whose verdict is drift", labels=mv
    )
    window = GaugeMetricFamily("gateway_drift_window_rows", "Rows in the drift window", labels=mv)
    verdict = GaugeMetricFamily(
        "gateway_drift_verdict", "1 for the current overall verdict", labels=[*mv, "verdict"]
    )
    for d in s.drift:
        key = [d.model, d.version]
        for feature, p, k in list(d.top)[:DRIFT_TOP_K]:
            psi.add_metric([*key, feature], p)
            ks.add_metric([*key, feature], k)
        if d.max_psi == d.max_psi:  # NaN: an empty window, no statistic to export
            max_psi.add_metric(key, d.max_psi)
        drifting.add_metric(key, d.drifting_features)
        window.add_metric(key, d.rows)
        for name in ("drift", "no_drift", "insufficient_data"):
            verdict.add_metric([*key, name], 1.0 if d.verdict == name else 0.0)
    yield from (psi, ks, max_psi, drifting, window, verdict)

    rollout = GaugeMetricFamily(
        "gateway_rollout_state", "1 for each model's rollout state", labels=["model", "state"]
    )
    for model, state in sorted(s.rollouts.items()):
        for name in _ROLLOUT_STATES:
            rollout.add_metric([model, name], 1.0 if state == name else 0.0)
    yield rollout
    if s.fleet is not None:
        gauges = (
            ("gateway_fleet_replicas", "Live replicas sharing the control plane", s.fleet.replicas),
            ("gateway_controller_leader", "1 when this replica holds the lease", s.fleet.is_leader),
            ("gateway_control_lag_seconds", "Change log behind the newest replica", s.fleet.lag_s),
        )
        for name, text, value in gauges:
            gauge = GaugeMetricFamily(name, text)
            gauge.add_metric([], float(value))
            yield gauge
    yield from _outcome_families(s)


def _outcome_families(s: Snapshot) -> Iterator[Metric]:
    mv = ["model", "version"]
    samples = CounterMetricFamily(
        "gateway_outcome_samples",
        "Served predictions joined with their ground truth (rows, or values for regressors)",
        labels=mv,
    )
    accuracy = GaugeMetricFamily(
        "gateway_outcome_accuracy", "Share of joined rows predicted right", labels=mv
    )
    mae = GaugeMetricFamily(
        "gateway_outcome_mae", "Mean absolute error of joined regression outputs", labels=mv
    )
    for o in s.outcomes:
        key = [o.model, o.version]
        samples.add_metric(key, o.samples)
        if o.accuracy is not None:
            accuracy.add_metric(key, o.accuracy)
        if o.mae is not None:
            mae.add_metric(key, o.mae)
    feedback = CounterMetricFamily(
        "gateway_feedback_items", "Ground-truth feedback items by result", labels=["result"]
    )
    for result, n in sorted(s.feedback.items()):
        feedback.add_metric([result], n)
    alerts = CounterMetricFamily(
        "gateway_alert_deliveries",
        "Alert webhook deliveries by result (failed: every retry failed)",
        labels=["result"],
    )
    for result in ("sent", "failed", "dropped"):
        alerts.add_metric([result], s.alerts.get(result, 0))
    yield from (samples, accuracy, mae, feedback, alerts)

    missing = GaugeMetricFamily(
        "gateway_route_missing_version",
        "1 for each version a route names that was not loaded at start (its share went to "
        "the stable version)",
        labels=["model", "version"],
    )
    for model, versions in sorted(s.route_missing_versions.items()):
        for version in versions:
            missing.add_metric([model, version], 1.0)
    yield missing


class GatewayCollector(Collector):
    """Collects a fresh ``Snapshot`` on every scrape."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        return list(_families(self._snapshot()))


def render(snapshot: Callable[[], Snapshot]) -> bytes:
    """The Prometheus text exposition of one snapshot (plus process metrics)."""
    from prometheus_client import ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(snapshot))
    ProcessCollector(registry=registry)
    return generate_latest(registry)
