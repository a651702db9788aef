"""rollout/policy.py: the rollout vocabulary: statuses, actions, the policy a canary follows
and its validation, the signals it is judged on, and the recorded state and decisions.

Values only (frozen msgspec Structs and dataclasses): no clock, no I/O, no threads. Invalid
policies raise ``InvalidInputError`` naming the field. It knows nothing of the router, the
store or how signals are measured.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias

import msgspec

from gateway.errors import InvalidInputError

__all__ = [
    "RolloutStatus",
    "Action",
    "DeadlineAction",
    "Verdict",
    "Measured",
    "ACTIVE_STATUSES",
    "EVALUATED_STATUSES",
    "CONTROLLER_ACTOR",
    "FULL_WEIGHT",
    "RolloutThresholds",
    "RolloutPolicy",
    "Signals",
    "Evaluation",
    "Transition",
    "RolloutState",
    "Decision",
]

RolloutStatus: TypeAlias = Literal[
    "canary", "paused", "awaiting_approval", "promoted", "rolled_back"
]
Action: TypeAlias = Literal["stay", "advance", "await_approval", "promote", "rollback", "pause"]
DeadlineAction: TypeAlias = Literal["rollback", "pause"]
Verdict: TypeAlias = Literal["pass", "fail", "insufficient", "not_evaluated"]
Measured: TypeAlias = dict[str, float | int | str | bool | None]

ACTIVE_STATUSES: Final[frozenset[str]] = frozenset({"canary", "paused", "awaiting_approval"})
EVALUATED_STATUSES: Final[frozenset[str]] = frozenset({"canary", "awaiting_approval"})
CONTROLLER_ACTOR: Final = "controller"
FULL_WEIGHT: Final = 100.0  # weights are percentages of the model's traffic


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
    """Candidate error rate minus stable error rate the candidate may have. Judged by an
    always-valid sequential test (``sequential.ProportionTest`` with this tolerance) after
    every evaluation, at any sample size: a rejection rolls back at once, with the false
    rollback rate bounded by ``RolloutPolicy.false_rollback_rate`` however often it looks."""
    max_p99_latency_ratio: float | None = 2.0
    """Candidate p99 / stable p99; 2.0 leaves room for the histogram's 26% bucket width.
    Also sets the sequential latency test: a request is slow when it takes longer than this
    ratio times the stable version's p99 from before the step (fixed before the window, so
    the test stays valid); the candidate's share of slow requests may exceed stable's by
    ``max_slow_share_delta``."""
    max_slow_share_delta: float | None = 0.01
    """Tolerance of the sequential latency test (fraction of requests); None turns the
    sequential latency test off (the p99 ratio check stays)."""
    max_shadow_disagreement: float | None = None
    """Share of mirrored rows where the shadow's answer differed from the primary's (0..1)."""
    candidate_worse_pvalue: float | None = None
    """Roll back when the outcome test says the candidate is worse at this p-value or below.
    With classification truths the test is sequential (always-valid, on the error share of
    each arm, sharing ``false_rollback_rate``) and rolls back at once; otherwise the
    fixed-sample p-value of the outcome comparison is compared with this level."""
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
    """Candidate (and, for comparisons, stable) samples before a pass, and before the
    fixed-threshold checks (latency ratio, drift, shadow) are judged. The sequential tests
    need no minimum: they may roll back after a handful of requests."""
    consecutive_failures: int = 3
    """Breaching evaluations of the fixed-threshold checks in a row that trigger a rollback;
    3 rides out one noisy window. Sequential tests roll back on their first rejection."""
    false_rollback_rate: float = 0.01
    """Probability that a candidate no worse than stable is rolled back by the sequential
    tests over the whole rollout, checked after every evaluation; split evenly over the
    tests and the steps (``sequential.split_alpha``)."""
    decision_deadline_s: float | None = 900.0
    """A step whose analysis still lacks data this long after it began takes
    ``deadline_action`` (and alerts): a candidate too quiet to judge is not left serving
    unjudged. 900 s is three default steps. None: wait forever."""
    deadline_action: DeadlineAction = "rollback"
    """What a step that misses its ``decision_deadline_s`` does: "rollback" or "pause"."""
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
        if not 0.0 < self.false_rollback_rate < 1.0:
            raise InvalidInputError("policy.false_rollback_rate must be in (0, 1)")
        if self.decision_deadline_s is not None and not self.decision_deadline_s > 0:
            raise InvalidInputError("policy.decision_deadline_s must be > 0")
        t = self.thresholds
        for name, value in (
            ("max_error_rate_delta", t.max_error_rate_delta),
            ("max_slow_share_delta", t.max_slow_share_delta),
        ):
            if value is not None and not 0.0 <= value < 0.99:
                raise InvalidInputError(f"policy.thresholds.{name} must be in [0, 0.99)")


@dataclass(frozen=True, slots=True)
class Signals:
    """What the gateway measured for one rollout, gathered once per evaluation.

    ``*_samples`` count the requests behind the rates and latencies (the evaluation window);
    ``candidate_requests_total`` is cumulative (steps by request count diff it). Any value may
    be None when not measured; drift values count only when ``drift_sufficient``.
    """

    candidate_samples: int = 0
    stable_samples: int = 0
    candidate_errors: int = 0
    """Failed candidate requests in the window (the sequential error test's events)."""
    stable_errors: int = 0
    slow_threshold_ms: float | None = None
    """Latency above which a request is slow (fixed before the window); None: not enough
    stable history before the step, the sequential latency test waits."""
    candidate_slow: int = 0
    stable_slow: int = 0
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
    outcome_counts: tuple[int, int, int, int] | None = None
    """Classification truths in the window: (candidate rows, candidate wrong, stable rows,
    stable wrong), for the sequential outcome test; None for regression or no truths."""
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
    rollout_id: str = ""
    """Unique per rollout: signal windows are keyed by it, so a rollout started again for
    the same versions never inherits an earlier one's measurements."""
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
