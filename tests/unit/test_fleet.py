"""Pooled signals across replicas (gateway/fleet.py) on a real redis-server: each replica
publishes its cumulative per-version traffic counters and outcome statistics; the sum is
exact (moments merged by Chan's formula, confusion tables of different sizes padded), and a
replica that dies keeps its last counters in the sum (a window never goes backwards)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest

from gateway.config import StoreSettings
from gateway.drift.profile import Profile
from gateway.fleet import Fleet
from gateway.outcomes import Moments, OutcomeSnapshot
from gateway.router import Router
from tests.redis_server import RedisServer
from tests.unit.test_drift_monitor import (
    N_FEATURES,
    STABLE,
    feed,
    make_monitor,
    profile,  # noqa: F401  # the fixture
    settle,
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as running:
        yield running


def _replica(url: str, incarnation: str, counts: dict[str, tuple[int, int, list[float]]]) -> Fleet:
    router = Router()
    for version, (requests, errors, latencies) in counts.items():
        stats = router._variant_stats("m", version)  # the counters requests would bump
        stats.requests, stats.rows, stats.errors = requests, requests, errors
        for ms in latencies:
            stats.latency.observe(ms)
    fleet = Fleet(StoreSettings(url=url, cluster="t"), router, incarnation)
    fleet.store.heartbeat(incarnation, "127.0.0.1:0", 0.0, ttl_s=0.5)
    fleet.publish()
    return fleet


def test_pooled_traffic_is_the_exact_sum_and_survives_a_dead_replica(server: RedisServer) -> None:
    a = _replica(server.url, "a", {"1": (100, 1, [1.0, 2.0]), "2": (10, 5, [50.0])})
    b = _replica(server.url, "b", {"1": (30, 0, [3.0])})
    try:
        pooled = {s.version: s for s in a.traffic("m")}
        assert (pooled["1"].requests, pooled["1"].errors) == (130, 1)
        assert (pooled["2"].requests, pooled["2"].errors) == (10, 5)
        assert sum(pooled["1"].latency_counts) == 3
        assert pooled["1"].latency_total_ms == pytest.approx(6.0)

        time.sleep(0.6)  # b's heartbeat expires; a keeps beating
        a.store.heartbeat("a", "127.0.0.1:0", 0.0, ttl_s=5.0)
        assert a.store.pooled("traffic:m").contributors == ("a",)
        again = {s.version: s for s in a.traffic("m")}
        assert again["1"].requests == 130  # b's requests happened: they stay counted
    finally:
        a.store.close()
        b.store.close()


def test_pooled_outcomes_merge_counts_exactly_and_moments_by_chan(server: RedisServer) -> None:
    def moments(values: list[float]) -> Moments:
        v = np.asarray(values)
        return Moments(len(v), float(v.mean()), float(((v - v.mean()) ** 2).sum()))

    errors_a, errors_b = [0.5, 1.5, 2.0], [3.0, 0.25]
    snaps = {
        "a": OutcomeSnapshot("m", "1", "regression", 3, 0, abs_error=moments(errors_a)),
        "b": OutcomeSnapshot("m", "1", "regression", 2, 0, abs_error=moments(errors_b)),
    }
    fleets = []
    for inc, snap in snaps.items():
        fleet = Fleet(StoreSettings(url=server.url, cluster="o"), Router(), inc)
        fleet.store.heartbeat(inc, "127.0.0.1:0", 0.0, ttl_s=5.0)
        fleet._outcome_snapshots = lambda snap=snap: [snap]  # type: ignore[method-assign,misc]
        fleet.publish()
        fleets.append(fleet)
    try:
        pooled = fleets[0].outcome("m", "1")
        assert (pooled.kind, pooled.n) == ("regression", 5)
        expected = moments(errors_a + errors_b)
        assert pooled.abs_error.n == expected.n
        assert pooled.abs_error.mean == pytest.approx(expected.mean)
        assert pooled.abs_error.m2 == pytest.approx(expected.m2)
        labels = OutcomeSnapshot(
            "m", "2", "classification", 4, 3, confusion=np.array([[2, 1], [0, 1]], dtype=np.int64)
        )
        wide = OutcomeSnapshot(
            "m", "2", "classification", 1, 1, confusion=np.diag([0, 0, 1]).astype(np.int64)
        )
        fleets[0]._outcome_snapshots = lambda: [labels]  # type: ignore[method-assign]
        fleets[1]._outcome_snapshots = lambda: [wide]  # type: ignore[method-assign]
        for fleet in fleets:
            fleet.publish()
        both = fleets[1].outcome("m", "2")
        assert (both.n, both.correct) == (5, 4)
        assert both.confusion is not None
        assert both.confusion.tolist() == [[2, 1, 0], [0, 1, 0], [0, 0, 1]]
    finally:
        for fleet in fleets:
            fleet.store.close()


def test_pooled_drift_report_sums_replicas_and_falls_back_to_its_own(
    server: RedisServer,
    profile: Profile,  # noqa: F811
) -> None:
    fleets = []
    for inc in ("lead", "other"):
        monitor, clock = make_monitor(profile)
        fleet = Fleet(StoreSettings(url=server.url, cluster="d"), Router(), inc, monitor)
        fleet.store.heartbeat(inc, "127.0.0.1:0", 0.0, ttl_s=30.0)
        fleets.append((fleet, monitor, clock))
    (lead, _, _), (other, other_monitor, _) = fleets
    try:
        x = np.random.default_rng(4).standard_normal((1200, N_FEATURES)).astype(np.float32)
        feed(other_monitor, STABLE, x)  # only the other replica serves
        for fleet, monitor, clock in fleets:
            settle(monitor, clock)
            fleet.publish()
        other.publish()  # a second beat re-sends nothing: the sum stays the same
        assert lead.drift is not None
        report = lead.drift.report(STABLE)
        assert (report.inputs[0].n, report.replicas) == (1200, 2)
        assert report == msgspec.structs.replace(other_monitor.report(STABLE), replicas=2)
        view = lead.view()
        assert [(r["id"], r["is_self"]) for r in view["replicas"]] == [
            ("lead", True),
            ("other", False),
        ]
        server.kill()
        alone = lead.drift.report(STABLE)  # the store is gone: this replica's own window
        assert (alone.inputs[0].n, alone.replicas) == (0, 1)
    finally:
        lead.store.close()
        other.store.close()
