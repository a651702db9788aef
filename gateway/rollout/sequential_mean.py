"""rollout/sequential_mean.py: the always-valid test on a difference of means
(``MeanTest``, a one-sided normal-mixture SPRT with plug-in variances) and the samples it
needs to decide. The derivation is in ``sequential``'s docstring. Pure arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from gateway.rollout.sequential_core import (
    _MAX_SAMPLES,
    DEFAULT_ACCEPT_ERROR,
    DEFAULT_FALSE_ROLLBACK_RATE,
    FloatArray,
    MeanMoments,
    SequentialResult,
    _check_level,
    _first_n,
    _result,
)

__all__ = ["MeanTest", "mean_samples_needed"]


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
