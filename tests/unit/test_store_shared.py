"""The control-plane seam, run against both backends: SqliteStore (one file) and RedisStore
(a real redis-server on a free loopback port). What the rollout controller relies on must
behave the same: atomic commits with a per-model version check, one dense verifying audit
chain under concurrent writers, and the controller lease with fencing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.errors import FencedWriteError, VersionConflictError
from gateway.store import (
    AuditEvent,
    Lease,
    LeaseKeeper,
    RedisStore,
    SqliteStore,
    Store,
    open_store,
)
from gateway.types import Route, Variant
from tests.redis_server import RedisServer

Factory = Callable[[], Store]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def new_store(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer
) -> Iterator[Factory]:
    """Opens clients of ONE fresh store (several clients = several replicas/processes)."""
    opened: list[Store] = []
    # A fresh key space per test: the cluster name isolates tests sharing the server.
    cluster = f"t{time.monotonic_ns()}"

    def factory() -> Store:
        store: Store
        if request.param == "sqlite":
            store = SqliteStore(tmp_path / "control.db")
        else:
            store = RedisStore(redis_server.url, cluster=cluster)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


def _route(model: str, candidate_weight: float) -> Route:
    return Route(model, (Variant("1", 100.0 - candidate_weight), Variant("2", candidate_weight)))


def _event(model: str, i: int, actor: str = "alice") -> AuditEvent:
    return AuditEvent(actor=actor, action="set_weights", model=model, after={"i": i})


def test_open_store_picks_the_backend(tmp_path: Path, redis_server: RedisServer) -> None:
    sqlite = open_store(tmp_path / "c.db")
    remote = open_store(redis_server.url, cluster="pick")
    try:
        assert isinstance(sqlite, SqliteStore)
        assert isinstance(remote, RedisStore)
        assert remote.address == f"127.0.0.1:{redis_server.port}"
    finally:
        sqlite.close()
        remote.close()


def test_commit_is_atomic_and_versioned(new_store: Factory) -> None:
    store = new_store()
    assert store.snapshot().models == {}
    entry = store.save("m", route=_route("m", 5), rollout=b'{"s":1}', event=_event("m", 1))
    assert entry is not None
    assert entry.seq == 1
    snap = store.snapshot()
    assert snap.version == 1
    assert snap.models["m"].version == 1
    assert snap.models["m"].route == _route("m", 5)
    assert snap.models["m"].rollout == b'{"s":1}'

    # A stale expected version writes nothing: no route, no rollout, no audit entry.
    with pytest.raises(VersionConflictError, match="control version 1, not 0"):
        store.save(
            "m", route=_route("m", 50), rollout=b"x", event=_event("m", 2), expected_version=0
        )
    assert store.get_route("m") == _route("m", 5)
    assert store.get_rollout("m") == b'{"s":1}'
    assert [e.seq for e in store.audit()] == [1]

    # The current version commits; a rollout-only write keeps the route and bumps versions.
    store.save("m", route=_route("m", 20), expected_version=1)
    store.save("m", rollout=b'{"s":2}', event=_event("m", 3), expected_version=2)
    store.save("other", route=_route("other", 1))
    snap = store.snapshot()
    assert snap.version == 4
    assert {m: s.version for m, s in snap.models.items()} == {"m": 3, "other": 1}
    assert snap.models["m"].route == _route("m", 20)
    assert store.rollouts() == {"m": b'{"s":2}'}
    assert store.routes() == {"m": _route("m", 20), "other": _route("other", 1)}
    # An audit-only append (e.g. a failed login) changes no state.
    store.append_audit("mallory", "auth_failed", "", "bad token")
    assert store.snapshot().version == 4
    assert store.verify_audit().ok


def test_concurrent_commits_form_one_dense_chain(new_store: Factory) -> None:
    clients = [new_store() for _ in range(3)]
    per_client = 100
    errors: list[BaseException] = []
    start = threading.Barrier(len(clients))

    def write(k: int) -> None:
        try:
            start.wait()
            for i in range(per_client):
                model = f"m{i % 5}"
                clients[k].save(model, route=_route(model, i % 50), event=_event(model, i, f"c{k}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    total = per_client * len(clients)
    for client in clients:  # every client reads the same chain
        result = client.verify_audit()
        assert result.ok, result.reason
        assert result.checked == result.head_seq == total
        seqs = [e.seq for e in client.audit(limit=1000)]
        assert seqs == list(range(total, 0, -1))
        assert client.snapshot().version == total
    by_actor = {f"c{k}": 0 for k in range(3)}
    for e in clients[0].audit(limit=1000):
        by_actor[e.actor] += 1
    assert by_actor == {"c0": per_client, "c1": per_client, "c2": per_client}


def test_exactly_one_of_three_contenders_gets_the_lease(new_store: Factory) -> None:
    clients = [new_store() for _ in range(3)]
    start = threading.Barrier(3)
    got: dict[int, Lease | None] = {}

    def contend(k: int) -> None:
        start.wait()
        got[k] = clients[k].acquire_lease(f"r{k}", 5.0)

    threads = [threading.Thread(target=contend, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    winners = [lease for lease in got.values() if lease is not None]
    assert len(winners) == 1
    assert clients[0].lease() == winners[0]
    # The holder re-acquiring keeps its token; a planned release frees it at once.
    winner = winners[0]
    k = int(winner.holder[1:])
    assert clients[k].acquire_lease(winner.holder, 5.0) == winner
    clients[k].release_lease(winner)
    assert clients[0].lease() is None
    nxt = clients[(k + 1) % 3].acquire_lease("next", 5.0)
    assert nxt is not None
    assert nxt.token > winner.token


def test_failover_and_fencing(new_store: Factory) -> None:
    old_client, new_client = new_store(), new_store()
    ttl_s = 0.4
    old = old_client.acquire_lease("old", ttl_s)
    assert old is not None
    assert old_client.save("m", route=_route("m", 1), fencing_token=old.token) is None
    # "old" stops renewing (paused, crashed); "new" polls until the lease is free.
    t0 = time.monotonic()
    new: Lease | None = None
    while new is None and time.monotonic() - t0 < ttl_s + 5.0:
        new = new_client.acquire_lease("new", ttl_s * 10)
        time.sleep(0.01)
    assert new is not None, "no failover within TTL + 5 s"
    assert new.token > old.token
    assert not old_client.renew_lease(old, ttl_s)
    # The paused ex-leader wakes up and writes with its stale token: refused, nothing written.
    with pytest.raises(FencedWriteError, match=f"fencing token {old.token}"):
        old_client.save("m", route=_route("m", 99), event=_event("m", 1), fencing_token=old.token)
    assert old_client.get_route("m") == _route("m", 1)
    assert old_client.audit() == []
    # The new leader's writes and an operator's (no token) go through.
    new_client.save("m", route=_route("m", 2), fencing_token=new.token)
    old_client.save("m", route=_route("m", 3), event=_event("m", 2))
    assert new_client.get_route("m") == _route("m", 3)


def test_lease_keepers_elect_one_and_fail_over(new_store: Factory) -> None:
    keepers = [
        LeaseKeeper(new_store(), f"r{k}", ttl_s=0.5, renew_interval_s=0.05) for k in range(3)
    ]
    for keeper in keepers:
        keeper.start()
    try:
        deadline = time.monotonic() + 5.0
        while sum(k.is_leader() for k in keepers) != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        leaders = [k for k in keepers if k.is_leader()]
        assert len(leaders) == 1
        first = leaders[0].current()
        assert first is not None
        leaders[0].stop(release=False)  # a crash: the lease is left to expire
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.5 + 5.0:
            leaders = [k for k in keepers if k.is_leader()]
            if leaders:
                break
            time.sleep(0.01)
        assert len(leaders) == 1, "no new leader within TTL + 5 s"
        second = leaders[0].current()
        assert second is not None
        assert second.token > first.token
    finally:
        for keeper in keepers:
            keeper.stop()


def test_commit_returns_the_versions_it_made(new_store: Factory) -> None:
    store = new_store()
    first = store.commit("m", route=_route("m", 1), event=_event("m", 1))
    assert (first.version, first.global_version) == (1, 1)
    assert first.entry is not None
    assert first.entry.seq == 1
    second = store.commit("n", rollout=b"{}", expected_version=0)
    assert (second.version, second.global_version, second.entry) == (1, 2, None)
    again = store.commit("m", route=_route("m", 2), expected_version=first.version)
    assert (again.version, again.global_version) == (2, 3)
    audit_only = store.commit("m", event=_event("m", 2))
    assert (audit_only.version, audit_only.global_version) == (2, 3)
    assert audit_only.entry is not None
    assert audit_only.entry.prev_hash == first.entry.hash
