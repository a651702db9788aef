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

from gateway.rollout.sequential_core import (
    _MAX_SAMPLES,
    DEFAULT_ACCEPT_ERROR,
    DEFAULT_FALSE_ROLLBACK_RATE,
    JEFFREYS,
    BernoulliCounts,
    FloatArray,
    MeanMoments,
    SequentialResult,
    SequentialVerdict,
    _check_level,
    _first_n,
    _result,
    exceedances,
    split_alpha,
    step_deadline_s,
)
from gateway.rollout.sequential_mean import MeanTest, mean_samples_needed

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

_BISECT_STEPS: Final = 100  # the boundary MLE to ~1e-30: far below any count's resolution


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
