"""SqliteStore through its public API: durability across reopen, the audit hash chain, and
tamper detection by editing the file behind the store's back with raw sqlite3."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from gateway.errors import InternalError, InvalidInputError
from gateway.store import GENESIS_HASH, AuditEvent, SqliteStore, Store, audit_hash
from gateway.types import Route, ShadowTarget, Variant


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "control.db"


def _fill(store: Store, n: int, clock: Clock) -> None:
    for i in range(n):
        clock.now += 1.0
        store.append_audit(
            "alice" if i % 2 else "controller",
            "set_weights",
            f"m{i % 3}",
            f"reason {i}",
            before={"weights": {"1": 100.0}},
            after={"weights": {"1": 90.0, "2": 10.0}},
            details={"i": i, "psi": 0.1 * i, "nan": float("nan")},
        )


def _raw(path: Path, sql: str, *args: object) -> None:
    db = sqlite3.connect(path)
    with db:
        db.execute(sql, args)
    db.close()


def test_state_survives_reopen(path: Path) -> None:
    clock = Clock()
    store = SqliteStore(path, clock=clock)
    route = Route("m", (Variant("1", 95.0), Variant("2", 5.0)), (ShadowTarget("3", 0.1),))
    entry = store.save(
        "m",
        route=route,
        rollout=b'{"status":"canary"}',
        event=AuditEvent(actor="alice", action="start", model="m", reason="go"),
    )
    assert entry is not None
    assert entry.seq == 1
    assert entry.ts == clock.now
    assert entry.prev_hash == GENESIS_HASH
    store.close()

    again = SqliteStore(path)
    assert again.get_route("m") == route
    assert again.routes() == {"m": route}
    assert again.get_rollout("m") == b'{"status":"canary"}'
    assert again.rollouts() == {"m": b'{"status":"canary"}'}
    assert again.get_route("other") is None
    assert again.get_rollout("other") is None
    assert again.audit() == [entry]
    nxt = again.append_audit("bob", "pause", "m", "hold")
    assert nxt.seq == 2
    assert nxt.prev_hash == entry.hash
    assert again.verify_audit().ok
    again.close()


def test_save_rejects_a_route_for_another_model(path: Path) -> None:
    store = SqliteStore(path)
    with pytest.raises(InvalidInputError):
        store.save("m", route=Route("other", (Variant("1", 1.0),)))
    assert store.routes() == {}
    store.close()


def test_audit_is_newest_first_and_filters(path: Path) -> None:
    clock = Clock(1000.0)
    store = SqliteStore(path, clock=clock)
    _fill(store, 9, clock)  # ts 1001..1009, models m0 m1 m2 m0 ...
    everything = store.audit()
    assert [e.seq for e in everything] == list(range(9, 0, -1))
    assert [e.seq for e in store.audit(model="m1")] == [8, 5, 2]
    assert [e.seq for e in store.audit(since=1004.0, until=1007.0)] == [6, 5, 4]
    assert [e.seq for e in store.audit(limit=2)] == [9, 8]
    first = everything[-1]
    assert first.details["nan"] is None  # stored as JSON: NaN becomes null
    assert first.before == {"weights": {"1": 100.0}}
    with pytest.raises(InvalidInputError):
        store.audit(limit=0)
    store.close()


def test_hash_covers_every_field(path: Path) -> None:
    store = SqliteStore(path)
    e = store.append_audit("alice", "rollback", "m", "bad", details={"x": 1})
    fields = {k: getattr(e, k) for k in e.__struct_fields__ if k != "hash"}
    assert audit_hash(**fields) == e.hash
    for key, value in [("reason", "good"), ("actor", "mallory"), ("ts", e.ts + 1)]:
        assert audit_hash(**{**fields, key: value}) != e.hash
    store.close()


def test_verify_detects_an_edited_row(path: Path) -> None:
    clock = Clock()
    store = SqliteStore(path, clock=clock)
    _fill(store, 5, clock)
    assert store.verify_audit().ok
    _raw(path, "UPDATE audit SET reason = 'nothing to see' WHERE seq = 3")
    result = store.verify_audit()
    assert not result.ok
    assert result.first_bad_seq == 3
    assert "hash" in result.reason
    store.close()


def test_verify_detects_edited_json_details(path: Path) -> None:
    clock = Clock()
    store = SqliteStore(path, clock=clock)
    _fill(store, 3, clock)
    _raw(path, """UPDATE audit SET details = '{"i":1,"psi":0.0}' WHERE seq = 2""")
    assert store.verify_audit().first_bad_seq == 2
    store.close()


def test_verify_detects_a_deleted_row(path: Path) -> None:
    clock = Clock()
    store = SqliteStore(path, clock=clock)
    _fill(store, 5, clock)
    _raw(path, "DELETE FROM audit WHERE seq = 2")
    result = SqliteStore(path).verify_audit()
    assert not result.ok
    assert result.first_bad_seq == 2
    assert "missing" in result.reason
    store.close()


def test_verify_detects_a_deleted_tail(path: Path) -> None:
    clock = Clock()
    store = SqliteStore(path, clock=clock)
    _fill(store, 4, clock)
    _raw(path, "DELETE FROM audit WHERE seq = 4")
    result = store.verify_audit()
    assert not result.ok
    assert result.first_bad_seq == 4
    assert "head" in result.reason
    store.close()


def test_verify_detects_reordered_rows(path: Path) -> None:
    clock = Clock()
    store = SqliteStore(path, clock=clock)
    _fill(store, 4, clock)
    # Swap rows 2 and 3 by renumbering: contents intact, order changed.
    _raw(path, "UPDATE audit SET seq = -2 WHERE seq = 2")
    _raw(path, "UPDATE audit SET seq = 2 WHERE seq = 3")
    _raw(path, "UPDATE audit SET seq = 3 WHERE seq = -2")
    result = store.verify_audit()
    assert not result.ok
    assert result.first_bad_seq == 2
    store.close()


def test_verify_detects_a_forged_row_that_recomputes_its_own_hash(path: Path) -> None:
    clock = Clock()
    store = SqliteStore(path, clock=clock)
    _fill(store, 3, clock)
    e = store.audit(limit=3)[1]  # seq 2
    fields = {k: getattr(e, k) for k in e.__struct_fields__ if k != "hash"}
    fields["reason"] = "forged"
    forged = audit_hash(**fields)
    _raw(path, "UPDATE audit SET reason = 'forged', hash = ? WHERE seq = 2", forged)
    result = store.verify_audit()
    assert not result.ok
    assert result.first_bad_seq == 3  # seq 3 still links to the original hash
    store.close()


def test_empty_trail_verifies(path: Path) -> None:
    store = SqliteStore(path)
    result = store.verify_audit()
    assert result.ok
    assert result.checked == 0
    assert result.head_hash == GENESIS_HASH
    store.close()


def test_concurrent_appends_form_one_chain(path: Path) -> None:
    store = SqliteStore(path)

    def writer(name: str) -> None:
        for i in range(10):
            store.append_audit(name, "noop", "m", str(i))

    threads = [threading.Thread(target=writer, args=(f"t{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = store.verify_audit()
    assert result.ok
    assert result.checked == 30
    store.close()


def test_two_stores_on_one_file_share_the_chain(path: Path) -> None:
    a, b = SqliteStore(path), SqliteStore(path)
    a.append_audit("a", "x")
    b.append_audit("b", "y")
    a.append_audit("a", "z")
    assert [e.actor for e in b.audit()] == ["a", "b", "a"]
    assert a.verify_audit().ok
    a.close()
    b.close()


def test_a_schema_1_file_is_upgraded_in_place(path: Path) -> None:
    # The layout written before versions and the lease existed (schema 1).
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE routes (model TEXT PRIMARY KEY, route TEXT NOT NULL);
        CREATE TABLE rollouts (model TEXT PRIMARY KEY, state BLOB NOT NULL);
        INSERT INTO meta VALUES ('schema', '1');
        INSERT INTO routes VALUES
            ('m', '{"model":"m","shadows":[],"variants":[{"version":"1","weight":100.0}]}');
        """
    )
    db.close()
    store = SqliteStore(path)
    route = store.get_route("m")
    assert route is not None
    snap = store.snapshot()
    assert snap.models["m"].version == 0  # written before versions were kept
    assert snap.epoch
    store.save("m", route=route, expected_version=0)
    assert store.snapshot().models["m"].version == 1
    store.close()
    _raw(path, "UPDATE meta SET value='3' WHERE key='schema'")
    with pytest.raises(InternalError, match="schema 3"):
        SqliteStore(path)
