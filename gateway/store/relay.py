"""store/relay.py: ground truth posted to one replica reaches the replica that served it.

In: a Redis URL and cluster name, this replica's incarnation id and a callback. Out:
``forward(model, items)`` appends feedback items this replica does not hold to one shared
stream (``feedback``, capped), without waiting; every replica tails that stream from where it
started and hands the other replicas' items to the callback (which joins the ones whose
prediction it holds and ignores the rest). At-least-once within the cap: a replica that
reconnects resumes after the last entry it read, and a repeated item joins once (the memory
counts later copies as duplicates). Nothing here is on the inference path. Knows nothing of
prediction memories or outcomes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Final

import msgspec
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.store.keyspace import as_entries, key_prefix
from gateway.types import FeedbackItem

__all__ = ["FeedbackRelay"]

logger = logging.getLogger(__name__)

MAXLEN: Final = 100_000  # items older than this many forwarded batches are dropped
BLOCK_MS: Final = 1000
TIMEOUT_S: Final = 0.5
RECONNECT_S: Final = 0.25

_encode: Final = msgspec.msgpack.Encoder().encode
_decode_items: Final = msgspec.msgpack.Decoder(list[FeedbackItem]).decode


class FeedbackRelay:
    """Forwards unknown feedback to the fleet and delivers the fleet's to ``on_items``.

    ``on_items(model, items)`` runs on the event loop; it must be quick. ``forwarded``,
    ``received`` and ``failed`` count batches.
    """

    def __init__(
        self,
        url: str,
        incarnation: str,
        on_items: Callable[[str, list[FeedbackItem]], object],
        *,
        cluster: str = "gateway",
    ) -> None:
        self._url = url
        self._key = key_prefix(cluster) + "feedback"
        self._incarnation = incarnation
        self._on_items = on_items
        self._redis: aioredis.Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self._last_id = ""
        self.forwarded = 0
        self.received = 0
        self.failed = 0

    async def start(self) -> None:
        if self._task is not None:
            return
        self._redis = aioredis.Redis.from_url(
            self._url,
            socket_timeout=TIMEOUT_S + BLOCK_MS / 1000,
            socket_connect_timeout=TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
        self._task = asyncio.get_running_loop().create_task(self._run(), name="feedback-relay")

    def forward(self, model: str, items: Sequence[FeedbackItem]) -> None:
        """Append ``items`` for the other replicas; returns at once (call on the loop)."""
        if not items or self._redis is None:
            return
        fields: dict[str, str | bytes] = {
            "o": self._incarnation,
            "m": model,
            "i": _encode(list(items)),
        }
        task = asyncio.get_running_loop().create_task(self._send(fields))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send(self, fields: dict[str, str | bytes]) -> None:
        assert self._redis is not None
        try:
            await self._redis.xadd(self._key, fields, maxlen=MAXLEN, approximate=True)  # type: ignore[arg-type]
            self.forwarded += 1
        except redis.RedisError as exc:
            self.failed += 1
            logger.warning("feedback not forwarded to the other replicas: %s", exc)

    async def _run(self) -> None:
        while True:
            try:
                await self._tail()
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:
                logger.debug("feedback relay paused: %s", exc)
                await asyncio.sleep(RECONNECT_S)

    async def _tail(self) -> None:
        assert self._redis is not None
        if not self._last_id:  # first connection: only what is forwarded from now on
            newest = await self._redis.xrevrange(self._key, count=1)
            rows = as_entries(newest)
            self._last_id = rows[0][0].decode() if rows else "0-0"
        while True:
            reply = await self._redis.xread({self._key: self._last_id}, count=100, block=BLOCK_MS)
            groups = (
                list(reply.values()) if isinstance(reply, dict) else [g[1] for g in reply or []]
            )
            for group in groups:
                for raw_id, fields in as_entries(group):
                    self._last_id = raw_id.decode()
                    if fields.get(b"o", b"").decode() == self._incarnation:
                        continue
                    self._deliver(fields)

    def _deliver(self, fields: dict[bytes, bytes]) -> None:
        try:
            items = _decode_items(fields[b"i"])
            self.received += 1
            self._on_items(fields[b"m"].decode(), items)
        except Exception:
            logger.exception("forwarded feedback could not be joined")

    async def stop(self) -> None:
        task, self._task = self._task, None
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        if self._sends:
            await asyncio.wait(set(self._sends), timeout=1.0)
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
