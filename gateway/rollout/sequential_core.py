"""rollout/sequential_core.py: what the sequential tests share: the false rollback budget
and its split, the arms' sufficient statistics (``BernoulliCounts``, ``MeanMoments``), latency
exceedances, the ``SequentialResult`` a test returns, and the step deadline derived from the
samples a decision needs. Pure arithmetic; the statistics themselves are described in
``sequential`` (two proportions) and ``sequential_mean`` (difference of means).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_FALSE_ROLLBACK_RATE",
    "DEFAULT_ACCEPT_ERROR",
    "JEFFREYS",
    "SequentialVerdict",
    "BernoulliCounts",
    "MeanMoments",
    "SequentialResult",
    "FloatArray",
    "split_alpha",
    "exceedances",
    "step_deadline_s",
]

SequentialVerdict = Literal["reject", "accept", "continue"]

DEFAULT_FALSE_ROLLBACK_RATE: Final = 0.01
"""Probability that a rollout of a candidate no worse than stable is ever rolled back, over
all the tests a rollout runs (split between them by ``split_alpha``) and however long it is
monitored. 1% is the acceptance bar of an A/A simulation; Ville's bound guarantees it."""
DEFAULT_ACCEPT_ERROR: Final = 0.05
"""Probability of declaring "not worse" for a candidate that is worse by more than the
margin; promotion is reversible, a rollback of a good candidate only costs time, so 5%."""
JEFFREYS: Final = 0.5  # Beta(1/2, 1/2): the minimax-regret (KT) prior for a Bernoulli rate
_LOG_E_CAP: Final = 700.0  # exp(700) ~ 1e304: report e-values as floats without overflow

FloatArray = npt.NDArray[np.float64]


def split_alpha(total: float, tests: int) -> float:
    """Each test's level when ``tests`` tests share a false rollback budget of ``total``
    (Bonferroni: the union of their rejections has probability at most ``total``)."""
    if not 0.0 < total < 1.0:
        raise ValueError(f"false rollback rate must be in (0, 1), got {total}")
    if tests < 1:
        raise ValueError(f"tests must be >= 1, got {tests}")
    return total / tests


# -- sufficient statistics ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BernoulliCounts:
    """Trials and events of one arm (requests and errors, truths and wrong answers).
    Counts from several replicas add with ``+``; a window is ``later - earlier``."""

    trials: int = 0
    events: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.events <= self.trials:
            raise ValueError(f"need 0 <= events <= trials, got {self.events}/{self.trials}")

    def update(self, event: bool) -> BernoulliCounts:
        """These counts plus one trial; O(1)."""
        return BernoulliCounts(self.trials + 1, self.events + int(event))

    def __add__(self, other: BernoulliCounts) -> BernoulliCounts:
        return BernoulliCounts(self.trials + other.trials, self.events + other.events)

    def __sub__(self, earlier: BernoulliCounts) -> BernoulliCounts:
        return BernoulliCounts(self.trials - earlier.trials, self.events - earlier.events)

    @classmethod
    def from_accuracy(cls, n: int, correct: int) -> BernoulliCounts:
        """Wrong predictions as the events: a lower accuracy is a higher event rate."""
        return cls(n, n - correct)

    @property
    def rate(self) -> float | None:
        return self.events / self.trials if self.trials else None


@dataclass(frozen=True, slots=True)
class MeanMoments:
    """Count, mean and sum of squared deviations (Welford's M2) of one arm's metric values.
    Replicas' moments merge exactly with ``+`` (Chan et al.'s parallel formula)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, value: float) -> MeanMoments:
        """These moments plus one value (Welford); O(1)."""
        n = self.n + 1
        delta = value - self.mean
        mean = self.mean + delta / n
        return MeanMoments(n, mean, self.m2 + delta * (value - mean))

    def __add__(self, other: MeanMoments) -> MeanMoments:
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * other.n / n
        return MeanMoments(n, mean, self.m2 + other.m2 + delta * delta * self.n * other.n / n)

    @classmethod
    def from_counts(cls, counts: BernoulliCounts) -> MeanMoments:
        """The moments of ``counts.trials`` values that are 1 for an event and 0 otherwise,
        so a rate can be judged by ``MeanTest`` (faster than ``ProportionTest`` once both
        arms hold a few hundred trials, but only asymptotically valid)."""
        if counts.trials == 0:
            return cls()
        mean = counts.events / counts.trials
        return cls(counts.trials, mean, counts.events * (1.0 - mean))

    @property
    def var(self) -> float | None:
        """Sample variance (ddof=1); None below 2 values."""
        return self.m2 / (self.n - 1) if self.n >= 2 else None


def exceedances(
    latency_counts: tuple[int, ...] | list[int],
    bucket_bounds_ms: tuple[float, ...],
    threshold_ms: float,
) -> BernoulliCounts:
    """Requests slower than ``threshold_ms`` out of all, from a latency histogram whose bucket
    ``i`` holds values in ``(bounds[i-1], bounds[i]]`` (one overflow bucket after the last).

    The threshold is rounded down to a bucket bound, so a request counts as slow only when
    its whole bucket lies above that bound. Fix the threshold before the window it judges
    (a latency objective, or the stable arm's p99 from before the step): a threshold read
    from the same window's data would make the events depend on each other.
    """
    if len(latency_counts) != len(bucket_bounds_ms) + 1:
        raise ValueError("latency_counts needs one count per bound plus an overflow bucket")
    first_slow = 0
    for i, bound in enumerate(bucket_bounds_ms):
        if bound <= threshold_ms:
            first_slow = i + 1
    total = int(sum(latency_counts))
    return BernoulliCounts(total, int(sum(latency_counts[first_slow:])))


@dataclass(frozen=True, slots=True)
class SequentialResult:
    """One evaluation of a sequential test.

    ``e_value`` is the evidence that the candidate is worse (against the null "not worse by
    more than the tolerance"); ``p_value = min(1, 1 / e_value)`` is valid at any stopping
    time. ``accept_e_value`` is the evidence that it is not worse by more than the margin.
    ``estimate`` is candidate minus stable (rate or mean), None without data on both arms.
    """

    test: str
    verdict: SequentialVerdict
    e_value: float
    p_value: float
    accept_e_value: float
    candidate_samples: int
    stable_samples: int
    estimate: float | None
    reason: str


def _result(
    test: str,
    log_e: float,
    log_accept_e: float,
    alpha: float,
    beta: float,
    candidate_samples: int,
    stable_samples: int,
    estimate: float | None,
    what: str,
) -> SequentialResult:
    e_value = math.exp(min(log_e, _LOG_E_CAP))
    accept_e = math.exp(min(log_accept_e, _LOG_E_CAP))
    p_value = min(1.0, math.exp(-log_e)) if log_e > -_LOG_E_CAP else 1.0
    counts = f"{candidate_samples} candidate / {stable_samples} stable samples"
    if log_e >= math.log(1.0 / alpha):
        verdict: SequentialVerdict = "reject"
        reason = f"{test}: candidate worse ({what}), always-valid p {p_value:.3g} <= {alpha:g}"
    elif log_accept_e >= math.log(1.0 / beta):
        verdict = "accept"
        reason = f"{test}: candidate not worse ({what}), e-value {accept_e:.3g} >= {1 / beta:g}"
    else:
        verdict = "continue"
        reason = f"{test}: undecided ({what}), always-valid p {p_value:.3g}"
    return SequentialResult(
        test,
        verdict,
        e_value,
        p_value,
        accept_e,
        candidate_samples,
        stable_samples,
        estimate,
        f"{reason}; {counts}",
    )


def _check_level(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value}")


# -- how long a decision takes --------------------------------------------------------------

_MAX_SAMPLES: Final = 10**9


def _first_n(decides: object, limit: int) -> int | None:
    """The smallest n in [1, limit] with decides(n) true, assuming monotone in n (doubling,
    then bisection: O(log limit) evaluations)."""
    assert callable(decides)
    hi = 1
    while not decides(hi):
        if hi >= limit:
            return None
        hi = min(2 * hi, limit)
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if decides(mid):
            hi = mid
        else:
            lo = mid
    return hi


def step_deadline_s(
    candidate_samples: int | None,
    *,
    requests_per_s: float,
    share: float,
    safety: float = 3.0,
    floor_s: float = 60.0,
) -> float | None:
    """Seconds a step may wait for a decision before its no-data deadline: ``safety`` times
    the time the candidate needs to see ``candidate_samples`` at ``requests_per_s`` (the
    model's total rate) and ``share`` (0..1), at least ``floor_s``. None when the test
    cannot decide (``candidate_samples`` None) or there is no traffic: no deadline to set
    from the test, the policy's fixed one applies. 3x covers the spread of stopping times
    around the mean path (the mean path sits near the median)."""
    _check_level("share", share)
    if candidate_samples is None or not requests_per_s > 0:
        return None
    return max(floor_s, safety * candidate_samples / (requests_per_s * share))
