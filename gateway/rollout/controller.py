"""rollout/controller.py: runs every active rollout: signals -> decision -> route weights.

In: a ``Store`` (routes, rollout states, audit trail), a ``WeightApplier`` (the router's
``set_weights``), a ``SignalSource`` (traffic, drift and shadow numbers for one rollout) and an
optional ``AlertSink``. Out: weight changes, persisted states, audit entries and alerts.

The controller only gathers signals, applies what ``decide`` concludes and records it. Manual
actions (promote, rollback, pause, weights) go through the same apply path as automatic ones,
so the router, the store and the audit trail never disagree on who did what. It does not know
HTTP, the router's internals or how drift is computed: it sees them only through the callables
above.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, Protocol, TypeAlias

import msgspec

from gateway.errors import (
    ConflictError,
    GatewayError,
    InvalidInputError,
    ModelNotFoundError,
    StoreUnavailableError,
)
from gateway.rollout.decide import decide
from gateway.rollout.policy import (
    ACTIVE_STATUSES,
    CONTROLLER_ACTOR,
    EVALUATED_STATUSES,
    FULL_WEIGHT,
    Decision,
    Evaluation,
    Measured,
    RolloutPolicy,
    RolloutState,
    RolloutStatus,
    Signals,
    Transition,
)
from gateway.store import AuditEvent, Store
from gateway.types import Route, Variant

__all__ = ["WeightApplier", "SignalSource", "AlertSink", "RolloutController"]

logger = logging.getLogger(__name__)

MAX_HISTORY: Final = 200  # transitions kept in a state document; the audit trail keeps all
_STOP_TIMEOUT_S: Final = 10.0  # one evaluation takes milliseconds; longer means it is stuck

WeightApplier: TypeAlias = Callable[[str, dict[str, float]], None]
"""``apply(model, {version: percent})``: swap the router's weights atomically. Called from
the controller's worker thread or an admin request's thread, never two at once."""
SignalSource: TypeAlias = Callable[[RolloutState], Signals]
"""``gather(state)``: the current signals for a rollout; cheap, thread-safe, non-blocking."""


class AlertSink(Protocol):
    """Where rollout events go (``alerts.AlertSender``); must never block or raise."""

    def send(
        self,
        event: str,
        model: str,
        reason: str,
        values: Mapping[str, object],
        extra: Mapping[str, object] | None = None,
    ) -> bool: ...


_state_decoder: Final = msgspec.json.Decoder(RolloutState)
_encode: Final = msgspec.json.Encoder().encode
_ALERTED: Final[Mapping[str, str]] = {
    "rolled_back": "rollout.rolled_back",
    "awaiting_approval": "rollout.awaiting_approval",
    "promoted": "rollout.promoted",
}


class RolloutController:
    """Runs every active rollout: evaluate -> decide -> apply -> persist -> audit -> alert.

    Public methods are synchronous and thread-safe (one lock); each write is one store
    transaction with an fsync, so callers on an event loop run them in a worker thread.
    Raises ``ModelNotFoundError`` for a model without a rollout, ``ConflictError`` for an
    action the rollout's status does not allow, ``InvalidInputError`` for bad arguments.
    """

    def __init__(
        self,
        store: Store,
        apply_weights: WeightApplier,
        gather: SignalSource,
        alerts: AlertSink | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._apply = apply_weights
        self._gather = gather
        self._alerts = alerts
        self._clock = clock
        self._lock = threading.RLock()
        self._states: dict[str, RolloutState] = {}
        for model, doc in store.rollouts().items():
            try:
                self._states[model] = _state_decoder.decode(doc)
            except msgspec.DecodeError as exc:
                logger.error("stored rollout state of model %s is unreadable: %s", model, exc)
        self._routes: dict[str, Route] = store.routes()
        self._is_restored = False
        self._executor: ThreadPoolExecutor | None = None
        self._stopping: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    # -- queries ----------------------------------------------------------------------------
    # Lock-free: states and routes are immutable values replaced whole, and a dict copy is
    # atomic under the GIL, so a status read never waits behind a write's fsync.

    def status(self, model: str) -> RolloutState:
        state = self._states.get(model)
        if state is None:
            raise ModelNotFoundError(f"model '{model}' has no rollout")
        return state

    def rollouts(self) -> list[RolloutState]:
        states = dict(self._states)
        return [states[m] for m in sorted(states)]

    def history(self, model: str) -> list[Transition]:
        return list(self.status(model).history)

    def routes(self) -> dict[str, Route]:
        return dict(self._routes)

    # -- manual actions -----------------------------------------------------------------------

    def start_rollout(
        self,
        model: str,
        stable: str,
        candidate: str,
        policy: RolloutPolicy,
        actor: str,
        reason: str = "",
    ) -> RolloutState:
        """Send ``policy.steps[0]`` percent of ``model`` to ``candidate``. A finished rollout
        of the model is replaced; an active one is a ``ConflictError``."""
        if not model or not stable or not candidate:
            raise InvalidInputError("model, stable and candidate must be non-empty")
        if stable == candidate:
            raise InvalidInputError(f"stable and candidate are both version {stable}")
        with self._lock:
            current = self._states.get(model)
            if current is not None and current.is_active:
                raise ConflictError(
                    f"model '{model}' already has a rollout ({current.status}) of version "
                    f"{current.candidate_version}; finish or roll it back first"
                )
            now = self._clock()
            first = policy.steps[0]
            state = RolloutState(
                model=model,
                stable_version=stable,
                candidate_version=candidate,
                status="canary",
                policy=policy,
                step_index=0,
                candidate_weight=first,
                step_started_at=now,
                created_at=now,
                updated_at=now,
                actor=actor,
                reason=reason,
            )
            return self._commit(
                None, state, "start", actor, reason or f"canary of {candidate} at {first:g}%"
            )

    def pause(self, model: str, actor: str, reason: str = "") -> RolloutState:
        """Hold the current weights and stop evaluating (only from "canary")."""
        with self._lock:
            state = self._require(model, "pause", {"canary"})
            return self._commit(state, self._moved(state, "paused"), "pause", actor, reason)

    def resume(self, model: str, actor: str, reason: str = "") -> RolloutState:
        """Back to "canary" at the current step; the step's clock and request count restart
        and its weights are applied again (they may have been set by hand while paused)."""
        with self._lock:
            state = self._require(model, "resume", {"paused"})
            now = self._clock()
            after = msgspec.structs.replace(
                self._moved(state, "canary"), step_started_at=now, step_requests_at_start=None
            )
            return self._commit(state, after, "resume", actor, reason)

    def promote(self, model: str, actor: str, reason: str = "") -> RolloutState:
        """Send all traffic to the candidate now, skipping remaining steps and approval."""
        with self._lock:
            state = self._require(model, "promote", {"canary", "paused", "awaiting_approval"})
            after = self._moved(state, "promoted", FULL_WEIGHT, len(state.policy.steps))
            return self._commit(state, after, "promote", actor, reason)

    def approve(self, model: str, actor: str, reason: str = "") -> RolloutState:
        """Promote a rollout that waits at the approval gate (only from "awaiting_approval")."""
        with self._lock:
            state = self._require(model, "approve", {"awaiting_approval"})
            after = self._moved(state, "promoted", FULL_WEIGHT, len(state.policy.steps))
            return self._commit(state, after, "approve", actor, reason)

    def rollback(self, model: str, actor: str, reason: str = "") -> RolloutState:
        """All traffic back to the stable version at once; after promotion this restores
        the previous stable version."""
        with self._lock:
            state = self._require(model, "roll back", ACTIVE_STATUSES | {"promoted"})
            after = self._moved(state, "rolled_back", 0.0)
            return self._commit(state, after, "rollback", actor, reason)

    def set_weights(
        self, model: str, weights: Mapping[str, float], actor: str, reason: str = ""
    ) -> Route:
        """Set ``model``'s route weights by hand (relative, any positive total). Refused
        while a rollout of the model is running: pause it first."""
        clean: dict[str, float] = {}
        for version, weight in weights.items():
            w = float(weight)
            if not version or not math.isfinite(w) or w < 0:
                raise InvalidInputError(
                    f"weight of version '{version}' must be a finite number >= 0"
                )
            clean[version] = w
        if not clean or sum(clean.values()) <= 0:
            raise InvalidInputError("weights must name a version with a positive weight")
        with self._lock:
            state = self._states.get(model)
            if state is not None and state.status in EVALUATED_STATUSES:
                raise ConflictError(
                    f"model '{model}' has a running rollout ({state.status}); pause it, "
                    "promote it or roll it back before setting weights"
                )
            before = self._routes.get(model)
            self._apply(model, dict(clean))  # the router validates the versions
            route = self._route(model, clean)
            with self._recorded_or_undone(model, "set_weights", before):
                self._store.save(
                    model,
                    route=route,
                    event=AuditEvent(
                        actor=actor,
                        action="set_weights",
                        model=model,
                        reason=reason,
                        before={"weights": before.weights() if before else {}},
                        after={"weights": route.weights()},
                        ts=self._clock(),
                    ),
                )
            self._routes[model] = route
            logger.info("model %s weights set to %s by %s: %s", model, clean, actor, reason)
            return route

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate_once(self) -> dict[str, Decision]:
        """Evaluate every rollout in "canary" or "awaiting_approval" once. A failing
        ``gather`` or apply is logged and skips that model only."""
        with self._lock:
            models = [m for m, s in self._states.items() if s.status in EVALUATED_STATUSES]
        decisions: dict[str, Decision] = {}
        for model in sorted(models):
            try:
                decision = self._evaluate(model)
            except Exception:
                logger.exception("evaluation of the rollout of model %s failed", model)
                continue
            if decision is not None:
                decisions[model] = decision
        return decisions

    def _evaluate(self, model: str) -> Decision | None:
        with self._lock:
            state = self._states.get(model)
            if state is None or state.status not in EVALUATED_STATUSES:
                return None  # changed by a manual action since the list was taken
            signals = self._gather(state)
            now = self._clock()
            d = decide(state, signals, state.policy, now)
            log = logger.info if d.action != "stay" else logger.debug
            log("rollout of %s: %s (%s)", model, d.action, d.reason)
            evaluation = Evaluation(
                time=now,
                verdict=d.verdict,
                action=d.action,
                reason=d.reason,
                values=d.values,
                consecutive_failures=d.consecutive_failures,
            )
            baseline = state.step_requests_at_start
            if baseline is None or d.step_index != state.step_index:
                baseline = signals.candidate_requests_total
            after = msgspec.structs.replace(
                state,
                consecutive_failures=d.consecutive_failures,
                last_evaluation=evaluation,
                step_requests_at_start=baseline,
            )
            if d.action == "stay":
                if d.consecutive_failures == state.consecutive_failures:
                    self._states[model] = after  # nothing durable changed: no write
                else:
                    action = "breach" if d.verdict == "fail" else "recovered"
                    self._commit(state, after, action, CONTROLLER_ACTOR, d.reason, d, apply=False)
                return d
            after = self._moved(after, d.status, d.candidate_weight, d.step_index)
            if d.step_index != state.step_index:
                after = msgspec.structs.replace(after, step_started_at=now)
            self._commit(state, after, d.action, CONTROLLER_ACTOR, d.reason, d)
            return d

    # -- the one apply path ------------------------------------------------------------------

    def _require(self, model: str, verb: str, allowed: frozenset[str] | set[str]) -> RolloutState:
        state = self._states.get(model)
        if state is None:
            raise ModelNotFoundError(f"model '{model}' has no rollout to {verb}")
        if state.status not in allowed:
            raise ConflictError(
                f"cannot {verb} the rollout of model '{model}': it is {state.status}"
            )
        return state

    @staticmethod
    def _moved(
        state: RolloutState,
        status: RolloutStatus,
        weight: float | None = None,
        step_index: int | None = None,
    ) -> RolloutState:
        """``state`` with a new status, weight and step; ``_commit`` records the transition."""
        return msgspec.structs.replace(
            state,
            status=status,
            candidate_weight=state.candidate_weight if weight is None else weight,
            step_index=state.step_index if step_index is None else step_index,
        )

    def _route(self, model: str, weights: Mapping[str, float]) -> Route:
        old = self._routes.get(model)
        variants = tuple(Variant(v, float(w)) for v, w in weights.items())
        return Route(model, variants, old.shadows if old else ())

    def _commit(
        self,
        before: RolloutState | None,
        after: RolloutState,
        action: str,
        actor: str,
        reason: str,
        decision: Decision | None = None,
        *,
        apply: bool = True,
    ) -> RolloutState:
        """Apply ``after``'s weights (the router validates them; a rollback must not wait on
        the disk), then write state, route and audit entry in one transaction, then alert.
        Caller holds the lock.

        If the apply raises, nothing changes. All-or-nothing: if the write raises, the
        router gets the previous weights back and memory is unchanged
        (``StoreUnavailableError``, 503). A rollback is the exception: it stays applied
        (it must work even on a full disk), memory follows the router, the failure is
        raised, and the next successful write catches up.
        """
        model, now = after.model, self._clock()
        if decision is not None:
            values: Measured = dict(decision.values)
        elif before is not None and before.last_evaluation is not None:
            values = dict(before.last_evaluation.values)  # context for a manual action
        else:
            values = {}
        moved = (
            before is None
            or before.status != after.status
            or before.candidate_weight != after.candidate_weight
        )
        if moved:
            transition = Transition(
                time=now,
                from_status=before.status if before else "",
                to_status=after.status,
                from_weight=before.candidate_weight if before else 0.0,
                to_weight=after.candidate_weight,
                action=action,
                actor=actor,
                reason=reason,
                values=values,
            )
            after = msgspec.structs.replace(
                after, history=(*after.history, transition)[-MAX_HISTORY:]
            )
        after = msgspec.structs.replace(after, updated_at=now)
        old_route = self._routes.get(model)
        route = old_route
        weight_changed = before is None or before.candidate_weight != after.candidate_weight
        # Resume re-applies unchanged weights: they may have been set by hand while paused.
        applied = False
        if apply and (weight_changed or action == "resume"):
            weights = after.weights()
            self._apply(model, weights)
            applied = True
            route = self._route(model, weights)
        details: dict[str, Any] = {
            "stable_version": after.stable_version,
            "candidate_version": after.candidate_version,
            "status": after.status,
            "step_index": after.step_index,
            "candidate_weight": after.candidate_weight,
            "consecutive_failures": after.consecutive_failures,
            "values": values,
        }
        if decision is not None:
            details.update(verdict=decision.verdict, breaches=list(decision.breaches))
        event = AuditEvent(
            actor=actor,
            action=action,
            model=model,
            reason=reason,
            before={
                "status": before.status if before else None,
                "weights": old_route.weights() if old_route else {},
            },
            after={"status": after.status, "weights": route.weights() if route else {}},
            details=details,
            ts=now,
        )
        if action == "rollback":
            self._states[model] = after
            if route is not None:
                self._routes[model] = route
            try:
                self._store.save(model, route=route, rollout=_encode(after), event=event)
            except Exception:
                logger.exception("rollout of %s: %s applied but not recorded", model, action)
                raise
        else:
            with self._recorded_or_undone(model, action, old_route if applied else None, applied):
                self._store.save(model, route=route, rollout=_encode(after), event=event)
            self._states[model] = after
            if route is not None:
                self._routes[model] = route
        if before is None or before.status != after.status:
            logger.info(
                "rollout of %s: %s -> %s by %s: %s",
                model,
                before.status if before else "none",
                after.status,
                actor,
                reason,
            )
        self._alert(before, after, actor, reason, values)
        return after

    @contextlib.contextmanager
    def _recorded_or_undone(
        self, model: str, action: str, previous: Route | None, undo: bool = True
    ) -> Iterator[None]:
        """A failed durable write of an applied change: the router gets ``previous`` back;
        a failure that is no ``GatewayError`` (full disk) becomes a 503."""
        try:
            yield
        except Exception as exc:
            if undo:
                try:
                    self._apply(model, previous.weights() if previous else {})
                except Exception:
                    logger.exception(
                        "%s of %s: restoring the previous weights failed", action, model
                    )
            logger.error("%s of %s not recorded, so not applied: %s", action, model, exc)
            if isinstance(exc, GatewayError):
                raise
            raise StoreUnavailableError(
                f"{action} of model '{model}' was not applied: the control store could not "
                f"record it ({type(exc).__name__}: {str(exc)[:200]}); the live state is "
                "unchanged"
            ) from exc

    def _alert(
        self,
        before: RolloutState | None,
        after: RolloutState,
        actor: str,
        reason: str,
        values: Measured,
    ) -> None:
        event = _ALERTED.get(after.status)
        if self._alerts is None or event is None or (before and before.status == after.status):
            return
        self._alerts.send(
            event,
            after.model,
            reason,
            values,
            {
                "actor": actor,
                "stable_version": after.stable_version,
                "candidate_version": after.candidate_version,
                "weights": after.weights(),
                "status": after.status,
            },
        )

    # -- restart and the background loop ------------------------------------------------------

    def restore(self) -> list[str]:
        """Re-apply every stored route (active rollouts included) after a restart. A model
        the router no longer serves is logged and skipped. Returns the models restored."""
        restored = []
        with self._lock:
            self._is_restored = True
            for model, route in sorted(self._routes.items()):
                try:
                    self._apply(model, route.weights())
                except GatewayError as exc:
                    logger.warning("route of model %s not restored: %s", model, exc)
                    continue
                restored.append(model)
                state = self._states.get(model)
                self._store.append_audit(
                    CONTROLLER_ACTOR,
                    "restore",
                    model,
                    "weights re-applied after restart",
                    after={"weights": route.weights(), "status": state.status if state else None},
                    ts=self._clock(),
                )
        if restored:
            logger.info("restored routes of %s", ", ".join(restored))
        return restored

    def start(self) -> None:
        """Restore stored routes (unless ``restore()`` ran already), then evaluate in the
        background every ``evaluation_interval_s`` (the smallest among active rollouts).
        Call on the running loop; evaluations run in the controller's own worker thread."""
        if self._task is not None:
            return
        if not self._is_restored:
            self.restore()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="rollout")
        self._stopping = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="rollout")
        self._task.add_done_callback(self._done)

    def _interval_s(self) -> float:
        intervals = [
            s.policy.evaluation_interval_s
            for s in dict(self._states).values()
            if s.status in EVALUATED_STATUSES
        ]
        return min(intervals, default=RolloutPolicy().evaluation_interval_s)

    async def _run(self) -> None:
        assert self._stopping is not None
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                await asyncio.wait_for(self._stopping.wait(), self._interval_s())
                return
            except TimeoutError:
                pass
            # Off the loop: a decision writes to the store (one fsync) and calls the router.
            await loop.run_in_executor(self._executor, self.evaluate_once)

    @staticmethod
    def _done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("rollout loop crashed", exc_info=task.exception())

    async def stop(self) -> None:
        """Stop the loop after the evaluation in progress, if any."""
        task, self._task = self._task, None
        if task is None:
            return
        assert self._stopping is not None
        self._stopping.set()
        try:
            await asyncio.wait_for(task, _STOP_TIMEOUT_S)
        except TimeoutError:
            logger.error("rollout loop did not stop within %.0f s", _STOP_TIMEOUT_S)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
