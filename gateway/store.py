"""store.py: control-plane state (routes, rollout states, the audit trail) behind one interface.

In: route tables, rollout-state documents (opaque JSON bytes that ``rollout.py`` owns) and
audit events. Out: the same, after a restart, plus a verification of the audit trail. ``Store``
is the seam; ``SqliteStore`` is the embedded implementation (one file, WAL, ``synchronous=FULL``
so a committed write is on disk before the call returns). A store shared by many replicas can
implement the same ``Protocol`` later. This module knows nothing of HTTP, policies or decisions.

The audit trail is append-only and tamper-evident: each entry's ``hash`` is the SHA-256 of a
canonical JSON encoding of all its other fields, ``prev_hash`` included, so editing, deleting
or reordering a row breaks the chain; a ``head`` record written in the same transaction as each
entry catches a deleted tail. Someone able to rewrite the whole file can recompute the chain:
ship ``AuditVerification.head_hash`` elsewhere (logs, alerts) to anchor it.

Every method is synchronous and short (one small transaction, one fsync for writes); callers
on an event loop run writes in a worker thread. The store is safe to share between threads.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Protocol

import msgspec

from gateway.errors import InternalError, InvalidInputError
from gateway.types import Route

__all__ = [
    "GENESIS_HASH",
    "MAX_AUDIT_LIMIT",
    "AuditEvent",
    "AuditEntry",
    "AuditVerification",
    "Store",
    "SqliteStore",
    "audit_hash",
]

logger = logging.getLogger(__name__)

GENESIS_HASH: Final = "0" * 64
"""``prev_hash`` of the first audit entry."""
MAX_AUDIT_LIMIT: Final = 1000  # one admin page; a larger read belongs in an export tool
BUSY_TIMEOUT_S: Final = 5.0  # another process holding the write lock finishes in milliseconds
_SCHEMA_VERSION: Final = 1
_VERIFY_CHUNK: Final = 500  # rows read per query while verifying, to bound memory

JsonObject = dict[str, Any]

_encode = msgspec.json.Encoder(order="sorted").encode
_route_decoder: Final = msgspec.json.Decoder(Route)


class AuditEvent(msgspec.Struct, frozen=True, kw_only=True):
    """What a caller records; the store adds ``seq``, ``ts`` (if unset) and the hashes."""

    actor: str
    """Token name of the operator, or "controller" for automatic decisions."""
    action: str
    model: str = ""
    reason: str = ""
    before: JsonObject = {}
    """State before the change (e.g. route weights by version)."""
    after: JsonObject = {}
    details: JsonObject = {}
    """Supporting facts: measured values behind a decision, request path of a failed login."""
    ts: float | None = None
    """Unix time in seconds; None means "now" by the store's clock."""


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One committed audit record. ``hash`` covers every other field, ``prev_hash`` included."""

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
    hash: str


class AuditVerification(msgspec.Struct, frozen=True, kw_only=True):
    """Result of walking the chain from the first entry to the recorded head."""

    ok: bool
    checked: int
    """Entries whose hash was recomputed (up to and including the first bad one)."""
    first_bad_seq: int | None
    reason: str
    head_seq: int = 0
    head_hash: str = GENESIS_HASH


class Store(Protocol):
    """Control-plane state. Writes are durable when the call returns; reads see all commits."""

    def get_route(self, model: str) -> Route | None: ...

    def routes(self) -> dict[str, Route]: ...

    def get_rollout(self, model: str) -> bytes | None: ...

    def rollouts(self) -> dict[str, bytes]: ...

    def save(
        self,
        model: str,
        *,
        route: Route | None = None,
        rollout: bytes | None = None,
        event: AuditEvent | None = None,
    ) -> AuditEntry | None:
        """Write any of a route, a rollout document and an audit event in ONE transaction."""
        ...

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
    ) -> AuditEntry: ...

    def audit(
        self,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> list[AuditEntry]: ...

    def verify_audit(self) -> AuditVerification: ...

    def close(self) -> None: ...


def _normalise(value: JsonObject) -> JsonObject:
    """A JSON round trip: tuples become lists, NaN and inf become null, Structs dicts.

    The hash is computed over what is stored, so the same entry read back hashes the same.
    """
    doc = msgspec.json.decode(_encode(value))
    if not isinstance(doc, dict):  # pragma: no cover - a dict always encodes to an object
        raise InvalidInputError("audit fields must be JSON objects")
    return doc


def audit_hash(
    *,
    seq: int,
    ts: float,
    actor: str,
    action: str,
    model: str,
    reason: str,
    before: JsonObject,
    after: JsonObject,
    details: JsonObject,
    prev_hash: str,
) -> str:
    """SHA-256 (hex) of the canonical encoding: sorted keys, no whitespace, shortest floats."""
    canonical = _encode(
        {
            "seq": seq,
            "ts": ts,
            "actor": actor,
            "action": action,
            "model": model,
            "reason": reason,
            "before": before,
            "after": after,
            "details": details,
            "prev_hash": prev_hash,
        }
    )
    return hashlib.sha256(canonical).hexdigest()


_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS routes (model TEXT PRIMARY KEY, route TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rollouts (model TEXT PRIMARY KEY, state BLOB NOT NULL);
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
    """

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.path = str(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, so an answered write survives power loss.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)  # IF NOT EXISTS throughout: reopening is a no-op
        with self._write() as db:
            row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(_SCHEMA_VERSION),))
            elif int(row[0]) > _SCHEMA_VERSION:
                raise InternalError(
                    f"store {self.path} has schema {row[0]}; this gateway knows {_SCHEMA_VERSION}"
                )

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

    def save(
        self,
        model: str,
        *,
        route: Route | None = None,
        rollout: bytes | None = None,
        event: AuditEvent | None = None,
    ) -> AuditEntry | None:
        """Write any of a route, a rollout document and an audit event in one transaction:
        either all are durable when this returns or none is written (raises)."""
        if route is not None and route.model != model:
            raise InvalidInputError(f"route is for model '{route.model}', not '{model}'")
        with self._write() as db:
            if route is not None:
                db.execute(
                    "INSERT OR REPLACE INTO routes VALUES (?, ?)",
                    (model, _encode(route).decode()),
                )
            if rollout is not None:
                db.execute("INSERT OR REPLACE INTO rollouts VALUES (?, ?)", (model, rollout))
            return None if event is None else self._append(db, event)

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
        fields: dict[str, Any] = {
            "seq": head_seq + 1,
            "ts": float(self._clock() if event.ts is None else event.ts),
            "actor": event.actor,
            "action": event.action,
            "model": event.model,
            "reason": event.reason,
            "before": _normalise(event.before),
            "after": _normalise(event.after),
            "details": _normalise(event.details),
            "prev_hash": head_hash,
        }
        entry = AuditEntry(**fields, hash=audit_hash(**fields))
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
        """Recompute every hash and link from the first entry to the recorded head.

        Detects an edited field (hash mismatch), a deleted or reordered row (a gap in ``seq``
        or a broken ``prev_hash`` link) and a deleted tail (the last row is not the head).
        Reads in chunks; O(entries) time.
        """
        with self._read() as db:
            head_seq, head_hash = self._head(db)
        expected_seq, prev_hash, checked = 1, GENESIS_HASH, 0

        def bad(seq: int | None, reason: str) -> AuditVerification:
            logger.error("audit trail verification failed at seq %s: %s", seq, reason)
            return AuditVerification(
                ok=False,
                checked=checked,
                first_bad_seq=seq,
                reason=reason,
                head_seq=head_seq,
                head_hash=head_hash,
            )

        last = 0
        while True:
            with self._read() as db:
                rows = db.execute(
                    f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
                    (last, _VERIFY_CHUNK),
                ).fetchall()
            if not rows:
                break
            for row in rows:
                try:
                    entry = _entry(row)
                except (msgspec.DecodeError, TypeError, ValueError):
                    checked += 1
                    return bad(int(row[0]), "stored fields are not valid JSON")
                checked += 1
                if entry.seq != expected_seq:
                    return bad(
                        expected_seq, f"entry {expected_seq} is missing (next is {entry.seq})"
                    )
                if entry.prev_hash != prev_hash:
                    return bad(entry.seq, "prev_hash does not match the previous entry's hash")
                fields = msgspec.structs.asdict(entry)
                del fields["hash"]
                if audit_hash(**fields) != entry.hash:
                    return bad(entry.seq, "hash does not match the entry's contents")
                prev_hash, expected_seq, last = entry.hash, entry.seq + 1, entry.seq
                if entry.seq > head_seq:
                    return bad(entry.seq, f"entry {entry.seq} lies beyond the head ({head_seq})")
        if last != head_seq or prev_hash != head_hash:
            return bad(last + 1, f"trail ends at seq {last} but the head is seq {head_seq}")
        return AuditVerification(
            ok=True,
            checked=checked,
            first_bad_seq=None,
            reason="chain intact",
            head_seq=head_seq,
            head_hash=head_hash,
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()
