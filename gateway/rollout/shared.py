"""rollout/shared.py: the controller's copy of the control state and its one write path.

In: a ``Store`` (SQLite for one process, Redis for a fleet), the router's weight applier and,
in a fleet, the controller lease (``LeaseSource``). Out: the routes, rollout states and
per-model store versions this replica holds; ``write`` applies a change locally first (a
rollback must not wait on the store), then commits it with its audit event in one store
transaction that checks the model's version and, for the controller's own decisions, the
lease's fencing token, and undoes the local change if the store refuses or cannot be
reached; ``adopt`` takes a newer state committed by another replica (the change log) without
writing. ``retried`` re-runs a manual action whose commit lost a version race, so it is
re-validated against the newer state. Knows nothing of policies or decisions.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable
from typing import Final, ParamSpec, TypeAlias, TypeVar

import msgspec

from gateway.errors import (
    FencedWriteError,
    GatewayError,
    StoreUnavailableError,
    VersionConflictError,
)
from gateway.rollout.policy import CONTROLLER_ACTOR, RolloutState
from gateway.store import AuditEvent, Lease, ModelState, Store
from gateway.types import Route

__all__ = ["COMMIT_ATTEMPTS", "LeaseSource", "SharedState", "retried"]

logger = logging.getLogger(__name__)

LeaseSource: TypeAlias = Callable[[], Lease | None]
"""``current()``: the controller lease this replica may decide under now, or None (another
replica decides). Without one (a single process) the controller always decides."""
WeightApplier: TypeAlias = Callable[[str, dict[str, float]], None]

COMMIT_ATTEMPTS: Final = 5  # a manual action re-validated against a newer state, then given up
_P = ParamSpec("_P")
_T = TypeVar("_T")
_state_decoder: Final = msgspec.json.Decoder(RolloutState)
_encode: Final = msgspec.json.Encoder().encode


def retried(method: Callable[_P, _T]) -> Callable[_P, _T]:
    """Re-run a manual action when another writer moved the model's state first: the failed
    commit already undid the local change and re-read the state, so the retry re-validates
    against the new one (and may become an ordinary ``ConflictError``)."""

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            try:
                return method(*args, **kwargs)
            except VersionConflictError:
                if attempt == COMMIT_ATTEMPTS:
                    raise
                time.sleep(random.uniform(0.002, 0.01) * attempt)
        raise AssertionError("unreachable")

    return wrapper


class SharedState:
    """Routes, rollout states and store versions held by one replica (see the module).

    Not locked itself: the controller calls it under its own lock. Reads of ``states`` and
    ``routes`` are lock-free (values replaced whole).
    """

    def __init__(self, store: Store, apply: WeightApplier, lease: LeaseSource | None) -> None:
        self._store = store
        self._apply = apply
        self._lease = lease
        self.states: dict[str, RolloutState] = {}
        self.routes: dict[str, Route] = {}
        self.versions: dict[str, int] = {}
        """Model -> the store's version of the state held here (what commits expect)."""
        for model_state in store.snapshot().models.values():
            self.adopt(model_state, apply=False)

    def write(
        self,
        model: str,
        route: Route | None,
        state: RolloutState | None,
        old_state: RolloutState | None,
        old_route: Route | None,
        event: AuditEvent,
    ) -> None:
        """Apply ``route`` (if any) to the router first (a rollback must not wait on the
        store), hold ``state``, then commit both with ``event`` in one store transaction
        that expects the model's version held here and, for the controller's own decisions,
        carries the lease's fencing token. If the store refuses or cannot be reached, the
        router and memory go back to ``old_route``/``old_state`` and the error is raised;
        on a version conflict the model's newer state is read back first, so a retry
        re-validates against it. Caller holds the controller's lock."""
        token: int | None = None
        if event.actor == CONTROLLER_ACTOR and self._lease is not None:
            lease = self._lease()
            if lease is None:
                raise FencedWriteError("this replica no longer holds the controller lease")
            token = lease.token
        if route is not None:
            self._apply(model, route.weights())  # raises before anything changed
            self.routes[model] = route
        if state is not None:
            self.states[model] = state
        try:
            done = self._store.commit(
                model,
                route=route,
                rollout=_encode(state) if state is not None else None,
                event=event,
                expected_version=self.versions.get(model, 0),
                fencing_token=token,
            )
        except Exception as exc:
            logger.warning("model %s: %s not recorded, undone: %s", model, event.action, exc)
            self._undo(model, route, old_route, state, old_state)
            if isinstance(exc, VersionConflictError):
                self._refresh(model)
            if isinstance(exc, GatewayError):
                raise
            raise _unavailable(model, event.action, exc) from exc
        self.versions[model] = done.version

    def _undo(
        self,
        model: str,
        route: Route | None,
        old_route: Route | None,
        state: RolloutState | None,
        old_state: RolloutState | None,
    ) -> None:
        if route is not None:
            if old_route is not None:
                try:
                    self._apply(model, old_route.weights())
                except GatewayError as exc:
                    logger.error("model %s: weights not restored: %s", model, exc)
                self.routes[model] = old_route
            else:
                self.routes.pop(model, None)
        if state is None:
            return
        if old_state is not None:
            self.states[model] = old_state
        else:
            self.states.pop(model, None)

    def _refresh(self, model: str) -> None:
        """Adopt the store's current state of ``model`` (after another writer moved it).
        The store is the truth even when its version is lower than the one held (a store
        replaced or restored from an older copy): otherwise every later commit would
        conflict."""
        try:
            current = self._store.snapshot().models.get(model)
        except GatewayError as exc:
            logger.warning("model %s: state not re-read: %s", model, exc)
            return
        if current is None:
            self.versions.pop(model, None)  # the store has nothing for it: start at 0
        else:
            self.adopt(current, force=True)

    def adopt(self, state: ModelState, *, apply: bool = True, force: bool = False) -> bool:
        """Hold ``state`` and apply its route if it is newer than the one held (or always,
        with ``force``); True if it was taken."""
        model = state.model
        if not force and state.version <= self.versions.get(model, 0):
            return False
        if state.rollout is not None:
            try:
                self.states[model] = _state_decoder.decode(state.rollout)
            except msgspec.DecodeError as exc:
                logger.error("stored rollout state of model %s is unreadable: %s", model, exc)
        if state.route is not None and state.route != self.routes.get(model):
            self.routes[model] = state.route
            if apply:
                try:
                    self._apply(model, state.route.weights())
                except GatewayError as exc:
                    logger.warning("route of model %s not applied: %s", model, exc)
        self.versions[model] = state.version
        return True


def _unavailable(model: str, action: str, exc: Exception) -> StoreUnavailableError:
    """The 503 for a change the store could not record (a full disk, an unwritable file):
    all-or-nothing, so it did not take effect either."""
    return StoreUnavailableError(
        f"{action} of model '{model}' was not applied: the control store could not record it "
        f"({type(exc).__name__}: {str(exc)[:200]}); the live state is unchanged"
    )
