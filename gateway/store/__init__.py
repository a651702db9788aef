"""store/: the control plane (routes, rollout states, audit trail, controller lease) behind
one seam.

``Store`` (``protocol.py``) is the seam the rollout controller and the admin API use.
``SqliteStore`` (``sqlite.py``) is the embedded single-node default (one file, no extra
service); ``RedisStore`` (``redis.py``, key layout and Lua scripts in ``keyspace.py``) shares
the same state between replicas and worker processes through Redis or Valkey, and adds what
only a fleet needs: the change log a ``ChangeFollower`` tails (``follower.py``), the replica
registry, pooled signals (``pooled.py``) and the feedback relay between replicas
(``relay.py``). ``LeaseKeeper`` and ``ReplicaHeartbeat``
(``cluster.py``) keep a replica's lease and heartbeat. ``open_store`` picks the backend from
a URL or path. The audit chain has one format for both (``audit.py``), so verification is
the same.
"""

from __future__ import annotations

from pathlib import Path

from gateway.store.audit import (
    GENESIS_HASH,
    MAX_AUDIT_LIMIT,
    AuditEntry,
    AuditEvent,
    AuditVerification,
    audit_hash,
)
from gateway.store.cluster import LeaseKeeper, ReplicaHeartbeat
from gateway.store.follower import ChangeFollower
from gateway.store.pooled import Pooled, decode_counts, encode_counts, sum_counts
from gateway.store.protocol import Commit, ControlSnapshot, Lease, ModelState, Store
from gateway.store.redis import RedisStore, Replica
from gateway.store.sqlite import SqliteStore

__all__ = [
    "GENESIS_HASH",
    "MAX_AUDIT_LIMIT",
    "AuditEntry",
    "AuditEvent",
    "AuditVerification",
    "ChangeFollower",
    "Commit",
    "ControlSnapshot",
    "Lease",
    "LeaseKeeper",
    "ModelState",
    "Pooled",
    "RedisStore",
    "Replica",
    "ReplicaHeartbeat",
    "SqliteStore",
    "Store",
    "audit_hash",
    "decode_counts",
    "encode_counts",
    "open_store",
    "sum_counts",
]

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_store(url_or_path: str | Path, *, cluster: str = "gateway") -> SqliteStore | RedisStore:
    """A ``RedisStore`` for a ``redis://``, ``rediss://`` or ``unix://`` URL (keys under the
    ``cluster`` name), otherwise a ``SqliteStore`` on that file path."""
    text = str(url_or_path)
    if text.startswith(_REDIS_SCHEMES):
        return RedisStore(text, cluster=cluster)
    return SqliteStore(url_or_path)
