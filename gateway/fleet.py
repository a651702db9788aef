"""fleet.py: one replica's membership in a fleet that shares one control plane through Redis.

In: ``StoreSettings`` with a store URL, this replica's incarnation id and address, the
router (for its traffic counters) and, once the controller exists, its ``observe``. Out: the
``RedisStore`` the controller commits through, the controller lease (``lease()``: the
``LeaseSource`` that gates evaluation and carries the fencing token), the replica's
heartbeat, its cumulative traffic counters published every beat, the pooled traffic of all
live replicas (``traffic(model)``, what the leader decides on), each sealed drift epoch
published once and the pooled drift reports (``drift``), the fleet view (``view()``: who is
alive, who leads, how far each trails) and the change-log follower
that hands every change committed elsewhere to ``observe`` in commit order, on a thread of
its own so a slow apply never holds the event loop. Nothing here is on the request path: the
router keeps serving what it holds while Redis is away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import msgspec
import numpy as np
import numpy.typing as npt

from gateway.config import StoreSettings
from gateway.drift.monitor import DriftMonitor
from gateway.drift.report import DriftReport
from gateway.errors import GatewayError
from gateway.feedback import PredictionMemory
from gateway.outcomes import Moments, OutcomeSnapshot
from gateway.router import Router
from gateway.store import (
    ChangeFollower,
    Lease,
    LeaseKeeper,
    ModelState,
    RedisStore,
    ReplicaHeartbeat,
    encode_counts,
    sum_counts,
)
from gateway.store.pooled import Counts
from gateway.store.relay import FeedbackRelay
from gateway.traffic import VariantSnapshot
from gateway.types import FeedbackItem, ModelRef

__all__ = ["Fleet", "FleetSample", "PooledDrift"]

logger = logging.getLogger(__name__)

SYNC_TIMEOUT_S: Final = 5.0  # start-up waits this long for the first snapshot, then serves
_TRAFFIC: Final = "traffic:"  # signal name prefix: traffic:<model>
_OUTCOMES: Final = "outcomes:"  # signal name prefix: outcomes:<model>:<version>
_SNAPSHOT_TIMEOUT_S: Final = 5.0
_FORGET_S: Final = 3600.0  # a dead replica's last counters stay in the sum this long
_DRIFT: Final = "drift:"  # signal name prefix: drift:<model>:<version>:<unix epoch>
_FLEET: Final = "fleet"  # signal: each replica's change-log position (in the extra bytes)
_VIEW_EVERY_S: Final = 2.0
_WHERE_EVERY_S: Final = 10.0  # the cached fleet view (metrics) is refreshed this often
_SEP: Final = "\x1f"  # joins a version into a counter name (versions are path-safe names)


class Fleet:
    """The Redis-backed control plane of one replica (see the module docstring)."""

    def __init__(
        self,
        settings: StoreSettings,
        router: Router,
        incarnation: str,
        monitor: DriftMonitor | None = None,
    ) -> None:
        self.settings = settings
        self.incarnation = incarnation
        self.store = RedisStore(settings.url, cluster=settings.cluster)
        self.store.ensure_epoch()  # reachable at start, or the process does not start
        self._router = router
        self._lease = LeaseKeeper(self.store, incarnation, ttl_s=settings.lease_ttl_s)
        self._heartbeat: ReplicaHeartbeat | None = None
        self._seen: dict[str, dict[str, tuple[float, Counts]]] = {}
        """model -> incarnation -> (when last read, its last cumulative counters)."""
        self._follower: ChangeFollower | None = None
        self.relay: FeedbackRelay | None = None
        self._memory: PredictionMemory | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outcomes_seen: dict[tuple[str, str], dict[str, tuple[float, OutcomeSnapshot]]] = {}
        self._applier: ThreadPoolExecutor | None = None
        self._monitor = monitor
        self._drift_sent: dict[ModelRef, int] = {}
        """ref -> newest sealed drift epoch published (each epoch is published once)."""
        self._view: FleetSample | None = None
        self._view_at = -_VIEW_EVERY_S
        self._where: _Position | None = None  # the change-log position last published
        self._where_at = 0.0
        self.drift = PooledDrift(self, monitor) if monitor is not None else None
        """The drift reports over every live replica's windows (the leader's signal, the
        admin report); None without a monitor."""

    def lease(self) -> Lease | None:
        """The controller lease this replica holds now, or None."""
        return self._lease.current()

    @property
    def is_following(self) -> bool:
        return self._follower is not None and self._follower.is_connected

    async def start(
        self,
        observe: Callable[[ModelState], object],
        address: str,
        join: Callable[[str, list[FeedbackItem]], object] | None = None,
        memory: PredictionMemory | None = None,
    ) -> None:
        """Follow the change log (the first snapshot applied, or ``SYNC_TIMEOUT_S`` passed),
        then keep the lease and the heartbeat (registered under ``address``); with ``join``,
        relay feedback between replicas (``join`` gets the others' items); with ``memory``,
        publish its outcome statistics too (read on this loop, where the memory lives)."""
        self._memory, self._loop = memory, asyncio.get_running_loop()
        if join is not None:
            self.relay = FeedbackRelay(
                self.settings.url, self.incarnation, join, cluster=self.settings.cluster
            )
            await self.relay.start()
        applier = ThreadPoolExecutor(1, thread_name_prefix="control-follow")
        self._applier = applier

        def hand_over(state: ModelState) -> None:
            applier.submit(_logged, observe, state)

        self._follower = ChangeFollower(
            self.settings.url,
            hand_over,
            cluster=self.settings.cluster,
            resync_interval_s=self.settings.resync_interval_s,
        )
        await self._follower.start()
        if not await self._follower.wait_synced(SYNC_TIMEOUT_S):
            logger.warning("control store not synced within %.0f s; following", SYNC_TIMEOUT_S)
        self._heartbeat = ReplicaHeartbeat(
            self.store,
            self.incarnation,
            address,
            ttl_s=self.settings.heartbeat_ttl_s,
            publish=self.publish,
        )
        self._heartbeat.start()
        self._lease.start()
        logger.info(
            "control plane shared through redis at %s (cluster %s) as replica %s",
            self.store.address,
            self.settings.cluster,
            self.incarnation,
        )

    async def stop(self) -> None:
        """Give the lease up (another replica decides at once), leave the registry, stop
        following. The store stays open (its owner closes it)."""
        # Off the loop: joins and store calls block, and a change being applied needs the
        # loop to reach the router.
        await asyncio.to_thread(self._lease.stop, release=True)
        if self._heartbeat is not None:
            await asyncio.to_thread(self._heartbeat.stop, forget=True)
        if self._follower is not None:
            await self._follower.stop()
        if self.relay is not None:
            await self.relay.stop()
        if self._applier is not None:
            await asyncio.to_thread(self._applier.shutdown, wait=True)

    # -- pooled traffic ---------------------------------------------------------------------

    def publish(self) -> None:
        """This replica's cumulative traffic counters, one snapshot per model (idempotent)."""
        by_model: dict[str, dict[str, npt.ArrayLike]] = {}
        try:
            snaps = self._router.traffic()
        except RuntimeError:  # a variant's first request resized the table mid-read
            return  # the next beat publishes
        for snap in snaps:
            counts = by_model.setdefault(snap.model, {})
            name = snap.version + _SEP
            counts[name + "requests"] = snap.requests
            counts[name + "rows"] = snap.rows
            counts[name + "errors"] = snap.errors
            counts[name + "latency"] = np.asarray(snap.latency_counts, dtype=np.int64)
            counts[name + "latency_us"] = round(snap.latency_total_ms * 1000)
        for model, counts in by_model.items():
            self.store.publish(_TRAFFIC + model, self.incarnation, encode_counts(counts))
        for outcome in self._outcome_snapshots():
            name = f"{_OUTCOMES}{outcome.model}:{outcome.version}"
            self.store.publish(name, self.incarnation, _encode_outcome(outcome))
        self._publish_drift()
        follower = self._follower
        if follower is not None:  # when it moved, and every 10 s (a wiped store relearns it)
            where = _Position(follower.last_id, follower.applied())
            if where != self._where or time.monotonic() - self._where_at > _WHERE_EVERY_S:
                payload = encode_counts({}, extra=msgspec.msgpack.encode(where), ts=time.time())
                self.store.publish(_FLEET, self.incarnation, payload)
                self._where, self._where_at = where, time.monotonic()
        if time.monotonic() - self._view_at >= _VIEW_EVERY_S:
            self._view_at = time.monotonic()
            self.view()

    def sample(self) -> FleetSample | None:
        """The fleet gauges as of the last view (refreshed by the heartbeat every 2 s; the
        scrape never waits on Redis)."""
        return self._view

    def view(self) -> dict[str, Any]:
        """Every registered replica: id, address, heartbeat age, whether it holds the
        controller lease, its change-log position, the versions it applied and its lag (how
        far, in change-log time, it trails the most advanced replica). Reads the store."""
        replicas = self.store.replicas()
        lease = self.store.lease()
        pooled = self.store.pooled(_FLEET)
        where = {inc: _position_decoder.decode(x) for inc, x in pooled.extras.items()}
        newest = max((_id_ms(p.position) for p in where.values()), default=0)
        now = time.time()
        rows = []
        for r in replicas:
            p = where.get(r.incarnation)
            lag = (newest - _id_ms(p.position)) / 1000 if p is not None else None
            rows.append(
                {
                    "id": r.incarnation,
                    "address": r.address,
                    "alive": r.alive,
                    "heartbeat_age_s": round(max(0.0, now - r.last_seen), 3),
                    "is_leader": lease is not None and lease.holder == r.incarnation,
                    "is_self": r.incarnation == self.incarnation,
                    "started": r.started,
                    "position": p.position if p is not None else None,
                    "applied": p.applied if p is not None else {},
                    "lag_s": lag,
                }
            )
        mine = where.get(self.incarnation)
        self._view = FleetSample(
            replicas=sum(1 for r in replicas if r.alive),
            is_leader=self.lease() is not None,
            lag_s=(newest - _id_ms(mine.position)) / 1000 if mine is not None else 0.0,
        )
        return {
            "shared": True,
            "cluster": self.settings.cluster,
            "self": self.incarnation,
            "leader": lease.holder if lease is not None else None,
            "fencing_token": lease.token if lease is not None else None,
            "replicas": rows,
        }

    def _publish_drift(self) -> None:
        """Each drift epoch sealed since the last publish, once (a failed one is retried at
        the next beat; epochs older than the window are gone and not needed)."""
        monitor = self._monitor
        if monitor is None:
            return
        sealed, epochs, sub_s = monitor.epochs()
        ttl_s = 2 * epochs * sub_s
        for ref in monitor.profiled():
            try:
                profile_hash, sealed_parts = monitor.export_since(
                    ref, self._drift_sent.get(ref, sealed - epochs)
                )
            except KeyError:  # unregistered meanwhile
                continue
            for epoch, counts in sealed_parts:
                payload = encode_counts(counts, profile_hash=profile_hash)
                self.store.publish(_drift_name(ref, epoch), self.incarnation, payload, ttl_s=ttl_s)
                self._drift_sent[ref] = epoch
        for ref in [r for r in self._drift_sent if r not in monitor.profiled()]:
            del self._drift_sent[ref]

    def drift_window(self, ref: ModelRef, profile_hash: str) -> tuple[Counts, tuple[str, ...]]:
        """The sum of every live replica's sealed drift counts of ``ref`` over the window
        (epochs published with ``profile_hash``), and the replicas that contributed."""
        if self._monitor is None:
            return {}, ()
        sealed, epochs, _ = self._monitor.epochs()
        parts: list[Counts] = []
        who: set[str] = set()
        for epoch in range(sealed - epochs + 1, sealed + 1):
            pooled = self.store.pooled(_drift_name(ref, epoch), profile_hash=profile_hash)
            parts.append(pooled.counts)
            who.update(pooled.contributors)
        return sum_counts(parts), tuple(sorted(who))

    def _outcome_snapshots(self) -> list[OutcomeSnapshot]:
        memory, loop = self._memory, self._loop
        if memory is None or loop is None or loop.is_closed():
            return []

        async def take() -> list[OutcomeSnapshot]:
            return [memory.snapshot(m, v) for m, v in memory.variants()]

        try:
            return asyncio.run_coroutine_threadsafe(take(), loop).result(_SNAPSHOT_TIMEOUT_S)
        except (TimeoutError, RuntimeError):  # a stopping loop: the next beat publishes
            return []

    def outcome(self, model: str, version: str) -> OutcomeSnapshot:
        """Every replica's cumulative outcome statistics of one version, merged exactly
        for counts (and by Chan's formula for moments); a dead replica's last snapshot
        stays in, as for traffic. Thread-safe reads; call from one thread (the leader's)."""
        key = (model, version)
        seen = self._outcomes_seen.setdefault(key, {})
        now = time.monotonic()
        try:
            pooled = self.store.pooled(f"{_OUTCOMES}{model}:{version}")
        except GatewayError as exc:
            logger.debug("pooled outcomes of %s/%s unavailable: %s", model, version, exc)
        else:
            for inc, counts in pooled.per_incarnation.items():
                seen[inc] = (now, _decode_outcome(model, version, counts, pooled.extras[inc]))
        for inc in [i for i, (at, _) in seen.items() if now - at > _FORGET_S]:
            del seen[inc]
        total = OutcomeSnapshot(model, version)
        for _, snap in seen.values():
            total = _plus(total, snap)
        return total

    def traffic(self, model: str) -> list[VariantSnapshot]:
        """Every live replica's cumulative traffic of ``model``, summed exactly (this
        replica's own counters until the store was read once). A replica that died keeps its
        last counters in the sum (those requests happened; dropping them would make a
        window's count go backwards) for ``_FORGET_S``. Shadow comparison figures stay this
        replica's."""
        local = {s.version: s for s in self._router.traffic(model)}
        now = time.monotonic()
        seen = self._seen.setdefault(model, {})
        try:
            pooled = self.store.pooled(_TRAFFIC + model)
        except GatewayError as exc:  # the last sums read stay (counts never go backwards)
            logger.debug("pooled traffic of %s unavailable: %s", model, exc)
        else:
            for inc, counts in pooled.per_incarnation.items():
                seen[inc] = (now, counts)
        for inc in [i for i, (at, _) in seen.items() if now - at > _FORGET_S]:
            del seen[inc]
        if not seen:
            return list(local.values())
        total = sum_counts([counts for _, counts in seen.values()])
        versions = sorted({k.split(_SEP)[0] for k in total} | set(local))
        out = []
        for version in versions:
            c = {k.split(_SEP)[1]: v for k, v in total.items() if k.startswith(version + _SEP)}
            mine = local.get(version)
            if not c:
                if mine is not None:
                    out.append(mine)
                continue
            out.append(
                VariantSnapshot(
                    model,
                    version,
                    int(c["requests"].sum()),
                    int(c["rows"].sum()),
                    int(c["errors"].sum()),
                    tuple(int(x) for x in c["latency"]),
                    float(c["latency_us"].sum()) / 1000,
                    dict(mine.shadow) if mine is not None else {},
                )
            )
        return out


class FleetSample(msgspec.Struct, frozen=True, kw_only=True):
    """What the metrics show of the fleet: live replicas, whether this one leads, its lag."""

    replicas: int
    is_leader: bool
    lag_s: float


class _Position(msgspec.Struct, array_like=True):
    position: str  # the change-log id last read
    applied: dict[str, int]  # model -> version applied


_position_decoder: Final = msgspec.msgpack.Decoder(_Position)


def _id_ms(stream_id: str) -> int:
    """The milliseconds part of a stream id ("<ms>-<seq>")."""
    head = stream_id.partition("-")[0]
    return int(head) if head.isdigit() else 0


class PooledDrift:
    """``report`` / ``compare`` like ``DriftMonitor``'s, over the fleet's summed windows;
    this replica's own report when the store cannot be read or nobody published yet."""

    def __init__(self, fleet: Fleet, monitor: DriftMonitor) -> None:
        self._fleet = fleet
        self._monitor = monitor

    def _pooled(self, ref: ModelRef, profile_hash: str) -> tuple[Counts, int] | None:
        try:
            counts, who = self._fleet.drift_window(ref, profile_hash)
        except GatewayError as exc:
            logger.debug("pooled drift of %s unavailable: %s", ref, exc)
            return None
        return (counts, len(who)) if who else None

    def report(self, ref: ModelRef) -> DriftReport:
        local = self._monitor.report(ref)  # KeyError when not monitored
        pooled = self._pooled(ref, local.profile_hash)
        if pooled is None:
            return local
        counts, n = pooled
        report = self._monitor.report_counts(ref, counts, local.window_s)
        return msgspec.structs.replace(report, replicas=n, dropped=local.dropped)

    def compare(self, ref_a: ModelRef, ref_b: ModelRef) -> DriftReport:
        local = self._monitor.compare(ref_a, ref_b)  # KeyError / ValueError as the monitor's
        a = self._pooled(ref_a, local.profile_hash)
        b = self._pooled(ref_b, local.profile_hash)
        if a is None or b is None:
            return local
        report = self._monitor.compare_counts(ref_a, ref_b, a[0], b[0], local.window_s)
        return msgspec.structs.replace(report, replicas=max(a[1], b[1]), dropped=local.dropped)


def _drift_name(ref: ModelRef, epoch: int) -> str:
    return f"{_DRIFT}{ref.name}:{ref.version}:{epoch}"


class _OutcomeExtra(msgspec.Struct, array_like=True):
    """The float parts of an ``OutcomeSnapshot`` (the int counts travel as counters)."""

    kind: str | None
    log_loss: tuple[int, float, float]
    abs_error: tuple[int, float, float]
    sq_error: tuple[int, float, float]
    sum_error: float


_outcome_extra_decoder: Final = msgspec.msgpack.Decoder(_OutcomeExtra)


def _m(moments: Moments) -> tuple[int, float, float]:
    return (moments.n, moments.mean, moments.m2)


def _encode_outcome(snap: OutcomeSnapshot) -> bytes:
    counts: dict[str, npt.ArrayLike] = {
        "n": snap.n,
        "correct": snap.correct,
        "confusion_overflow": snap.confusion_overflow,
    }
    if snap.confusion is not None:  # named by size: replicas may have seen other labels
        counts[f"confusion{snap.confusion.shape[0]}"] = snap.confusion
    extra = _OutcomeExtra(
        snap.kind, _m(snap.log_loss), _m(snap.abs_error), _m(snap.sq_error), snap.sum_error
    )
    return encode_counts(counts, extra=msgspec.msgpack.encode(extra))


def _decode_outcome(model: str, version: str, counts: Counts, extra: bytes) -> OutcomeSnapshot:
    e = _outcome_extra_decoder.decode(extra)
    kind = e.kind if e.kind in ("classification", "regression") else None
    return OutcomeSnapshot(
        model,
        version,
        kind,  # type: ignore[arg-type]  # checked against the two kinds above
        int(counts["n"].sum()),
        int(counts["correct"].sum()),
        Moments(*e.log_loss),
        next((v for k, v in counts.items() if k.startswith("confusion") and k[9:].isdigit()), None),
        int(counts["confusion_overflow"].sum()),
        Moments(*e.abs_error),
        Moments(*e.sq_error),
        e.sum_error,
    )


def _moments_plus(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s merge of two series' moments."""
    if a.n == 0:
        return b
    if b.n == 0:
        return a
    n = a.n + b.n
    delta = b.mean - a.mean
    return Moments(n, a.mean + delta * b.n / n, a.m2 + b.m2 + delta * delta * a.n * b.n / n)


def _plus(a: OutcomeSnapshot, b: OutcomeSnapshot) -> OutcomeSnapshot:
    """Both replicas' outcomes of one version; a snapshot of the other kind is left out."""
    if a.kind is not None and b.kind is not None and a.kind != b.kind:
        logger.warning("outcomes of %s/%s mix kinds across replicas", a.model, a.version)
        return a
    confusion = a.confusion
    if confusion is None:
        confusion = b.confusion
    elif b.confusion is not None:
        if confusion.shape == b.confusion.shape:
            confusion = confusion + b.confusion
        else:  # different label ranges seen: the larger table, padded
            shape = tuple(
                max(x, y) for x, y in zip(confusion.shape, b.confusion.shape, strict=True)
            )
            merged = np.zeros(shape, dtype=np.int64)
            merged[: confusion.shape[0], : confusion.shape[1]] += confusion
            merged[: b.confusion.shape[0], : b.confusion.shape[1]] += b.confusion
            confusion = merged
    return OutcomeSnapshot(
        a.model,
        a.version,
        a.kind or b.kind,
        a.n + b.n,
        a.correct + b.correct,
        _moments_plus(a.log_loss, b.log_loss),
        confusion,
        a.confusion_overflow + b.confusion_overflow,
        _moments_plus(a.abs_error, b.abs_error),
        _moments_plus(a.sq_error, b.sq_error),
        a.sum_error + b.sum_error,
    )


def _logged(observe: Callable[[ModelState], object], state: ModelState) -> None:
    started = time.perf_counter()
    try:
        observe(state)
    except Exception:
        logger.exception("applying the change of model %s failed", state.model)
    logger.debug("applied %s v%d in %.1f ms", state.model, state.version, _ms(started))


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
