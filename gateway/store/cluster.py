"""store/cluster.py: one replica's background duties in a fleet: hold the controller lease
when it can, and keep its registry heartbeat (and signal snapshots) fresh.

In: a store (any ``Store`` for the lease; a ``RedisStore`` for the heartbeat), this
replica's incarnation id and the intervals. Out: ``LeaseKeeper.current()``, the lease this
replica may decide under (with its fencing token) or None, judged by its own monotonic clock
so a replica that cannot reach the store stops deciding before its lease can pass to another;
and a heartbeat that ages the replica out of the pooled signals when it dies. Each runs on
its own daemon thread, so a busy event loop cannot starve a renewal. Knows nothing of what
the leader decides or what the signals mean.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Final

from gateway.errors import GatewayError
from gateway.store.protocol import Lease, Store
from gateway.store.redis import RedisStore

__all__ = ["LeaseKeeper", "ReplicaHeartbeat"]

logger = logging.getLogger(__name__)

LEASE_TTL_S: Final = 2.0  # failover after a crash ~ TTL (1.5-1.7 s measured at 1.5 s)
SAFE_FRACTION: Final = 0.75  # trust a renewal for 75% of the TTL: margin for clock-rate drift
HEARTBEAT_TTL_S: Final = 5.0  # a dead replica leaves the pooled signals within this
_STOP_TIMEOUT_S: Final = 2.0


class LeaseKeeper:
    """Acquires and renews the controller lease for ``holder`` every ``renew_interval_s``.

    ``current()`` is the lease while the last successful renewal, started at monotonic time
    t, is younger than ``SAFE_FRACTION * ttl_s`` (the store's own expiry is later than t +
    ttl_s); after that the keeper treats the lease as lost even if the store is unreachable.
    """

    def __init__(
        self,
        store: Store,
        holder: str,
        *,
        ttl_s: float = LEASE_TTL_S,
        renew_interval_s: float | None = None,
        on_change: Callable[[Lease | None], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self.holder = holder
        self._ttl_s = ttl_s
        self._interval_s = ttl_s / 4 if renew_interval_s is None else renew_interval_s
        self._on_change = on_change
        self._clock = clock
        self._lease: Lease | None = None
        self._valid_until = 0.0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def current(self) -> Lease | None:
        """The lease this replica may act under now, or None."""
        with self._lock:
            if self._lease is not None and self._clock() < self._valid_until:
                return self._lease
            return None

    def is_leader(self) -> bool:
        return self.current() is not None

    def tick(self) -> Lease | None:
        """One acquire-or-renew round trip; returns ``current()`` after it."""
        before = self.current()
        started = self._clock()
        try:
            if self._lease is None:
                lease = self._store.acquire_lease(self.holder, self._ttl_s)
            else:
                kept = self._store.renew_lease(self._lease, self._ttl_s)
                lease = self._lease if kept else None
            with self._lock:
                self._lease = lease
                self._valid_until = started + SAFE_FRACTION * self._ttl_s if lease else 0.0
        except GatewayError as exc:  # unreachable: keep what we have until it runs out
            logger.debug("lease round trip failed: %s", exc)
        after = self.current()
        if after != before:
            logger.info(
                "controller lease %s (holder %s)",
                f"held, token {after.token}" if after else "not held",
                self.holder,
            )
            if self._on_change is not None:
                self._on_change(after)
        return after

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.tick()
            self._stopping.wait(self._interval_s)

    def stop(self, *, release: bool = True) -> None:
        """Stop renewing; with ``release`` give the lease up so another replica takes over at
        once (a planned shutdown) instead of after the TTL."""
        thread, self._thread = self._thread, None
        self._stopping.set()
        if thread is not None:
            thread.join(_STOP_TIMEOUT_S)
        with self._lock:
            lease, self._lease, self._valid_until = self._lease, None, 0.0
        if release and lease is not None:
            try:
                self._store.release_lease(lease)
            except GatewayError as exc:
                logger.warning("lease not released (it expires by itself): %s", exc)


class ReplicaHeartbeat:
    """Keeps ``incarnation`` registered and alive, and runs ``publish`` (this replica's
    signal snapshots) after each beat, every ``interval_s`` on its own thread."""

    def __init__(
        self,
        store: RedisStore,
        incarnation: str,
        address: str,
        *,
        ttl_s: float = HEARTBEAT_TTL_S,
        interval_s: float = 0.5,
        publish: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self.incarnation = incarnation
        self._address = address
        self._ttl_s = ttl_s
        self._interval_s = interval_s
        self._publish = publish
        self._started = time.time()
        self._is_failing = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> bool:
        """One heartbeat and publish; False if the store could not be reached."""
        try:
            self._store.heartbeat(self.incarnation, self._address, self._started, self._ttl_s)
            if self._publish is not None:
                self._publish()
        except GatewayError as exc:
            if not self._is_failing:
                logger.warning("replica heartbeat failed: %s", exc)
            self._is_failing = True
            return False
        self._is_failing = False
        return True

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.beat()
            self._stopping.wait(self._interval_s)

    def stop(self, *, forget: bool = True) -> None:
        """Stop beating; with ``forget`` leave the registry at once (planned shutdown)."""
        thread, self._thread = self._thread, None
        self._stopping.set()
        if thread is not None:
            thread.join(_STOP_TIMEOUT_S)
        if forget:
            try:
                self._store.forget(self.incarnation)
            except GatewayError as exc:
                logger.warning("replica not removed from the registry: %s", exc)
