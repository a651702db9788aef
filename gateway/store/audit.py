"""store/audit.py: the audit trail's records, their hash and the chain walk, shared by backends.

In: audit events from callers, and stored entries read back by a backend. Out: entries with
their sequence number and hashes, and an ``AuditVerification`` of a chain. Every backend
(SQLite, Redis) builds entries with ``new_entry`` and verifies with ``ChainWalk``, so one
chain format and one verification hold for all of them. Knows nothing of storage.

Each entry's ``hash`` is the SHA-256 of a canonical JSON encoding of all its other fields,
``prev_hash`` included, so editing, deleting or reordering an entry breaks the chain; a head
record written atomically with each entry catches a deleted tail.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Final

import msgspec

from gateway.errors import InvalidInputError

__all__ = [
    "GENESIS_HASH",
    "MAX_AUDIT_LIMIT",
    "AuditEntry",
    "AuditEvent",
    "AuditVerification",
    "ChainWalk",
    "JsonObject",
    "audit_hash",
    "canonical",
    "new_entry",
]

logger = logging.getLogger(__name__)

GENESIS_HASH: Final = "0" * 64
"""``prev_hash`` of the first audit entry."""
MAX_AUDIT_LIMIT: Final = 1000  # one admin page; a larger read belongs in an export tool

JsonObject = dict[str, Any]

_encode = msgspec.json.Encoder(order="sorted").encode


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
    return hashlib.sha256(
        canonical(
            seq=seq,
            ts=ts,
            actor=actor,
            action=action,
            model=model,
            reason=reason,
            before=before,
            after=after,
            details=details,
            prev_hash=prev_hash,
        )
    ).hexdigest()


def canonical(
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
) -> bytes:
    """The bytes ``audit_hash`` hashes: JSON with sorted keys, no whitespace."""
    return _encode(
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


def new_entry(event: AuditEvent, *, head_seq: int, head_hash: str, now: float) -> AuditEntry:
    """The entry that follows the head ``(head_seq, head_hash)``; ``now`` fills an unset ts."""
    fields: dict[str, Any] = {
        "seq": head_seq + 1,
        "ts": float(now if event.ts is None else event.ts),
        "actor": event.actor,
        "action": event.action,
        "model": event.model,
        "reason": event.reason,
        "before": _normalise(event.before),
        "after": _normalise(event.after),
        "details": _normalise(event.details),
        "prev_hash": head_hash,
    }
    return AuditEntry(**fields, hash=audit_hash(**fields))


class ChainWalk:
    """Checks entries fed in ``seq`` order against the chain rules, then the recorded head.

    Detects an edited field (hash mismatch), a deleted or reordered entry (a gap in ``seq``
    or a broken ``prev_hash`` link) and a deleted tail (the last entry is not the head).
    Usage: ``feed`` each entry until it returns a failure, then ``finish``.
    """

    def __init__(self, head_seq: int, head_hash: str) -> None:
        self.head_seq = head_seq
        self.head_hash = head_hash
        self.checked = 0
        self._expected_seq = 1
        self._prev_hash = GENESIS_HASH
        self._last = 0

    def bad(self, seq: int | None, reason: str) -> AuditVerification:
        logger.error("audit trail verification failed at seq %s: %s", seq, reason)
        return AuditVerification(
            ok=False,
            checked=self.checked,
            first_bad_seq=seq,
            reason=reason,
            head_seq=self.head_seq,
            head_hash=self.head_hash,
        )

    def feed(self, entry: AuditEntry) -> AuditVerification | None:
        """Checks one entry; returns the failure, or None while the chain holds."""
        self.checked += 1
        if entry.seq != self._expected_seq:
            return self.bad(
                self._expected_seq, f"entry {self._expected_seq} is missing (next is {entry.seq})"
            )
        if entry.prev_hash != self._prev_hash:
            return self.bad(entry.seq, "prev_hash does not match the previous entry's hash")
        fields = msgspec.structs.asdict(entry)
        del fields["hash"]
        if audit_hash(**fields) != entry.hash:
            return self.bad(entry.seq, "hash does not match the entry's contents")
        self._prev_hash, self._expected_seq, self._last = entry.hash, entry.seq + 1, entry.seq
        if entry.seq > self.head_seq:
            return self.bad(entry.seq, f"entry {entry.seq} lies beyond the head ({self.head_seq})")
        return None

    def unreadable(self, seq: int) -> AuditVerification:
        """The entry at ``seq`` could not be decoded."""
        self.checked += 1
        return self.bad(seq, "stored fields are not valid JSON")

    def finish(self) -> AuditVerification:
        """After the last entry: the chain must end exactly at the recorded head."""
        if self._last != self.head_seq or self._prev_hash != self.head_hash:
            return self.bad(
                self._last + 1,
                f"trail ends at seq {self._last} but the head is seq {self.head_seq}",
            )
        return AuditVerification(
            ok=True,
            checked=self.checked,
            first_bad_seq=None,
            reason="chain intact",
            head_seq=self.head_seq,
            head_hash=self.head_hash,
        )
