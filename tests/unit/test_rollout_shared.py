"""The rollout controller over a store shared by several controllers (replicas): version
checks with re-validation, fencing of a stale leader, adoption of changes made elsewhere
(``observe``) and the undo of a local change the store refuses. Real stores: SQLite and a
real redis-server."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.errors import ConflictError, FencedWriteError, StoreUnavailableError
from gateway.rollout import RolloutController
from gateway.store import Lease, RedisStore, SqliteStore, Store
from tests.redis_server import RedisServer
from tests.unit.test_rollout import GOOD, Clock, Router, Signalling, _only, _policy

OpenStore = Callable[[], Store]


@pytest.fixture(params=["sqlite", "redis"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    opened: list[Store] = []
    server: RedisServer | None = None
    if request.param == "redis":
        server = RedisServer(tmp_path / "redis").start()

    def new() -> Store:
        store: Store
        if server is not None:
            store = RedisStore(server.url, cluster="t")
        else:
            store = SqliteStore(tmp_path / "control.db")
        opened.append(store)
        return store

    yield new
    for store in opened:
        store.close()
    if server is not None:
        server.kill()


class Replica:
    def __init__(self, store: Store, lease: Callable[[], Lease | None] | None = None) -> None:
        self.store = store
        self.clock = Clock()
        self.router = Router()
        self.gather = Signalling()
        self.controller = RolloutController(
            store, self.router, self.gather, clock=self.clock, lease=lease
        )


def test_a_manual_action_revalidates_against_another_replicas_change(
    open_store: OpenStore,
) -> None:
    a, b = Replica(open_store()), Replica(open_store())
    a.controller.start_rollout("m", "1", "2", _policy(), "alice")
    assert b.controller.observe(a.store.snapshot().models["m"])
    a.controller.pause("m", "alice", "look closer")
    # b has not seen the pause: its commit conflicts, it re-reads, then rolls back.
    b.controller.rollback("m", "bob", "bad")
    assert b.controller.status("m").status == "rolled_back"
    assert b.router.tables["m"] == {"1": 100.0, "2": 0.0}
    with pytest.raises(ConflictError):  # a is behind too: re-read, now nothing to roll back
        a.controller.rollback("m", "alice", "bad too")
    assert a.controller.status("m").status == "rolled_back"
    actions = [e.action for e in a.store.audit(model="m")]
    assert actions == ["rollback", "pause", "start"]  # exactly one rollback
    assert a.store.verify_audit().ok


def test_observe_adopts_a_newer_state_and_ignores_an_older_one(open_store: OpenStore) -> None:
    a, b = Replica(open_store()), Replica(open_store())
    a.controller.start_rollout("m", "1", "2", _policy(), "alice")
    state = a.store.snapshot().models["m"]
    assert b.controller.observe(state)
    assert b.router.tables["m"] == {"1": 95.0, "2": 5.0}
    assert b.controller.status("m").status == "canary"
    assert not b.controller.observe(state)  # same version: already held
    assert not a.controller.observe(state)  # its own commit


def test_a_stale_leader_is_fenced_and_its_change_undone(open_store: OpenStore) -> None:
    store = open_store()
    first = store.acquire_lease("a", ttl_s=0.05)
    assert first is not None
    a = Replica(store, lease=lambda: first)  # a still believes it leads (paused, say)
    policy = _policy(thresholds=_only(max_error_rate=0.05), consecutive_failures=1)
    a.controller.start_rollout("m", "1", "2", policy, "alice")
    time.sleep(0.1)
    second = store.acquire_lease("b", ttl_s=5.0)
    assert second is not None
    assert second.token > first.token
    a.gather.signals = dataclasses.replace(GOOD, candidate_error_rate=0.5)
    a.clock.now += 1
    assert a.controller.evaluate_once() == {}  # the fenced write is logged, not decided
    assert a.router.tables["m"] == {"1": 95.0, "2": 5.0}  # the rollback was undone
    assert a.controller.status("m").status == "canary"
    assert [e.action for e in store.audit(model="m")] == ["start"]
    follower = Replica(store, lease=lambda: None)
    follower.clock.now += 1
    assert follower.controller.evaluate_once() == {}  # not the leader: does not evaluate
    assert follower.gather.seen == []


def test_fencing_error_is_raised_for_a_lost_lease(open_store: OpenStore) -> None:
    a = Replica(open_store(), lease=lambda: None)
    policy = _policy(thresholds=_only(max_error_rate=0.05), consecutive_failures=1)
    a.controller.start_rollout("m", "1", "2", policy, "alice")  # manual: needs no lease
    a.gather.signals = dataclasses.replace(GOOD, candidate_error_rate=0.5)
    a.clock.now += 1
    with pytest.raises(FencedWriteError):
        a.controller._evaluate("m")  # a decision without the lease is refused before apply
    assert a.router.tables["m"] == {"1": 95.0, "2": 5.0}


def test_a_store_outage_undoes_a_manual_rollback(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    store = RedisStore(server.url, cluster="t")
    try:
        a = Replica(store)
        a.controller.start_rollout("m", "1", "2", _policy(), "alice")
        server.kill()
        with pytest.raises(StoreUnavailableError):
            a.controller.rollback("m", "bob", "bad")
        assert a.router.tables["m"] == {"1": 95.0, "2": 5.0}
        assert a.controller.status("m").status == "canary"
    finally:
        store.close()
        server.kill()


def test_a_replaced_store_is_adopted_after_one_conflict(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    store = RedisStore(server.url, cluster="t")
    try:
        a = Replica(store)
        a.controller.set_weights("m", {"1": 90, "2": 10}, "alice")
        a.controller.set_weights("m", {"1": 80, "2": 20}, "alice")
        other = RedisStore(server.url, cluster="t")
        other._redis.flushall()  # the store lost everything (replaced, restored empty)
        other.close()
        a.controller.set_weights("m", {"1": 70, "2": 30}, "bob")  # conflict, re-read, retried
        assert store.snapshot().models["m"].route is not None
        assert a.router.tables["m"] == {"1": 70.0, "2": 30.0}
    finally:
        store.close()
        server.kill()
