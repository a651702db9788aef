"""router.py: picks the model version that serves each request and hands it to its batcher.

A request that names a version (or is pinned by a load balancer) goes there. Otherwise the
model's route splits traffic between versions by weight: with a routing key the variant is
a deterministic function of (key, weights) by weighted rendezvous hashing, stable across
replicas and restarts, and when weights change only the keys that must move do; without a
key the choice is random by weight. Shadow versions get a sampled copy of the traffic
(``shadow.py``). Tables are swapped atomically: a request keeps the endpoint and route it
resolved until it finishes, so a swap never fails a request in flight.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import random
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy.typing as npt

from gateway.batcher import Batcher, Runnable
from gateway.errors import InvalidInputError, ModelNotFoundError, ModelNotReadyError
from gateway.shadow import ShadowRunner
from gateway.traffic import VariantSnapshot, VariantStats
from gateway.types import (
    InferRequest,
    InferResponse,
    ModelSignature,
    Route,
    ShadowTarget,
    Variant,
)

__all__ = ["Servable", "Endpoint", "Router", "sticky_choice"]

Array = npt.NDArray[Any]
logger = logging.getLogger(__name__)
_U64: Final = struct.Struct("<Q")
_TWO64: Final = float(2**64)


def _unit(key: str, salt: str) -> float:
    """A uniform number in (0, 1) from (key, salt), the same on every replica."""
    digest = hashlib.blake2b(f"{salt}\x00{key}".encode(), digest_size=8).digest()
    value: int = _U64.unpack(digest)[0]
    return (value + 0.5) / _TWO64


def sticky_choice(key: str, model: str, variants: tuple[Variant, ...]) -> str:
    """Weighted rendezvous hashing: the variant maximising w / -ln(u(key, variant)).

    Each variant wins with probability proportional to its weight, and raising one weight
    moves keys only onto that variant (a 10% -> 20% change moves about 10% of keys).
    """
    best = ""
    best_score = -math.inf
    for v in variants:
        if v.weight <= 0:
            continue
        score = v.weight / -math.log(_unit(key, f"{model}/{v.version}"))
        if score > best_score:
            best, best_score = v.version, score
    return best


class Servable(Runnable, Protocol):
    """A loaded model version as the router needs it."""

    name: str
    version: str
    signature: ModelSignature

    def prepare(self, request: InferRequest) -> tuple[list[Array], int]: ...

    def respond(self, request: InferRequest, arrays: list[Array]) -> InferResponse: ...


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One served model version: the model and the batcher in front of it."""

    model: Servable
    batcher: Batcher
    default_timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class _CompiledRoute:
    route: Route
    live: tuple[Variant, ...]  # weight > 0, in a fixed order
    cumulative: tuple[float, ...]
    total: float


def _compile(route: Route) -> _CompiledRoute:
    live = tuple(v for v in sorted(route.variants, key=lambda v: v.version) if v.weight > 0)
    cumulative = []
    acc = 0.0
    for v in live:
        acc += v.weight
        cumulative.append(acc)
    return _CompiledRoute(route, live, tuple(cumulative), acc)


class Router:
    """The routing table. Mutated only on the event-loop thread, by whole-dict swaps."""

    def __init__(
        self,
        *,
        seed: int | None = None,
        shadow_max_in_flight: int = 32,
        shadow_executor: Executor | None = None,
        shadow_cpu_share: float = 0.0,
    ) -> None:
        self._models: dict[str, dict[str, Endpoint]] = {}
        self._defaults: dict[str, str] = {}
        self._pinned_defaults: dict[str, str] = {}
        self._routes: dict[str, _CompiledRoute] = {}
        self._stats: dict[tuple[str, str], VariantStats] = {}
        self._random = random.Random(seed)
        self.shadows = ShadowRunner(shadow_max_in_flight, shadow_cpu_share)
        self._shadow_executor = shadow_executor
        self.on_response: Callable[[InferRequest, InferResponse], None] | None = None
        """Called with every successful primary request and its response, on the loop
        thread (the data plane's remember step hangs here); must not block."""

    # -- versions -----------------------------------------------------------------------

    def install(self, endpoint: Endpoint, default_version: str = "") -> Endpoint | None:
        """Serve ``endpoint``; return the endpoint it replaces (the caller drains it)."""
        name, version = endpoint.model.name, endpoint.model.version
        versions = dict(self._models.get(name, {}))
        old = versions.get(version)
        versions[version] = endpoint
        models = dict(self._models)
        models[name] = versions
        if default_version:
            self._pinned_defaults[name] = default_version
        self._models = models
        self._refresh_default(name)
        return old

    def remove(self, name: str, version: str | None = None) -> list[Endpoint]:
        """Stop serving ``name`` (one version, or all); return the removed endpoints."""
        versions = dict(self._models.get(name, {}))
        if version is None:
            removed = list(versions.values())
            versions = {}
        else:
            ep = versions.pop(version, None)
            removed = [ep] if ep else []
        models = dict(self._models)
        if versions:
            models[name] = versions
        else:
            models.pop(name, None)
            self._pinned_defaults.pop(name, None)
        self._models = models
        self._refresh_default(name)
        return removed

    def _refresh_default(self, name: str) -> None:
        versions = self._models.get(name)
        if not versions:
            self._defaults.pop(name, None)
            return
        pinned = self._pinned_defaults.get(name)
        if pinned and pinned in versions:
            self._defaults[name] = pinned
        else:
            self._defaults[name] = max(versions, key=lambda v: (len(v), v))

    def endpoints(self) -> Iterator[Endpoint]:
        for versions in self._models.values():
            yield from versions.values()

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[str]:
        return sorted(self._models.get(name, {}), key=lambda v: (len(v), v))

    def resolve(self, name: str, version: str = "") -> Endpoint:
        """The endpoint for ``name``/``version`` ("" = default). Raises
        ``ModelNotFoundError`` for an unknown name or version."""
        versions = self._models.get(name)
        if versions is None:
            raise ModelNotFoundError(f"Request for unknown model: '{name}' is not found")
        if not version:
            version = self._defaults[name]
        endpoint = versions.get(version)
        if endpoint is None:
            raise ModelNotFoundError(
                f"Request for unknown model: '{name}' version {version} is not found; "
                f"loaded versions: {', '.join(self.versions(name))}"
            )
        return endpoint

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            return self.resolve(name, version).batcher.is_accepting
        except ModelNotFoundError:
            return False

    # -- routes -------------------------------------------------------------------------

    def set_route(self, route: Route) -> Route | None:
        """Install ``route`` atomically; return the one it replaces. Weights must be
        non-negative with a positive sum; every variant and shadow version must be a
        positive integer string (it may be loaded later: until then it gets no traffic
        error-free only if its weight is 0)."""
        for v in route.variants:
            if v.weight < 0 or not math.isfinite(v.weight):
                raise InvalidInputError(
                    f"route '{route.model}': weight of version "
                    f"{v.version} must be a finite number >= 0"
                )
        if route.variants and sum(v.weight for v in route.variants) <= 0:
            raise InvalidInputError(f"route '{route.model}': weights must not all be 0")
        for s in route.shadows:
            if not 0 <= s.sample_rate <= 1:
                raise InvalidInputError(
                    f"route '{route.model}': shadow sample_rate of "
                    f"version {s.version} must be within 0..1"
                )
        routes = dict(self._routes)
        old = routes.get(route.model)
        if route.variants or route.shadows:
            routes[route.model] = _compile(route)
        else:
            routes.pop(route.model, None)
        self._routes = routes
        return old.route if old else None

    def set_weights(self, model: str, weights: Mapping[str, float]) -> Route:
        """Replace the variant weights of ``model``'s route (shadows are kept)."""
        old = self._routes.get(model)
        shadows = old.route.shadows if old else ()
        route = Route(
            model,
            tuple(Variant(v, float(w)) for v, w in sorted(weights.items())),
            shadows,
        )
        self.set_route(route)
        return route

    def get_route(self, model: str) -> Route | None:
        compiled = self._routes.get(model)
        return compiled.route if compiled else None

    def routes(self) -> dict[str, Route]:
        return {name: c.route for name, c in self._routes.items()}

    def choose(self, model: str, routing_key: str | None = None) -> str:
        """The version a request for ``model`` without a version goes to ("" = default)."""
        compiled = self._routes.get(model)
        if compiled is None or not compiled.live:
            return ""
        if len(compiled.live) == 1:
            return compiled.live[0].version
        if routing_key:
            return sticky_choice(routing_key, model, compiled.live)
        point = self._random.random() * compiled.total
        for variant, edge in zip(compiled.live, compiled.cumulative, strict=True):
            if point < edge:
                return variant.version
        return compiled.live[-1].version

    # -- statistics ---------------------------------------------------------------------

    def _variant_stats(self, model: str, version: str) -> VariantStats:
        stats = self._stats.get((model, version))
        if stats is None:
            stats = self._stats[(model, version)] = VariantStats(model, version)
        return stats

    def traffic(self, model: str | None = None) -> list[VariantSnapshot]:
        """Cumulative per-variant counters (diff two snapshots for a window)."""
        return [
            s.snapshot() for (m, _), s in sorted(self._stats.items()) if model is None or m == model
        ]

    # -- requests -----------------------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferResponse:
        """Route, validate, queue and run one request. The response names the version
        that served it; routed traffic is mirrored to the route's shadows."""
        name = request.model_name
        version = request.model_version or self.choose(name, request.routing_key)
        try:
            endpoint = self.resolve(name, version)
        except ModelNotFoundError:
            if version and not request.model_version:
                # The route chose a version that is not loaded: its error, for its rollout.
                stats = self._variant_stats(name, version)
                stats.requests += 1
                stats.errors += 1
            raise
        model = endpoint.model
        stats = self._variant_stats(name, model.version)
        start = time.perf_counter()
        try:
            # ``_run`` written out: an inline model answers in this call, without the
            # coroutine and the future of a queued request.
            feeds, rows, deadline = self._feeds(endpoint, request)
            arrays = endpoint.batcher.run_now(feeds, rows, deadline)
            if arrays is None:
                arrays = await endpoint.batcher.submit(feeds, rows, deadline)
            response = model.respond(request, arrays)
        except BaseException:
            # Counted on completion, with the error, so that any window of two snapshots
            # holds errors <= requests.
            stats.requests += 1
            stats.errors += 1
            raise
        stats.requests += 1
        stats.latency.observe((time.perf_counter() - start) * 1000)
        stats.rows += (
            response.outputs[0].shape[0] if response.outputs and response.outputs[0].shape else 1
        )
        compiled = self._routes.get(name)
        if compiled is not None and compiled.route.shadows:
            self._mirror(compiled.route.shadows, request, response, model.version)
        hook = self.on_response
        if hook is not None:
            try:
                hook(request, response)
            except Exception:  # an observer must never fail the request it observes
                logger.exception("response hook failed for %s", name)
        return response

    async def _run(self, endpoint: Endpoint, request: InferRequest) -> InferResponse:
        feeds, rows, deadline = self._feeds(endpoint, request)
        arrays = await endpoint.batcher.submit(feeds, rows, deadline)
        return endpoint.model.respond(request, arrays)

    @staticmethod
    def _feeds(endpoint: Endpoint, request: InferRequest) -> tuple[list[Array], int, float | None]:
        """The request's feeds and rows for ``endpoint``'s model (``prepare`` validates
        them) and its deadline (the caller's, else the model's default timeout); refused
        while the model unloads."""
        model = endpoint.model
        if not endpoint.batcher.is_accepting:
            raise ModelNotReadyError(f"model '{model.name}' version {model.version} is unloading")
        feeds, rows = model.prepare(request)
        deadline = request.deadline
        if deadline is None and endpoint.default_timeout_s:
            deadline = time.monotonic() + endpoint.default_timeout_s
        return feeds, rows, deadline

    def _mirror(
        self,
        shadows: tuple[ShadowTarget, ...],
        request: InferRequest,
        response: InferResponse,
        served: str,
    ) -> None:
        name = request.model_name
        versions = self._models.get(name, {})
        runner = self.shadows
        for target in shadows:
            if target.version == served:
                continue
            if target.sample_rate < 1 and self._random.random() >= target.sample_rate:
                continue
            stats = self._variant_stats(name, target.version).shadow
            endpoint = versions.get(target.version)
            if endpoint is None:
                stats.dropped += 1
                continue
            # Admitted before the call is built: most copies of a slow shadow are dropped,
            # and a dropped one should cost as little as the counting.
            if runner.admits(stats):
                runner.start(
                    functools.partial(self._run_shadow, endpoint, request), response, stats
                )

    async def _run_shadow(self, endpoint: Endpoint, primary: InferRequest) -> InferResponse:
        """A mirror call of ``primary`` to ``endpoint``: a cheap (inline) model runs through
        its batcher like any request; a model that needs the inference pool runs on the
        shadow executor instead, a low-priority thread, so a slow shadow cannot take the
        cores the primary path and its callers need (its copies queue, then drop, behind
        ``shadow_max_in_flight``)."""
        model = endpoint.model
        request = InferRequest(
            primary.model_name,
            model.version,
            primary.inputs,
            id=primary.id,
            parameters=primary.parameters,
            outputs=primary.outputs,
        )
        if self._shadow_executor is None or model.is_inline:
            # Charged at wall time: an inline model runs on the loop, mostly at once.
            start = time.perf_counter()
            try:
                return await self._run(endpoint, request)
            finally:
                self.shadows.charge(time.perf_counter() - start)
        feeds, _rows = model.prepare(request)
        loop = asyncio.get_running_loop()
        arrays, run_s = await loop.run_in_executor(
            self._shadow_executor, _timed_run, model.run, feeds
        )
        self.shadows.charge(run_s)
        return model.respond(request, arrays)


def _timed_run(run: Callable[[list[Any]], list[Any]], feeds: list[Any]) -> tuple[list[Any], float]:
    """A model call on a worker thread and how long it ran (wall seconds, from its start on
    the thread). Not the thread's CPU time: that misses onnxruntime's intra-op threads, and
    the call's wall time is how long it shares the cores and caches with the primary's
    requests, which grows when their load starves the low-priority thread: the budget then
    admits fewer copies exactly while the primary is busy."""
    start = time.perf_counter()
    arrays = run(feeds)
    return arrays, time.perf_counter() - start
