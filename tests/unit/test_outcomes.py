"""Outcome statistics and tests, against scipy (test-only) and hand formulas.

Tolerances: the normal functions, the two-proportion z-test and Wilson's interval agree with
scipy to 1e-12 relative. Everything built on the Student t CDF (Welch's p-value, t quantiles
and intervals) is held to 1e-9 relative: the incomplete-beta continued fraction is good to
about 1e-13 for moderate df, and for df in the millions (where it loses about eps * df / t^2)
the asymptotic form takes over; the worst case against an exact (mpmath) reference was
5e-11, and scipy agrees with the exact values to 2e-13.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from gateway.distributions import Alternative
from gateway.outcomes import (
    OutcomeKindError,
    OutcomeSnapshot,
    OutcomeStats,
    compare,
)

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)
ALTERNATIVES: tuple[Alternative, ...] = ("less", "greater", "two-sided")
REL_Z: float = 1e-12
REL_T: float = 1e-9

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


def close(actual: float, expected: float, rel: float) -> bool:
    """Relative agreement, with an absolute floor far below any p-value anyone reads."""
    return math.isclose(actual, expected, rel_tol=rel, abs_tol=1e-300)


# -- cumulative stats and windows ------------------------------------------------------------


@PROPERTY
@given(
    values=st.lists(st.floats(0.0, 1e3), min_size=0, max_size=60),
    split=st.integers(0, 60),
    chunk=st.integers(1, 7),
)
def test_moments_window_matches_direct_computation(
    values: list[float], split: int, chunk: int
) -> None:
    # Absolute errors of predictions against zero truths are the values themselves.
    stats = OutcomeStats("m", "1")
    data = np.array(values, np.float64)
    split = min(split, len(values))
    for start in range(0, split, chunk):
        part = data[start : min(start + chunk, split)]
        stats.add_regression(part, np.zeros_like(part))
    earlier = stats.snapshot().abs_error
    for start in range(split, len(values), chunk):
        part = data[start : start + chunk]
        stats.add_regression(part, np.zeros_like(part))
    window = stats.snapshot().abs_error.minus(earlier)
    tail = data[split:]
    assert window.n == tail.size
    if tail.size:
        assert window.mean == pytest.approx(float(tail.mean()), rel=1e-9, abs=1e-9)
    if tail.size >= 2:
        assert window.var == pytest.approx(float(tail.var(ddof=1)), rel=1e-7, abs=1e-6)
    else:
        assert window.var is None


def test_classification_stats_and_windows() -> None:
    stats = OutcomeStats("m", "2")
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]], np.float32)
    truth = np.array([0, 2, 2], np.int64)
    stats.add_scores(proba, truth)
    first = stats.snapshot()
    assert (first.kind, first.n, first.correct) == ("classification", 3, 2)
    expected_log_loss = -np.log(np.array([0.7, 0.1, 0.4], np.float32).astype(np.float64))
    assert first.log_loss.mean == pytest.approx(float(expected_log_loss.mean()), rel=1e-12)
    assert first.confusion is not None
    assert first.confusion[0, 0] == 1
    assert first.confusion[2, 1] == 1
    assert first.confusion[2, 2] == 1
    stats.add_classification(np.array([1, 70], np.int64), np.array([1, 65], np.int64))
    window = stats.snapshot().minus(first)
    assert (window.n, window.correct, window.confusion_overflow) == (2, 1, 1)
    assert window.log_loss.n == 0  # labels only: no probabilities, no log-loss
    assert window.confusion is not None
    assert int(window.confusion.sum()) == 1
    assert window.accuracy == 0.5
    with pytest.raises(OutcomeKindError, match="classification"):
        stats.add_regression(np.zeros(1), np.zeros(1))


@PROPERTY
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(0, 120),
    chunk=st.sampled_from([1, 3, 16, 17, 50, 1000]),
)
def test_row_by_row_and_vectorised_paths_agree(seed: int, rows: int, chunk: int) -> None:
    """Batches up to SMALL_BATCH rows take a Python loop, larger ones numpy: same counts."""
    rng = np.random.default_rng(seed)
    classes = int(rng.integers(2, 70))
    scores = rng.dirichlet(np.ones(classes), size=rows).astype(np.float32)
    kind = rng.integers(0, 4, rows)
    scores[kind == 1] = rng.normal(size=(int((kind == 1).sum()), classes))  # logits
    scores[kind == 2, 0] = np.nan  # no usable class
    truth = rng.integers(0, classes, rows).astype(np.int64)
    labels = rng.integers(-1, 80, rows).astype(np.int64)
    values = rng.normal(size=rows)
    whole, parts = OutcomeStats("m", "1"), OutcomeStats("m", "1")
    whole.add_scores(scores, truth)
    whole.add_classification(labels, truth)
    wreg, preg = OutcomeStats("m", "2"), OutcomeStats("m", "2")
    wreg.add_regression(values, np.zeros(rows))
    for start in range(0, rows, chunk):
        end = start + chunk
        parts.add_scores(scores[start:end], truth[start:end])
        parts.add_classification(labels[start:end], truth[start:end])
        preg.add_regression(values[start:end], np.zeros(values[start:end].shape))
    for a, b in ((whole.snapshot(), parts.snapshot()), (wreg.snapshot(), preg.snapshot())):
        assert (a.n, a.correct, a.confusion_overflow) == (b.n, b.correct, b.confusion_overflow)
        assert (a.confusion is None) == (b.confusion is None)
        if a.confusion is not None and b.confusion is not None:
            assert np.array_equal(a.confusion, b.confusion)
        for ma, mb in ((a.log_loss, b.log_loss), (a.abs_error, b.abs_error)):
            assert ma.n == mb.n
            assert ma.mean == pytest.approx(mb.mean, rel=1e-9, abs=1e-12)
            assert ma.m2 == pytest.approx(mb.m2, rel=1e-7, abs=1e-9)
        assert a.sum_error == pytest.approx(b.sum_error, rel=1e-9, abs=1e-9)


def test_log_loss_is_clipped_at_1e_15() -> None:
    stats = OutcomeStats("m", "1")
    proba = np.array([[1.0, 0.0]], np.float32)
    stats.add_scores(proba, np.array([1], np.int64))
    assert stats.snapshot().log_loss.mean == pytest.approx(-math.log(1e-15))


def test_regression_stats_match_numpy() -> None:
    rng = np.random.default_rng(7)
    truth = rng.normal(size=500)
    predicted = truth + rng.normal(0.3, 1.0, size=500)
    stats = OutcomeStats("m", "1")
    for part in np.array_split(np.arange(500), 9):
        stats.add_regression(predicted[part], truth[part])
    snap = stats.snapshot()
    err = predicted - truth
    assert snap.mae == pytest.approx(float(np.abs(err).mean()), rel=1e-12)
    assert snap.rmse == pytest.approx(float(np.sqrt(np.square(err).mean())), rel=1e-12)
    assert snap.mean_error == pytest.approx(float(err.mean()), rel=1e-12)
    assert snap.abs_error.var == pytest.approx(float(np.abs(err).var(ddof=1)), rel=1e-10)
    assert snap.accuracy is None


# -- compare ---------------------------------------------------------------------------------


def add_classifier_rows(stats: OutcomeStats, accuracy: float, n: int, seed: int) -> None:
    """``n`` 3-class rows, right with probability ``accuracy``, with softmax-like scores."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 3, n).astype(np.int64)
    right = rng.random(n) < accuracy
    predicted = np.where(right, truth, (truth + rng.integers(1, 3, n)) % 3).astype(np.int64)
    proba = np.full((n, 3), 0.15, np.float32)
    proba[np.arange(n), predicted] = 0.7
    stats.add_scores(proba, truth)


def classifier_snapshot(version: str, accuracy: float, n: int, seed: int) -> OutcomeSnapshot:
    stats = OutcomeStats("m", version)
    add_classifier_rows(stats, accuracy, n, seed)
    return stats.snapshot()


def test_a_deliberately_wrong_candidate_is_worse_after_a_few_hundred_samples() -> None:
    stable = classifier_snapshot("1", 0.9, 300, seed=1)
    candidate = classifier_snapshot("2", 0.6, 300, seed=2)
    result = compare(candidate, stable, alpha=0.05, min_samples=100)
    assert result.kind == "classification"
    assert result.test == "two_proportion_z"
    assert result.candidate_worse
    assert not result.not_worse_enough_samples
    assert result.p_value is not None
    assert result.p_value < 1e-6
    assert result.statistic is not None
    assert result.statistic < 0
    assert result.difference is not None
    assert result.difference < -0.2
    assert result.samples_needed is not None
    assert result.samples_needed < 100
    candidate_ci, stable_ci = result.candidate.accuracy_ci, result.stable.accuracy_ci
    assert candidate_ci is not None
    assert stable_ci is not None
    assert candidate_ci[1] < stable_ci[0]
    candidate_log_loss, stable_log_loss = result.candidate.log_loss, result.stable.log_loss
    assert candidate_log_loss is not None
    assert stable_log_loss is not None
    assert candidate_log_loss > stable_log_loss
    assert [c.label for c in result.candidate.classes] == [0, 1, 2]
    assert sum(c.true for c in result.candidate.classes) == 300


def test_an_equal_candidate_stays_not_worse() -> None:
    stable = classifier_snapshot("1", 0.9, 3000, seed=3)
    candidate = classifier_snapshot("2", 0.9, 3000, seed=4)
    result = compare(candidate, stable, alpha=0.05, min_samples=100)
    assert not result.candidate_worse
    assert result.not_worse_enough_samples
    assert result.p_value is not None
    assert result.p_value > 0.05


def test_too_few_samples_decides_nothing() -> None:
    stable = classifier_snapshot("1", 0.9, 50, seed=5)
    candidate = classifier_snapshot("2", 0.2, 50, seed=6)
    result = compare(candidate, stable, min_samples=100)
    assert not result.enough_samples
    assert not result.candidate_worse
    assert not result.not_worse_enough_samples
    assert result.p_value is not None
    assert result.p_value < 0.05  # reported, not acted on


def test_regression_comparison_uses_welch_on_absolute_errors() -> None:
    rng = np.random.default_rng(11)
    truth = rng.normal(size=400)
    stable = OutcomeStats("m", "1")
    stable.add_regression(truth + rng.normal(0, 0.5, 400), truth)
    bad = OutcomeStats("m", "2")
    bad.add_regression(truth + rng.normal(0, 1.5, 400), truth)
    same = OutcomeStats("m", "3")
    same.add_regression(truth + rng.normal(0, 0.5, 400), truth)
    worse = compare(bad.snapshot(), stable.snapshot())
    assert worse.test == "welch_t"
    assert worse.candidate_worse
    assert worse.p_value is not None
    assert worse.p_value < 1e-6
    assert worse.candidate.mae_ci is not None
    assert worse.candidate.rmse_ci is not None
    equal = compare(same.snapshot(), stable.snapshot())
    assert not equal.candidate_worse
    assert equal.not_worse_enough_samples
    a, b = same.snapshot().abs_error, stable.snapshot().abs_error
    assert a.var is not None
    assert b.var is not None
    expected = sps.ttest_ind_from_stats(
        a.mean,
        math.sqrt(a.var),
        a.n,
        b.mean,
        math.sqrt(b.var),
        b.n,
        equal_var=False,
        alternative="greater",
    )
    assert equal.p_value is not None
    assert close(equal.p_value, float(expected.pvalue), REL_T)


def test_compare_without_data_and_with_mixed_kinds() -> None:
    empty = compare(OutcomeSnapshot("m", "2"), OutcomeSnapshot("m", "1"))
    assert (empty.kind, empty.test, empty.p_value, empty.samples_needed) == (
        None,
        "none",
        None,
        None,
    )
    assert not empty.candidate_worse
    assert not empty.not_worse_enough_samples
    regression = OutcomeStats("m", "1")
    regression.add_regression(np.zeros(3), np.ones(3))
    with pytest.raises(OutcomeKindError):
        compare(classifier_snapshot("2", 0.5, 10, seed=0), regression.snapshot())


def test_a_window_comparison_sees_only_the_window() -> None:
    # A candidate that was fine for a long time and then broke: cumulative counts hide it,
    # the window does not.
    stats = OutcomeStats("m", "2")
    add_classifier_rows(stats, 0.9, 20_000, seed=8)
    start = stats.snapshot()
    add_classifier_rows(stats, 0.5, 400, seed=10)
    window = stats.snapshot().minus(start)
    broken = classifier_snapshot("2", 0.5, 400, seed=10)
    assert (window.n, window.correct) == (broken.n, broken.correct)
    assert window.confusion is not None
    assert broken.confusion is not None
    assert np.array_equal(window.confusion, broken.confusion)
    assert window.log_loss.mean == pytest.approx(broken.log_loss.mean, rel=1e-9)
    stable_window = classifier_snapshot("1", 0.9, 400, seed=12)
    assert compare(window, stable_window).candidate_worse
    stable_cumulative = classifier_snapshot("1", 0.9, 20_400, seed=9)
    cumulative = compare(stats.snapshot(), stable_cumulative)
    assert cumulative.p_value is not None
    assert cumulative.p_value > 1e-6


def test_comparison_encodes_to_json() -> None:
    import msgspec

    result = compare(classifier_snapshot("2", 0.8, 200, 1), classifier_snapshot("1", 0.8, 200, 2))
    decoded = msgspec.json.decode(msgspec.json.encode(result))
    assert decoded["kind"] == "classification"
    assert decoded["candidate"]["classes"][0]["label"] == 0
