"""Drift statistics from counts, against scipy on the same bins and samples."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps
from scipy.spatial.distance import jensenshannon

from gateway import distributions
from gateway.drift import kernels, stats
from gateway.drift.profile import build_tensor_profile

PROPERTY = settings(max_examples=50, deadline=None, derandomize=True, database=None)

I64 = npt.NDArray[np.int64]


def numeric_counts(
    live: npt.NDArray[np.float32], sample: npt.NDArray[np.float32]
) -> tuple[I64, I64, npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(window counts, reference bin counts, mids, std) for a 1-feature 20-bin profile."""
    num = build_tensor_profile(sample.reshape(-1, 1), ["x"], 20).numeric
    assert num is not None
    counts = np.zeros((1, num.width), np.int64)
    kernels.count_numeric(live.reshape(-1, 1), num.packed, counts)
    return counts, num.ref_counts, num.mids, num.std


def test_critical_values_match_drift_md() -> None:
    # DRIFT.md §4.4: chi2_19 at 1 - 0.01/F and c(0.01/F) for F = 1, 32, 256.
    for n_feat, chi2_q, ks_c in [(1, 36.2, 1.628), (32, 47.4, 2.093), (256, 53.5, 2.328)]:
        assert distributions.chi2_isf(0.01 / n_feat, 19) == pytest.approx(chi2_q, abs=0.05)
        assert distributions.ks_coefficient(0.01 / n_feat) == pytest.approx(ks_c, abs=5e-4)
    crit = stats.chi2_critical(np.array([19, 0]), 0.01 / 32)
    assert crit[1] == math.inf
    threshold = stats.psi_thresholds(crit[:1], np.array([1000]), np.array([50_000]))
    assert threshold[0] == pytest.approx(0.0484, abs=1e-4)


@PROPERTY
@given(shift=st.floats(-1.0, 1.0), n=st.integers(50, 3000), seed=st.integers(0, 2**32 - 1))
def test_statistics_agree_with_scipy(shift: float, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal(20_000).astype(np.float32)
    live = (rng.standard_normal(n) + shift).astype(np.float32)
    counts, ref_counts, mids, std = numeric_counts(live, sample)
    ws = stats.numeric_vs_reference(counts, ref_counts, mids, std)
    folded = counts[0, 1:21].copy()
    folded[0] += counts[0, 0]
    last = int(np.flatnonzero(ref_counts[0])[-1])
    folded[last] += counts[0, 21]
    real = ref_counts[0] > 0
    expected_js = jensenshannon(folded.astype(float), ref_counts[0].astype(float))
    assert ws.js[0] == pytest.approx(expected_js, abs=1e-9)
    shares = ref_counts[0][real] / ref_counts[0].sum()
    chi2 = sps.chisquare(folded[real], n * shares).statistic
    assert ws.chi2[0] == pytest.approx(chi2, rel=1e-9)
    a = np.maximum(folded / n, 1e-4)
    e = np.maximum(ref_counts[0] / ref_counts[0].sum(), 1e-4)
    assert ws.psi[0] == pytest.approx(float(((a - e) * np.log(a / e)).sum()), rel=1e-9)
    assert ws.ks[0] <= sps.ks_2samp(live, sample).statistic + 1e-12
    assert ws.n[0] == n
    assert ws.n_base[0] == sample.size


def test_homogeneity_chi2_matches_contingency_table() -> None:
    rng = np.random.default_rng(11)
    a = rng.integers(0, 50, (3, 8))
    b = rng.integers(0, 50, (3, 8))
    a[1, 2] = b[1, 2] = 0  # an empty column is skipped, as scipy would reject it
    got = stats.chi2_homogeneity(a, b)
    for j in range(3):
        keep = (a[j] + b[j]) > 0
        table = np.stack([a[j][keep], b[j][keep]])
        expected = sps.chi2_contingency(table, correction=False).statistic
        assert got[j] == pytest.approx(expected, rel=1e-9)


def test_w1_tracks_a_location_shift_in_sigma_units() -> None:
    rng = np.random.default_rng(12)
    sample = rng.standard_normal(50_000).astype(np.float32)
    live = (rng.standard_normal(20_000) + 0.5).astype(np.float32)
    counts, ref_counts, mids, std = numeric_counts(live, sample)
    ws = stats.numeric_vs_reference(counts, ref_counts, mids, std)
    exact = sps.wasserstein_distance(live, sample) / float(np.std(sample))
    assert ws.w1[0] == pytest.approx(exact, rel=0.05)  # binned: within 2-4% (DRIFT.md §4.1)
    assert ws.psi[0] == pytest.approx(0.245, abs=0.03)  # PSI ~ delta^2 (DRIFT.md §1.2)


def test_quality_rates_come_from_their_own_columns() -> None:
    # B = 2: [below, bin1, bin2, above, nan, inf]
    counts = np.array([[1, 40, 50, 3, 4, 2]], np.int64)
    ref = np.array([[50, 50]], np.int64)
    ws = stats.numeric_vs_reference(counts, ref, np.array([[-1.0, 1.0]]), np.array([1.0]))
    assert ws.rows[0] == 100
    assert ws.n[0] == 94
    assert (ws.below_min_rate[0], ws.above_max_rate[0]) == (0.01, 0.03)
    assert (ws.nan_rate[0], ws.inf_rate[0]) == (0.04, 0.02)
    alerts = stats.quality_alerts(ws, np.zeros(1), np.zeros(1))
    assert alerts.tolist() == [True]


def test_categorical_statistics_score_unseen_as_epsilon_mass() -> None:
    ref = np.array([[400, 300, 300]], np.int64)
    counts = np.array([[390, 310, 290, 10, 5]], np.int64)  # codes | unseen | nan/inf
    ws = stats.categorical_vs_reference(counts, ref)
    assert ws.n[0] == 1000
    assert ws.unseen_rate[0] == pytest.approx(10 / 1005)
    assert ws.nan_rate[0] == pytest.approx(5 / 1005)
    expected = sps.chisquare([390, 310, 290], 990 * np.array([0.4, 0.3, 0.3])).statistic
    assert ws.chi2[0] == pytest.approx(expected, rel=1e-12)
    js = jensenshannon([390, 310, 290, 10], [400, 300, 300, 0])
    assert ws.js[0] == pytest.approx(js, abs=1e-12)
    assert ws.ks[0] == 0.0


def test_verdicts_need_enough_rows_and_severity_follows_psi() -> None:
    n = np.array([10, 5000, 5000, 5000])
    verdict = stats.verdicts(n, np.array([True, True, False, True]), 1000)
    assert verdict == ["insufficient_data", "drift", "no_drift", "drift"]
    severity = stats.severities(np.array([0.5, 0.3, 0.05, 0.12]), verdict)
    assert severity == ["none", "major", "none", "moderate"]


def test_zero_rows_give_finite_statistics_and_infinite_thresholds() -> None:
    counts = np.zeros((1, 24), np.int64)
    ref = np.full((1, 20), 10, np.int64)
    mids = np.tile(np.arange(20.0), (1, 1))
    ws = stats.numeric_vs_reference(counts, ref, mids, np.ones(1))
    assert ws.n[0] == 0
    assert stats.psi_thresholds(np.array([30.0]), ws.n, ws.n_base)[0] == math.inf
    assert np.isfinite([ws.psi[0], ws.js[0], ws.ks[0], ws.w1[0], ws.chi2[0]]).all()
