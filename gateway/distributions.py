"""distributions.py: the special functions the statistics need, in one place: the standard
normal, Student's t (through the regularised incomplete beta function) and the chi-square
(through the regularised incomplete gamma function), their tails and their quantiles; and the
intervals, tests and sample sizes built on them (Wilson and t intervals, the two-proportion z
and Welch t tests).

In: plain floats. Out: plain floats. Pure functions: no numpy, no scipy at run time (the tests
check every function against scipy), no state. Every quantile comes from one inverse,
``_invert_sf``: Newton steps on the upper tail kept inside a bisection bracket, so it always
converges. Used by ``outcomes.py`` (tests on ground truth) and ``drift/stats.py`` (critical
values); it knows nothing of either.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Final, Literal

__all__ = [
    "normal_cdf",
    "normal_sf",
    "normal_ppf",
    "regularized_beta",
    "t_cdf",
    "t_sf",
    "t_ppf",
    "chi2_sf",
    "chi2_isf",
    "chi2_ppf",
    "ks_coefficient",
    "Alternative",
    "DEFAULT_POWER",
    "accuracy_ci",
    "mean_ci",
    "mae_ci",
    "rmse",
    "rmse_ci",
    "two_proportion_test",
    "welch_t_test",
    "samples_needed_two_proportions",
    "samples_needed_means",
]

Alternative = Literal["less", "greater", "two-sided"]
DEFAULT_POWER: Final = 0.8  # the conventional 80% power for sample-size estimates

_SQRT2: Final = math.sqrt(2.0)
_LN_SQRT_2PI: Final = 0.5 * math.log(2.0 * math.pi)
_CF_EPS: Final = 1e-15  # continued fraction stops when a step changes it by less than this
_CF_TINY: Final = 1e-300  # Lentz's guard against division by zero
_CF_MAX_ITER: Final = 100_000  # needs O(sqrt(a)) steps: enough for df up to about 1e9
_STANDARD_NORMAL: Final = statistics.NormalDist()
# For df far above t^2 the continued fraction loses about eps * df / (1 + t^2) to cancellation
# (x is within t^2/df of 1), while the large-a asymptotic form errs by about
# (1 + t^2)^2 / (4 df^2): the two are equal where (1 + t^2) / df = (4 eps)^(1/3) ~ 9.6e-6, so
# neither ever errs by more than about 2e-11 relative.
_T_ASYMPTOTIC_RATIO: Final = (4.0 * 2.220446049250313e-16) ** (1.0 / 3.0)


# ----------------------------------------------------------------------------------------------
# The one inverse.

_INVERSE_MAX_ITER: Final = 400  # bisection alone halves the bracket: 400 steps reach any float


def _invert_sf(
    sf: Callable[[float], float],
    pdf: Callable[[float], float],
    p: float,
    start: float,
    *,
    hi: float,
    rtol: float,
    scale: float = 0.0,
) -> float:
    """The x >= 0 with ``sf(x) == p`` for a decreasing upper tail ``sf`` with density ``pdf``.

    The bracket [0, hi] doubles until it holds the root (``inf`` when it passes the largest
    float); Newton steps from ``start`` that would leave the bracket are replaced by bisection.
    Stops when a step is below ``rtol * max(scale, |x|)`` or the bracket is one ulp wide.
    """
    lo = 0.0
    while sf(hi) > p:  # grow the bracket; ratio 2, so bisection converges fast
        lo, hi = hi, 2.0 * hi
        if math.isinf(hi):
            return math.inf
    x = min(max(start, lo), hi)
    if not lo < x < hi:
        x = 0.5 * (lo + hi)
    for _ in range(_INVERSE_MAX_ITER):
        f = sf(x) - p
        if f > 0.0:
            lo = x
        else:
            hi = x
        density = pdf(x)
        nxt = x + f / density if density > 0.0 else math.inf  # d(sf)/dx = -pdf
        if not lo < nxt < hi:
            nxt = 0.5 * (lo + hi)
        if abs(nxt - x) <= rtol * max(scale, abs(x)) or hi - lo <= 4e-16 * hi:
            return nxt
        x = nxt
    return x


# ----------------------------------------------------------------------------------------------
# Normal and Student t.


def normal_cdf(x: float) -> float:
    """P(Z <= x) for a standard normal; accurate to the last digits in both tails."""
    return 0.5 * math.erfc(-x / _SQRT2)


def normal_sf(x: float) -> float:
    """P(Z > x) for a standard normal."""
    return 0.5 * math.erfc(x / _SQRT2)


def normal_ppf(q: float) -> float:
    """The ``q`` quantile of a standard normal (0 < q < 1).

    Wichura's AS241 (``statistics.NormalDist.inv_cdf``), then one Newton step on our own
    ``normal_cdf`` so that quantile and CDF agree to rounding.
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    x = _STANDARD_NORMAL.inv_cdf(q)
    pdf = math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    if pdf > 0.0:
        # Work in the smaller tail so the residual keeps its relative precision.
        residual = normal_cdf(x) - q if q < 0.5 else (1.0 - q) - normal_sf(x)
        x -= residual / pdf
    return x


def _lgamma_correction(x: float) -> float:
    """ln Gamma(x) minus its Stirling approximation, for x >= 10 (error below 1e-18)."""
    inv = 1.0 / x
    inv2 = inv * inv
    return inv * (
        1.0 / 12.0
        - inv2
        * (
            1.0 / 360.0
            - inv2 * (1.0 / 1260.0 - inv2 * (1.0 / 1680.0 - inv2 * (1.0 / 1188.0 - inv2 / 1820.0)))
        )
    )


def _ln_beta(a: float, b: float) -> float:
    """ln B(a, b) without cancelling large lgamma values (R's lbeta): accurate for any size."""
    p, q = min(a, b), max(a, b)
    if p >= 10.0:
        corr = _lgamma_correction(p) + _lgamma_correction(q) - _lgamma_correction(p + q)
        return (
            -0.5 * math.log(q)
            + _LN_SQRT_2PI
            + corr
            + (p - 0.5) * math.log(p / (p + q))
            + q * math.log1p(-p / (p + q))
        )
    if q >= 10.0:
        corr = _lgamma_correction(q) - _lgamma_correction(p + q)
        return (
            math.lgamma(p) + corr + p - p * math.log(p + q) + (q - 0.5) * math.log1p(-p / (p + q))
        )
    return math.lgamma(p) + math.lgamma(q) - math.lgamma(p + q)


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) by the modified Lentz method (Numerical Recipes 6.4)."""
    qab = a + b
    qap = a + 1.0
    qam = a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    if abs(d) < _CF_TINY:
        d = _CF_TINY
    d = 1.0 / d
    h = d
    for m in range(1, _CF_MAX_ITER + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        if abs(d) < _CF_TINY:
            d = _CF_TINY
        c = 1.0 + aa / c
        if abs(c) < _CF_TINY:
            c = _CF_TINY
        d = 1.0 / d
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        if abs(d) < _CF_TINY:
            d = _CF_TINY
        c = 1.0 + aa / c
        if abs(c) < _CF_TINY:
            c = _CF_TINY
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _CF_EPS:
            return h
    raise ArithmeticError(f"incomplete beta did not converge (a={a}, b={b}, x={x})")


def _ibeta(a: float, b: float, x: float, y: float, ln_x: float, ln_y: float) -> float:
    """I_x(a, b) with y = 1 - x and both logarithms supplied by a caller who knows them
    precisely (for large a, a * ln(x) amplifies any rounding in ln(x))."""
    ln_front = a * ln_x + b * ln_y - _ln_beta(a, b)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(ln_front) * _beta_cf(b, a, y) / b


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function (a, b > 0, 0 <= x <= 1).

    Numerical Recipes' continued fraction with an accurate ln B(a, b); agrees with
    ``scipy.special.betainc`` to about 1e-12 relative (tested to 1e-10).
    """
    if a <= 0.0 or b <= 0.0:
        raise ValueError(f"a and b must be positive, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x == 0.0:
        return 0.0
    if x == 1.0:
        return 1.0
    return _ibeta(a, b, x, 1.0 - x, math.log(x), math.log1p(-x))


def _t_tail(t: float, df: float) -> float:
    """P(T > |t|) for Student's t with ``df`` degrees of freedom."""
    t, df = float(t), float(df)
    if df <= 0.0 or math.isnan(df):
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isnan(t):
        return math.nan
    if math.isinf(df):
        return normal_sf(abs(t))
    if t == 0.0:
        return 0.5
    if math.isinf(t):
        return 0.0
    t = abs(t)
    root_df = math.sqrt(df)
    if t < root_df and 1.0 + t * t < _T_ASYMPTOTIC_RATIO * df:
        # Leading term of DiDonato & Morris' BGRAT expansion: I_x(a, 1/2) ~ Q(1/2, u) with
        # u = -(a - 1/4) ln x, i.e. erfc(sqrt(u)); relative error about (1 + t^2)^2 / (4 df^2).
        return 0.5 * math.erfc(math.sqrt((0.5 * df - 0.25) * math.log1p(t * t / df)))
    # I_x(df/2, 1/2) with x = df / (df + t^2): x, 1 - x and both logs from a ratio below 1,
    # taken in logs where it could underflow, so nothing overflows and nothing cancels.
    if t <= root_df:
        s2 = (t / root_df) ** 2  # x = 1 / (1 + s2)
        x, y = 1.0 / (1.0 + s2), s2 / (1.0 + s2)
        ln_x = -math.log1p(s2)
        ln_y = 2.0 * (math.log(t) - math.log(root_df)) + ln_x  # s2 may underflow to 0
    else:
        ln_r = 2.0 * (math.log(root_df) - math.log(t))  # x = r / (1 + r)
        r = math.exp(ln_r)
        x, y = r / (1.0 + r), 1.0 / (1.0 + r)
        ln_y = -math.log1p(r)
        ln_x = ln_r + ln_y
    return 0.5 * _ibeta(0.5 * df, 0.5, x, y, ln_x, ln_y)


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom (df may be fractional)."""
    tail = _t_tail(t, df)
    return tail if t < 0.0 else 1.0 - tail


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom."""
    tail = _t_tail(t, df)
    return tail if t > 0.0 else 1.0 - tail


def _t_pdf(t: float, df: float) -> float:
    return math.exp(
        -0.5 * (df + 1.0) * math.log1p(t * t / df) - 0.5 * math.log(df) - _ln_beta(0.5 * df, 0.5)
    )


def _t_isf(p: float, df: float) -> float:
    """The x > 0 with ``t_sf(x, df) == p`` for 0 < p < 0.5."""
    return _invert_sf(
        lambda x: t_sf(x, df), lambda x: _t_pdf(x, df), p, -normal_ppf(p), hi=1.0, rtol=1e-15
    )


def t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (0 < q < 1)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    if df <= 0.0 or math.isnan(df):
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(df):
        return normal_ppf(q)
    if q == 0.5:
        return 0.0
    return -_t_isf(q, df) if q < 0.5 else _t_isf(1.0 - q, df)


# ----------------------------------------------------------------------------------------------
# Chi-square (regularised incomplete gamma), to 1e-12 relative.

_GAMMA_EPS: Final = 1e-15
_GAMMA_TINY: Final = 1e-300
_GAMMA_MAX_ITER: Final = 1000


def _gamma_series_p(a: float, x: float) -> float:
    """Regularised lower incomplete gamma P(a, x) by its power series (good for x < a + 1)."""
    term = 1.0 / a
    total = term
    ap = a
    for _ in range(_GAMMA_MAX_ITER):
        ap += 1.0
        term *= x / ap
        total += term
        if abs(term) < abs(total) * _GAMMA_EPS:
            break
    return total * math.exp(-x + a * math.log(x) - math.lgamma(a))


def _gamma_cf_q(a: float, x: float) -> float:
    """Regularised upper incomplete gamma Q(a, x) by Lentz's continued fraction (x >= a + 1)."""
    b = x + 1.0 - a
    c = 1.0 / _GAMMA_TINY
    d = 1.0 / b
    h = d
    for i in range(1, _GAMMA_MAX_ITER):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        if abs(d) < _GAMMA_TINY:
            d = _GAMMA_TINY
        c = b + an / c
        if abs(c) < _GAMMA_TINY:
            c = _GAMMA_TINY
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _GAMMA_EPS:
            break
    return math.exp(-x + a * math.log(x) - math.lgamma(a)) * h


def chi2_sf(x: float, df: float) -> float:
    """Upper tail P(X > x) of a chi-square with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if x <= 0.0:
        return 1.0
    a = 0.5 * df
    h = 0.5 * x
    if h < a + 1.0:
        return 1.0 - _gamma_series_p(a, h)
    return _gamma_cf_q(a, h)


def _chi2_pdf(x: float, df: float) -> float:
    a = 0.5 * df
    return math.exp((a - 1.0) * math.log(x) - 0.5 * x - a * math.log(2.0) - math.lgamma(a))


def chi2_isf(q: float, df: float) -> float:
    """The x with ``chi2_sf(x, df) == q``: the upper-``q`` critical value.

    Wilson-Hilferty start, then the bracketed Newton inverse; agrees with
    ``scipy.stats.chi2.isf`` to about 1e-12 relative.
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"tail probability must be in (0, 1), got {q}")
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    z = _STANDARD_NORMAL.inv_cdf(1.0 - q)
    w = 2.0 / (9.0 * df)
    start = df * (1.0 - w + z * math.sqrt(w)) ** 3
    return _invert_sf(
        lambda x: chi2_sf(x, df),
        lambda x: _chi2_pdf(x, df),
        q,
        start,
        hi=max(2.0 * df, 10.0),
        rtol=1e-14,
        scale=1.0,
    )


def chi2_ppf(p: float, df: float) -> float:
    """The ``p`` quantile of a chi-square with ``df`` degrees of freedom."""
    return chi2_isf(1.0 - p, df)


def ks_coefficient(alpha: float) -> float:
    """Asymptotic two-sample KS coefficient c(alpha) = sqrt(-ln(alpha / 2) / 2)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return math.sqrt(-math.log(alpha / 2.0) / 2.0)


# ----------------------------------------------------------------------------------------------
# Intervals, tests and sample sizes on plain numbers (what outcomes.py compares arms with).


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")


def accuracy_ci(correct: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion; (0, 1) when n == 0."""
    _check_level(level)
    if not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n, got correct={correct}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    z = normal_ppf(0.5 + 0.5 * level)
    z2n = z * z / n
    p = correct / n
    centre = (p + 0.5 * z2n) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(p * (1.0 - p) / n + 0.25 * z2n / n)
    # The bounds are exactly 0 at no successes and 1 at all (rounding would leave 1e-17).
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == n else min(1.0, centre + half)
    return (low, high)


def mean_ci(mean: float, var: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Student t interval for a mean from its sample variance (ddof=1); needs n >= 2."""
    _check_level(level)
    if n < 2:
        raise ValueError(f"a t interval needs at least 2 values, got {n}")
    half = t_ppf(0.5 + 0.5 * level, n - 1) * math.sqrt(max(var, 0.0) / n)
    return (mean - half, mean + half)


def mae_ci(
    mean_abs_error: float, var_abs_error: float, n: int, level: float = 0.95
) -> tuple[float, float]:
    """t interval for the mean absolute error, floored at 0."""
    low, high = mean_ci(mean_abs_error, var_abs_error, n, level)
    return (max(0.0, low), high)


def rmse(sum_sq_error: float, n: int) -> float:
    """Root mean squared error from the sum of squared errors."""
    if n <= 0:
        raise ValueError(f"rmse needs at least one value, got {n}")
    return math.sqrt(sum_sq_error / n)


def rmse_ci(mse: float, var_sq_error: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """t interval for the mean squared error, square-rooted (monotone, so coverage carries)."""
    low, high = mean_ci(mse, var_sq_error, n, level)
    return (math.sqrt(max(0.0, low)), math.sqrt(max(0.0, high)))


def _p_value(statistic: float, alternative: Alternative, cdf: float, sf: float) -> float:
    if alternative == "less":
        return cdf
    if alternative == "greater":
        return sf
    if alternative == "two-sided":
        return min(1.0, 2.0 * (sf if statistic > 0.0 else cdf))
    raise ValueError(f"alternative must be less, greater or two-sided, got {alternative!r}")


def two_proportion_test(
    c1: int, n1: int, c2: int, n2: int, alternative: Alternative = "two-sided"
) -> tuple[float, float]:
    """Pooled two-proportion z-test of p1 = c1/n1 against p2 = c2/n2; returns (z, p).

    "less" tests H1: p1 < p2. When both arms are all successes or all failures the pooled
    variance is 0 and the result is z = 0 (no evidence either way).
    """
    if n1 <= 0 or n2 <= 0 or not 0 <= c1 <= n1 or not 0 <= c2 <= n2:
        raise ValueError(f"need 0 <= c <= n and n > 0, got {c1}/{n1} and {c2}/{n2}")
    pooled = (c1 + c2) / (n1 + n2)
    se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2))
    z = (c1 / n1 - c2 / n2) / se if se > 0.0 else 0.0
    return z, _p_value(z, alternative, normal_cdf(z), normal_sf(z))


def welch_t_test(
    mean1: float,
    var1: float,
    n1: int,
    mean2: float,
    var2: float,
    n2: int,
    alternative: Alternative = "two-sided",
) -> tuple[float, float, float]:
    """Welch's unequal-variance t-test from summary statistics; returns (t, df, p).

    ``var`` are sample variances (ddof=1), as ``scipy.stats.ttest_ind_from_stats`` takes their
    square roots. "greater" tests H1: mean1 > mean2. When both variances are 0 the statistic
    is +-inf for different means (p 0 or 1) or 0 for equal ones, with df = n1 + n2 - 2.
    """
    if n1 < 2 or n2 < 2:
        raise ValueError(f"Welch's test needs at least 2 values per arm, got {n1} and {n2}")
    if var1 < 0.0 or var2 < 0.0:
        raise ValueError("variances must be non-negative")
    s1 = var1 / n1
    s2 = var2 / n2
    se2 = s1 + s2
    diff = mean1 - mean2
    if se2 == 0.0:
        t = 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
        df = float(n1 + n2 - 2)
    else:
        t = diff / math.sqrt(se2)
        df = se2 * se2 / (s1 * s1 / (n1 - 1) + s2 * s2 / (n2 - 1))
    return t, df, _p_value(t, alternative, t_cdf(t, df), t_sf(t, df))


def _z_alpha(alpha: float, two_sided: bool) -> float:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return normal_ppf(1.0 - (alpha / 2.0 if two_sided else alpha))


def _z_power(power: float) -> float:
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power}")
    return normal_ppf(power)


def samples_needed_two_proportions(
    p1: float, p2: float, alpha: float = 0.05, power: float = DEFAULT_POWER, two_sided: bool = False
) -> int | None:
    """Samples per arm for the pooled z-test to detect p1 vs p2 (normal approximation,
    one-sided at ``alpha`` unless ``two_sided``); None when p1 == p2 (no n detects nothing)."""
    if not (0.0 <= p1 <= 1.0 and 0.0 <= p2 <= 1.0):
        raise ValueError(f"proportions must be in [0, 1], got {p1} and {p2}")
    if p1 == p2:
        return None
    pbar = 0.5 * (p1 + p2)
    root = _z_alpha(alpha, two_sided) * math.sqrt(2.0 * pbar * (1.0 - pbar)) + _z_power(
        power
    ) * math.sqrt(p1 * (1.0 - p1) + p2 * (1.0 - p2))
    return max(2, math.ceil(root * root / ((p1 - p2) ** 2)))


def samples_needed_means(
    delta: float,
    sd1: float,
    sd2: float,
    alpha: float = 0.05,
    power: float = DEFAULT_POWER,
    two_sided: bool = False,
) -> int | None:
    """Samples per arm to detect a difference ``delta`` in means with standard deviations
    ``sd1``, ``sd2`` (normal approximation to Welch's test, one-sided unless ``two_sided``);
    None when delta == 0."""
    if delta == 0.0:
        return None
    z = _z_alpha(alpha, two_sided) + _z_power(power)
    return max(2, math.ceil(z * z * (sd1 * sd1 + sd2 * sd2) / (delta * delta)))
