"""rollout/controller.py: runs every active rollout: signals -> decision -> route weights.

In: a ``Store`` (routes, rollout states, audit trail), a ``WeightApplier`` (the router's
``set_weights``), a ``SignalSource`` (traffic, drift and shadow numbers for one rollout) and an
optional ``AlertSink``. Out: weight changes, persisted states, audit entries and alerts.

Every change that sends traffic somewhere (start, weights, promote) is first checked against
what is loaded (``VersionCheck``: unknown or not-ready versions are an ``InvalidInputError``
naming them); rollback is never checked, it must always work. Each rollout gets a unique id;
its signal windows begin when it starts and when each step begins (``WindowStart``). The loop
evaluates every ``evaluation_interval_s`` and, between ticks, as soon as a rollout's candidate
fails or is slow (``Activity``, polled by ``loop.EvaluationLoop`` every 50 ms), so a failing
candidate is judged within a fraction of a second; a new rollout is evaluated at once.

The controller only gathers signals, applies what ``decide`` concludes and records it. Manual
actions (promote, rollback, pause, weights) go through the same apply path as automatic ones,
so the router, the store and the audit trail never disagree on who did what. It sees HTTP, the
router and drift only through the callables above (``ports``). With a ``LeaseSource`` (a fleet
sharing one store) only the lease holder evaluates, and every write goes through
``SharedState`` (``shared.py``): version-checked, fenced, undone if the store refuses;
``observe`` adopts what other replicas committed.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import msgspec

from gateway.errors import (
    ConflictError,
    GatewayError,
    InvalidInputError,
    ModelNotFoundError,
)
from gateway.rollout.decide import decide
from gateway.rollout.loop import ActivityWatch, EvaluationLoop
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
    Transition,
)
from gateway.rollout.ports import (
    Activity,
    AlertSink,
    SignalSource,
    VersionCheck,
    WeightApplier,
    WindowStart,
)
from gateway.rollout.routes import not_ready, repaired_weights
from gateway.rollout.routes import table as routes_table
from gateway.rollout.shared import LeaseSource, SharedState, retried
from gateway.store import AuditEvent, ModelState, Store
from gateway.types import Route, Variant

__all__ = ["RolloutController"]  # its ports (callables it is given) live in ``ports``

logger = logging.getLogger(__name__)

MAX_HISTORY: Final = 200  # transitions kept in a state document; the audit trail keeps all

_ALERTED: Final[Mapping[str, str]] = {
    "rolled_back": "rollout.rolled_back",
    "paused": "rollout.paused",
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
        *,
        check_versions: VersionCheck | None = None,
        begin_window: WindowStart | None = None,
        activity: Activity | None = None,
        config_routes: Mapping[str, Route] | None = None,
        lease: LeaseSource | None = None,
    ) -> None:
        self._store = store
        self._lease = lease
        self._shared = SharedState(store, apply_weights, lease)
        self._apply = apply_weights
        self._gather = gather
        self._alerts = alerts
        self._clock = clock
        self._check_versions = check_versions
        self._begin_window = begin_window
        self._config_routes = dict(config_routes or {})
        self._missing: dict[str, list[str]] = {}  # model -> route versions not ready at start
        self._lock = threading.RLock()
        # The local copy of the shared state, owned by ``SharedState`` (the write path).
        self._states: dict[str, RolloutState] = self._shared.states
        self._routes: dict[str, Route] = self._shared.routes
        self._is_restored = False
        news = ActivityWatch(activity, self._evaluated) if activity is not None else None
        watching = news.watching if news is not None else None
        self._loop_runner = EvaluationLoop(self.evaluate_once, self._interval_s, news, watching)

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

    def route_table(self) -> dict[str, dict[str, Any]]:
        """Every route, stored (API) and config, with its source (``rollout.routes``)."""
        return routes_table(dict(self._routes), self._config_routes, dict(self._missing))

    def missing_versions(self) -> dict[str, list[str]]:
        """Model -> versions its route names that were not loaded and ready at start."""
        return {m: list(v) for m, v in self._missing.items() if v}

    def _repair(self, model: str, route: Route) -> dict[str, float] | None:
        """The weights to apply for ``route`` at start: unchanged, or with the share of
        versions that are not ready moved to the stable one (recorded in ``_missing``)."""
        missing = self._missing[model] = not_ready(route, self._check)
        state = self._states.get(model)
        stable = state.stable_version if state else None
        return repaired_weights(route, missing, stable) if missing else route.weights()

    # -- manual actions -----------------------------------------------------------------------

    @retried
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
        self._check(model, [stable, candidate])
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
                rollout_id=uuid.uuid4().hex,
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
            state = self._commit(
                None, state, "start", actor, reason or f"canary of {candidate} at {first:g}%"
            )
            self._window(state)
        self.wake()  # the first evaluation runs at once, not at the next tick
        return state

    @retried
    def pause(self, model: str, actor: str, reason: str = "") -> RolloutState:
        """Hold the current weights and stop evaluating (only from "canary")."""
        with self._lock:
            state = self._require(model, "pause", {"canary"})
            return self._commit(state, self._moved(state, "paused"), "pause", actor, reason)

    @retried
    def resume(self, model: str, actor: str, reason: str = "") -> RolloutState:
        """Back to "canary" at the current step; the step's clock and request count restart
        and its weights are applied again (they may have been set by hand while paused)."""
        with self._lock:
            state = self._require(model, "resume", {"paused"})
            now = self._clock()
            after = msgspec.structs.replace(
                self._moved(state, "canary"), step_started_at=now, step_requests_at_start=None
            )
            after = self._commit(state, after, "resume", actor, reason)
            self._window(after)
            return after

    @retried
    def promote(self, model: str, actor: str, reason: str = "") -> RolloutState:
        """Send all traffic to the candidate now, skipping remaining steps and approval."""
        with self._lock:
            state = self._require(model, "promote", {"canary", "paused", "awaiting_approval"})
            self._check(model, [state.candidate_version])
            after = self._moved(state, "promoted", FULL_WEIGHT, len(state.policy.steps))
            return self._commit(state, after, "promote", actor, reason)

    @retried
    def approve(self, model: str, actor: str, reason: str = "") -> RolloutState:
        """Promote a rollout that waits at the approval gate (only from "awaiting_approval")."""
        with self._lock:
            state = self._require(model, "approve", {"awaiting_approval"})
            after = self._moved(state, "promoted", FULL_WEIGHT, len(state.policy.steps))
            return self._commit(state, after, "approve", actor, reason)

    @retried
    def rollback(self, model: str, actor: str, reason: str = "") -> RolloutState:
        """All traffic back to the stable version at once; after promotion this restores
        the previous stable version."""
        with self._lock:
            state = self._require(model, "roll back", ACTIVE_STATUSES | {"promoted"})
            after = self._moved(state, "rolled_back", 0.0)
            return self._commit(state, after, "rollback", actor, reason)

    @retried
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
        self._check(model, [v for v, w in clean.items() if w > 0])
        with self._lock:
            state = self._states.get(model)
            if state is not None and state.status in EVALUATED_STATUSES:
                raise ConflictError(
                    f"model '{model}' has a running rollout ({state.status}); pause it, "
                    "promote it or roll it back before setting weights"
                )
            before = self._routes.get(model)
            route = self._route(model, clean)
            self._shared.write(
                model,
                route,
                None,
                state,
                before,
                AuditEvent(
                    actor=actor,
                    action="set_weights",
                    model=model,
                    reason=reason,
                    before={"weights": before.weights() if before else {}},
                    after={"weights": route.weights()},
                    ts=self._clock(),
                ),
            )
            logger.info("model %s weights set to %s by %s: %s", model, clean, actor, reason)
            return route

    def _check(self, model: str, versions: Sequence[str]) -> None:
        if self._check_versions is not None:
            self._check_versions(model, versions)

    def _window(self, state: RolloutState) -> None:
        """Start the rollout's signal windows now (``WindowStart`` must not raise)."""
        if self._begin_window is not None and state.status in EVALUATED_STATUSES:
            self._begin_window(state)

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate_once(self) -> dict[str, Decision]:
        """Evaluate every rollout in "canary" or "awaiting_approval" once. A failing
        ``gather`` or apply is logged and skips that model only. Only the lease holder
        evaluates (with a ``lease`` source): elsewhere this returns {} at once."""
        if self._lease is not None and self._lease() is None:
            return {}
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
            after = self._commit(state, after, d.action, CONTROLLER_ACTOR, d.reason, d)
            self._window(after)
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

    def observe(self, state: ModelState) -> bool:
        """Adopt a model's state committed by another replica (from the change log): its
        route goes to the router, its rollout document is held; nothing is written. A
        version not newer than the one held is ignored. True if anything was adopted."""
        with self._lock:
            return self._shared.adopt(state)

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
        """Apply ``after``'s weights (first: a rollback must not wait on the disk), then write
        state, route and audit entry in one transaction (``_write``), then alert. Caller
        holds the lock. If the apply or the write raises, nothing changes (it is undone).
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
        if apply and (weight_changed or action == "resume"):
            route = self._route(model, after.weights())
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
        self._shared.write(
            model, route if route is not old_route else None, after, before, old_route, event
        )
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
        """Re-apply every stored route (active rollouts included) after a restart, and
        repair stored or config routes that name a version not loaded and ready: its share
        goes to the stable version, loudly (``routes.repaired_weights``). A model the router
        no longer serves is logged and skipped. Returns the models restored."""
        restored = []
        with self._lock:
            self._is_restored = True
            routes = {**self._config_routes, **self._routes}
            for model, route in sorted(routes.items()):
                weights, note = self._repair(model, route), "weights re-applied after restart"
                if self._missing.get(model):
                    note = f"version {', '.join(self._missing[model])} not loaded: share to stable"
                if model not in self._routes and not self._missing.get(model):
                    continue  # a config route the app installed as it is
                if model in self._routes and model in self._config_routes:
                    logger.warning(
                        "model %s: the route set through the API overrides the config file's %s",
                        model,
                        self._config_routes[model].weights(),
                    )
                try:
                    if weights is not None:
                        self._apply(model, weights)
                except GatewayError as exc:
                    logger.warning("route of model %s not restored: %s", model, exc)
                    continue
                restored.append(model)
                state = self._states.get(model)
                self._store.append_audit(
                    CONTROLLER_ACTOR,
                    "restore",
                    model,
                    note,
                    after={"weights": weights or {}, "status": state.status if state else None},
                    ts=self._clock(),
                )
        if restored:
            logger.info("restored routes of %s", ", ".join(restored))
        return restored

    def start(self) -> None:
        """Restore stored routes (unless ``restore()`` ran already), then evaluate in the
        background every ``evaluation_interval_s`` (the smallest among active rollouts) and
        whenever a candidate fails or is slow. Call on the running loop; evaluations run in
        the loop's own worker thread."""
        if self._loop_runner.is_running:
            return
        if not self._is_restored:
            self.restore()
        self._loop_runner.start()

    def _evaluated(self) -> list[RolloutState]:
        return [s for s in dict(self._states).values() if s.status in EVALUATED_STATUSES]

    def _interval_s(self) -> float:
        intervals = [
            s.policy.evaluation_interval_s
            for s in dict(self._states).values()
            if s.status in EVALUATED_STATUSES
        ]
        return min(intervals, default=RolloutPolicy().evaluation_interval_s)

    def wake(self) -> None:
        """Evaluate soon instead of at the next tick; from any thread."""
        self._loop_runner.wake()

    async def stop(self) -> None:
        """Stop the loop after the evaluation in progress, if any."""
        await self._loop_runner.stop()
