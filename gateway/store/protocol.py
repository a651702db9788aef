"""store/protocol.py: the control-plane seam: the ``Store`` Protocol and the values it exchanges.

In and out: routes, rollout documents (opaque bytes that the rollout controller owns), audit
events and entries, per-model versions, the controller lease. ``SqliteStore`` (one node) and
``RedisStore`` (many replicas) implement ``Store`` with the same semantics; callers pick one
with ``gateway.store.open_store``. Every method is synchronous and short, so callers on an
event loop run them in a worker thread. Knows nothing of HTTP, policies or decisions.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from gateway.store.audit import AuditEntry, AuditEvent, AuditVerification, JsonObject
from gateway.types import Route

__all__ = ["Commit", "ControlSnapshot", "Lease", "ModelState", "Store"]


class ModelState(msgspec.Struct, frozen=True, kw_only=True):
    """One model's shared control state at one version (what a follower applies)."""

    model: str
    version: int
    """Bumped by every commit that writes the model's route or rollout; 0 = never written."""
    route: Route | None = None
    rollout: bytes | None = None


class ControlSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """Every model's state, read atomically."""

    version: int
    """Global commit counter: any state change bumps it."""
    epoch: str
    """Random id written when the store was created: a change means the store was replaced."""
    models: dict[str, ModelState]


class Commit(msgspec.Struct, frozen=True, kw_only=True):
    """What one commit did: the model's and the store's version after it, and the entry."""

    version: int
    """The model's version now (unchanged if the commit wrote no route or rollout)."""
    global_version: int
    entry: AuditEntry | None = None


class Lease(msgspec.Struct, frozen=True, kw_only=True):
    """The controller lease: who holds it and the fencing token of that tenure."""

    holder: str
    token: int


class Store(Protocol):
    """Control-plane state. Writes are durable when the call returns; reads see all commits.

    Raises ``StoreUnavailableError`` (503) when a shared store cannot be reached,
    ``VersionConflictError`` when ``expected_version`` is stale and ``FencedWriteError`` when
    ``fencing_token`` is not the current lease's.
    """

    def get_route(self, model: str) -> Route | None: ...

    def routes(self) -> dict[str, Route]: ...

    def get_rollout(self, model: str) -> bytes | None: ...

    def rollouts(self) -> dict[str, bytes]: ...

    def snapshot(self) -> ControlSnapshot: ...

    def save(
        self,
        model: str,
        *,
        route: Route | None = None,
        rollout: bytes | None = None,
        event: AuditEvent | None = None,
        expected_version: int | None = None,
        fencing_token: int | None = None,
    ) -> AuditEntry | None:
        """Write any of a route, a rollout document and an audit event in ONE atomic commit.

        ``expected_version``: the model's version the caller validated against (None: no
        check). ``fencing_token``: the controller lease token (None for operator writes,
        which need no lease).
        """
        ...

    def commit(
        self,
        model: str,
        *,
        route: Route | None = None,
        rollout: bytes | None = None,
        event: AuditEvent | None = None,
        expected_version: int | None = None,
        fencing_token: int | None = None,
    ) -> Commit:
        """``save`` that also returns the versions after the commit, so a writer can pass
        the right ``expected_version`` next time without reading the state again."""
        ...

    def append_audit(
        self,
        actor: str,
        action: str,
        model: str = "",
        reason: str = "",
        *,
        before: JsonObject | None = None,
        after: JsonObject | None = None,
        details: JsonObject | None = None,
        ts: float | None = None,
    ) -> AuditEntry: ...

    def audit(
        self,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> list[AuditEntry]: ...

    def verify_audit(self) -> AuditVerification: ...

    def acquire_lease(self, holder: str, ttl_s: float) -> Lease | None:
        """Take the controller lease if it is free (a new, larger token) or extend it if
        ``holder`` already holds it (same token). None: another holder has it."""
        ...

    def renew_lease(self, lease: Lease, ttl_s: float) -> bool:
        """Extend ``lease`` by ``ttl_s`` if it is still the current one."""
        ...

    def release_lease(self, lease: Lease) -> None:
        """Give the lease up at once if it is still the current one (planned shutdown)."""
        ...

    def lease(self) -> Lease | None:
        """The current, unexpired lease, if any."""
        ...

    def close(self) -> None: ...
