"""rollout/decide.py: the pure transition table of a canary rollout:
``decide(state, signals, policy, now) -> Decision``.

Each status has exactly one rule (CANARY -> advance / promote / await approval / roll back /
pause / stay; the others hold). Pure: no I/O, no clock, no mutation; the controller gathers
signals and applies what this decides. It knows nothing of the store, the router or alerts.

Two kinds of checks. The *sequential* ones (error rate against stable, the share of slow
requests against stable, and classification outcomes) are always-valid tests
(``sequential.ProportionTest``) on the current window's counts: valid however often they are
looked at, so they need no sample minimum and no run of
failing evaluations, and one rejection rolls back. They share ``policy.false_rollback_rate``
over tests x windows (``split_alpha``), so an A/A rollout is rolled back with probability at
most that rate (1% by default; tests/unit/test_rollout_sim.py measures it). The *fixed
threshold* ones (p99 ratio, drift, shadow disagreement, absolute error rate) wait for
``min_samples`` and ``consecutive_failures`` as before. A step that cannot reach a verdict by
``decision_deadline_s`` takes ``deadline_action``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, TypeAlias, get_args

from gateway.rollout.policy import (
    FULL_WEIGHT,
    Action,
    Decision,
    Measured,
    RolloutPolicy,
    RolloutState,
    RolloutStatus,
    RolloutThresholds,
    Signals,
    Verdict,
)
from gateway.rollout.sequential import BernoulliCounts, ProportionTest, split_alpha

__all__ = ["decide", "sequential_alpha"]

_MIN_P99_MS: Final = 1e-3  # floor for the stable p99 in the ratio: a 0 ms bucket is not "free"

# -- the pure decision ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Analysis:
    verdict: Verdict
    breaches: tuple[str, ...]
    missing: tuple[str, ...]
    values: Measured
    immediate: bool = False
    """A sequential test rejected: roll back now, without waiting for more breaches."""


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def _measured(s: Signals) -> Measured:
    delta = None
    if s.candidate_error_rate is not None and s.stable_error_rate is not None:
        delta = s.candidate_error_rate - s.stable_error_rate
    ratio = None
    if s.candidate_p99_ms is not None and s.stable_p99_ms is not None:
        # Two decimals: p99s are histogram bucket bounds 26% apart, and three buckets are
        # 1.26**3 = 2.0004, which must not count as "over 2.0" (identical versions failed).
        ratio = round(s.candidate_p99_ms / max(s.stable_p99_ms, _MIN_P99_MS), 2)
    return {
        "candidate_samples": s.candidate_samples,
        "stable_samples": s.stable_samples,
        "candidate_errors": s.candidate_errors,
        "stable_errors": s.stable_errors,
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


def _tests(t: RolloutThresholds) -> int:
    return (
        int(t.max_error_rate_delta is not None)
        + int(t.max_p99_latency_ratio is not None and t.max_slow_share_delta is not None)
        + int(t.candidate_worse_pvalue is not None)
    )


def sequential_alpha(policy: RolloutPolicy) -> float:
    """Each sequential test's level in one window: ``false_rollback_rate`` split over the
    tests and the windows a rollout can judge (each step below 100%, plus the approval
    wait when approval is required)."""
    windows = sum(1 for w in policy.steps if w < FULL_WEIGHT) + int(policy.require_approval)
    return split_alpha(policy.false_rollback_rate, max(1, _tests(policy.thresholds)) * windows)


def _sequential(s: Signals, policy: RolloutPolicy, values: Measured) -> list[str]:
    """Run the always-valid tests on the window's counts; return their rejections."""
    t = policy.thresholds
    alpha = sequential_alpha(policy)
    rejected: list[str] = []
    if t.max_error_rate_delta is not None:
        tol = t.max_error_rate_delta
        test = ProportionTest("error_rate", alpha=alpha, tolerance=tol, margin=tol + 0.01)
        r = test.evaluate(
            BernoulliCounts(s.candidate_samples, s.candidate_errors),
            BernoulliCounts(s.stable_samples, s.stable_errors),
        )
        values["error_rate_e_value"] = r.e_value
        values["error_rate_always_valid_p"] = r.p_value
        if r.verdict == "reject":
            rejected.append(r.reason)
    slow_tol = t.max_slow_share_delta
    if t.max_p99_latency_ratio is not None and slow_tol is not None and s.slow_threshold_ms:
        tol = slow_tol
        test = ProportionTest("latency", alpha=alpha, tolerance=tol, margin=tol + 0.01)
        r = test.evaluate(
            BernoulliCounts(s.candidate_samples, min(s.candidate_slow, s.candidate_samples)),
            BernoulliCounts(s.stable_samples, min(s.stable_slow, s.stable_samples)),
        )
        values["slow_threshold_ms"] = s.slow_threshold_ms
        values["latency_e_value"] = r.e_value
        if r.verdict == "reject":
            rejected.append(f"{r.reason} (slow: over {s.slow_threshold_ms:.4g} ms)")
    if t.candidate_worse_pvalue is not None and s.outcome_counts is not None:
        nc, xc, ns, xs = s.outcome_counts
        test = ProportionTest("outcome", alpha=alpha)
        r = test.evaluate(BernoulliCounts(nc, xc), BernoulliCounts(ns, xs))
        values["outcome_e_value"] = r.e_value
        values["outcome_always_valid_p"] = r.p_value
        if r.verdict == "reject":
            rejected.append(r.reason)
    return rejected


def _analyse(s: Signals, policy: RolloutPolicy) -> _Analysis:
    """The sequential tests first (a rejection is an immediate "fail"); then every fixed
    threshold: "fail" on any breach, else "insufficient" when a configured check lacked
    data, else "pass". Below ``min_samples``: "insufficient"."""
    values = _measured(s)
    rejected = _sequential(s, policy, values)
    if rejected:
        return _Analysis("fail", tuple(rejected), (), values, immediate=True)
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
    fixed_outcome = s.outcome_counts is None  # with counts, the sequential test judged it
    if fixed_outcome and level is not None and p is not None and s.outcome_worse and p <= level:
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


def _judge_breaches(
    state: RolloutState, policy: RolloutPolicy, a: _Analysis, now: float | None
) -> Decision | None:
    """The shared part of every evaluated status: a sequential rejection rolls back, a
    threshold breach counts towards rollback, insufficient data holds until the step's
    deadline (``now`` None: no deadline). Returns None when the analysis passed (the caller
    decides)."""
    if a.immediate:
        return _decision(
            state,
            "rollback",
            "rolled back by a sequential test: " + "; ".join(a.breaches),
            status="rolled_back",
            weight=0.0,
            analysis=a,
            failures=state.consecutive_failures + 1,
        )
    if a.verdict == "insufficient":
        why = "insufficient data: " + "; ".join(a.missing)
        deadline = policy.decision_deadline_s
        waited = 0.0 if now is None else now - state.step_started_at
        if deadline is not None and now is not None and waited >= deadline:
            reason = f"no decision within the {deadline:g} s deadline ({why})"
            if policy.deadline_action == "pause":
                return _decision(state, "pause", f"paused: {reason}", status="paused", analysis=a)
            return _decision(
                state,
                "rollback",
                f"rolled back: {reason}",
                status="rolled_back",
                weight=0.0,
                analysis=a,
            )
        return _decision(state, "stay", why, analysis=a)
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
    held = _judge_breaches(state, policy, a, now)
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
    held = _judge_breaches(state, policy, a, None)  # a person decides: no deadline
    if held is not None:
        return held
    return _decision(state, "stay", "analysis passed; awaiting approval", analysis=a, failures=0)


def _hold(why: str) -> Callable[[RolloutState, Signals, RolloutPolicy, float], Decision]:
    def rule(state: RolloutState, s: Signals, policy: RolloutPolicy, now: float) -> Decision:
        return _decision(state, "stay", why)

    return rule


_Rule: TypeAlias = Callable[[RolloutState, Signals, RolloutPolicy, float], Decision]

# The transition table: each status has exactly one rule.
#   canary            -> advance | await_approval | promote | rollback | pause | stay
#   awaiting_approval -> rollback | pause | stay (promotion only through approve/promote)
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
    no clock, no mutation. A sequential test's rejection rolls back at once; a fixed
    threshold breach needs ``min_samples`` and ``policy.consecutive_failures`` breaches in a
    row; a passing evaluation resets the count; no verdict by the step's deadline takes the
    policy's ``deadline_action``."""
    return _TABLE[state.status](state, signals, policy, now)
