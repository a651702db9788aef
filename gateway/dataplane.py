"""dataplane.py: one request, protocol-neutral. Both front ends (``http_api``, ``grpc_api``)
decode, call this, and encode; nothing here knows a path, a header, a metadata key or a
status code.

A request is *admitted* (request id, routing key, version pin, deadline), *routed and
answered* (``router.infer``: variant, batcher, repository), and *remembered* (the prediction
memory for ground-truth feedback, the sampled prediction log). Beside the request path: the
server and model metadata, readiness, the statistics selection, the live route view, the
feedback join and the outcome report. The router does not know the memory or the log exist:
the remember step hangs on its response hook, so the hot path gains no await.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import msgspec

from gateway.codecs.limits import timeout_from_parameter_us
from gateway.errors import (
    DeadlineExceededError,
    ModelNotFoundError,
    ModelNotReadyError,
)
from gateway.feedback import PredictionMemory
from gateway.logs import RequestIds, sanitize_request_id
from gateway.logs import request_id as request_id_from
from gateway.outcomes import OutcomeKindError
from gateway.outcomes import compare as compare_outcomes
from gateway.predlog import PredictionLogger
from gateway.router import Endpoint, Router
from gateway.types import (
    FeedbackItem,
    FeedbackResult,
    InferRequest,
    InferResponse,
    ModelStats,
    ParamValue,
)

__all__ = ["EXTENSIONS", "DataPlane"]

logger = logging.getLogger(__name__)

# The V2 extensions both front ends announce in the server metadata.
EXTENSIONS: Final = (
    "binary_tensor_data",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "statistics",
    "parameters",
)


class DataPlane:
    """The protocol-neutral half of every data-plane call, shared by both front ends.

    ``infer`` is the router's own coroutine function: the front ends await it directly, and
    the remember step runs inside it (on the loop thread, after the shadows are mirrored)
    through the router's response hook, installed here only when something listens.
    """

    def __init__(
        self,
        router: Router,
        *,
        server_name: str,
        server_version: str,
        is_ready: Callable[[], bool],
        memory: PredictionMemory,
        predictions: PredictionLogger | None = None,
    ) -> None:
        self.router = router
        self.server_name = server_name
        self.server_version = server_version
        self.extensions = EXTENSIONS
        self.is_ready = is_ready
        self.memory = memory
        self.relay: Callable[[str, list[FeedbackItem]], None] | None = None
        """In a fleet: forwards feedback for ids this replica does not hold to the others."""
        self._predictions = predictions
        remembers = memory.settings.enabled or predictions is not None
        self._assign_ids = remembers
        self._ids = RequestIds()
        self.infer = router.infer
        if remembers:
            router.on_response = self._answered

    # -- one request ------------------------------------------------------------------------

    def admit(
        self,
        request: InferRequest,
        deadline: float | None,
        *,
        request_id: str | None = None,
        traceparent: str | None = None,
        routing_key: ParamValue | None = None,
        pinned: str | None = None,
    ) -> None:
        """Enrich a decoded request before routing: its deadline (monotonic seconds), its
        id (the request's own, else ``x-request-id`` / ``traceparent``, else a new one when
        predictions are remembered), the version pin and the routing key (the caller's, else
        the V2 ``routing_key`` parameter)."""
        request.deadline = deadline
        if request.id:
            # The body id goes into the response header and log lines: made safe like a
            # header's (printable ASCII, at most 128 characters).
            request.id = sanitize_request_id(request.id)
        if not request.id:
            if request_id or traceparent:
                request.id = request_id_from(
                    {"x-request-id": request_id or "", "traceparent": traceparent or ""}
                )
            elif self._assign_ids:
                request.id = self._ids.new()
        if pinned and not request.model_version:
            request.model_version = pinned
        params = request.parameters
        if routing_key is None and params and "routing_key" in params:
            routing_key = params["routing_key"]
        if routing_key is not None:
            request.routing_key = str(routing_key)

    @staticmethod
    def deadline(request: InferRequest, timeout_s: float | None) -> float | None:
        """A monotonic deadline from the caller's timeout (seconds), else from the V2
        ``timeout`` parameter (microseconds; 0 means none). A timeout already spent raises
        ``DeadlineExceededError``."""
        seconds = timeout_s
        if seconds is None and request.parameters and "timeout" in request.parameters:
            seconds = timeout_from_parameter_us(request.parameters["timeout"]) or None
        if seconds is None:
            return None
        if seconds <= 0:
            raise DeadlineExceededError("the request's timeout had passed on arrival")
        return time.monotonic() + seconds

    def _answered(self, request: InferRequest, response: InferResponse) -> None:
        """Per successful request, on the loop thread: remember the prediction for
        ground-truth feedback, and sampled prediction logging."""
        if response.outputs and request.id:
            self.memory.remember(
                request.id,
                response.model_name,
                response.model_version,
                response.outputs[0].data,
            )
        log = self._predictions
        if log is not None and log.is_sampled(request.id):
            log.submit(
                response.model_name,
                response.model_version,
                request.id,
                {t.name: t.data for t in request.inputs},
                {t.name: t.data for t in response.outputs},
            )

    # -- models: metadata, readiness, statistics, routes ------------------------------------

    def model(self, name: str, version: str = "") -> Endpoint:
        """The served version (``ModelNotFoundError`` when there is none)."""
        return self.router.resolve(name, version)

    def versions(self, name: str) -> list[str]:
        return self.router.versions(name)

    def is_model_ready(self, name: str, version: str = "") -> bool:
        """False for unknown models: V2 clients expect "not ready", not an error."""
        return self.router.is_ready(name, version)

    def require_ready(self, name: str, version: str = "") -> None:
        if not self.router.is_ready(name, version):
            suffix = f" version {version}" if version else ""
            raise ModelNotReadyError(f"model '{name}'{suffix} is not ready")

    def is_serving(self, name: str, version: str = "") -> bool | None:
        """Health of one model (or one variant): None when unknown, else whether the server
        and that model are both ready."""
        try:
            self.router.resolve(name, version)
        except ModelNotFoundError:
            return None
        return self.is_ready() and self.router.is_ready(name, version)

    def statistics(self, name: str | None, version: str = "") -> list[tuple[str, str, ModelStats]]:
        """The V2 statistics selection: every model, one model's versions, or one version."""
        endpoints: Iterator[Endpoint] | list[Endpoint]
        if not name:
            endpoints = self.router.endpoints()
        elif version:
            endpoints = [self.router.resolve(name, version)]
        else:
            self.router.resolve(name)
            endpoints = [e for e in self.router.endpoints() if e.model.name == name]
        return [(e.model.name, e.model.version, e.batcher.stats) for e in endpoints]

    def route_view(self, name: str) -> dict[str, Any]:
        """The live traffic split of a model and each variant's readiness and traffic (for
        load balancers and external splitters)."""
        router = self.router
        router.resolve(name)
        route = router.get_route(name)
        if route is None:
            default = router.resolve(name).model.version
            variants = [{"version": default, "weight": 1.0}]
            shadows: list[dict[str, Any]] = []
        else:
            total = sum(v.weight for v in route.variants) or 1.0
            variants = [{"version": v.version, "weight": v.weight / total} for v in route.variants]
            shadows = [{"version": s.version, "sample_rate": s.sample_rate} for s in route.shadows]
        traffic = {t.version: t for t in router.traffic(name)}
        for entry in variants + shadows:
            version = str(entry["version"])
            entry["ready"] = router.is_ready(name, version)
            seen = traffic.get(version)
            if seen is not None:
                entry["requests"] = seen.requests
                entry["errors"] = seen.errors
                entry["p99_ms"] = seen.p(0.99)
        for entry in shadows:
            seen = traffic.get(str(entry["version"]))
            entry["comparison"] = seen.shadow if seen is not None else {}
        return {"model": name, "variants": variants, "shadows": shadows}

    # -- ground truth -----------------------------------------------------------------------

    async def feedback(self, model: str, items: list[FeedbackItem]) -> FeedbackResult:
        """Join ground truth to remembered predictions (the feedback call, both protocols).
        Unknown and expired ids are counted in the answer, never an error for the call."""
        self.router.resolve(model)
        result = self.memory.join(items, model=model)
        if self.relay is not None and result.unknown_ids:
            held = self.memory.holds
            self.relay(model, [i for i in items if isinstance(i.id, str) and not held(i.id)])
        return result

    def outcomes(self, model: str) -> dict[str, Any]:
        """Outcome metrics per version of ``model`` and each version compared with the
        stable one (the route's heaviest variant, else the default version)."""
        router = self.router
        router.resolve(model)
        versions = router.versions(model)
        route = router.get_route(model)
        if route is not None and route.variants:
            stable = max(route.variants, key=lambda v: v.weight).version
        else:
            stable = router.resolve(model).model.version
        snapshots = {v: self.memory.snapshot(model, v) for v in versions}
        out: dict[str, Any] = {"model": model, "stable": stable, "versions": {}}
        for version, snap in snapshots.items():
            entry: dict[str, Any] = {
                "kind": snap.kind,
                "n": snap.n,
                "accuracy": snap.accuracy,
                "mae": snap.mae,
                "rmse": snap.rmse,
            }
            if version != stable and stable in snapshots:
                try:
                    entry["versus_stable"] = msgspec.to_builtins(
                        compare_outcomes(snap, snapshots[stable])
                    )
                except OutcomeKindError as exc:
                    entry["versus_stable"] = {"error": str(exc)}
            out["versions"][version] = entry
        out["memory"] = msgspec.to_builtins(self.memory.counters())
        return out
