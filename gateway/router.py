"""router.py: maps a request's model name and version to the batcher that serves it.

A name maps to its loaded versions; a request that names a version goes there, one that
names none goes to the model's default version (the highest, unless configured). The table
is swapped atomically when versions are installed or removed: a request holds the endpoint
it resolved until it finishes, so a swap never fails a request in flight.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy.typing as npt

from gateway.batcher import Batcher, Runnable
from gateway.errors import ModelNotFoundError, ModelNotReadyError
from gateway.types import InferRequest, InferResponse, ModelSignature

__all__ = ["Servable", "Endpoint", "Router"]

Array = npt.NDArray[Any]


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


class Router:
    """The routing table. Mutated only on the event-loop thread, by whole-dict swaps."""

    def __init__(self) -> None:
        self._models: dict[str, dict[str, Endpoint]] = {}
        self._defaults: dict[str, str] = {}
        self._pinned_defaults: dict[str, str] = {}

    # -- table ------------------------------------------------------------------------

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
        """Stop routing to ``name`` (one version, or all); return the removed endpoints."""
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

    # -- requests -----------------------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferResponse:
        """Validate, queue and run one request; its response names the version that ran."""
        endpoint = self.resolve(request.model_name, request.model_version)
        model = endpoint.model
        if not endpoint.batcher.is_accepting:
            raise ModelNotReadyError(f"model '{model.name}' version {model.version} is unloading")
        feeds, rows = model.prepare(request)
        deadline = request.deadline
        if deadline is None and endpoint.default_timeout_s:
            deadline = time.monotonic() + endpoint.default_timeout_s
        arrays = await endpoint.batcher.submit(feeds, rows, deadline)
        return model.respond(request, arrays)
