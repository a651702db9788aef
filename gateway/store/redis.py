"""store/redis.py: the control plane shared by many replicas, in Redis (or Valkey).

In: the same calls as ``SqliteStore`` (routes, rollout documents, audit events, the lease),
plus replica heartbeats and cumulative signal snapshots. Out: the same state for every
replica, a change log (a Redis Stream) that ``ChangeFollower`` tails, the pooled sums of the
replicas' signals. Speaks only the RESP subset that Valkey shares (hashes, strings, streams,
EVALSHA); every key sits under one hash tag, ``gw:{<cluster>}:``, so the scripts also run
on one Redis Cluster slot. Knows nothing of HTTP, policies or decisions.

Every state change is ONE Lua commit that checks the fencing token (controller writes) and
the model's version (when the caller gives one), then writes the route and rollout document,
bumps the versions, appends the audit entry on the head it reads (same canonical JSON and
SHA-256 as SQLite's, ``store/audit.py``; the script hashes it, so concurrent writers never
race on the head and never retry) and appends the change-log entry.

Keys (under the prefix): ``state`` HASH {version, epoch, ver:<m>, route:<m>, rollout:<m>};
``changes`` STREAM {model, v, g, route?, rollout?}; ``audit`` STREAM ids ``<seq>-1``
{c: canonical JSON, h: hash}; ``audit:head`` HASH {seq, hash}; ``leader`` STRING
"<token> <holder>" with PX; ``leader:token`` counter; ``replicas`` HASH incarnation -> JSON;
``hb:<inc>`` STRING with PX; ``sig:<name>`` HASH incarnation -> msgpack snapshot (a drift
epoch is a name of its own, e.g. ``drift:<model>:<version>:<epoch>``, with a TTL).

Methods are synchronous and short, with socket timeouts (``TIMEOUT_S``) and no client-side
retries, so an unreachable Redis raises ``StoreUnavailableError`` (503) in under a second
and a commit is never replayed blindly. Safe to share between threads (a connection pool).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Final

import msgspec
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from gateway.errors import (
    FencedWriteError,
    InvalidInputError,
    StoreUnavailableError,
    VersionConflictError,
)
from gateway.store.audit import (
    GENESIS_HASH,
    MAX_AUDIT_LIMIT,
    AuditEntry,
    AuditEvent,
    AuditVerification,
    ChainWalk,
    JsonObject,
    audit_hash,
    canonical,
    new_entry,
)
from gateway.store.keyspace import (
    ACQUIRE_SCRIPT,
    COMMIT_SCRIPT,
    RENEW_SCRIPT,
    SNAPSHOT_SCRIPT,
    as_bytes,
    as_entries,
    as_fields,
    key_prefix,
    parse_state,
)
from gateway.store.pooled import Counts, Pooled, decode_counts, sum_counts
from gateway.store.protocol import Commit, ControlSnapshot, Lease
from gateway.types import Route

__all__ = ["RedisStore", "Replica"]

logger = logging.getLogger(__name__)

TIMEOUT_S: Final = 0.4  # a commit takes ~1 ms (0.7-0.9 ms p50 measured); 2 x 0.4 s < 1 s
CHANGES_MAXLEN: Final = 10_000  # ~ hours of changes; a follower further behind resyncs
_AUDIT_CHUNK: Final = 500  # stream entries read per call while scanning or verifying

_encode = msgspec.json.Encoder(order="sorted").encode
_route_decoder: Final = msgspec.json.Decoder(Route)


class _Unhashed(msgspec.Struct, frozen=True, kw_only=True):
    """An audit entry as stored (its canonical JSON), before the hash is attached."""

    seq: int
    ts: float
    actor: str
    action: str
    model: str
    reason: str
    before: JsonObject
    after: JsonObject
    details: JsonObject
    prev_hash: str


_unhashed_decoder: Final = msgspec.json.Decoder(_Unhashed)
_PREV_AT: Final = b',"prev_hash":"'
_SEQ_AT: Final = b',"seq":'


def _entry(raw: bytes, digest: bytes) -> AuditEntry:
    fields = msgspec.structs.asdict(_unhashed_decoder.decode(raw))
    return AuditEntry(**fields, hash=digest.decode())


def _canonical_parts(entry: AuditEntry) -> tuple[bytes, bytes, bytes]:
    """The entry's canonical JSON cut around its ``prev_hash`` and ``seq`` values, which the
    commit script fills in from the head it reads. Keys are sorted, so the top-level
    ``prev_hash`` and ``seq`` follow every nested object and the last match is theirs (a
    string value cannot hold an unescaped quote); checked by rebuilding a second encoding."""
    fields = msgspec.structs.asdict(entry)
    del fields["hash"]
    fields.update(seq=1, prev_hash=GENESIS_HASH)
    text = canonical(**fields)
    p = text.rindex(_PREV_AT + GENESIS_HASH.encode() + b'","reason":') + len(_PREV_AT)
    q = text.rindex(_SEQ_AT + b'1,"ts":') + len(_SEQ_AT)
    parts = text[:p], text[p + len(GENESIS_HASH) : q], text[q + 1 :]
    fields.update(seq=987654321, prev_hash="f" * 64)
    if parts[0] + b"f" * 64 + parts[1] + b"987654321" + parts[2] != canonical(**fields):
        raise InvalidInputError("audit event fields cannot be encoded canonically")  # unreachable
    return parts


class Replica(msgspec.Struct, frozen=True, kw_only=True):
    """One gateway process in the registry."""

    incarnation: str
    address: str
    started: float
    last_seen: float
    alive: bool = False
    """Its heartbeat key has not expired."""


_replica_decoder: Final = msgspec.json.Decoder(Replica)


class RedisStore:
    """``Store`` in Redis, plus the replica registry and pooled signals.

    ``url`` is a redis-py URL (``redis://[user:pass@]host:port/db``, ``rediss://``,
    ``unix://``). ``cluster`` names the key space, so several gateway fleets may share one
    Redis. ``timeout_s`` bounds every call's connect and read.
    """

    def __init__(
        self,
        url: str,
        *,
        cluster: str = "gateway",
        timeout_s: float = TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cluster = cluster
        self.prefix = key_prefix(cluster)
        self._clock = clock
        self._timeout_s = timeout_s
        self._pool = redis.ConnectionPool.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # No replays: a commit whose reply was lost must not run twice.
            retry=Retry(NoBackoff(), 0),
            max_connections=64,
        )
        kwargs = self._pool.connection_kwargs
        where = (
            kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
        )
        self.address = str(where)
        """Host and port (or socket path) for messages; never the credentials."""
        self._redis = redis.Redis(connection_pool=self._pool)
        self._commit = self._redis.register_script(COMMIT_SCRIPT)
        self._acquire = self._redis.register_script(ACQUIRE_SCRIPT)
        self._renew = self._redis.register_script(RENEW_SCRIPT)
        self._snapshot = self._redis.register_script(SNAPSHOT_SCRIPT)
        self._k_state = self.prefix + "state"
        self._k_changes = self.prefix + "changes"
        self._k_audit = self.prefix + "audit"
        self._k_head = self.prefix + "audit:head"
        self._k_leader = self.prefix + "leader"
        self._k_token = self.prefix + "leader:token"
        self._k_replicas = self.prefix + "replicas"

    @contextmanager
    def _call(self, what: str) -> Iterator[None]:
        """Turns connection failures and timeouts into ``StoreUnavailableError``."""
        try:
            yield
        except redis.TimeoutError as exc:
            raise StoreUnavailableError(
                f"control store unavailable (redis at {self.address}): {what} timed out "
                f"after {self._timeout_s} s; a change may still have been applied, so check "
                "the state before retrying"
            ) from exc
        except redis.ConnectionError as exc:
            raise StoreUnavailableError(
                f"control store unavailable (redis at {self.address}): {what} failed: {exc}"
            ) from exc
        except redis.ResponseError as exc:
            # A Redis that answers but refuses (read-only replica, OOM, LOADING after restart).
            raise StoreUnavailableError(
                f"control store refused {what} (redis at {self.address}): {exc}"
            ) from exc

    def ensure_epoch(self) -> str:
        """Write the store's random epoch if it has none (first use or wiped); return it."""
        with self._call("reading the epoch"):
            self._redis.hsetnx(self._k_state, "epoch", secrets.token_hex(8))
            return as_bytes(self._redis.hget(self._k_state, "epoch") or b"").decode()

    def ping(self) -> bool:
        """True if Redis answers now (never raises)."""
        try:
            return bool(self._redis.ping())
        except redis.RedisError:
            return False

    # -- routes and rollouts ----------------------------------------------------------------

    def get_route(self, model: str) -> Route | None:
        with self._call("reading a route"):
            raw = self._redis.hget(self._k_state, f"route:{model}")
        return None if raw is None else _route_decoder.decode(as_bytes(raw))

    def routes(self) -> dict[str, Route]:
        return {m: s.route for m, s in self.snapshot().models.items() if s.route is not None}

    def get_rollout(self, model: str) -> bytes | None:
        with self._call("reading a rollout"):
            raw = self._redis.hget(self._k_state, f"rollout:{model}")
        return None if raw is None else as_bytes(raw)

    def rollouts(self) -> dict[str, bytes]:
        return {m: s.rollout for m, s in self.snapshot().models.items() if s.rollout is not None}

    def snapshot(self) -> ControlSnapshot:
        with self._call("reading the state"):
            fields = self._redis.hgetall(self._k_state)
        return parse_state(as_fields(fields))

    def snapshot_with_position(self) -> tuple[ControlSnapshot, str]:
        """The state and the change log's last id, read atomically: following from that id
        after applying the snapshot misses nothing."""
        with self._call("reading the state"):
            last_id, flat = self._snapshot(keys=[self._k_state, self._k_changes])
        return parse_state(as_fields(flat)), as_bytes(last_id).decode()

    def save(
        self,
        model: str,
        *,
        route: Route | None = None,
        rollout: bytes | None = None,
        event: AuditEvent | None = None,
        expected_version: int | None = None,
        fencing_token: int | None = None,
    ) -> AuditEntry | None:
        """One atomic commit (see the module docstring). Raises ``VersionConflictError``,
        ``FencedWriteError``, ``StoreUnavailableError`` (nothing written, or for a timeout,
        an outcome to check with ``snapshot``)."""
        return self.commit(
            model,
            route=route,
            rollout=rollout,
            event=event,
            expected_version=expected_version,
            fencing_token=fencing_token,
        ).entry

    def commit(
        self,
        model: str,
        *,
        route: Route | None = None,
        rollout: bytes | None = None,
        event: AuditEvent | None = None,
        expected_version: int | None = None,
        fencing_token: int | None = None,
    ) -> Commit:
        """``save``, returning the versions after the commit."""
        if route is not None and route.model != model:
            raise InvalidInputError(f"route is for model '{route.model}', not '{model}'")
        return self._run_commit(
            model, route, rollout, event, expected_version, fencing_token, "a commit"
        )

    def _run_commit(
        self,
        model: str,
        route: Route | None,
        rollout: bytes | None,
        event: AuditEvent | None,
        expected_version: int | None,
        fencing_token: int | None,
        what: str,
    ) -> Commit:
        draft = None
        parts = (b"", b"", b"")
        if event is not None:
            draft = new_entry(event, head_seq=0, head_hash=GENESIS_HASH, now=self._clock())
            parts = _canonical_parts(draft)
        args: list[str | bytes | int] = [
            model,
            "" if expected_version is None else expected_version,
            "" if fencing_token is None else fencing_token,
            "0" if draft is None else "1",
            *parts,
            "0" if route is None else "1",
            b"" if route is None else _encode(route),
            "0" if rollout is None else "1",
            b"" if rollout is None else rollout,
            CHANGES_MAXLEN,
            secrets.token_hex(8),
        ]
        keys = [self._k_state, self._k_changes, self._k_audit, self._k_head, self._k_leader]
        with self._call(what):
            reply = self._commit(keys=keys, args=args)
        status = as_bytes(reply[0]).decode()
        if status == "version":
            raise VersionConflictError(
                f"model '{model}' is at control version {int(reply[1])}, not "
                f"{expected_version}: it changed meanwhile; re-read and retry"
            )
        if status == "fenced":
            raise FencedWriteError(
                f"controller write refused: fencing token {fencing_token} is not the "
                "current lease's"
            )
        if status != "ok":  # pragma: no cover - the script has no other answer
            raise StoreUnavailableError(f"unexpected commit reply {status!r}")
        version = int(reply[1])
        global_version = int(reply[2])
        if draft is None:
            return Commit(version=version, global_version=global_version)
        entry = msgspec.structs.replace(
            draft,
            seq=int(reply[3]),
            prev_hash=as_bytes(reply[4]).decode(),
            hash=as_bytes(reply[5]).decode(),
        )
        fields = msgspec.structs.asdict(entry)
        del fields["hash"]
        if audit_hash(**fields) != entry.hash:  # the chain check would fail later; say it now
            logger.error("audit entry %d was hashed differently by the store", entry.seq)
        return Commit(version=version, global_version=global_version, entry=entry)

    def _read_head(self) -> tuple[int, str]:
        with self._call("reading the audit head"):
            seq, digest = self._redis.hmget(self._k_head, ["seq", "hash"])
        return int(seq or 0), (as_bytes(digest).decode() if digest else GENESIS_HASH)

    # -- controller lease ---------------------------------------------------------------------

    def acquire_lease(self, holder: str, ttl_s: float) -> Lease | None:
        with self._call("acquiring the lease"):
            token = self._acquire(keys=[self._k_leader, self._k_token], args=[holder, _ms(ttl_s)])
        return None if token is None else Lease(holder=holder, token=int(token))

    def renew_lease(self, lease: Lease, ttl_s: float) -> bool:
        with self._call("renewing the lease"):
            done = self._renew(keys=[self._k_leader], args=[_lease_value(lease), _ms(ttl_s)])
        return bool(done)

    def release_lease(self, lease: Lease) -> None:
        with self._call("releasing the lease"):
            self._renew(keys=[self._k_leader], args=[_lease_value(lease), ""])

    def lease(self) -> Lease | None:
        with self._call("reading the lease"):
            raw = self._redis.get(self._k_leader)
        if raw is None:
            return None
        token, _, holder = as_bytes(raw).decode().partition(" ")
        return Lease(holder=holder, token=int(token))

    # -- audit trail --------------------------------------------------------------------------

    def append_audit(
        self,
        actor: str,
        action: str,
        model: str = "",
        reason: str = "",
        *,
        before: JsonObject | None = None,
        after: JsonObject | None = None,
        details: JsonObject | None = None,
        ts: float | None = None,
    ) -> AuditEntry:
        event = AuditEvent(
            actor=actor,
            action=action,
            model=model,
            reason=reason,
            before=before or {},
            after=after or {},
            details=details or {},
            ts=ts,
        )
        entry = self._run_commit(model, None, None, event, None, None, "an audit append").entry
        assert entry is not None
        return entry

    def _entries(
        self, start: str, end: str, *, reverse: bool
    ) -> Iterator[tuple[int, bytes, bytes]]:
        """(seq, canonical JSON, hash) from the audit stream in chunks, oldest or newest
        first."""
        while True:
            with self._call("reading the audit trail"):
                if reverse:
                    reply = self._redis.xrevrange(self._k_audit, end, start, count=_AUDIT_CHUNK)
                else:
                    reply = self._redis.xrange(self._k_audit, start, end, count=_AUDIT_CHUNK)
            rows = as_entries(reply)
            for raw_id, fields in rows:
                yield int(raw_id.split(b"-")[0]), fields.get(b"c", b""), fields.get(b"h", b"")
            if len(rows) < _AUDIT_CHUNK:
                return
            last = rows[-1][0].decode()
            if reverse:
                end = "(" + last
            else:
                start = "(" + last

    def audit(
        self,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> list[AuditEntry]:
        """Entries newest first, optionally for one model and ``since <= ts < until``.
        Scans the stream from the head (no secondary index): O(entries scanned)."""
        if not 1 <= limit <= MAX_AUDIT_LIMIT:
            raise InvalidInputError(f"limit must be between 1 and {MAX_AUDIT_LIMIT}")
        found: list[AuditEntry] = []
        for _, raw, digest in self._entries("-", "+", reverse=True):
            entry = _entry(raw, digest)
            if model is not None and entry.model != model:
                continue
            if until is not None and entry.ts >= until:
                continue
            if since is not None and entry.ts < since:
                continue
            found.append(entry)
            if len(found) == limit:
                break
        return found

    def verify_audit(self) -> AuditVerification:
        """Walk the whole stream against the recorded head (``ChainWalk``, as SQLite's)."""
        head_seq, head_hash = self._read_head()
        walk = ChainWalk(head_seq, head_hash)
        # Up to the head read above: entries committed meanwhile are not this walk's business.
        for seq, raw, digest in self._entries("-", f"{head_seq}-1", reverse=False):
            try:
                entry = _entry(raw, digest)
            except (msgspec.DecodeError, msgspec.ValidationError):
                return walk.unreadable(seq)
            if entry.seq != seq:
                return walk.bad(seq, f"entry stored under seq {seq} says seq {entry.seq}")
            failure = walk.feed(entry)
            if failure is not None:
                return failure
        return walk.finish()

    # -- replica registry ---------------------------------------------------------------------

    def heartbeat(self, incarnation: str, address: str, started: float, ttl_s: float) -> None:
        """Register (or refresh) this replica: alive for ``ttl_s`` from now. Idempotent."""
        record = Replica(
            incarnation=incarnation, address=address, started=started, last_seen=self._clock()
        )
        with self._call("sending the heartbeat"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(self._k_replicas, incarnation, _encode(record))
            pipe.set(self.prefix + f"hb:{incarnation}", b"1", px=_ms(ttl_s))
            pipe.execute()

    def forget(self, incarnation: str) -> None:
        """Remove a replica from the registry at once (planned shutdown)."""
        with self._call("leaving the registry"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.hdel(self._k_replicas, incarnation)
            pipe.delete(self.prefix + f"hb:{incarnation}")
            pipe.execute()

    def prune(self, max_age_s: float, signals: Sequence[str] = ()) -> list[str]:
        """Drop the replicas whose heartbeat expired and that were last seen more than
        ``max_age_s`` ago, from the registry and from the ``signals`` named (a hash field
        cannot expire by itself before Redis 7.4). Returns the incarnations dropped. Run by
        the leader, with ``max_age_s`` longer than a rollout step."""
        now = self._clock()
        dead = [
            r.incarnation for r in self.replicas() if not r.alive and now - r.last_seen > max_age_s
        ]
        if dead:
            with self._call("pruning the registry"):
                pipe = self._redis.pipeline(transaction=True)
                pipe.hdel(self._k_replicas, *dead)
                for name in signals:
                    pipe.hdel(self.prefix + f"sig:{name}", *dead)
                pipe.execute()
        return dead

    def replicas(self) -> list[Replica]:
        """Every registered replica, alive or not, by incarnation."""
        with self._call("reading the registry"):
            rows = self._redis.hgetall(self._k_replicas)
        records = sorted((_replica_decoder.decode(v) for v in rows.values()), key=_incarnation)
        alive = self._alive([r.incarnation for r in records])
        return [msgspec.structs.replace(r, alive=r.incarnation in alive) for r in records]

    def _alive(self, incarnations: Sequence[str]) -> set[str]:
        if not incarnations:
            return set()
        with self._call("reading heartbeats"):
            beats = self._redis.mget([self.prefix + f"hb:{inc}" for inc in incarnations])
        return {inc for inc, beat in zip(incarnations, beats, strict=True) if beat is not None}

    # -- pooled signals -----------------------------------------------------------------------

    def publish(self, name: str, incarnation: str, payload: bytes, *, ttl_s: float = 0.0) -> None:
        """Store this incarnation's cumulative snapshot of signal ``name`` (an
        ``encode_counts`` payload). Idempotent: a retry overwrites, never double-counts.
        ``ttl_s`` > 0 expires the whole signal key (e.g. a drift epoch past the window)."""
        key = self.prefix + f"sig:{name}"
        with self._call("publishing signals"):
            if ttl_s > 0:
                pipe = self._redis.pipeline(transaction=True)
                pipe.hset(key, incarnation, payload)
                pipe.pexpire(key, _ms(ttl_s))
                pipe.execute()
            else:
                self._redis.hset(key, incarnation, payload)

    def pooled(self, name: str, *, profile_hash: str | None = None) -> Pooled:
        """The exact int64 sum of the live incarnations' snapshots of ``name``. Skipped (and
        said why): an incarnation whose heartbeat expired, one whose ``profile_hash`` differs
        (when one is given) and one whose arrays do not match the others' shapes."""
        with self._call("reading signals"):
            rows = self._redis.hgetall(self.prefix + f"sig:{name}")
        by_inc = {k.decode(): v for k, v in as_fields(rows).items()}
        alive = self._alive(sorted(by_inc))
        per: dict[str, Counts] = {}
        extras: dict[str, bytes] = {}
        skipped: dict[str, str] = {}
        total: Counts = {}
        for inc in sorted(by_inc):
            if inc not in alive:
                skipped[inc] = "heartbeat expired"
                continue
            counts, phash, extra = decode_counts(by_inc[inc])
            if profile_hash is not None and phash != profile_hash:
                skipped[inc] = f"profile hash {phash} differs from {profile_hash}"
                continue
            try:
                total = sum_counts([total, counts])
            except InvalidInputError as exc:
                skipped[inc] = str(exc)
                continue
            per[inc], extras[inc] = counts, extra
        return Pooled(
            counts=total,
            contributors=tuple(sorted(per)),
            per_incarnation=per,
            extras=extras,
            skipped=skipped,
        )

    def close(self) -> None:
        self._redis.close()
        self._pool.disconnect()


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _lease_value(lease: Lease) -> str:
    return f"{lease.token} {lease.holder}"


def _incarnation(replica: Replica) -> str:
    return replica.incarnation
