"""store/sqlite.py: the embedded control-plane store, one SQLite file (the single-node default).

In: routes, rollout documents, audit events, lease requests. Out: the same after a restart,
per-model versions, and a verification of the audit trail. WAL journal with
``synchronous=FULL``, so a committed write is on disk before the call returns. Several
processes may share the file: writers queue on SQLite's lock, and versions, the audit head and
the lease are read inside each write transaction, so the semantics match ``RedisStore``.

The audit chain (format in ``store/audit.py``) lives in one table with a ``head`` record
written in the same transaction as each entry. Someone able to rewrite the whole file can
recompute the chain: ship ``AuditVerification.head_hash`` elsewhere (logs, alerts) to anchor it.
Every method is synchronous and short (one small transaction, one fsync for writes); the
store is safe to share between threads.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import msgspec

from gateway.errors import FencedWriteError, InternalError, InvalidInputError, VersionConflictError
from gateway.store.audit import (
    GENESIS_HASH,
    MAX_AUDIT_LIMIT,
    AuditEntry,
    AuditEvent,
    AuditVerification,
    ChainWalk,
    JsonObject,
    new_entry,
)
from gateway.store.protocol import Commit, ControlSnapshot, Lease, ModelState
from gateway.types import Route

__all__ = ["SqliteStore"]

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_S: Final = 5.0  # another process holding the write lock finishes in milliseconds
# 2 added per-model versions, the global version and epoch, and the controller lease.
_SCHEMA_VERSION: Final = 2
_VERIFY_CHUNK: Final = 500  # rows read per query while verifying, to bound memory

_encode = msgspec.json.Encoder(order="sorted").encode
_route_decoder: Final = msgspec.json.Decoder(Route)

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS routes (model TEXT PRIMARY KEY, route TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rollouts (model TEXT PRIMARY KEY, state BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS versions (model TEXT PRIMARY KEY, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS lease (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    holder TEXT NOT NULL,
    token INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    model TEXT NOT NULL,
    reason TEXT NOT NULL,
    before TEXT NOT NULL,
    after TEXT NOT NULL,
    details TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_model_seq ON audit (model, seq);
CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
"""

_AUDIT_COLUMNS: Final = (
    "seq, ts, actor, action, model, reason, before, after, details, prev_hash, hash"
)


def _entry(row: tuple[Any, ...]) -> AuditEntry:
    seq, ts, actor, action, model, reason, before, after, details, prev_hash, digest = row
    return AuditEntry(
        seq=int(seq),
        ts=float(ts),
        actor=str(actor),
        action=str(action),
        model=str(model),
        reason=str(reason),
        before=msgspec.json.decode(before),
        after=msgspec.json.decode(after),
        details=msgspec.json.decode(details),
        prev_hash=str(prev_hash),
        hash=str(digest),
    )


class SqliteStore:
    """``Store`` in one SQLite file (WAL journal, ``synchronous=FULL``).

    One connection guarded by a lock: every call is one short transaction. Several processes
    may open the same file; writers queue on SQLite's lock (``BUSY_TIMEOUT_S``) and the audit
    chain stays linear because each append reads the head inside its own write transaction.
    The lease's expiry is judged by ``clock`` (wall time), shared by processes on one host.
    """

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.path = str(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: the WAL is fsynced at every commit, so an answered write survives power loss.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)  # IF NOT EXISTS throughout: reopening is a no-op
            with self._write() as db:
                row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
                if row is not None and int(row[0]) > _SCHEMA_VERSION:
                    raise InternalError(
                        f"store {self.path} has schema {row[0]}; "
                        f"this gateway knows {_SCHEMA_VERSION}"
                    )
                db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(_SCHEMA_VERSION),)
                )
                db.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('epoch', ?)", (secrets.token_hex(8),)
                )
        except BaseException:
            self._db.close()  # a store that cannot open leaves no connection behind
            raise

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction under the lock; committed (and fsynced) on exit."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    # -- routes and rollouts ----------------------------------------------------------------

    def get_route(self, model: str) -> Route | None:
        with self._read() as db:
            row = db.execute("SELECT route FROM routes WHERE model=?", (model,)).fetchone()
        return None if row is None else _route_decoder.decode(row[0])

    def routes(self) -> dict[str, Route]:
        with self._read() as db:
            rows = db.execute("SELECT model, route FROM routes ORDER BY model").fetchall()
        return {str(m): _route_decoder.decode(r) for m, r in rows}

    def get_rollout(self, model: str) -> bytes | None:
        with self._read() as db:
            row = db.execute("SELECT state FROM rollouts WHERE model=?", (model,)).fetchone()
        return None if row is None else bytes(row[0])

    def rollouts(self) -> dict[str, bytes]:
        with self._read() as db:
            rows = db.execute("SELECT model, state FROM rollouts ORDER BY model").fetchall()
        return {str(m): bytes(s) for m, s in rows}

    def snapshot(self) -> ControlSnapshot:
        """Every model's route, rollout and version, from one read transaction."""
        with self._lock:
            db = self._db
            db.execute("BEGIN")
            try:
                meta = dict(db.execute("SELECT key, value FROM meta"))
                versions = dict(db.execute("SELECT model, version FROM versions"))
                routes = dict(db.execute("SELECT model, route FROM routes"))
                rollouts = dict(db.execute("SELECT model, state FROM rollouts"))
            finally:
                db.execute("COMMIT")
        models = {
            str(m): ModelState(
                model=str(m),
                version=int(versions.get(m, 0)),
                route=_route_decoder.decode(routes[m]) if m in routes else None,
                rollout=bytes(rollouts[m]) if m in rollouts else None,
            )
            for m in sorted(set(versions) | set(routes) | set(rollouts))
        }
        return ControlSnapshot(
            version=int(meta.get("version", 0)), epoch=str(meta["epoch"]), models=models
        )

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
        """Write any of a route, a rollout document and an audit event in one transaction:
        either all are durable when this returns or none is written (raises)."""
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
        with self._write() as db:
            if fencing_token is not None:
                self._check_fence(db, fencing_token)
            row = db.execute("SELECT version FROM versions WHERE model=?", (model,)).fetchone()
            version = 0 if row is None else int(row[0])
            if expected_version is not None and version != expected_version:
                raise VersionConflictError(
                    f"model '{model}' is at control version {version}, not "
                    f"{expected_version}: it changed meanwhile; re-read and retry"
                )
            if route is not None:
                db.execute(
                    "INSERT OR REPLACE INTO routes VALUES (?, ?)",
                    (model, _encode(route).decode()),
                )
            if rollout is not None:
                db.execute("INSERT OR REPLACE INTO rollouts VALUES (?, ?)", (model, rollout))
            if route is not None or rollout is not None:
                version += 1
                db.execute("INSERT OR REPLACE INTO versions VALUES (?, ?)", (model, version))
                db.execute(
                    "INSERT INTO meta VALUES ('version', '1') ON CONFLICT(key) "
                    "DO UPDATE SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT)"
                )
            row = db.execute("SELECT value FROM meta WHERE key='version'").fetchone()
            entry = None if event is None else self._append(db, event)
        return Commit(
            version=version, global_version=0 if row is None else int(row[0]), entry=entry
        )

    # -- controller lease ---------------------------------------------------------------------

    def _check_fence(self, db: sqlite3.Connection, token: int) -> None:
        row = db.execute("SELECT holder, token, expires_at FROM lease WHERE id=1").fetchone()
        if row is None or int(row[1]) != token or float(row[2]) <= self._clock():
            raise FencedWriteError(
                f"controller write refused: fencing token {token} is not the current lease's"
            )

    def acquire_lease(self, holder: str, ttl_s: float) -> Lease | None:
        now = self._clock()
        with self._write() as db:
            row = db.execute("SELECT holder, token, expires_at FROM lease WHERE id=1").fetchone()
            if row is not None and float(row[2]) > now:
                if str(row[0]) != holder:
                    return None
                token = int(row[1])
            else:
                token = (0 if row is None else int(row[1])) + 1
            db.execute(
                "INSERT OR REPLACE INTO lease VALUES (1, ?, ?, ?)", (holder, token, now + ttl_s)
            )
        return Lease(holder=holder, token=token)

    def renew_lease(self, lease: Lease, ttl_s: float) -> bool:
        now = self._clock()
        with self._write() as db:
            cur = db.execute(
                "UPDATE lease SET expires_at=? WHERE id=1 AND holder=? AND token=? "
                "AND expires_at>?",
                (now + ttl_s, lease.holder, lease.token, now),
            )
            return cur.rowcount == 1

    def release_lease(self, lease: Lease) -> None:
        with self._write() as db:
            # Expire rather than delete: the token counter lives in the row.
            db.execute(
                "UPDATE lease SET expires_at=0 WHERE id=1 AND holder=? AND token=?",
                (lease.holder, lease.token),
            )

    def lease(self) -> Lease | None:
        with self._read() as db:
            row = db.execute("SELECT holder, token, expires_at FROM lease WHERE id=1").fetchone()
        if row is None or float(row[2]) <= self._clock():
            return None
        return Lease(holder=str(row[0]), token=int(row[1]))

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
        """Append one entry; it is durable (fsynced) when this returns."""
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
        with self._write() as db:
            return self._append(db, event)

    def _head(self, db: sqlite3.Connection) -> tuple[int, str]:
        rows = dict(
            db.execute("SELECT key, value FROM meta WHERE key IN ('head_seq', 'head_hash')")
        )
        return int(rows.get("head_seq", 0)), str(rows.get("head_hash", GENESIS_HASH))

    def _append(self, db: sqlite3.Connection, event: AuditEvent) -> AuditEntry:
        head_seq, head_hash = self._head(db)
        entry = new_entry(event, head_seq=head_seq, head_hash=head_hash, now=self._clock())
        db.execute(
            f"INSERT INTO audit ({_AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.seq,
                entry.ts,
                entry.actor,
                entry.action,
                entry.model,
                entry.reason,
                _encode(entry.before).decode(),
                _encode(entry.after).decode(),
                _encode(entry.details).decode(),
                entry.prev_hash,
                entry.hash,
            ),
        )
        db.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            [("head_seq", str(entry.seq)), ("head_hash", entry.hash)],
        )
        return entry

    def audit(
        self,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> list[AuditEntry]:
        """Entries newest first, optionally for one model and ``since <= ts < until``
        (unix seconds). ``limit`` must be 1..``MAX_AUDIT_LIMIT``."""
        if not 1 <= limit <= MAX_AUDIT_LIMIT:
            raise InvalidInputError(f"limit must be between 1 and {MAX_AUDIT_LIMIT}")
        where: list[str] = []
        args: list[str | float] = []
        if model is not None:
            where.append("model = ?")
            args.append(model)
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        if until is not None:
            where.append("ts < ?")
            args.append(until)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        sql = f"SELECT {_AUDIT_COLUMNS} FROM audit {clause} ORDER BY seq DESC LIMIT ?"
        with self._read() as db:
            rows = db.execute(sql, (*args, limit)).fetchall()
        return [_entry(row) for row in rows]

    def verify_audit(self) -> AuditVerification:
        """Recompute every hash and link from the first entry to the recorded head
        (``ChainWalk``). Reads in chunks; O(entries) time."""
        with self._read() as db:
            walk = ChainWalk(*self._head(db))
        last = 0
        while True:
            with self._read() as db:
                rows = db.execute(
                    f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
                    (last, _VERIFY_CHUNK),
                ).fetchall()
            if not rows:
                return walk.finish()
            for row in rows:
                try:
                    entry = _entry(row)
                except (msgspec.DecodeError, TypeError, ValueError):
                    return walk.unreadable(int(row[0]))
                failure = walk.feed(entry)
                if failure is not None:
                    return failure
                last = entry.seq

    def close(self) -> None:
        with self._lock:
            self._db.close()
