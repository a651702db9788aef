"""telemetry.py: the metrics snapshot, gathered from the parts at scrape time, and the
``/metrics`` exposition built from it.

In: the router (batchers, variants, routes), the drift monitor, the prediction memory, both
front ends' response counters, the rollout controller (once the control plane is up) and the
readiness flag. Out: a ``metrics.Snapshot`` and its Prometheus text. Reads only; nothing
here is on the request path, and nothing here counts: the parts keep their own counters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import Response

from gateway.drift.monitor import DriftMonitor
from gateway.feedback import PredictionMemory
from gateway.metrics import (
    CONTENT_TYPE,
    BatcherSample,
    DriftSample,
    FleetGauges,
    OutcomeSample,
    Snapshot,
    VariantSample,
    render,
)
from gateway.router import Router
from gateway.traffic import LATENCY_BUCKETS_MS

__all__ = ["Telemetry", "RolloutStates"]


class _Rollout(Protocol):
    @property
    def model(self) -> str: ...

    @property
    def status(self) -> str: ...


class RolloutStates(Protocol):
    """What telemetry reads of the rollout controller: each rollout's model and status, and
    the route versions that were not loaded at start."""

    def rollouts(self) -> Iterable[_Rollout]: ...

    def missing_versions(self) -> dict[str, list[str]]: ...


class Telemetry:
    """``snapshot()`` and ``metrics()`` over the live parts. ``responses`` and ``controller``
    are filled in by the wiring once those parts exist."""

    def __init__(
        self,
        router: Router,
        monitor: DriftMonitor,
        memory: PredictionMemory,
        is_ready: Callable[[], bool],
    ) -> None:
        self.router = router
        self.monitor = monitor
        self.memory = memory
        self.is_ready = is_ready
        self.responses: dict[str, Mapping[str, int]] = {}
        """Infer responses by status, per protocol ("http", "grpc"): each front end's own
        counter, registered once it is built."""
        self.controller: RolloutStates | None = None
        self.alert_counts: Callable[[], dict[str, int]] | None = None
        self.fleet: Callable[[], FleetGauges | None] | None = None

    def metrics(self) -> bytes:
        """Prometheus exposition of the live counters (built at scrape time)."""
        return render(self.snapshot)

    async def endpoint(self, request: Request) -> Any:
        """``GET /metrics`` as a Starlette endpoint (the admin listener serves it)."""
        return Response(self.metrics(), media_type=CONTENT_TYPE)

    def snapshot(self) -> Snapshot:
        """Every metric family's current values, gathered from the parts (scrape time)."""
        batchers = []
        for endpoint in self.router.endpoints():
            st = endpoint.batcher.stats
            batchers.append(
                BatcherSample(
                    endpoint.model.name,
                    endpoint.model.version,
                    endpoint.batcher.queue_depth,
                    st.success.count,
                    st.fail.count,
                    st.inference_count,
                    st.execution_count,
                    st.rejected,
                    st.expired,
                    st.queue.ns,
                    st.compute_input.ns,
                    st.compute_infer.ns,
                    st.compute_output.ns,
                    {size: b.compute_infer.count for size, b in st.batches.items()},
                    dict(getattr(endpoint.model, "schema_violations", {})),
                )
            )
        routes = self.router.routes()
        variants = []
        for t in self.router.traffic():
            route = routes.get(t.model)
            weight = None
            if route is not None:
                total = sum(v.weight for v in route.variants) or 1.0
                weight = route.weights().get(t.version, 0.0) / total
            variants.append(
                VariantSample(
                    t.model,
                    t.version,
                    t.requests,
                    t.errors,
                    LATENCY_BUCKETS_MS,
                    t.latency_counts,
                    t.latency_total_ms,
                    weight,
                    int(t.shadow.get("sent") or 0),
                    int(t.shadow.get("dropped") or 0),
                    int(t.shadow.get("errors") or 0),
                    t.shadow.get("agreement"),
                    int(t.shadow.get("over_budget") or 0),
                )
            )
        drift = []
        for endpoint in self.router.endpoints():
            ref = endpoint.model.ref
            try:
                report = self.monitor.report(ref)
            except KeyError:
                continue
            features = report.inputs + report.outputs
            drift.append(
                DriftSample(
                    ref.name,
                    ref.version,
                    report.inputs[0].n if report.inputs else 0,
                    report.verdict,
                    sum(1 for f in features if f.verdict == "drift"),
                    # Empty windows have NaN statistics: no PSI is exported for them.
                    max((f.psi for f in features if f.psi == f.psi), default=math.nan),
                    [(f.name, f.psi, f.ks) for f in features if f.psi == f.psi],
                )
            )
        responses = {
            (protocol, code): n
            for protocol, counts in self.responses.items()
            for code, n in counts.items()
        }
        outcomes = []
        for model, version in self.memory.variants():
            snap = self.memory.snapshot(model, version)
            outcomes.append(OutcomeSample(model, version, snap.n, snap.accuracy, snap.mae))
        counters = self.memory.counters()
        feedback = {
            "matched": counters.matched,
            "unknown": counters.unknown_ids,
            "expired": counters.expired_ids,
            "duplicate": counters.duplicate,
            "invalid": counters.invalid,
        }
        controller = self.controller
        rollouts: dict[str, str] = {}
        if controller is not None:
            rollouts = {state.model: str(state.status) for state in controller.rollouts()}
        missing = controller.missing_versions() if controller is not None else {}
        alerts = self.alert_counts() if self.alert_counts is not None else {}
        return Snapshot(
            batchers,
            variants,
            drift,
            responses,
            rollouts,
            self.is_ready(),
            outcomes,
            feedback,
            alerts=alerts,
            route_missing_versions=missing,
            fleet=self.fleet() if self.fleet is not None else None,
        )
