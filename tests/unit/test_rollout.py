"""Rollout decisions (the pure table) and the controller with a fake clock, a fake signal
source and a recording weight applier, over a real SqliteStore."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import msgspec
import pytest

from gateway.errors import ConflictError, InvalidInputError, ModelNotFoundError
from gateway.rollout import (
    RolloutController,
    RolloutPolicy,
    RolloutState,
    RolloutThresholds,
    Signals,
    decide,
)
from gateway.store import SqliteStore

T0 = 1_700_000_000.0

GOOD = Signals(
    candidate_samples=500,
    stable_samples=5000,
    candidate_requests_total=500,
    candidate_error_rate=0.001,
    stable_error_rate=0.001,
    candidate_p99_ms=10.0,
    stable_p99_ms=10.0,
    input_drift_psi=0.01,
    input_drift_ks=0.02,
    input_drift_feature="f3",
    prediction_drift_psi=0.01,
    shadow_disagreement=0.0,
    drift_sufficient=True,
)


NO_LIMITS: dict[str, object] = {
    name: None for name in RolloutThresholds.__struct_fields__ if name.startswith(("max_", "cand"))
}


def _only(**limits: object) -> dict[str, object]:
    """Thresholds with every limit off except ``limits`` (the defaults check two)."""
    return {**NO_LIMITS, **limits}


def _policy(**kw: object) -> RolloutPolicy:
    base: dict[str, object] = {"steps": [5, 25, 50, 100], "step_duration_s": 60.0}
    base.update(kw)
    return msgspec.convert(base, RolloutPolicy)


def _state(policy: RolloutPolicy, **kw: object) -> RolloutState:
    fields: dict[str, object] = {
        "model": "m",
        "stable_version": "1",
        "candidate_version": "2",
        "status": "canary",
        "policy": policy,
        "step_index": 0,
        "candidate_weight": policy.steps[0],
        "step_started_at": T0,
        "step_requests_at_start": 0,
        "created_at": T0,
        "updated_at": T0,
        "actor": "alice",
        "reason": "test",
    }
    fields.update(kw)
    return RolloutState(**fields)  # type: ignore[arg-type]  # test factory over kwargs


# -- decide(): the transition table ---------------------------------------------------------


def test_canary_stays_while_the_step_is_young() -> None:
    policy = _policy()
    d = decide(_state(policy), GOOD, policy, T0 + 30)
    assert (d.action, d.status, d.verdict) == ("stay", "canary", "pass")
    assert d.weights == {"1": 95.0, "2": 5.0}


def test_canary_advances_by_time() -> None:
    policy = _policy()
    d = decide(_state(policy), GOOD, policy, T0 + 60)
    assert (d.action, d.status, d.step_index) == ("advance", "canary", 1)
    assert d.weights == {"1": 75.0, "2": 25.0}
    assert "advancing to 25%" in d.reason


def test_canary_advances_by_requests() -> None:
    policy = _policy(step_duration_s=None, step_requests=1000)
    state = _state(policy, step_requests_at_start=100)
    few = dataclasses.replace(GOOD, candidate_requests_total=1099)
    assert decide(state, few, policy, T0 + 1).action == "stay"
    enough = dataclasses.replace(GOOD, candidate_requests_total=1100)
    d = decide(state, enough, policy, T0 + 1)
    assert (d.action, d.candidate_weight) == ("advance", 25.0)


def test_either_condition_advances() -> None:
    policy = _policy(step_duration_s=3600.0, step_requests=100)
    d = decide(_state(policy), dataclasses.replace(GOOD, candidate_requests_total=100), policy, T0)
    assert d.action == "advance"


def test_unknown_baseline_counts_no_requests() -> None:
    policy = _policy(step_duration_s=None, step_requests=10)
    d = decide(_state(policy, step_requests_at_start=None), GOOD, policy, T0)
    assert d.action == "stay"


def test_last_step_promotes_without_approval() -> None:
    policy = _policy()
    state = _state(policy, step_index=2, candidate_weight=50.0)
    d = decide(state, GOOD, policy, T0 + 60)
    assert (d.action, d.status) == ("promote", "promoted")
    assert d.weights == {"1": 0.0, "2": 100.0}


def test_steps_not_ending_at_100_promote_after_the_last() -> None:
    policy = _policy(steps=[10, 50])
    state = _state(policy, step_index=1, candidate_weight=50.0)
    assert decide(state, GOOD, policy, T0 + 60).action == "promote"


def test_approval_gate_holds_before_100() -> None:
    policy = _policy(require_approval=True)
    state = _state(policy, step_index=2, candidate_weight=50.0)
    d = decide(state, GOOD, policy, T0 + 60)
    assert (d.action, d.status) == ("await_approval", "awaiting_approval")
    assert d.weights == {"1": 50.0, "2": 50.0}
    waiting = _state(policy, status="awaiting_approval", step_index=2, candidate_weight=50.0)
    d = decide(waiting, GOOD, policy, T0 + 9999)
    assert (d.action, d.status) == ("stay", "awaiting_approval")


def test_awaiting_approval_still_rolls_back_on_breaches() -> None:
    policy = _policy(require_approval=True, consecutive_failures=1)
    waiting = _state(policy, status="awaiting_approval", step_index=2, candidate_weight=50.0)
    bad = dataclasses.replace(GOOD, candidate_error_rate=0.5)
    d = decide(waiting, bad, policy, T0)
    assert (d.action, d.status, d.candidate_weight) == ("rollback", "rolled_back", 0.0)


@pytest.mark.parametrize("status", ["paused", "promoted", "rolled_back"])
def test_paused_and_terminal_states_stay(status: str) -> None:
    policy = _policy(consecutive_failures=1)
    state = _state(policy, status=status, candidate_weight=50.0)
    worst = dataclasses.replace(GOOD, candidate_error_rate=1.0)
    d = decide(state, worst, policy, T0 + 10**6)
    assert (d.action, d.status, d.candidate_weight) == ("stay", status, 50.0)
    assert d.verdict == "not_evaluated"


BREACHES: list[tuple[str, dict[str, object], dict[str, object]]] = [
    ("max_error_rate", {"max_error_rate": 0.05}, {"candidate_error_rate": 0.06}),
    (
        "max_error_rate_delta",
        {"max_error_rate_delta": 0.01},
        {"candidate_error_rate": 0.03, "stable_error_rate": 0.01},
    ),
    (
        "max_p99_latency_ratio",
        {"max_p99_latency_ratio": 1.5},
        {"candidate_p99_ms": 16.0, "stable_p99_ms": 10.0},
    ),
    ("max_input_drift_psi", {"max_input_drift_psi": 0.2}, {"input_drift_psi": 0.3}),
    ("max_input_drift_ks", {"max_input_drift_ks": 0.1}, {"input_drift_ks": 0.15}),
    ("max_prediction_drift_psi", {"max_prediction_drift_psi": 0.1}, {"prediction_drift_psi": 0.2}),
    ("max_shadow_disagreement", {"max_shadow_disagreement": 0.02}, {"shadow_disagreement": 0.05}),
    (
        "candidate_worse_pvalue",
        {"candidate_worse_pvalue": 0.01},
        {"outcome_pvalue": 0.001, "outcome_worse": True},
    ),
]


@pytest.mark.parametrize(("name", "limits", "signals"), BREACHES, ids=[b[0] for b in BREACHES])
def test_each_threshold_breaches(
    name: str, limits: dict[str, object], signals: dict[str, object]
) -> None:
    policy = _policy(thresholds=_only(**limits), consecutive_failures=2)
    state = _state(policy)
    bad = dataclasses.replace(GOOD, **signals)  # type: ignore[arg-type]  # field overrides
    first = decide(state, bad, policy, T0 + 60)
    assert (first.action, first.verdict, first.consecutive_failures) == ("stay", "fail", 1)
    assert "breach 1/2" in first.reason
    second = decide(_state(policy, consecutive_failures=1), bad, policy, T0 + 60)
    assert (second.action, second.status) == ("rollback", "rolled_back")
    assert second.weights == {"1": 100.0, "2": 0.0}
    assert second.breaches
    # The same signals pass when that threshold is off.
    off = _policy(thresholds=NO_LIMITS, consecutive_failures=2)
    assert decide(_state(off), bad, off, T0 + 60).verdict == "pass"


def test_breach_reason_names_the_drifting_feature() -> None:
    policy = _policy(thresholds={"max_input_drift_psi": 0.2})
    d = decide(_state(policy), dataclasses.replace(GOOD, input_drift_psi=0.5), policy, T0)
    assert "input_drift_psi 0.5 > 0.2 (feature f3)" in d.reason
    assert d.values["input_drift_psi"] == 0.5
    assert d.values["input_drift_feature"] == "f3"


def test_below_min_samples_is_insufficient_never_fail() -> None:
    policy = _policy(min_samples=200, consecutive_failures=1, decision_deadline_s=None)
    awful = dataclasses.replace(GOOD, candidate_samples=199, candidate_error_rate=1.0)
    d = decide(_state(policy), awful, policy, T0 + 10**6)
    assert (d.action, d.verdict, d.consecutive_failures) == ("stay", "insufficient", 0)
    assert "199/200" in d.reason


def test_insufficient_stable_samples_hold_comparisons() -> None:
    policy = _policy(min_samples=200)
    few_stable = dataclasses.replace(GOOD, stable_samples=10, candidate_error_rate=0.5)
    d = decide(_state(policy), few_stable, policy, T0 + 60)
    # error_rate_delta (a default threshold) cannot be judged, so no pass and no advance.
    assert (d.action, d.verdict) == ("stay", "insufficient")


def test_drift_without_enough_data_is_not_judged() -> None:
    policy = _policy(thresholds={"max_input_drift_psi": 0.2})
    noisy = dataclasses.replace(GOOD, input_drift_psi=9.0, drift_sufficient=False)
    d = decide(_state(policy), noisy, policy, T0 + 60)
    assert (d.action, d.verdict) == ("stay", "insufficient")


def test_nan_is_missing_not_passing() -> None:
    policy = _policy(thresholds={"max_error_rate": 0.1})
    d = decide(
        _state(policy), dataclasses.replace(GOOD, candidate_error_rate=float("nan")), policy, T0
    )
    assert d.verdict == "insufficient"


def test_a_pass_resets_consecutive_failures() -> None:
    policy = _policy()
    d = decide(_state(policy, consecutive_failures=2), GOOD, policy, T0 + 1)
    assert (d.verdict, d.consecutive_failures) == ("pass", 0)


def test_insufficient_keeps_consecutive_failures() -> None:
    policy = _policy()
    few = dataclasses.replace(GOOD, candidate_samples=1)
    assert decide(_state(policy, consecutive_failures=2), few, policy, T0).consecutive_failures == 2


def test_promotion_can_require_a_not_worse_outcome() -> None:
    policy = _policy(thresholds={"promote_requires_not_worse": True})
    state = _state(policy, step_index=2, candidate_weight=50.0)
    assert decide(state, GOOD, policy, T0 + 60).action == "stay"
    worse = dataclasses.replace(GOOD, outcome_pvalue=0.3, outcome_worse=True)
    assert decide(state, worse, policy, T0 + 60).action == "stay"
    fine = dataclasses.replace(GOOD, outcome_pvalue=0.4, outcome_worse=False)
    assert decide(state, fine, policy, T0 + 60).action == "promote"
    # Advancing between earlier steps does not wait for outcomes.
    assert decide(_state(policy), GOOD, policy, T0 + 60).action == "advance"


def test_decide_is_pure() -> None:
    policy = _policy()
    state = _state(policy)
    before = msgspec.json.encode(state)
    assert decide(state, GOOD, policy, T0 + 60) == decide(state, GOOD, policy, T0 + 60)
    assert msgspec.json.encode(state) == before


@pytest.mark.parametrize(
    "bad",
    [
        {"steps": []},
        {"steps": [5, 5, 100]},
        {"steps": [50, 25]},
        {"steps": [0, 50]},
        {"steps": [100]},
        {"steps": [5, 150]},
        {"step_duration_s": None, "step_requests": None},
        {"min_samples": 0},
        {"consecutive_failures": 0},
        {"evaluation_interval_s": 0},
        {"thresholds": {"max_error_rat": 0.1}},
    ],
)
def test_invalid_policies_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises((InvalidInputError, msgspec.ValidationError)):
        _policy(**bad)


# -- the controller -----------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Router:
    """Records every weight table applied, like the router's set_weights."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, float]] = {}
        self.calls: list[tuple[str, dict[str, float]]] = []
        self.known = {"m": {"1", "2", "3"}, "n": {"1", "2"}}

    def __call__(self, model: str, weights: dict[str, float]) -> None:
        if model not in self.known or not set(weights) <= self.known[model]:
            raise ModelNotFoundError(f"unknown model '{model}' or version in {sorted(weights)}")
        self.tables[model] = dict(weights)
        self.calls.append((model, dict(weights)))


class Signalling:
    """A settable signal source; counts candidate requests as the test advances time."""

    def __init__(self) -> None:
        self.signals = GOOD
        self.seen: list[str] = []

    def __call__(self, state: RolloutState) -> Signals:
        self.seen.append(state.model)
        return self.signals


class Alerts:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str, dict[str, object], dict[str, object]]] = []

    def send(
        self,
        event: str,
        model: str,
        reason: str,
        values: Mapping[str, object],
        extra: Mapping[str, object] | None = None,
    ) -> bool:
        self.events.append((event, model, reason, dict(values), dict(extra or {})))
        return True


class Rig:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.clock = Clock()
        self.router = Router()
        self.gather = Signalling()
        self.alerts = Alerts()
        self.store = SqliteStore(path, clock=self.clock)
        self.controller = self.new_controller()

    def new_controller(self) -> RolloutController:
        return RolloutController(
            self.store, self.router, self.gather, alerts=self.alerts, clock=self.clock
        )


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path / "control.db")
    yield r
    r.store.close()


def test_canary_walks_to_approval_then_promotion(rig: Rig) -> None:
    c = rig.controller
    policy = _policy(require_approval=True, step_duration_s=60.0)
    state = c.start_rollout("m", "1", "2", policy, "alice", "new model")
    assert state.status == "canary"
    assert rig.router.tables["m"] == {"1": 95.0, "2": 5.0}
    for weight in (25.0, 50.0):
        rig.clock.now += 30
        assert c.evaluate_once()["m"].action == "stay"
        rig.clock.now += 30
        assert c.evaluate_once()["m"].action == "advance"
        assert rig.router.tables["m"] == {"1": 100 - weight, "2": weight}
    rig.clock.now += 60
    assert c.evaluate_once()["m"].action == "await_approval"
    assert c.status("m").status == "awaiting_approval"
    assert rig.router.tables["m"] == {"1": 50.0, "2": 50.0}
    assert rig.alerts.events[-1][0] == "rollout.awaiting_approval"
    rig.clock.now += 3600
    assert c.evaluate_once()["m"].action == "stay"  # waits for a person
    with pytest.raises(ConflictError):
        c.pause("m", "bob", "pausing while awaiting is refused")
    done = c.approve("m", "bob", "looks good")
    assert done.status == "promoted"
    assert rig.router.tables["m"] == {"1": 0.0, "2": 100.0}
    assert c.evaluate_once() == {}  # nothing active
    actions = [e.action for e in rig.store.audit(model="m")]
    assert actions == ["approve", "await_approval", "advance", "advance", "start"]
    assert [t.to_weight for t in c.history("m")] == [5.0, 25.0, 50.0, 50.0, 100.0]
    assert c.history("m")[-1].actor == "bob"
    assert rig.alerts.events[-1][0] == "rollout.promoted"
    assert rig.store.verify_audit().ok


def test_breach_rolls_back_at_once_with_measured_values(rig: Rig) -> None:
    c = rig.controller
    policy = _policy(thresholds=_only(max_error_rate=0.05), consecutive_failures=3)
    c.start_rollout("m", "1", "2", policy, "alice", "try it")
    rig.clock.now += 61
    c.evaluate_once()
    assert rig.router.tables["m"] == {"1": 75.0, "2": 25.0}
    rig.gather.signals = dataclasses.replace(GOOD, candidate_error_rate=0.2)
    for n in (1, 2):
        rig.clock.now += 1
        d = c.evaluate_once()["m"]
        assert (d.action, d.consecutive_failures) == ("stay", n)
        assert c.status("m").consecutive_failures == n
        assert rig.router.tables["m"] == {"1": 75.0, "2": 25.0}
    rig.clock.now += 1
    d = c.evaluate_once()["m"]
    assert (d.action, d.status) == ("rollback", "rolled_back")
    assert rig.router.tables["m"] == {"1": 100.0, "2": 0.0}
    state = c.status("m")
    assert state.status == "rolled_back"
    assert state.candidate_weight == 0.0
    assert state.last_evaluation is not None
    assert state.last_evaluation.values["candidate_error_rate"] == 0.2
    assert state.history[-1].values["candidate_error_rate"] == 0.2
    entry = rig.store.audit(model="m", limit=1)[0]
    assert (entry.action, entry.actor) == ("rollback", "controller")
    assert entry.details["values"]["candidate_error_rate"] == 0.2
    assert entry.details["breaches"] == ["candidate_error_rate 0.2 > 0.05"]
    assert entry.before["weights"] == {"1": 75.0, "2": 25.0}
    assert entry.after["weights"] == {"1": 100.0, "2": 0.0}
    breaches = [e for e in rig.store.audit(model="m") if e.action == "breach"]
    assert len(breaches) == 2
    event, model, reason, values, extra = rig.alerts.events[-1]
    assert (event, model) == ("rollout.rolled_back", "m")
    assert "candidate_error_rate 0.2 > 0.05" in reason
    assert values["candidate_error_rate"] == 0.2
    assert extra["weights"] == {"1": 100.0, "2": 0.0}
    assert c.evaluate_once() == {}


def test_a_pass_between_breaches_resets_the_count(rig: Rig) -> None:
    c = rig.controller
    c.start_rollout("m", "1", "2", _policy(thresholds={"max_error_rate": 0.05}), "a", "")
    bad = dataclasses.replace(GOOD, candidate_error_rate=0.2)
    for signals in (bad, bad, GOOD, bad, bad):
        rig.gather.signals = signals
        c.evaluate_once()
    assert c.status("m").status == "canary"
    assert c.status("m").consecutive_failures == 2
    assert "recovered" in [e.action for e in rig.store.audit(model="m")]


def test_insufficient_data_writes_nothing(rig: Rig) -> None:
    c = rig.controller
    c.start_rollout("m", "1", "2", _policy(), "a", "")
    rig.gather.signals = dataclasses.replace(GOOD, candidate_samples=3)
    for _ in range(5):
        rig.clock.now += 100
        assert c.evaluate_once()["m"].verdict == "insufficient"
    assert len(rig.store.audit()) == 1
    assert c.status("m").last_evaluation is not None


def test_manual_rollback_after_promotion_restores_the_previous_stable(rig: Rig) -> None:
    c = rig.controller
    c.start_rollout("m", "1", "2", _policy(), "alice", "")
    c.promote("m", "alice", "skip the steps")
    assert rig.router.tables["m"] == {"1": 0.0, "2": 100.0}
    state = c.rollback("m", "bob", "customer complaints")
    assert state.status == "rolled_back"
    assert rig.router.tables["m"] == {"1": 100.0, "2": 0.0}
    entry = rig.store.audit(model="m", limit=1)[0]
    assert (entry.actor, entry.action, entry.reason) == ("bob", "rollback", "customer complaints")
    assert rig.alerts.events[-1][0] == "rollout.rolled_back"
    with pytest.raises(ConflictError):
        c.rollback("m", "bob", "twice")


def test_pause_holds_and_resume_reapplies(rig: Rig) -> None:
    c = rig.controller
    c.start_rollout("m", "1", "2", _policy(), "alice", "")
    c.pause("m", "alice", "investigating")
    rig.clock.now += 10**4
    assert c.evaluate_once() == {}
    with pytest.raises(ConflictError):
        c.pause("m", "alice", "already paused")
    c.set_weights("m", {"1": 100.0, "2": 0.0}, "alice", "drain the canary while paused")
    assert rig.router.tables["m"] == {"1": 100.0, "2": 0.0}
    state = c.resume("m", "alice", "fixed")
    assert state.status == "canary"
    assert state.step_started_at == rig.clock.now
    assert rig.router.tables["m"] == {"1": 95.0, "2": 5.0}
    assert c.evaluate_once()["m"].action == "stay"  # the step's clock restarted


def test_set_weights_is_refused_during_a_running_rollout(rig: Rig) -> None:
    c = rig.controller
    route = c.set_weights("n", {"1": 90, "2": 10}, "alice", "manual a/b")
    assert route.weights() == {"1": 90.0, "2": 10.0}
    assert rig.router.tables["n"] == {"1": 90.0, "2": 10.0}
    c.start_rollout("m", "1", "2", _policy(), "alice", "")
    with pytest.raises(ConflictError):
        c.set_weights("m", {"1": 50, "2": 50}, "alice", "")
    for bad in ({}, {"1": -1.0}, {"1": 0.0}, {"1": float("inf")}):
        with pytest.raises(InvalidInputError):
            c.set_weights("n", bad, "alice", "")
    with pytest.raises(ModelNotFoundError):
        c.set_weights("n", {"9": 1.0}, "alice", "")  # the router refuses: nothing recorded
    assert rig.store.get_route("n") == route
    entry = rig.store.audit(model="n", limit=1)[0]
    assert entry.before == {"weights": {}}
    assert entry.after == {"weights": {"1": 90.0, "2": 10.0}}


def test_start_refuses_conflicts_and_bad_arguments(rig: Rig) -> None:
    c = rig.controller
    with pytest.raises(InvalidInputError):
        c.start_rollout("m", "1", "1", _policy(), "a", "")
    c.start_rollout("m", "1", "2", _policy(), "a", "")
    with pytest.raises(ConflictError):
        c.start_rollout("m", "1", "3", _policy(), "a", "")
    with pytest.raises(ModelNotFoundError):
        c.status("nope")
    with pytest.raises(ModelNotFoundError):
        c.promote("nope", "a", "")
    with pytest.raises(ConflictError):
        c.approve("m", "a", "not awaiting")
    c.rollback("m", "a", "")
    again = c.start_rollout("m", "1", "3", _policy(), "a", "a finished rollout is replaced")
    assert again.candidate_version == "3"


def test_a_failing_gather_skips_only_that_model(rig: Rig) -> None:
    c = rig.controller
    c.start_rollout("m", "1", "2", _policy(), "a", "")
    c.start_rollout("n", "1", "2", _policy(), "a", "")

    def gather(state: RolloutState) -> Signals:
        if state.model == "m":
            raise RuntimeError("metrics unavailable")
        return GOOD

    flaky = RolloutController(rig.store, rig.router, gather, clock=rig.clock)
    rig.clock.now += 61
    assert set(flaky.evaluate_once()) == {"n"}


def test_a_new_controller_restores_state_and_weights(rig: Rig) -> None:
    c = rig.controller
    c.start_rollout("m", "1", "2", _policy(), "alice", "")
    rig.clock.now += 61
    c.evaluate_once()
    c.set_weights("n", {"1": 70, "2": 30}, "alice", "")
    before = c.status("m")
    rig.store.close()

    store = SqliteStore(rig.path, clock=rig.clock)
    router = Router()
    fresh = RolloutController(store, router, rig.gather, clock=rig.clock)
    assert fresh.status("m") == before
    assert fresh.restore() == ["m", "n"]
    assert router.tables == {"m": {"1": 75.0, "2": 25.0}, "n": {"1": 70.0, "2": 30.0}}
    rig.clock.now += 61
    assert fresh.evaluate_once()["m"].action == "advance"
    assert router.tables["m"] == {"1": 50.0, "2": 50.0}
    assert "restore" in [e.action for e in store.audit()]
    assert store.verify_audit().ok
    store.close()


def test_restore_skips_models_the_router_no_longer_serves(rig: Rig) -> None:
    rig.controller.set_weights("n", {"1": 1, "2": 1}, "a", "")
    rig.router.known.pop("n")
    assert rig.new_controller().restore() == []


def test_background_loop_evaluates_and_stops(rig: Rig) -> None:
    evaluated = threading.Event()

    def gather(state: RolloutState) -> Signals:
        evaluated.set()
        return GOOD

    controller = RolloutController(rig.store, rig.router, gather, clock=rig.clock)
    policy = _policy(evaluation_interval_s=0.01)
    controller.start_rollout("m", "1", "2", policy, "a", "")

    async def main() -> None:
        controller.start()
        controller.start()  # idempotent
        await asyncio.get_running_loop().run_in_executor(None, evaluated.wait, 10)
        await controller.stop()
        await controller.stop()  # idempotent

    asyncio.run(main())
    assert evaluated.is_set()
    assert rig.router.tables["m"] == {"1": 95.0, "2": 5.0}


def test_every_change_is_checked_against_what_is_loaded_except_rollback(rig: Rig) -> None:
    ready = {"1", "2"}

    def check(model: str, versions: Sequence[str]) -> None:
        bad = [v for v in versions if v not in ready]
        if bad:
            raise InvalidInputError(f"model '{model}': version {', '.join(bad)} is not ready")

    c = RolloutController(
        rig.store, rig.router, rig.gather, alerts=rig.alerts, clock=rig.clock, check_versions=check
    )
    with pytest.raises(InvalidInputError, match="version 9"):
        c.start_rollout("m", "1", "9", _policy(), "alice")
    with pytest.raises(InvalidInputError, match="version 3"):
        c.set_weights("m", {"1": 50, "3": 50}, "alice")
    c.set_weights("m", {"1": 100, "3": 0}, "alice")  # a zero weight sends nothing there
    first = c.start_rollout("m", "1", "2", _policy(), "alice")
    ready.discard("2")  # the candidate stops being ready
    with pytest.raises(InvalidInputError, match="version 2"):
        c.promote("m", "bob")
    assert c.rollback("m", "bob", "always possible").status == "rolled_back"
    ready.add("2")
    again = c.start_rollout("m", "1", "2", _policy(), "alice")
    assert again.rollout_id
    assert again.rollout_id != first.rollout_id


def test_a_step_past_its_deadline_pauses_and_alerts(rig: Rig) -> None:
    c = rig.controller
    policy = _policy(decision_deadline_s=120.0, deadline_action="pause")
    c.start_rollout("m", "1", "2", policy, "alice")
    rig.gather.signals = dataclasses.replace(GOOD, candidate_samples=3)
    rig.clock.now += 60
    assert c.evaluate_once()["m"].action == "stay"
    rig.clock.now += 61
    d = c.evaluate_once()["m"]
    assert (d.action, d.status) == ("pause", "paused")
    assert "deadline" in d.reason
    assert rig.router.tables["m"] == {"1": 95.0, "2": 5.0}  # held, not moved
    assert rig.alerts.events[-1][0] == "rollout.paused"
    assert rig.store.audit(model="m")[0].action == "pause"
