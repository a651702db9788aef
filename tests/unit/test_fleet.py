"""Pooled traffic across replicas (gateway/fleet.py) on a real redis-server: each replica
publishes its cumulative per-version counters, the sum is exact, and a replica that dies
keeps its last counters in the sum (a window's count never goes backwards)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import StoreSettings
from gateway.fleet import Fleet
from gateway.router import Router
from tests.redis_server import RedisServer


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
