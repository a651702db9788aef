"""store/pooled.py: signal snapshots that many replicas publish and a leader sums exactly.

In: one replica's cumulative counters, as named int64 arrays of any shape (requests, error
counts, latency histogram buckets, drift bin counts), a profile hash and opaque extra bytes
for what is not a plain counter. Out: a compact msgpack payload, and the element-wise int64
sum of many payloads with who contributed and who was left out and why. Pure: knows nothing
of Redis, traffic, drift or outcomes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import msgspec
import numpy as np
import numpy.typing as npt

from gateway.errors import InvalidInputError

__all__ = ["Counts", "Pooled", "decode_counts", "encode_counts", "sum_counts"]

Counts = dict[str, npt.NDArray[np.int64]]


class _Array(msgspec.Struct, array_like=True):
    shape: list[int]
    data: bytes  # little-endian int64, C order


class _Snapshot(msgspec.Struct, kw_only=True):
    counts: dict[str, _Array]
    profile_hash: str = ""
    extra: bytes = b""
    ts: float = 0.0


_snapshot_encoder: Final = msgspec.msgpack.Encoder()
_snapshot_decoder: Final = msgspec.msgpack.Decoder(_Snapshot)


def encode_counts(
    counts: Mapping[str, npt.ArrayLike],
    *,
    profile_hash: str = "",
    extra: bytes = b"",
    ts: float = 0.0,
) -> bytes:
    """One replica's snapshot: named int64 arrays (any shape), plus opaque ``extra`` bytes
    for what is not a plain counter (e.g. moments the reader merges itself)."""
    arrays = {}
    for name, value in counts.items():
        array = np.ascontiguousarray(value, dtype="<i8")
        arrays[name] = _Array(shape=list(array.shape), data=array.tobytes())
    return _snapshot_encoder.encode(
        _Snapshot(counts=arrays, profile_hash=profile_hash, extra=extra, ts=ts)
    )


def decode_counts(payload: bytes) -> tuple[Counts, str, bytes]:
    """(counts, profile hash, extra) of an ``encode_counts`` payload."""
    snap = _snapshot_decoder.decode(payload)
    counts: Counts = {}
    for name, arr in snap.counts.items():
        counts[name] = np.frombuffer(arr.data, dtype="<i8").astype(np.int64).reshape(arr.shape)
    return counts, snap.profile_hash, snap.extra


def sum_counts(parts: Sequence[Mapping[str, npt.NDArray[np.int64]]]) -> Counts:
    """Element-wise int64 sum of named arrays; a name missing from a part counts as zeros.
    Raises ``InvalidInputError`` if two parts give one name different shapes."""
    total: Counts = {}
    for part in parts:
        for name, array in part.items():
            if name not in total:
                total[name] = np.array(array, dtype=np.int64, copy=True)
            elif total[name].shape != array.shape:
                raise InvalidInputError(
                    f"counter '{name}' has shape {array.shape}, others {total[name].shape}"
                )
            else:
                total[name] += array
    return total


@dataclass(frozen=True, kw_only=True)
class Pooled:
    """The sum of the live replicas' snapshots of one signal."""

    counts: Counts
    contributors: tuple[str, ...]
    """Incarnations summed, sorted."""
    per_incarnation: dict[str, Counts]
    extras: dict[str, bytes]
    skipped: dict[str, str]
    """Incarnation -> why its snapshot was left out (heartbeat expired, profile differs...)."""
