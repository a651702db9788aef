"""A route or rollout change that cannot be recorded changes nothing: on SQLite made
read-only and on a Redis store whose server is gone, the controller answers 503, the
router gets its previous weights back, and memory and the audit trail are as they were."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import StoreUnavailableError
from gateway.rollout import RolloutController, RolloutPolicy, RolloutState, Signals
from gateway.status import http_status
from gateway.store import RedisStore, SqliteStore, Store
from tests.redis_server import RedisServer


class Router:
    """What the controller's weight door reaches: the live weights per model."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, float]] = {}

    def apply(self, model: str, weights: dict[str, float]) -> None:
        if weights:
            self.tables[model] = dict(weights)
        else:
            self.tables.pop(model, None)


def _no_signals(state: RolloutState) -> Signals:
    raise AssertionError("not evaluated in these tests")


def _sqlite_read_only(store: SqliteStore, on: bool) -> None:
    handle: Any = store
    with handle._lock:
        handle._db.execute(f"PRAGMA query_only={'ON' if on else 'OFF'}")


@pytest.fixture
def sqlite(tmp_path: Path) -> Iterator[tuple[Store, Callable[[bool], None]]]:
    store = SqliteStore(tmp_path / "control.sqlite3")
    yield store, lambda broken: _sqlite_read_only(store, broken)
    store.close()


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[tuple[Store, Callable[[bool], None]]]:
    with RedisServer(tmp_path / "redis") as server:
        store = RedisStore(server.url, cluster="aon")

        def broken(on: bool) -> None:
            if on:
                server.kill()
            else:
                server.start()

        yield store, broken
        store.close()


@pytest.mark.parametrize("backend", ["sqlite", "shared"])
def test_unrecorded_changes_change_nothing(backend: str, request: pytest.FixtureRequest) -> None:
    store, broken = request.getfixturevalue(backend)
    router = Router()
    controller = RolloutController(store, router.apply, _no_signals)
    controller.set_weights("m", {"1": 100}, "ops", "start")
    audit = store.audit(None, None, None, 100)
    broken(True)
    try:
        with pytest.raises(StoreUnavailableError) as caught:
            controller.set_weights("m", {"1": 50, "2": 50}, "ops", "split")
        assert http_status(caught.value.kind) == 503
        with pytest.raises(StoreUnavailableError):
            controller.start_rollout("m", "1", "2", RolloutPolicy(), "ops", "canary")
        assert router.tables == {"m": {"1": 100.0}}
        assert controller.routes()["m"].weights() == {"1": 100.0}
        assert controller.rollouts() == []
    finally:
        broken(False)
    assert store.audit(None, None, None, 100) == audit
    # Once the store is back the same change goes through.
    state = controller.start_rollout("m", "1", "2", RolloutPolicy(), "ops", "canary")
    assert router.tables["m"] == state.weights()
    broken(True)
    try:
        with pytest.raises(StoreUnavailableError):
            controller.pause("m", "ops", "hold")
        assert controller.status("m").status == "canary"
        # A rollback is all-or-nothing too: unrecorded, it would be lost on restart and
        # unseen by other replicas; the operator hears 503 with the reason.
        with pytest.raises(StoreUnavailableError):
            controller.rollback("m", "ops", "bad canary")
        assert router.tables["m"] == state.weights()
        assert controller.status("m").status == "canary"
    finally:
        broken(False)
