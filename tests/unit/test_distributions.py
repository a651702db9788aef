"""distributions.py against scipy: tails, quantiles and the incomplete beta function."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special
from scipy import stats as sps

from gateway import distributions

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)
REL_Z: float = 1e-12
REL_T: float = 1e-9


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
