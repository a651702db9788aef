"""sequential.py: always-valid tests of "the candidate is worse than the stable version",
safe to check after every observation, for rollout decisions.

In: sufficient statistics of the two arms of a rollout, as cumulative counts that add up
across replicas (``BernoulliCounts`` for error rates, latency exceedances and accuracy;
``MeanMoments`` for a continuous error metric such as the absolute error). Out: a
``SequentialResult``: the e-value against "not worse", the always-valid p-value, and a verdict
("reject": roll back; "accept": not worse by more than the margin; "continue"). Plus the
expected samples a decision needs, from which a step's no-data deadline is set. Pure
arithmetic (``math`` and ``numpy``): no clock, no I/O; it knows nothing of routing, HTTP or
the rollout policy's vocabulary.

Why it replaces "min_samples + N consecutive failing evaluations": a fixed-sample test checked
after every evaluation rejects a true null far more often than its nominal level (the
"peeking" problem), and the guard rails against that (a sample minimum, several failing
evaluations in a row) slow down exactly the rollbacks that should be fastest. An *e-process*
``E_t`` is a non-negative process with ``E[E_tau] <= 1`` under the null for every stopping time
``tau``; by Ville's inequality ``P(exists t: E_t >= 1/alpha) <= alpha``, so rejecting the first
time ``E_t >= 1/alpha`` keeps the false rollback rate at ``alpha`` however often the test is
looked at and for however long (Ramdas, Grünwald, Vovk, Shafer, "Game-theoretic statistics
and safe anytime-valid inference", 2023). ``p_t = min(1, 1/E_t)`` is the matching always-valid
p-value (Johari, Koomen, Pekelis, Walsh, "Always valid inference: continuous monitoring of
A/B tests", 2022); confidence sequences are the same idea turned into intervals (Howard,
Ramdas, McAuliffe, Sekhon, "Time-uniform, nonparametric, nonasymptotic confidence
sequences", 2021).

Two statistics:

* ``ProportionTest`` (exact, any sample size): arm ``k`` has ``n_k`` trials and ``x_k`` events
  (errors, slow requests, wrong predictions). The numerator is the Beta-Bernoulli marginal
  likelihood of both arms (independent Beta(a, b) priors, Jeffreys' a = b = 1/2 by default);
  the denominator is the likelihood maximised over the null ``p_c - p_s <= d``::

      E_t = B(a + x_c, b + n_c - x_c) B(a + x_s, b + n_s - x_s) / B(a, b)^2
            / sup_{p_c - p_s <= d} p_c^x_c (1 - p_c)^(n_c - x_c) p_s^x_s (1 - p_s)^(n_s - x_s)

  For the true null rates ``(p_c0, p_s0)`` the numerator divided by *their* likelihood is a
  non-negative martingale with mean 1 (a mixture of likelihood ratios; each observation's
  predictive probability depends only on the past, and which arm a request goes to does not
  depend on its outcome). The sup in the denominator is at least that likelihood, so ``E_t``
  sits below a test martingale for every null element: an e-process (the "universal
  inference" argument of Wasserman, Ramdas, Balakrishnan, 2020). It depends on the counts
  only, so it is the same whether one process saw every request in order or replicas' counts
  were summed, and the arms' shares (5% or 50%, changing between steps) do not enter it.
  The accept side is the same construction with the null ``p_c - p_s >= margin``.

* ``MeanTest`` (asymptotic): a one-sided normal-mixture SPRT (mSPRT) on the difference of
  means ``theta = mu_c - mu_s``. With ``Delta = mean_c - mean_s`` and
  ``V = var_c / n_c + var_s / n_s``, the Gaussian likelihood ratio of ``theta`` against 0,
  after integrating the common location out with a flat (right Haar) prior, is
  ``exp((theta Delta - theta^2 / 2) / V)``; mixing ``theta`` over a half-normal
  ``N+(0, tau^2)`` gives::

      E_t = 2 sqrt(V / (V + tau^2)) exp(tau^2 Delta^2 / (2 V (V + tau^2)))
              Phi(tau Delta / sqrt(V (V + tau^2)))

  With known variances this is a test supermartingale under ``theta <= 0`` (each component
  is, since ``E exp(theta' X - theta'^2 / 2) = exp(theta' theta_0) <= 1`` for
  ``theta_0 <= 0 < theta'``; the location reduction is Pérez-Ortiz, Lardy, de Heide,
  Grünwald, "E-statistics, group invariance and anytime valid testing", 2024). The variances
  are plug-in sample variances, as in Johari et al., so validity is asymptotic: the test
  waits for ``min_samples`` per arm and its type-I error is checked by simulation.

Across steps: the exact guarantee assumes each arm's rate is constant while the split may
change. Rates that move together on both arms (an outage, a daily cycle) break that once the
split changes: pooled over a 5% step and a 50% step, an outage during the 50% step hits a
larger part of the candidate's requests than of the stable arm's, and an identical candidate
looks worse (Simpson's paradox; 266 of 400 simulated A/A rollouts rolled back). So judge each
step on its own window (one split) and share the budget over the steps: ``split_alpha(total,
tests * steps)``; within a step a common burst touches both arms in proportion (0 of 400).

Defaults and the error rates they give. A rollout's tests share one false rollback budget,
``DEFAULT_FALSE_ROLLBACK_RATE`` = 1%, split evenly (``split_alpha``): the default pair, error
rate and latency exceedance, run at 0.5% each. By Ville's inequality and the union bound, a
candidate no worse than stable is rolled back with probability at most 1% over the whole
rollout, checked after every request, for any horizon (exact for ``ProportionTest``;
asymptotic for ``MeanTest``). Simulated (tests/unit/test_sequential.py): 0 of 1,000 A/A
rollouts, 5% and 50% splits, 2,000 candidate requests each. The accept side errs (calls a
candidate worse by more than the margin "not worse") with probability at most
``DEFAULT_ACCEPT_ERROR`` = 5%. Expected candidate requests to decide, ``ProportionTest``
defaults, stable at 1% errors, 5% / 50% split: 3 / 7 to reject a candidate failing every
request, 93 / 252 at 10% errors, 349 / 834 at 5%, 4,251 / 8,588 at 2%; 4,356 / 5,248 to
accept an equal candidate within the 1-point margin (1,270 / 1,110 with no errors at all).

Units: counts are requests (or truths); rates are fractions in [0, 1]; means, margins and
``tau`` are in the metric's own units (``tau`` is given as ``effect_sd``, a multiple of the
pooled standard deviation, which makes the test scale-free).
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
    "SequentialVerdict",
    "BernoulliCounts",
    "MeanMoments",
    "SequentialResult",
    "ProportionTest",
    "MeanTest",
    "split_alpha",
    "exceedances",
    "proportion_samples_needed",
    "mean_samples_needed",
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
_BISECT_STEPS: Final = 100  # the boundary MLE to ~1e-30: far below any count's resolution

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


# -- two proportions ------------------------------------------------------------------------


def _xlogy(x: float, y: float) -> float:
    return 0.0 if x == 0.0 else x * math.log(y)


def _loglik(x: float, n: float, p: float) -> float:
    """log p^x (1 - p)^(n - x), with 0 log 0 = 0; -inf where p excludes the data."""
    f = n - x
    if (x > 0 and p <= 0.0) or (f > 0 and p >= 1.0):
        return -math.inf
    return _xlogy(x, p) + _xlogy(f, 1.0 - p)


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _boundary_max(xc: float, nc: float, xs: float, ns: float, d: float) -> float:
    """max over p_s of the log likelihood on the line p_c = p_s + d (concave in p_s: bisect
    on the derivative, which falls from +inf to -inf across the feasible interval)."""
    fc, fs = nc - xc, ns - xs
    lo, hi = max(0.0, -d), min(1.0, 1.0 - d)
    for _ in range(_BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        pc = mid + d
        slope = 0.0
        if xc:
            slope += xc / pc
        if fc:
            slope -= fc / (1.0 - pc)
        if xs:
            slope += xs / mid
        if fs:
            slope -= fs / (1.0 - mid)
        if slope > 0.0:
            lo = mid
        else:
            hi = mid
    ps = 0.5 * (lo + hi)
    return _loglik(xc, nc, ps + d) + _loglik(xs, ns, ps)


def _constrained_max(
    xc: float, nc: float, xs: float, ns: float, d: float, side: Literal["le", "ge"]
) -> float:
    """sup of the two-arm log likelihood over p_c - p_s <= d ("le") or >= d ("ge")."""
    pc, ps = xc / nc, xs / ns
    inside = pc - ps <= d if side == "le" else pc - ps >= d
    if inside:
        return _loglik(xc, nc, pc) + _loglik(xs, ns, ps)
    if d == 0.0:  # the boundary p_c = p_s: the pooled rate, in closed form
        return _loglik(xc + xs, nc + ns, (xc + xs) / (nc + ns))
    return _boundary_max(xc, nc, xs, ns, d)


@dataclass(frozen=True, slots=True)
class ProportionTest:
    """Always-valid test that the candidate's event rate exceeds the stable arm's.

    ``evaluate`` rejects (roll back) when the e-value against ``p_c - p_s <= tolerance``
    reaches ``1/alpha``, and accepts when the e-value against ``p_c - p_s >= margin``
    reaches ``1/beta``. Exact at every sample size, including zero events on an arm.
    """

    name: str = "error_rate"
    alpha: float = DEFAULT_FALSE_ROLLBACK_RATE / 2  # shared with the latency test
    beta: float = DEFAULT_ACCEPT_ERROR
    margin: float = 0.01
    """Absolute rate difference (fraction) the candidate may be worse by and still pass."""
    tolerance: float = 0.0
    """Rate difference not worth a rollback; 0: any excess is "worse"."""
    prior_a: float = JEFFREYS
    prior_b: float = JEFFREYS

    def __post_init__(self) -> None:
        _check_level("alpha", self.alpha)
        _check_level("beta", self.beta)
        if not 0.0 <= self.tolerance < self.margin < 1.0:
            raise ValueError("need 0 <= tolerance < margin < 1")
        if not (self.prior_a > 0 and self.prior_b > 0):
            raise ValueError("prior_a and prior_b must be > 0")

    def log_e_values(self, xc: float, nc: float, xs: float, ns: float) -> tuple[float, float]:
        """(log e-value for "worse", log e-value for "not worse by the margin"); counts may
        be expected (fractional) values. Both 0 until each arm has a trial."""
        if nc <= 0 or ns <= 0:
            return 0.0, 0.0
        a, b = self.prior_a, self.prior_b
        log_mix = (
            _log_beta(a + xc, b + nc - xc) + _log_beta(a + xs, b + ns - xs) - 2 * _log_beta(a, b)
        )
        log_e = log_mix - _constrained_max(xc, nc, xs, ns, self.tolerance, "le")
        log_accept = log_mix - _constrained_max(xc, nc, xs, ns, self.margin, "ge")
        return log_e, log_accept

    def evaluate(self, candidate: BernoulliCounts, stable: BernoulliCounts) -> SequentialResult:
        """Judge the cumulative counts of both arms (pooled over replicas); O(1)."""
        log_e, log_accept = self.log_e_values(
            candidate.events, candidate.trials, stable.events, stable.trials
        )
        rc, rs = candidate.rate, stable.rate
        estimate = None if rc is None or rs is None else rc - rs
        what = (
            "no data on both arms"
            if estimate is None
            else f"rate {candidate.events}/{candidate.trials} vs {stable.events}/{stable.trials}"
        )
        return _result(
            self.name,
            log_e,
            log_accept,
            self.alpha,
            self.beta,
            candidate.trials,
            stable.trials,
            estimate,
            what,
        )

    def log_e_path(
        self, is_candidate: npt.NDArray[np.bool_], is_event: npt.NDArray[np.bool_]
    ) -> FloatArray:
        """The log e-value for "worse" after each observation of a sequence (last axis is
        time; leading axes are independent runs): the same statistic as ``evaluate`` at
        every prefix, computed by summing log predictive probabilities, so simulations can
        check it after every observation. Only for ``tolerance == 0``."""
        if self.tolerance != 0.0:
            raise ValueError("log_e_path needs tolerance == 0 (the closed-form null)")
        a, b = self.prior_a, self.prior_b
        cand = is_candidate.astype(np.float64)
        event = is_event.astype(np.float64)
        nc, xc = np.cumsum(cand, axis=-1), np.cumsum(cand * event, axis=-1)
        n = np.cumsum(np.ones_like(cand), axis=-1)
        x = np.cumsum(event, axis=-1)
        ns, xs = n - nc, x - xc
        # The predictive probability of each observation given its own arm's past counts.
        n_prev = np.where(is_candidate, nc, ns) - 1.0
        x_prev = np.where(is_candidate, xc, xs) - event
        hits = np.where(is_event, a + x_prev, b + (n_prev - x_prev))
        log_mix = np.cumsum(np.log(hits) - np.log(a + b + n_prev), axis=-1)
        # Maximised log likelihoods through x log(x / n) = x log x - x log n (0 log 0 = 0).
        unconstrained = _xlogx(xc) + _xlogx(nc - xc) - _xlogx(nc)
        unconstrained += _xlogx(xs) + _xlogx(ns - xs) - _xlogx(ns)
        on_null = _xlogx(x) + _xlogx(n - x) - _xlogx(n)
        worse = xc * ns > xs * nc  # p_c > p_s: the null's maximum is on p_c = p_s
        log_e = log_mix - np.where(worse, on_null, unconstrained)
        return np.where((nc > 0) & (ns > 0), log_e, 0.0)


def _xlogx(x: FloatArray) -> FloatArray:
    """x log x for counts (0 or at least 1), 0 at 0."""
    out: FloatArray = x * np.log(np.maximum(x, 1.0))
    return out


# -- difference of means --------------------------------------------------------------------


def _log_ndtr(x: float) -> float:
    """log Phi(x), accurate far into the lower tail (erfc underflows below about -38)."""
    if x > -20.0:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
    # Mills ratio: Phi(x) ~ phi(x) / |x| (1 - 1/x^2 + 3/x^4)
    return (
        -0.5 * x * x
        - math.log(-x)
        - 0.5 * math.log(2 * math.pi)
        + math.log1p(-1.0 / (x * x) + 3.0 / x**4)
    )


def _log_half_normal_mixture(delta: float, v: float, tau2: float) -> float:
    """log of 2 sqrt(V/(V+tau^2)) exp(tau^2 Delta^2 / (2V(V+tau^2))) Phi(tau Delta /
    sqrt(V(V+tau^2))): the half-normal mixture of Gaussian likelihood ratios (see the
    module docstring)."""
    s = v + tau2
    return (
        math.log(2.0)
        + 0.5 * math.log(v / s)
        + tau2 * delta * delta / (2.0 * v * s)
        + _log_ndtr(math.sqrt(tau2) * delta / math.sqrt(v * s))
    )


@dataclass(frozen=True, slots=True)
class MeanTest:
    """Always-valid (asymptotically) test that the candidate's mean metric is higher (worse)
    than the stable arm's: a one-sided normal-mixture SPRT with plug-in variances.

    ``effect_sd`` is the mixture's scale tau in pooled standard deviations: the test is
    most powerful for standardised differences near it. ``margin`` (metric units) is the
    excess the candidate may have and still be accepted; None never accepts.
    """

    name: str = "mean_error"
    alpha: float = DEFAULT_FALSE_ROLLBACK_RATE / 2
    beta: float = DEFAULT_ACCEPT_ERROR
    effect_sd: float = 0.25
    """0.25 pooled sd: between Cohen's "small" (0.2) and "medium" (0.5); the mixture is
    tuned to decide within a few hundred samples per arm, the scale of a canary step."""
    margin: float | None = None
    tolerance: float = 0.0
    min_samples: int = 10
    """Values per arm before the plug-in variance is trusted; 10 keeps the simulated type-I
    error of skewed (absolute-error) data under alpha."""

    def __post_init__(self) -> None:
        _check_level("alpha", self.alpha)
        _check_level("beta", self.beta)
        if not self.effect_sd > 0:
            raise ValueError("effect_sd must be > 0")
        if self.min_samples < 2:
            raise ValueError("min_samples must be >= 2 (a variance needs two values)")
        if self.margin is not None and not self.margin > self.tolerance:
            raise ValueError("margin must exceed tolerance")

    def log_e_values(self, candidate: MeanMoments, stable: MeanMoments) -> tuple[float, float]:
        """(log e-value for "worse", log e-value for "not worse by the margin")."""
        if min(candidate.n, stable.n) < self.min_samples:
            return 0.0, 0.0
        vc, vs = candidate.var or 0.0, stable.var or 0.0
        pooled = (candidate.m2 + stable.m2) / (candidate.n + stable.n - 2)
        if pooled <= 0.0:
            return 0.0, 0.0  # constant values on both arms: no scale to judge against
        v = max(vc / candidate.n + vs / stable.n, pooled * 1e-12)
        tau2 = (self.effect_sd**2) * pooled
        diff = candidate.mean - stable.mean
        log_e = _log_half_normal_mixture(diff - self.tolerance, v, tau2)
        log_accept = 0.0
        if self.margin is not None:
            log_accept = _log_half_normal_mixture(self.margin - diff, v, tau2)
        return log_e, log_accept

    def evaluate(self, candidate: MeanMoments, stable: MeanMoments) -> SequentialResult:
        """Judge the cumulative moments of both arms (merged over replicas); O(1)."""
        log_e, log_accept = self.log_e_values(candidate, stable)
        ready = min(candidate.n, stable.n) >= self.min_samples
        estimate = candidate.mean - stable.mean if candidate.n and stable.n else None
        what = (
            f"mean {candidate.mean:.4g} vs {stable.mean:.4g}"
            if ready
            else f"waiting for {self.min_samples} values per arm"
        )
        return _result(
            self.name,
            log_e,
            log_accept,
            self.alpha,
            self.beta,
            candidate.n,
            stable.n,
            estimate,
            what,
        )

    def log_e_path(self, is_candidate: npt.NDArray[np.bool_], values: FloatArray) -> FloatArray:
        """The log e-value for "worse" after each observation of a sequence (last axis is
        time; leading axes are independent runs), as ``evaluate`` would give at every
        prefix (moments from running sums: for simulations, not for long-lived state)."""
        cand = is_candidate.astype(np.float64)
        stab = 1.0 - cand
        nc, ns = np.cumsum(cand, axis=-1), np.cumsum(stab, axis=-1)
        sc, ss = np.cumsum(cand * values, axis=-1), np.cumsum(stab * values, axis=-1)
        qc = np.cumsum(cand * values * values, axis=-1)
        qs = np.cumsum(stab * values * values, axis=-1)
        ready = np.minimum(nc, ns) >= self.min_samples
        nc_, ns_ = np.where(ready, nc, 2.0), np.where(ready, ns, 2.0)
        mc, ms = sc / nc_, ss / ns_
        m2c = np.maximum(qc - sc * mc, 0.0)
        m2s = np.maximum(qs - ss * ms, 0.0)
        pooled = (m2c + m2s) / (nc_ + ns_ - 2.0)
        ready &= pooled > 0.0
        pooled = np.where(ready, pooled, 1.0)
        v = np.maximum(m2c / (nc_ - 1.0) / nc_ + m2s / (ns_ - 1.0) / ns_, pooled * 1e-12)
        tau2 = self.effect_sd**2 * pooled
        delta = mc - ms - self.tolerance
        s = v + tau2
        z = np.sqrt(tau2) * delta / np.sqrt(v * s)
        log_e = math.log(2.0) + 0.5 * np.log(v / s) + tau2 * delta * delta / (2.0 * v * s)
        log_e = log_e + _log_ndtr_np(z)
        return np.where(ready, log_e, 0.0)


_log_ndtr_ufunc: Final = np.frompyfunc(_log_ndtr, 1, 1)


def _log_ndtr_np(x: FloatArray) -> FloatArray:
    return np.asarray(_log_ndtr_ufunc(x), dtype=np.float64)


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


def proportion_samples_needed(
    test: ProportionTest,
    *,
    candidate_rate: float,
    stable_rate: float,
    share: float,
    limit: int = _MAX_SAMPLES,
) -> int | None:
    """Candidate samples after which ``test`` decides on the *expected* counts: rejects when
    ``candidate_rate`` is worse than ``stable_rate`` by more than the tolerance, accepts
    otherwise. ``share`` is the candidate's fraction of the traffic (0..1). This follows
    the mean path, so it approximates the median decision time; None beyond ``limit``."""
    _check_level("share", share)
    for rate in (candidate_rate, stable_rate):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rates must be in [0, 1], got {rate}")
    ratio = (1.0 - share) / share
    rejects = candidate_rate - stable_rate > test.tolerance
    threshold = math.log(1.0 / (test.alpha if rejects else test.beta))

    def decides(n: int) -> bool:
        ns = n * ratio
        log_e, log_accept = test.log_e_values(n * candidate_rate, n, ns * stable_rate, ns)
        return (log_e if rejects else log_accept) >= threshold

    return _first_n(decides, limit)


def mean_samples_needed(
    test: MeanTest, *, effect_sd: float, share: float, limit: int = _MAX_SAMPLES
) -> int | None:
    """Candidate samples after which ``test`` decides on the expected statistic when the
    candidate's mean exceeds stable's by ``effect_sd`` standard deviations (equal variances):
    rejects when that is above the tolerance, accepts (needs a margin) otherwise."""
    _check_level("share", share)
    ratio = (1.0 - share) / share
    rejects = effect_sd > test.tolerance
    threshold = math.log(1.0 / (test.alpha if rejects else test.beta))

    def decides(n: int) -> bool:
        ns = max(round(n * ratio), 1)
        if min(n, ns) < test.min_samples:
            return False
        cand = MeanMoments(n, effect_sd, float(n - 1))
        stab = MeanMoments(ns, 0.0, float(ns - 1))
        log_e, log_accept = test.log_e_values(cand, stab)
        return (log_e if rejects else log_accept) >= threshold

    if not rejects and test.margin is None:
        return None
    return _first_n(decides, limit)


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
