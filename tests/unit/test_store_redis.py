"""What only the Redis control plane does, against a real redis-server: the change follower
(order, exactly-once per version, resync after a Redis crash and restart), pooled signals
(exact int64 sums over live replicas, dead ones aging out), fail-fast errors while Redis is
down or hung, and tamper detection on the audit stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from gateway.errors import StoreUnavailableError
from gateway.status import http_status
from gateway.store import (
    AuditEvent,
    ChangeFollower,
    LeaseKeeper,
    ModelState,
    RedisStore,
    ReplicaHeartbeat,
    encode_counts,
)
from gateway.store.keyspace import key_prefix
from gateway.types import Route, Variant
from tests.redis_server import RedisServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as running:
        yield running


@pytest.fixture
def store(server: RedisServer) -> Iterator[RedisStore]:
    opened = RedisStore(server.url, cluster="t")
    yield opened
    opened.close()


def _route(weight: float) -> Route:
    return Route("m", (Variant("1", 100.0 - weight), Variant("2", weight)))


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


async def _until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.002)
    return True


def test_follower_sees_every_change_in_order(server: RedisServer, store: RedisStore) -> None:
    store.save("m", route=_route(0))  # state before the follower starts: from the snapshot
    seen: list[tuple[str, int, float]] = []
    arrived: dict[int, float] = {}

    def on_change(state: ModelState) -> None:
        assert state.route is not None
        seen.append((state.model, state.version, state.route.weights().get("2", 0.0)))
        if state.model == "m":
            arrived[state.version] = time.perf_counter()

    async def main() -> list[float]:
        follower = ChangeFollower(server.url, on_change, cluster="t", resync_interval_s=0.2)
        await follower.start()
        try:
            assert await follower.wait_synced(5.0)
            started: dict[int, float] = {}
            for i in range(1, 201):
                started[i + 1] = time.perf_counter()
                await asyncio.to_thread(
                    store.save,
                    "m",
                    route=_route(i % 100),
                    event=AuditEvent(actor="op", action="set_weights", model="m"),
                )
                if i % 50 == 0:  # another model interleaves; it must not disturb "m"
                    await asyncio.to_thread(store.save, "n", route=Route("n", (Variant("1", 1),)))
            assert await _until(lambda: follower.applied() == {"m": 201, "n": 4}, 5.0)
            assert follower.version == store.snapshot().version == 205
            return [(arrived[v] - started[v]) * 1000 for v in started]
        finally:
            await follower.stop()

    lag_ms = asyncio.run(main())
    versions = [v for model, v, _ in seen if model == "m"]
    assert versions == list(range(1, 202))  # in order, once each, none missed
    assert [w for model, _, w in seen if model == "m"][-1] == 200 % 100
    print(f"propagation ms: p50 {_percentile(lag_ms, 50):.2f} p99 {_percentile(lag_ms, 99):.2f}")
    assert _percentile(lag_ms, 99) < 250


def test_follower_resyncs_after_redis_restarts(server: RedisServer, store: RedisStore) -> None:
    seen: list[int] = []
    follower_box: list[ChangeFollower] = []

    async def main() -> None:
        follower = ChangeFollower(
            server.url, lambda s: seen.append(s.version), cluster="t", resync_interval_s=5.0
        )
        follower_box.append(follower)
        await follower.start()
        try:
            assert await follower.wait_synced(5.0)
            for i in range(50):
                await asyncio.to_thread(store.save, "m", route=_route(i))
            assert await _until(lambda: follower.applied().get("m") == 50, 5.0)
            resyncs = follower.resyncs

            server.kill()  # a crash: the AOF holds every acknowledged commit
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailableError):
                await asyncio.to_thread(store.save, "m", route=_route(99))
            assert time.monotonic() - t0 < 2.0  # a hang would be unbounded
            assert await _until(lambda: not follower.is_connected, 5.0)

            await asyncio.to_thread(server.start)  # same port and directory
            ready = time.monotonic()
            for i in range(50):
                await asyncio.to_thread(store.save, "m", route=_route(i))
            assert await _until(lambda: follower.applied().get("m") == 100, 5.0)
            assert follower.resyncs > resyncs
            assert follower.is_connected
            print(f"caught up {time.monotonic() - ready:.3f} s after Redis was ready")
        finally:
            await follower.stop()

    asyncio.run(main())
    # Every version once, in order: the missed entries are replayed from the log position.
    assert seen == list(range(1, 101))
    assert store.snapshot().models["m"].version == 100  # the failed commit wrote nothing
    assert store.get_route("m") == _route(49)


def test_follower_recovers_from_a_hung_redis(server: RedisServer, store: RedisStore) -> None:
    seen: list[int] = []

    async def main() -> None:
        follower = ChangeFollower(server.url, lambda s: seen.append(s.version), cluster="t")
        await follower.start()
        try:
            await asyncio.to_thread(store.save, "m", route=_route(1))
            assert await _until(lambda: follower.applied() == {"m": 1}, 5.0)
            server.pause()  # SIGSTOP: connections stay open, nothing answers
            try:
                assert await _until(lambda: not follower.is_connected, 5.0)
            finally:
                server.resume()
            resumed = time.monotonic()
            await asyncio.to_thread(store.save, "m", route=_route(2))
            assert await _until(lambda: follower.applied() == {"m": 2}, 5.0)
            assert time.monotonic() - resumed < 2.0
        finally:
            await follower.stop()

    asyncio.run(main())
    assert seen == [1, 2]


def test_follower_adopts_a_replaced_store(server: RedisServer, store: RedisStore) -> None:
    seen: list[tuple[int, Route | None]] = []

    async def main() -> None:
        follower = ChangeFollower(
            server.url,
            lambda s: seen.append((s.version, s.route)),
            cluster="t",
            resync_interval_s=0.1,
        )
        await follower.start()
        try:
            for i in range(5):
                await asyncio.to_thread(store.save, "m", route=_route(i))
            assert await _until(lambda: follower.applied() == {"m": 5}, 5.0)
            raw = redis.Redis(port=server.port)
            raw.flushall()  # the store is lost (or replaced by an empty one)
            raw.close()
            await asyncio.to_thread(store.save, "m", route=_route(42))  # a new epoch, version 1
            assert await _until(lambda: follower.applied() == {"m": 1}, 5.0)
        finally:
            await follower.stop()

    asyncio.run(main())
    assert seen[-1] == (1, _route(42))


def test_writes_fail_fast_while_redis_is_down_or_hung(server: RedisServer) -> None:
    store = RedisStore(server.url, cluster="t")
    try:
        store.save("m", route=_route(1))
        server.pause()  # hung: the socket stays open, nothing answers
        try:
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailableError, match="may still have been applied") as hung:
                store.save("m", route=_route(2))
            assert time.monotonic() - t0 < 2.0  # a hang would be unbounded
        finally:
            server.resume()
        assert http_status(hung.value.kind) == 503
        server.kill()
        for call in (
            lambda: store.save("m", route=_route(3)),
            lambda: store.append_audit("op", "x"),
            store.snapshot,
            store.verify_audit,
            lambda: store.acquire_lease("r", 1.0),
        ):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailableError, match=f"127.0.0.1:{server.port}"):
                call()
            assert time.monotonic() - t0 < 2.0  # a hang would be unbounded
        assert not store.ping()
        server.start()
        store.save("m", route=_route(4))  # the pool reconnects by itself
        # The hung server may have run the queued commit when it resumed, before the kill
        # (hence "may still have been applied"); the commits tried while it was dead did not.
        snap = store.snapshot()
        assert snap.models["m"].version in (2, 3)
        assert snap.version == snap.models["m"].version
        assert snap.models["m"].route == _route(4)
    finally:
        store.close()


def test_pooled_counts_are_exact_sums_of_live_replicas(server: RedisServer) -> None:
    stores = [RedisStore(server.url, cluster="t") for _ in range(3)]
    rng = np.random.default_rng(7)
    big = 2**40  # well past float64's exact range once summed and squared: sums must be int64
    snapshots = [
        {
            "requests": rng.integers(0, big, size=4, dtype=np.int64),
            "latency_buckets": rng.integers(0, big, size=(3, 20), dtype=np.int64),
        }
        for _ in stores
    ]
    ttls = [5.0, 5.0, 0.3]  # the third replica dies: its heartbeat expires

    def publisher(k: int) -> Callable[[], None]:
        return lambda: stores[k].publish("traffic:m", f"inc{k}", encode_counts(snapshots[k]))

    beats = [
        ReplicaHeartbeat(
            s,
            f"inc{k}",
            f"10.0.0.{k}:8000",
            ttl_s=ttls[k],
            publish=publisher(k),
        )
        for k, s in enumerate(stores)
    ]
    try:
        for beat in beats:
            assert beat.beat()
            assert beat.beat()  # idempotent: a re-publish overwrites, never double-counts
        pooled = stores[0].pooled("traffic:m")
        assert pooled.contributors == ("inc0", "inc1", "inc2")
        for name in ("requests", "latency_buckets"):
            expected = snapshots[0][name] + snapshots[1][name] + snapshots[2][name]
            assert pooled.counts[name].dtype == np.int64
            assert np.array_equal(pooled.counts[name], expected)
            assert np.array_equal(pooled.per_incarnation["inc2"][name], snapshots[2][name])
        assert [r.incarnation for r in stores[0].replicas() if r.alive] == ["inc0", "inc1", "inc2"]

        deadline = time.monotonic() + 0.3 + 1.0
        while "inc2" in stores[0].pooled("traffic:m").contributors:
            assert time.monotonic() < deadline, "an expired replica still counts"
            time.sleep(0.01)
        pooled = stores[0].pooled("traffic:m")
        assert pooled.contributors == ("inc0", "inc1")
        assert pooled.skipped == {"inc2": "heartbeat expired"}
        assert np.array_equal(
            pooled.counts["requests"], snapshots[0]["requests"] + snapshots[1]["requests"]
        )
        assert [(r.incarnation, r.alive) for r in stores[0].replicas()] == [
            ("inc0", True),
            ("inc1", True),
            ("inc2", False),
        ]
        assert stores[0].prune(60.0, ["traffic:m"]) == []  # dead, but not for long enough
        assert stores[0].prune(0.0, ["traffic:m"]) == ["inc2"]
        assert stores[0].pooled("traffic:m").skipped == {}
        beats[1].stop()  # a planned shutdown leaves the registry at once
        assert [r.incarnation for r in stores[0].replicas()] == ["inc0"]
    finally:
        for s in stores:
            s.close()


def test_drift_epochs_pool_only_matching_profiles(store: RedisStore) -> None:
    counts = {"bins": np.arange(12, dtype=np.int64).reshape(3, 4)}
    for inc in ("a", "b", "c", "d"):
        store.heartbeat(inc, "-", 0.0, 5.0)
    store.publish("drift:m:2:1000", "a", encode_counts(counts, profile_hash="p1"), ttl_s=60)
    store.publish("drift:m:2:1000", "b", encode_counts(counts, profile_hash="p1"), ttl_s=60)
    store.publish("drift:m:2:1000", "c", encode_counts(counts, profile_hash="p2"), ttl_s=60)
    wrong_shape = {"bins": np.ones(5, dtype=np.int64)}
    store.publish("drift:m:2:1000", "d", encode_counts(wrong_shape, profile_hash="p1"), ttl_s=60)
    pooled = store.pooled("drift:m:2:1000", profile_hash="p1")
    assert pooled.contributors == ("a", "b")
    assert np.array_equal(pooled.counts["bins"], 2 * counts["bins"])
    assert set(pooled.skipped) == {"c", "d"}
    assert "profile hash p2" in pooled.skipped["c"]
    assert "shape" in pooled.skipped["d"]


def test_verify_detects_a_deleted_entry_and_a_lost_tail(
    server: RedisServer, store: RedisStore
) -> None:
    for i in range(5):
        store.append_audit("op", "set_weights", "m", f"r{i}", details={"i": i, "nan": float("nan")})
    assert store.verify_audit().ok
    raw = redis.Redis(port=server.port)
    audit_key = key_prefix("t") + "audit"
    raw.xdel(audit_key, "3-1")
    result = store.verify_audit()
    assert not result.ok
    assert result.first_bad_seq == 3
    assert "missing" in result.reason
    raw.delete(audit_key)
    result = store.verify_audit()
    assert not result.ok
    assert "head is seq 5" in result.reason
    raw.close()


def test_leader_stops_deciding_while_redis_is_down(server: RedisServer) -> None:
    store = RedisStore(server.url, cluster="t")
    keeper = LeaseKeeper(store, "r0", ttl_s=0.6, renew_interval_s=0.05)
    try:
        keeper.start()
        deadline = time.monotonic() + 5.0
        while not keeper.is_leader():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.kill()
        lost_at = time.monotonic()
        while keeper.is_leader():  # it cannot renew: it must give up before the TTL ends
            assert time.monotonic() - lost_at < 0.6, "still deciding after the lease expired"
            time.sleep(0.01)
        # AOF kept the lease with its absolute expiry: the keeper renews it if it is still
        # there (same token: nobody else could have held it) or acquires a new one.
        server.start()
        deadline = time.monotonic() + 0.6 + 1.0
        while not keeper.is_leader():
            assert time.monotonic() < deadline, "no leader within TTL + 1 s after Redis returned"
            time.sleep(0.01)
    finally:
        keeper.stop()
        store.close()
