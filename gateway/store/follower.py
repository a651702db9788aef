"""store/follower.py: keeps one replica's view of the shared control state current.

In: a Redis URL and cluster name (``RedisStore``'s key space) and a callback. Out: the
callback is called, on the event loop, with each changed model's new ``ModelState`` (route
and rollout document), in commit order per model and exactly once per version. The follower
tails the change log with ``XREAD BLOCK`` from the last id it applied, and resyncs from a
snapshot (state plus the log's position, read atomically) at start, after every reconnect and
every ``resync_interval_s``: it replays the log entries it missed, in order, then delivers
any model whose version still differs (its entries were trimmed from the log). Nothing on
the request path waits on it: the router keeps serving the routes it holds while Redis is
away. Knows nothing of routers or controllers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.store.keyspace import (
    SNAPSHOT_SCRIPT,
    as_bytes,
    as_entries,
    as_fields,
    change_from_fields,
    key_prefix,
    parse_state,
)
from gateway.store.protocol import ModelState

__all__ = ["ChangeFollower"]

logger = logging.getLogger(__name__)

BLOCK_MS: Final = 1000  # one XREAD wait; a dead connection shows within BLOCK + TIMEOUT_S
READ_COUNT: Final = 100  # entries per XREAD: a burst of changes is applied in few round trips
TIMEOUT_S: Final = 0.5  # connect and reply timeout, on top of the XREAD block
CATCH_UP_MAX: Final = 10_000  # log entries replayed in order on a resync; beyond, the snapshot
RECONNECT_MIN_S: Final = 0.05
RECONNECT_MAX_S: Final = 0.25  # a returning Redis is seen (and resynced) within ~0.3 s


class ChangeFollower:
    """Tails the change log of one cluster and calls ``on_change`` with each new state.

    ``on_change`` runs on the loop and must be quick (apply a route in memory); an exception
    it raises is logged and the follower goes on. ``start()`` returns at once; await
    ``wait_synced()`` to know the first snapshot was applied.
    """

    def __init__(
        self,
        url: str,
        on_change: Callable[[ModelState], None],
        *,
        cluster: str = "gateway",
        resync_interval_s: float = 5.0,
    ) -> None:
        self._url = url
        self._on_change = on_change
        self._prefix = key_prefix(cluster)
        self._resync_interval_s = resync_interval_s
        self._applied: dict[str, int] = {}
        self._epoch = ""
        self.version = 0
        """Global version of the last state applied."""
        self.last_id = "0-0"
        """Change-log position: the id of the last entry read."""
        self.resyncs = 0
        self.is_connected = False
        self._synced: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._is_stopping = False
        self._redis: aioredis.Redis | None = None

    def applied(self) -> dict[str, int]:
        """Model -> version last delivered to ``on_change``."""
        return dict(self._applied)

    async def start(self) -> None:
        if self._task is not None:
            return
        self._synced = asyncio.Event()
        self._is_stopping = False
        self._redis = aioredis.Redis.from_url(
            self._url,
            socket_timeout=TIMEOUT_S + BLOCK_MS / 1000,
            socket_connect_timeout=TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
        self._task = asyncio.get_running_loop().create_task(self._run(), name="change-follower")
        self._task.add_done_callback(_done)

    async def wait_synced(self, timeout_s: float) -> bool:
        """True once the first snapshot was applied (False after ``timeout_s``)."""
        assert self._synced is not None, "start() first"
        try:
            await asyncio.wait_for(self._synced.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        task, self._task = self._task, None
        self._is_stopping = True
        # Cancel until done: on Python 3.11 a cancel that lands as redis-py's read timeout
        # fires can be swallowed by asyncio.timeout, and the loop would read on.
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def _run(self) -> None:
        delay = RECONNECT_MIN_S
        while not self._is_stopping:
            try:
                await self._follow()
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:
                if self.is_connected:  # it was following until now: retry soon
                    logger.warning("control store unreachable, following paused: %s", exc)
                    delay = RECONNECT_MIN_S
                else:
                    delay = min(delay * 2, RECONNECT_MAX_S)
                self.is_connected = False
                await asyncio.sleep(delay)

    async def _follow(self) -> None:
        assert self._redis is not None
        await self._resync()
        if not self.is_connected:
            logger.info("following the control store from version %d", self.version)
        self.is_connected = True
        next_resync = time.monotonic() + self._resync_interval_s
        stream = self._prefix + "changes"
        while not self._is_stopping:
            reply = await self._redis.xread(
                {stream: self.last_id}, count=READ_COUNT, block=BLOCK_MS
            )
            for raw_id, fields in _stream_entries(reply):
                self.last_id = raw_id.decode()
                self.version = max(self.version, int(fields.get(b"g", b"0")))
                self._deliver(change_from_fields(fields))
            if time.monotonic() >= next_resync:
                await self._resync()
                next_resync = time.monotonic() + self._resync_interval_s

    async def _resync(self) -> None:
        """Catch up to a snapshot (state plus the log position, read atomically): first the
        log entries between the last one read and the snapshot's position, in order, then
        every model whose version still differs (entries trimmed from the log). If the
        store's epoch changed (replaced or wiped) or its version went back, adopt it whole."""
        assert self._redis is not None
        keys = [self._prefix + "state", self._prefix + "changes"]
        reply: object = await self._redis.eval(SNAPSHOT_SCRIPT, len(keys), *keys)
        if not isinstance(reply, list) or len(reply) != 2:
            raise redis.ResponseError(f"unexpected snapshot reply {reply!r:.80}")
        raw_id, flat = reply
        snap, snap_id = parse_state(as_fields(flat)), as_bytes(raw_id).decode()
        if self._epoch and snap.epoch != self._epoch:
            logger.warning(
                "control store epoch changed (%s -> %s): adopting its state",
                self._epoch,
                snap.epoch,
            )
            self._applied.clear()
        elif snap.version < self.version:
            logger.warning(
                "control store went back from version %d to %d: adopting its state",
                self.version,
                snap.version,
            )
            self._applied.clear()
        elif self.resyncs > 0 and snap_id != self.last_id:
            rows = await self._redis.xrange(
                keys[1], min="(" + self.last_id, max=snap_id, count=CATCH_UP_MAX
            )
            for _, fields in as_entries(rows):
                self._deliver(change_from_fields(fields))
        for state in snap.models.values():
            if self._applied.get(state.model) != state.version:
                self._deliver(state, force=True)
        # An empty store has no epoch yet; its first commit writes one (not a replacement).
        self._epoch = snap.epoch
        self.version = snap.version
        self.last_id = snap_id
        self.resyncs += 1
        assert self._synced is not None
        self._synced.set()

    def _deliver(self, state: ModelState, *, force: bool = False) -> None:
        if not force and state.version <= self._applied.get(state.model, 0):
            return  # already applied from a snapshot or an earlier read
        self._applied[state.model] = state.version
        try:
            self._on_change(state)
        except Exception:
            logger.exception("applying control change of model %s failed", state.model)


def _stream_entries(reply: object) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of an XREAD reply on one stream (RESP2: [[name, entries]]; RESP3: a map)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        groups = list(reply.values())
    elif isinstance(reply, list):
        groups = [group[1] for group in reply]
    else:
        raise redis.ResponseError(f"unexpected XREAD reply {reply!r:.80}")
    return [entry for group in groups for entry in as_entries(group)]


def _done(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("change follower crashed", exc_info=task.exception())
