"""distributions.py against scipy: tails, quantiles, the incomplete beta function, and the
intervals, tests and sample sizes built on them."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special
from scipy import stats as sps

from gateway import distributions
from gateway.distributions import Alternative

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)
REL_Z: float = 1e-12
REL_T: float = 1e-9
ALTERNATIVES: tuple[Alternative, ...] = ("less", "greater", "two-sided")


def close(actual: float, expected: float, rel: float) -> bool:
    """Relative agreement, with an absolute floor far below any p-value anyone reads."""
    return math.isclose(actual, expected, rel_tol=rel, abs_tol=1e-300)


# -- normal and Student t ----------------------------------------------------------------------


@pytest.mark.parametrize("x", [-38.0, -20.0, -8.5, -3.0, -1.0, -1e-3, 0.0, 0.7, 2.5, 9.0, 37.0])
def test_normal_cdf_and_sf_match_scipy(x: float) -> None:
    assert close(distributions.normal_cdf(x), float(sps.norm.cdf(x)), REL_Z)
    assert close(distributions.normal_sf(x), float(sps.norm.sf(x)), REL_Z)


@pytest.mark.parametrize("q", [1e-300, 1e-50, 1e-9, 0.001, 0.025, 0.3, 0.5, 0.8, 0.975, 1 - 1e-9])
def test_normal_ppf_matches_scipy(q: float) -> None:
    expected = float(sps.norm.ppf(q))
    assert distributions.normal_ppf(q) == pytest.approx(expected, rel=REL_Z, abs=1e-15)


DFS = [0.6, 1.0, 2.0, 3.0, 4.5, 9.0, 30.0, 117.3, 1e3, 2.5e4, 1e5, 1e6, 3e7, 1e9]
TS = [-60.0, -12.0, -4.0, -2.1, -1.0, -0.2, 0.0, 1e-4, 0.5, 1.7, 2.4, 3.3, 7.0, 25.0, 400.0]


@pytest.mark.parametrize("df", DFS)
def test_t_cdf_and_sf_match_scipy_on_a_grid(df: float) -> None:
    for t in TS:
        assert close(distributions.t_cdf(t, df), float(sps.t.cdf(t, df)), REL_T), (t, df)
        assert close(distributions.t_sf(t, df), float(sps.t.sf(t, df)), REL_T), (t, df)


@PROPERTY
@given(
    log_df=st.floats(-0.3, 8.0),
    t=st.floats(-80.0, 80.0, allow_nan=False),
)
def test_t_cdf_matches_scipy(log_df: float, t: float) -> None:
    df = 10.0**log_df
    assert close(distributions.t_cdf(t, df), float(sps.t.cdf(t, df)), REL_T)
    assert close(distributions.t_sf(t, df), float(sps.t.sf(t, df)), REL_T)


@pytest.mark.parametrize("df", [1.0, 2.0, 3.0, 7.5, 29.0, 250.0, 1e4, 1e6, 1e8])
@pytest.mark.parametrize("q", [1e-12, 1e-6, 0.001, 0.025, 0.05, 0.3, 0.5, 0.9, 0.975, 0.999])
def test_t_ppf_matches_scipy(df: float, q: float) -> None:
    x = distributions.t_ppf(q, df)
    assert x == pytest.approx(float(sps.t.ppf(q, df)), rel=REL_T, abs=1e-15)
    if q != 0.5:
        assert close(distributions.t_cdf(x, df), q, REL_T)


@PROPERTY
@given(
    log_a=st.floats(-1.0, 5.0),
    log_b=st.floats(-1.0, 5.0),
    x=st.floats(0.0, 1.0),
)
def test_regularized_beta_matches_scipy(log_a: float, log_b: float, x: float) -> None:
    a, b = 10.0**log_a, 10.0**log_b
    assert close(distributions.regularized_beta(a, b, x), float(special.betainc(a, b, x)), 1e-10)


def test_distribution_edges() -> None:
    assert distributions.t_cdf(math.inf, 5) == 1.0
    assert distributions.t_cdf(-math.inf, 5) == 0.0
    assert distributions.t_cdf(1.3, math.inf) == pytest.approx(float(sps.norm.cdf(1.3)), rel=REL_Z)
    assert math.isnan(distributions.t_cdf(math.nan, 5))
    assert distributions.t_ppf(0.5, 3) == 0.0
    assert distributions.t_ppf(1e-300, 0.5) == -math.inf  # the true quantile is beyond 1.8e308
    for bad in (0.0, 1.0, -0.1, math.nan):
        with pytest.raises(ValueError, match="quantile level"):
            distributions.normal_ppf(bad)
    with pytest.raises(ValueError, match="degrees of freedom"):
        distributions.t_cdf(1.0, 0.0)
    with pytest.raises(ValueError, match="positive"):
        distributions.regularized_beta(0.0, 1.0, 0.5)


# -- chi-square ------------------------------------------------------------------------------


@pytest.mark.parametrize("df", [1, 2, 3, 7, 19, 63, 255])
@pytest.mark.parametrize("tail", [0.5, 0.05, 0.01, 0.01 / 32, 0.01 / 256, 1e-9])
def test_chi2_quantile_matches_scipy(df: int, tail: float) -> None:
    assert distributions.chi2_ppf(1.0 - tail, df) == pytest.approx(
        sps.chi2.ppf(1.0 - tail, df), rel=1e-6
    )
    assert distributions.chi2_isf(tail, df) == pytest.approx(sps.chi2.isf(tail, df), rel=1e-9)
    assert distributions.chi2_sf(distributions.chi2_isf(tail, df), df) == pytest.approx(
        tail, rel=1e-9
    )


def test_chi2_edges() -> None:
    assert distributions.chi2_sf(0.0, 3) == 1.0
    assert distributions.chi2_ppf(0.5, 2) == pytest.approx(2 * math.log(2), rel=1e-12)
    with pytest.raises(ValueError, match="tail probability"):
        distributions.chi2_isf(0.0, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        distributions.chi2_isf(0.5, 0)
    with pytest.raises(ValueError, match="alpha"):
        distributions.ks_coefficient(1.0)


# -- intervals -------------------------------------------------------------------------------


def wilson_by_hand(correct: int, n: int, level: float) -> tuple[float, float]:
    z = float(sps.norm.ppf(1 - (1 - level) / 2))
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return centre - half, centre + half


@PROPERTY
@given(
    n=st.integers(1, 10**7),
    share=st.floats(0.0, 1.0),
    level=st.sampled_from([0.8, 0.9, 0.95, 0.99, 0.999]),
)
def test_wilson_interval_matches_hand_formula(n: int, share: float, level: float) -> None:
    correct = round(share * n)
    low, high = distributions.accuracy_ci(correct, n, level)
    expected_low, expected_high = wilson_by_hand(correct, n, level)
    assert low == pytest.approx(max(0.0, expected_low), rel=REL_Z, abs=1e-15)
    assert high == pytest.approx(min(1.0, expected_high), rel=REL_Z, abs=1e-15)
    assert 0.0 <= low <= correct / n <= high <= 1.0


def test_wilson_interval_edges() -> None:
    assert distributions.accuracy_ci(0, 0) == (0.0, 1.0)
    low, high = distributions.accuracy_ci(0, 10)
    assert low == 0.0
    assert 0.0 < high < 0.35  # Wilson stays informative at 0 successes (Wald would give 0)
    with pytest.raises(ValueError, match="correct"):
        distributions.accuracy_ci(11, 10)


@PROPERTY
@given(
    mean=st.floats(-1e3, 1e3),
    sd=st.floats(1e-3, 1e3),
    n=st.integers(2, 10**6),
)
def test_mean_ci_matches_scipy_t_interval(mean: float, sd: float, n: int) -> None:
    low, high = distributions.mean_ci(mean, sd * sd, n, 0.95)
    expected = sps.t.interval(0.95, n - 1, loc=mean, scale=sd / math.sqrt(n))
    half = float(expected[1]) - mean
    assert (high - low) / 2 == pytest.approx(half, rel=REL_T)
    assert (high + low) / 2 == pytest.approx(mean, rel=1e-12, abs=1e-9)


def test_mae_and_rmse_intervals() -> None:
    low, high = distributions.mae_ci(0.01, 4.0, 10)
    assert low == 0.0 < 0.01 < high
    assert distributions.rmse(50.0, 2) == 5.0
    low, high = distributions.rmse_ci(25.0, 16.0, 100)
    m_low, m_high = distributions.mean_ci(25.0, 16.0, 100)
    assert (low, high) == pytest.approx((math.sqrt(m_low), math.sqrt(m_high)))
    with pytest.raises(ValueError, match="at least 2"):
        distributions.mean_ci(1.0, 1.0, 1)


# -- tests -----------------------------------------------------------------------------------


def z_test_by_hand(c1: int, n1: int, c2: int, n2: int, alternative: str) -> tuple[float, float]:
    p1, p2 = c1 / n1, c2 / n2
    pooled = (c1 + c2) / (n1 + n2)
    z = (p1 - p2) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if alternative == "less":
        return z, float(sps.norm.cdf(z))
    if alternative == "greater":
        return z, float(sps.norm.sf(z))
    return z, float(2 * sps.norm.sf(abs(z)))


@PROPERTY
@given(
    n1=st.integers(2, 10**6),
    n2=st.integers(2, 10**6),
    s1=st.floats(0.0, 1.0),
    s2=st.floats(0.0, 1.0),
    alternative=st.sampled_from(ALTERNATIVES),
)
def test_two_proportion_test_matches_scipy_norm(
    n1: int, n2: int, s1: float, s2: float, alternative: Alternative
) -> None:
    c1, c2 = round(s1 * n1), round(s2 * n2)
    if c1 + c2 in (0, n1 + n2):
        return  # no variance: covered by test_degenerate_tests
    z, p = distributions.two_proportion_test(c1, n1, c2, n2, alternative)
    expected_z, expected_p = z_test_by_hand(c1, n1, c2, n2, alternative)
    assert z == pytest.approx(expected_z, rel=REL_Z, abs=1e-12)
    assert close(p, expected_p, 1e-11)


@PROPERTY
@given(
    mean1=st.floats(-100.0, 100.0),
    mean2=st.floats(-100.0, 100.0),
    sd1=st.floats(0.01, 100.0),
    sd2=st.floats(0.01, 100.0),
    n1=st.integers(2, 10**6),
    n2=st.integers(2, 10**6),
    alternative=st.sampled_from(ALTERNATIVES),
)
def test_welch_t_test_matches_scipy(
    mean1: float,
    mean2: float,
    sd1: float,
    sd2: float,
    n1: int,
    n2: int,
    alternative: Alternative,
) -> None:
    t, df, p = distributions.welch_t_test(mean1, sd1**2, n1, mean2, sd2**2, n2, alternative)
    expected = sps.ttest_ind_from_stats(
        mean1, sd1, n1, mean2, sd2, n2, equal_var=False, alternative=alternative
    )
    v1, v2 = sd1**2 / n1, sd2**2 / n2
    expected_df = (v1 + v2) ** 2 / (v1**2 / (n1 - 1) + v2**2 / (n2 - 1))
    assert t == pytest.approx(float(expected.statistic), rel=1e-12, abs=1e-12)
    assert df == pytest.approx(expected_df, rel=1e-12)
    assert close(p, float(expected.pvalue), REL_T)


def test_degenerate_tests() -> None:
    assert distributions.two_proportion_test(10, 10, 20, 20, "less") == (0.0, 0.5)
    assert distributions.two_proportion_test(0, 10, 0, 20, "two-sided") == (0.0, 1.0)
    assert distributions.welch_t_test(1.0, 0.0, 5, 1.0, 0.0, 5) == (0.0, 8.0, 1.0)
    t, _df, p = distributions.welch_t_test(2.0, 0.0, 5, 1.0, 0.0, 5, "greater")
    assert (t, p) == (math.inf, 0.0)
    with pytest.raises(ValueError, match="at least 2"):
        distributions.welch_t_test(1.0, 1.0, 1, 1.0, 1.0, 5)
    with pytest.raises(ValueError, match="alternative"):
        distributions.two_proportion_test(1, 2, 1, 2, "sideways")  # type: ignore[arg-type]  # on purpose


# -- sample sizes ----------------------------------------------------------------------------


@pytest.mark.parametrize(("p1", "p2"), [(0.9, 0.85), (0.5, 0.45), (0.99, 0.97), (0.2, 0.3)])
@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_samples_needed_two_proportions_reaches_the_power(
    p1: float, p2: float, alpha: float
) -> None:
    n = distributions.samples_needed_two_proportions(p1, p2, alpha, 0.8)
    assert n is not None

    def power(m: float) -> float:  # normal approximation, one-sided, pooled null variance
        pbar = (p1 + p2) / 2
        se0 = math.sqrt(2 * pbar * (1 - pbar) / m)
        se1 = math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / m)
        return float(sps.norm.cdf((abs(p1 - p2) - sps.norm.ppf(1 - alpha) * se0) / se1))

    assert power(n) >= 0.8 > power(n - 1)
    assert distributions.samples_needed_two_proportions(p1, p1) is None


@pytest.mark.parametrize(
    ("delta", "sd1", "sd2"), [(0.1, 1.0, 1.0), (2.0, 5.0, 3.0), (0.01, 0.2, 0.1)]
)
def test_samples_needed_means_reaches_the_power(delta: float, sd1: float, sd2: float) -> None:
    n = distributions.samples_needed_means(delta, sd1, sd2, 0.05, 0.8)
    assert n is not None

    def power(m: int) -> float:
        return float(sps.norm.cdf(delta / math.sqrt((sd1**2 + sd2**2) / m) - sps.norm.ppf(0.95)))

    assert power(n) >= 0.8 > power(n - 1)
    two_sided = distributions.samples_needed_means(delta, sd1, sd2, 0.05, 0.8, two_sided=True)
    assert two_sided is not None
    assert two_sided > n
    assert distributions.samples_needed_means(0.0, 1.0, 1.0) is None
