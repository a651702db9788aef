"""rollout/routes.py: the one route table: routes from the config file and routes set
through the admin API (stored), with their source, and the repair of a route that names a
version which is not loaded.

Precedence: a route stored through the API (weights set by hand or by a rollout) overrides
the config file's route for the same model, and keeps doing so across restarts; the config's
route applies to models with no stored route. ``GET /admin/v1/routes`` shows every route
with ``source`` ("config" or "api") and, for an API route that shadows a config one, the
config's weights under ``overrides_config``.

A route naming a version that is not loaded and ready is repaired at start: that version's
share goes to the stable version (the rollout's stable one, else the route's heaviest
loaded version), and the route is listed with ``missing_versions`` (logged as an error and
counted by ``gateway_route_missing_version``). Pure functions over ``types.Route``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from gateway.errors import InvalidInputError
from gateway.types import Route

__all__ = ["RouteSource", "not_ready", "repaired_weights", "route_view", "table"]

logger = logging.getLogger(__name__)

RouteSource = Literal["config", "api"]


def not_ready(route: Route, check: Callable[[str, Sequence[str]], None]) -> list[str]:
    """The versions with a positive weight in ``route`` that ``check`` refuses, each logged
    as an error with the reason."""
    missing = []
    for version, weight in route.weights().items():
        try:
            if weight > 0:
                check(route.model, [version])
        except InvalidInputError as exc:
            missing.append(version)
            logger.error("route of model %s names version %s: %s", route.model, version, exc)
    return missing


def repaired_weights(
    route: Route, missing: Iterable[str], stable: str | None
) -> dict[str, float] | None:
    """``route``'s weights with each ``missing`` version's share moved to ``stable`` (or to
    the heaviest version that is not missing). None when no version is left to serve."""
    gone = set(missing)
    weights = route.weights()
    kept = {v: w for v, w in weights.items() if v not in gone}
    moved = sum(w for v, w in weights.items() if v in gone)
    target = stable if stable is not None and stable not in gone else None
    if target is None:
        if not kept:
            return None
        target = max(kept, key=lambda v: kept[v])
    kept[target] = kept.get(target, 0.0) + moved
    return kept if sum(kept.values()) > 0 else None


def route_view(
    route: Route,
    source: RouteSource,
    config: Route | None = None,
    missing: Iterable[str] = (),
) -> dict[str, Any]:
    """One row of ``GET /admin/v1/routes``."""
    view: dict[str, Any] = {
        "model": route.model,
        "source": source,
        "variants": [{"version": v.version, "weight": v.weight} for v in route.variants],
        "weights": route.weights(),
        "shadows": [{"version": s.version, "sample_rate": s.sample_rate} for s in route.shadows],
    }
    if source == "api" and config is not None:
        view["overrides_config"] = config.weights()
    gone = sorted(missing)
    if gone:
        view["missing_versions"] = gone
    return view


def table(
    stored: Mapping[str, Route],
    config: Mapping[str, Route],
    missing: Mapping[str, list[str]],
) -> dict[str, dict[str, Any]]:
    """Every route by model: stored (API) routes over config ones."""
    out: dict[str, dict[str, Any]] = {}
    for model in sorted(set(stored) | set(config)):
        if model in stored:
            out[model] = route_view(stored[model], "api", config.get(model), missing.get(model, ()))
        else:
            out[model] = route_view(config[model], "config", None, missing.get(model, ()))
    return out
