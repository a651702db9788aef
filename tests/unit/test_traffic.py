"""traffic.py: latency buckets, quantiles, per-variant counters and their windows."""

from __future__ import annotations

import itertools
import math

import pytest

from gateway.traffic import LATENCY_BUCKETS_MS, LatencyHistogram, VariantStats, quantile


def test_buckets_are_about_26_percent_apart_from_0_1_ms_to_10_s() -> None:
    assert LATENCY_BUCKETS_MS[0] == 0.1
    assert 8_000 < LATENCY_BUCKETS_MS[-1] < 12_000
    ratios = [b / a for a, b in itertools.pairwise(LATENCY_BUCKETS_MS)]
    assert all(1.25 < r < 1.27 for r in ratios)


def test_histogram_counts_each_observation_in_its_bucket() -> None:
    h = LatencyHistogram()
    for ms in (0.05, 0.1, 0.11, 5.0, 1e9):
        h.observe(ms)
    assert h.counts[0] == 2  # at or below the first bound
    assert h.counts[1] == 1
    assert h.counts[-1] == 1  # beyond the last bound: the overflow bucket
    assert sum(h.counts) == 5
    assert h.total_ms == pytest.approx(0.05 + 0.1 + 0.11 + 5.0 + 1e9)


def test_quantile_is_within_one_bucket_of_the_exact_value() -> None:
    h = LatencyHistogram()
    values = [0.5 + 0.01 * i for i in range(1000)]
    for ms in values:
        h.observe(ms)
    p99 = quantile(h.counts, 0.99)
    assert p99 is not None
    exact = sorted(values)[989]
    assert exact <= p99 < exact * 1.27
    assert quantile([0] * len(h.counts), 0.5) is None
    overflow = [0] * len(h.counts)
    overflow[-1] = 1
    assert quantile(overflow, 0.5) == math.inf


def test_snapshots_and_windows() -> None:
    stats = VariantStats("m", "2")
    stats.requests, stats.errors, stats.rows = 10, 1, 12
    stats.latency.observe(1.0)
    earlier = stats.snapshot()
    assert earlier.error_rate == pytest.approx(0.1)
    stats.requests += 5
    stats.errors += 5
    stats.rows += 5
    for _ in range(5):
        stats.latency.observe(100.0)
    stats.shadow.compared_rows, stats.shadow.agreed_rows = 4, 3
    window = stats.snapshot().minus(earlier)
    assert (window.requests, window.errors, window.rows) == (5, 5, 5)
    assert window.error_rate == 1.0
    assert sum(window.latency_counts) == 5
    assert window.p(0.5) is not None
    assert 100.0 <= window.p(0.5) < 127.0  # type: ignore[operator]  # checked above
    assert window.latency_total_ms == pytest.approx(500.0)
    assert window.shadow["agreement"] == 0.75
    empty = VariantStats("m", "3").snapshot()
    assert (empty.error_rate, empty.p(0.99)) == (None, None)
