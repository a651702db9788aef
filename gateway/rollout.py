"""rollout.py: canary rollouts driven by live signals: signals -> decision -> route weights.

In: a ``Store`` (routes, rollout states, audit trail), a ``WeightApplier`` (the router's
``set_weights``), a ``SignalSource`` (traffic, drift and shadow numbers for one rollout) and an
optional ``AlertSink``. Out: weight changes, persisted states, audit entries and alerts.

The decision is the pure function ``decide(state, signals, policy, now)``, an explicit table
from status to rule; ``RolloutController`` only gathers signals, applies decisions and records
them. Manual actions (promote, rollback, pause, weights) go through the same apply path as
automatic ones, so the router, the store and the audit trail never disagree on who did what.
This module does not know HTTP, the router's internals or how drift is computed: it sees them
only through the callables above.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol, TypeAlias, get_args

import msgspec

from gateway.errors import ConflictError, GatewayError, InvalidInputError, ModelNotFoundError
from gateway.store import AuditEvent, Store
from gateway.types import Route, Variant

__all__ = [
    "RolloutStatus",
    "Action",
    "Verdict",
    "Measured",
    "ACTIVE_STATUSES",
    "CONTROLLER_ACTOR",
    "RolloutThresholds",
    "RolloutPolicy",
    "Signals",
    "Evaluation",
    "Transition",
    "RolloutState",
    "Decision",
    "decide",
    "WeightApplier",
    "SignalSource",
    "AlertSink",
    "RolloutController",
]

logger = logging.getLogger(__name__)

RolloutStatus: TypeAlias = Literal[
    "canary", "paused", "awaiting_approval", "promoted", "rolled_back"
]
Action: TypeAlias = Literal["stay", "advance", "await_approval", "promote", "rollback"]
Verdict: TypeAlias = Literal["pass", "fail", "insufficient", "not_evaluated"]
Measured: TypeAlias = dict[str, float | int | str | bool | None]

ACTIVE_STATUSES: Final[frozenset[str]] = frozenset({"canary", "paused", "awaiting_approval"})
_EVALUATED_STATUSES: Final[frozenset[str]] = frozenset({"canary", "awaiting_approval"})
CONTROLLER_ACTOR: Final = "controller"
FULL_WEIGHT: Final = 100.0  # weights are percentages of the model's traffic
MAX_HISTORY: Final = 200  # transitions kept in a state document; the audit trail keeps all
_MIN_P99_MS: Final = 1e-3  # floor for the stable p99 in the ratio: a 0 ms bucket is not "free"
_STOP_TIMEOUT_S: Final = 10.0  # one evaluation takes milliseconds; longer means it is stuck


class RolloutThresholds(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Limits a candidate must stay within; None means "not checked". A value above its
    limit is a breach (judged only with ``min_samples`` candidate samples)."""

    max_input_drift_psi: float | None = None
    """Worst PSI of the candidate's inputs against the reference profile; 0.25 is the usual
    "significant shift" mark. Off by default: input drift is not the candidate's fault."""
    max_input_drift_ks: float | None = None
    """Worst KS statistic of the candidate's numeric inputs against the reference."""
    max_prediction_drift_psi: float | None = None
    """PSI of the candidate's outputs against the stable version's over the same window."""
    max_error_rate: float | None = None
    """Candidate's share of failed requests (0..1)."""
    max_error_rate_delta: float | None = 0.02
    """Candidate error rate minus stable error rate; 0.02 is about 3 standard errors at
    200 samples and a 1% base rate, so noise alone rarely trips it three times running."""
    max_p99_latency_ratio: float | None = 2.0
    """Candidate p99 / stable p99; 2.0 leaves room for the histogram's 26% bucket width."""
    max_shadow_disagreement: float | None = None
    """Share of mirrored rows where the shadow's answer differed from the primary's (0..1)."""
    candidate_worse_pvalue: float | None = None
    """Roll back when the outcome test says the candidate is worse at this p-value or below."""
    promote_requires_not_worse: bool = False
    """Promotion waits until an outcome comparison exists and does not say "worse"."""


class RolloutPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a canary advances. Invalid values raise ``InvalidInputError`` naming the field."""

    steps: tuple[float, ...] = (5.0, 25.0, 50.0, 100.0)
    """Candidate weights (percent) in order; reaching 100 (or passing the last step) is
    promotion. Strictly increasing, each in (0, 100], the first below 100."""
    step_duration_s: float | None = 300.0
    """A step may advance after this long with passing analysis; 5 min collects a few
    thousand requests at modest traffic. None: advance by requests only."""
    step_requests: int | None = None
    """A step may advance after this many candidate requests (whichever comes first)."""
    require_approval: bool = False
    """Stop before 100% in "awaiting_approval" until someone approves."""
    evaluation_interval_s: float = 1.0
    """Seconds between evaluations; 1 s matches the drift aggregator's tick."""
    min_samples: int = 200
    """Candidate (and, for comparisons, stable) samples before any verdict; below it the
    rollout neither fails nor passes."""
    consecutive_failures: int = 3
    """Breaching evaluations in a row that trigger a rollback; 3 rides out one noisy window."""
    thresholds: RolloutThresholds = RolloutThresholds()

    def __post_init__(self) -> None:
        steps = self.steps
        if not steps:
            raise InvalidInputError("policy.steps must name at least one weight")
        if any(not 0 < s <= FULL_WEIGHT for s in steps):
            raise InvalidInputError("policy.steps: each weight must be in (0, 100]")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise InvalidInputError("policy.steps must be strictly increasing")
        if steps[0] >= FULL_WEIGHT:
            raise InvalidInputError("policy.steps: the first step must be below 100")
        if self.step_duration_s is None and self.step_requests is None:
            raise InvalidInputError("policy needs step_duration_s or step_requests (or both)")
        if self.step_duration_s is not None and self.step_duration_s < 0:
            raise InvalidInputError("policy.step_duration_s must be >= 0")
        if self.step_requests is not None and self.step_requests < 0:
            raise InvalidInputError("policy.step_requests must be >= 0")
        if not self.evaluation_interval_s > 0:
            raise InvalidInputError("policy.evaluation_interval_s must be > 0")
        if self.min_samples < 1:
            raise InvalidInputError("policy.min_samples must be >= 1")
        if self.consecutive_failures < 1:
            raise InvalidInputError("policy.consecutive_failures must be >= 1")


@dataclass(frozen=True, slots=True)
class Signals:
    """What the gateway measured for one rollout, gathered once per evaluation.

    ``*_samples`` count the requests behind the rates and latencies (the evaluation window);
    ``candidate_requests_total`` is cumulative (steps by request count diff it). Any value may
    be None when not measured; drift values count only when ``drift_sufficient``.
    """

    candidate_samples: int = 0
    stable_samples: int = 0
    candidate_requests_total: int = 0
    candidate_error_rate: float | None = None
    stable_error_rate: float | None = None
    candidate_p99_ms: float | None = None
    stable_p99_ms: float | None = None
    input_drift_psi: float | None = None
    input_drift_ks: float | None = None
    input_drift_feature: str | None = None
    prediction_drift_psi: float | None = None
    shadow_disagreement: float | None = None
    outcome_pvalue: float | None = None
    """One-sided p-value of "the candidate's outcome is worse" (from the feedback feature)."""
    outcome_worse: bool | None = None
    """The outcome comparison's direction: True when the candidate looks worse."""
    drift_sufficient: bool = False
    """The drift verdicts had enough rows; otherwise drift thresholds are not judged."""


class Evaluation(msgspec.Struct, frozen=True, kw_only=True):
    """The latest evaluation of a rollout, as shown by the admin API."""

    time: float
    verdict: Verdict
    action: Action
    reason: str
    values: Measured
    consecutive_failures: int


class Transition(msgspec.Struct, frozen=True, kw_only=True):
    """One change of status or weight, with who made it, why, and the numbers behind it."""

    time: float
    from_status: str = msgspec.field(name="from")
    to_status: str = msgspec.field(name="to")
    from_weight: float
    to_weight: float
    action: str
    actor: str
    reason: str
    values: Measured = {}


class RolloutState(msgspec.Struct, frozen=True, kw_only=True):
    """A rollout of ``candidate_version`` against ``stable_version`` of ``model``.

    After promotion the stable version stays recorded, so a rollback restores it.
    """

    model: str
    stable_version: str
    candidate_version: str
    status: RolloutStatus
    policy: RolloutPolicy
    step_index: int
    candidate_weight: float
    """Percent of the model's traffic the candidate receives now."""
    step_started_at: float
    step_requests_at_start: int | None = None
    """Candidate requests when the step began; None: taken at the next evaluation."""
    consecutive_failures: int = 0
    last_evaluation: Evaluation | None = None
    history: tuple[Transition, ...] = ()
    created_at: float
    updated_at: float
    actor: str
    reason: str

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    def weights(self, candidate_weight: float | None = None) -> dict[str, float]:
        """Route weights (percent) by version for ``candidate_weight`` (default: current)."""
        w = self.candidate_weight if candidate_weight is None else candidate_weight
        return {self.stable_version: FULL_WEIGHT - w, self.candidate_version: w}


@dataclass(frozen=True, slots=True)
class Decision:
    """What ``decide`` concluded: the next status, step and weights, and why."""

    action: Action
    status: RolloutStatus
    step_index: int
    candidate_weight: float
    weights: dict[str, float]
    verdict: Verdict
    reason: str
    consecutive_failures: int
    values: Measured = field(default_factory=dict)
    breaches: tuple[str, ...] = ()


# -- the pure decision ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Analysis:
    verdict: Verdict
    breaches: tuple[str, ...]
    missing: tuple[str, ...]
    values: Measured


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def _measured(s: Signals) -> Measured:
    delta = None
    if s.candidate_error_rate is not None and s.stable_error_rate is not None:
        delta = s.candidate_error_rate - s.stable_error_rate
    ratio = None
    if s.candidate_p99_ms is not None and s.stable_p99_ms is not None:
        ratio = s.candidate_p99_ms / max(s.stable_p99_ms, _MIN_P99_MS)
    return {
        "candidate_samples": s.candidate_samples,
        "stable_samples": s.stable_samples,
        "candidate_requests_total": s.candidate_requests_total,
        "candidate_error_rate": s.candidate_error_rate,
        "stable_error_rate": s.stable_error_rate,
        "error_rate_delta": delta,
        "candidate_p99_ms": s.candidate_p99_ms,
        "stable_p99_ms": s.stable_p99_ms,
        "p99_latency_ratio": ratio,
        "input_drift_psi": s.input_drift_psi,
        "input_drift_ks": s.input_drift_ks,
        "input_drift_feature": s.input_drift_feature,
        "prediction_drift_psi": s.prediction_drift_psi,
        "shadow_disagreement": s.shadow_disagreement,
        "outcome_pvalue": s.outcome_pvalue,
        "outcome_worse": s.outcome_worse,
        "drift_sufficient": s.drift_sufficient,
    }


def _analyse(s: Signals, policy: RolloutPolicy) -> _Analysis:
    """Judge every configured threshold: "fail" on any breach, else "insufficient" when a
    configured check lacked data, else "pass". Below ``min_samples``: "insufficient"."""
    values = _measured(s)
    n_min = policy.min_samples
    if s.candidate_samples < n_min:
        why = f"candidate has {s.candidate_samples}/{n_min} samples"
        return _Analysis("insufficient", (), (why,), values)
    t = policy.thresholds
    stable_why = f"stable has {s.stable_samples}/{n_min} samples"
    stable_ok = s.stable_samples >= n_min
    drift_why = "drift statistics lack data"

    def num(key: str, usable: bool = True) -> float | None:
        value = values[key]
        return _finite(float(value)) if usable and isinstance(value, int | float) else None

    checks: tuple[tuple[str, float | None, float | None, str], ...] = (
        ("candidate_error_rate", num("candidate_error_rate"), t.max_error_rate, "no requests"),
        (
            "error_rate_delta",
            num("error_rate_delta", stable_ok),
            t.max_error_rate_delta,
            stable_why,
        ),
        (
            "p99_latency_ratio",
            num("p99_latency_ratio", stable_ok),
            t.max_p99_latency_ratio,
            stable_why if not stable_ok else "no latency observed",
        ),
        (
            "input_drift_psi",
            num("input_drift_psi", s.drift_sufficient),
            t.max_input_drift_psi,
            drift_why,
        ),
        (
            "input_drift_ks",
            num("input_drift_ks", s.drift_sufficient),
            t.max_input_drift_ks,
            drift_why,
        ),
        (
            "prediction_drift_psi",
            num("prediction_drift_psi", s.drift_sufficient),
            t.max_prediction_drift_psi,
            drift_why,
        ),
        (
            "shadow_disagreement",
            num("shadow_disagreement"),
            t.max_shadow_disagreement,
            "no shadow comparisons",
        ),
    )
    breaches: list[str] = []
    missing: list[str] = []
    for name, value, limit, why in checks:
        if limit is None:
            continue
        if value is None:
            missing.append(f"{name}: {why}")
        elif value > limit:
            where = ""
            if name.startswith("input_drift") and s.input_drift_feature:
                where = f" (feature {s.input_drift_feature})"
            breaches.append(f"{name} {value:.4g} > {limit:.4g}{where}")
    level = t.candidate_worse_pvalue
    p = _finite(s.outcome_pvalue)
    if level is not None and p is not None and s.outcome_worse and p <= level:
        breaches.append(f"outcome worse: p={p:.3g} <= {level:.3g}")
    if breaches:
        return _Analysis("fail", tuple(breaches), tuple(missing), values)
    if missing:
        return _Analysis("insufficient", (), tuple(missing), values)
    return _Analysis("pass", (), (), values)


def _decision(
    state: RolloutState,
    action: Action,
    reason: str,
    *,
    status: RolloutStatus | None = None,
    step_index: int | None = None,
    weight: float | None = None,
    analysis: _Analysis | None = None,
    failures: int | None = None,
) -> Decision:
    w = state.candidate_weight if weight is None else weight
    return Decision(
        action=action,
        status=state.status if status is None else status,
        step_index=state.step_index if step_index is None else step_index,
        candidate_weight=w,
        weights=state.weights(w),
        verdict="not_evaluated" if analysis is None else analysis.verdict,
        reason=reason,
        consecutive_failures=state.consecutive_failures if failures is None else failures,
        values={} if analysis is None else analysis.values,
        breaches=() if analysis is None else analysis.breaches,
    )


def _judge_breaches(state: RolloutState, policy: RolloutPolicy, a: _Analysis) -> Decision | None:
    """The shared part of every evaluated status: insufficient data holds, a breach counts
    towards rollback. Returns None when the analysis passed (the caller decides)."""
    if a.verdict == "insufficient":
        return _decision(state, "stay", "insufficient data: " + "; ".join(a.missing), analysis=a)
    if a.verdict == "fail":
        failures = state.consecutive_failures + 1
        needed = policy.consecutive_failures
        breach = "; ".join(a.breaches)
        if failures >= needed:
            return _decision(
                state,
                "rollback",
                f"rolled back after {failures}/{needed} failing evaluations: {breach}",
                status="rolled_back",
                weight=0.0,
                analysis=a,
                failures=failures,
            )
        return _decision(
            state, "stay", f"breach {failures}/{needed}: {breach}", analysis=a, failures=failures
        )
    return None


def _from_canary(state: RolloutState, s: Signals, policy: RolloutPolicy, now: float) -> Decision:
    a = _analyse(s, policy)
    held = _judge_breaches(state, policy, a)
    if held is not None:
        return held
    i, steps = state.step_index, policy.steps
    elapsed_s = now - state.step_started_at
    baseline = state.step_requests_at_start
    requests = 0 if baseline is None else s.candidate_requests_total - baseline
    by_time = policy.step_duration_s is not None and elapsed_s >= policy.step_duration_s
    by_requests = policy.step_requests is not None and requests >= policy.step_requests
    where = f"step {i + 1}/{len(steps)} at {state.candidate_weight:g}%"
    if not (by_time or by_requests):
        return _decision(
            state,
            "stay",
            f"analysis passed; {where} for {elapsed_s:.0f} s and {requests} requests",
            analysis=a,
            failures=0,
        )
    trigger = f"{elapsed_s:.0f} s" if by_time else f"{requests} requests"
    next_weight = steps[i + 1] if i + 1 < len(steps) else FULL_WEIGHT
    if next_weight < FULL_WEIGHT:
        return _decision(
            state,
            "advance",
            f"analysis passed after {trigger} at {state.candidate_weight:g}%; "
            f"advancing to {next_weight:g}%",
            step_index=i + 1,
            weight=next_weight,
            analysis=a,
            failures=0,
        )
    if policy.thresholds.promote_requires_not_worse and (
        s.outcome_pvalue is None or s.outcome_worse is not False
    ):
        return _decision(
            state,
            "stay",
            f"analysis passed; {where}; promotion waits for an outcome comparison that is "
            "not worse",
            analysis=a,
            failures=0,
        )
    if policy.require_approval:
        return _decision(
            state,
            "await_approval",
            f"analysis passed after {trigger} at {state.candidate_weight:g}%; "
            "promotion to 100% awaits approval",
            status="awaiting_approval",
            analysis=a,
            failures=0,
        )
    return _decision(
        state,
        "promote",
        f"analysis passed after {trigger} at {state.candidate_weight:g}%; promoted to 100%",
        status="promoted",
        step_index=len(steps),
        weight=FULL_WEIGHT,
        analysis=a,
        failures=0,
    )


def _from_awaiting_approval(
    state: RolloutState, s: Signals, policy: RolloutPolicy, now: float
) -> Decision:
    # The candidate still serves its last step's share while a person decides, possibly for
    # hours, so breaches keep counting towards rollback; only promotion needs the person.
    a = _analyse(s, policy)
    held = _judge_breaches(state, policy, a)
    if held is not None:
        return held
    return _decision(state, "stay", "analysis passed; awaiting approval", analysis=a, failures=0)


def _hold(why: str) -> Callable[[RolloutState, Signals, RolloutPolicy, float], Decision]:
    def rule(state: RolloutState, s: Signals, policy: RolloutPolicy, now: float) -> Decision:
        return _decision(state, "stay", why)

    return rule


_Rule: TypeAlias = Callable[[RolloutState, Signals, RolloutPolicy, float], Decision]

# The transition table: each status has exactly one rule.
#   canary            -> advance | await_approval | promote | rollback | stay
#   awaiting_approval -> rollback | stay        (promotion only through approve/promote)
#   paused            -> stay                   (resume through the API)
#   promoted          -> stay                   (rollback through the API)
#   rolled_back       -> stay                   (terminal)
_TABLE: Final[Mapping[str, _Rule]] = {
    "canary": _from_canary,
    "awaiting_approval": _from_awaiting_approval,
    "paused": _hold("paused: not evaluated until resumed"),
    "promoted": _hold("promoted: the rollout is finished"),
    "rolled_back": _hold("rolled back: the rollout is finished"),
}
assert set(_TABLE) == set(get_args(RolloutStatus)), "every status needs exactly one rule"


def decide(state: RolloutState, signals: Signals, policy: RolloutPolicy, now: float) -> Decision:
    """The next step for ``state`` given ``signals`` at unix time ``now``. Pure: no I/O,
    no clock, no mutation. A breach needs ``min_samples``; ``policy.consecutive_failures``
    breaches in a row roll back; a passing evaluation resets the count."""
    return _TABLE[state.status](state, signals, policy, now)


# -- the controller -----------------------------------------------------------------------

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
            if state is not None and state.status in _EVALUATED_STATUSES:
                raise ConflictError(
                    f"model '{model}' has a running rollout ({state.status}); pause it, "
                    "promote it or roll it back before setting weights"
                )
            before = self._routes.get(model)
            self._apply(model, dict(clean))
            route = self._route(model, clean)
            self._routes[model] = route
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
            logger.info("model %s weights set to %s by %s: %s", model, clean, actor, reason)
            return route

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate_once(self) -> dict[str, Decision]:
        """Evaluate every rollout in "canary" or "awaiting_approval" once. A failing
        ``gather`` or apply is logged and skips that model only."""
        with self._lock:
            models = [m for m, s in self._states.items() if s.status in _EVALUATED_STATUSES]
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
            if state is None or state.status not in _EVALUATED_STATUSES:
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
        """Apply ``after``'s weights (first: a rollback must not wait on the disk), then write
        state, route and audit entry in one transaction, then alert. Caller holds the lock.

        If the apply raises, nothing changes. If the write raises after the apply, memory
        follows the router (what serves traffic) and the next successful write catches up.
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
            weights = after.weights()
            self._apply(model, weights)
            route = self._route(model, weights)
            self._routes[model] = route
        self._states[model] = after
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
        try:
            self._store.save(model, route=route, rollout=_encode(after), event=event)
        except Exception:
            logger.exception("rollout of %s: %s applied but not recorded", model, action)
            raise
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
            if s.status in _EVALUATED_STATUSES
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
