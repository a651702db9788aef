"""kernels.py: the request-path count kernels of the drift monitor (Numba, numpy in, counts out).

Each kernel bins the values of some columns of one request tensor into an ``int64`` count matrix
(or into the current slot of a per-thread ring of such matrices). Everything here is a pure
function of its arguments; the kernels never allocate, lock or call Python. This module knows
nothing of profiles as files, statistics, windows or models: it owns only the packed search
layout, the count-matrix layout and the compiled kernels (DRIFT.md §1.1, §2, §6).

Numeric count matrix ``int64 [F, B+4]``: column 0 counts values below the reference min,
columns 1..B the in-range bins, B+1 values at or above ``hi`` (above the reference max), B+2 NaN
and B+3 ±inf. Categorical count matrix ``int64 [F, K+2]``: columns 0..K-1 the category codes, K
unseen values, K+1 NaN or ±inf. Counts merge across threads, time slices and replicas by
integer addition.

The search depth is a compile-time constant: one kernel is generated per depth by a closure over
an ``int`` that calls module-level helpers, which LLVM inlines and then fully unrolls into a
branch-free search (a runtime depth measured 18-33 ns/value against 4.3-4.5, DRIFT.md §2). The
closures capture only that int: a cached closure capturing another dispatcher recompiles in
every process (DRIFT.md §2.2). Every kernel has one explicit signature (input read-only, which
also accepts writable arrays at the same dispatch cost), so an unexpected dtype or layout raises
``TypeError`` instead of compiling for a second on the request path. Call ``warm_up()`` (or
resolve the kernels) before the server reports ready.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol, TypeVar, cast

import numba
import numpy as np
import numpy.typing as npt
from numba import types as nbt

__all__ = [
    "COL_BELOW",
    "NUMERIC_EXTRA_COLS",
    "CATEGORICAL_EXTRA_COLS",
    "DEFAULT_DEPTH",
    "MAX_DEPTH",
    "CountKernel",
    "RingKernel",
    "numeric_depth",
    "categorical_depth",
    "numeric_depth_of",
    "categorical_depth_of",
    "pack_numeric",
    "pack_categorical",
    "numeric_count_kernel",
    "numeric_ring_kernel",
    "categorical_count_kernel",
    "categorical_ring_kernel",
    "as_rows",
    "subsample_stride",
    "count_numeric",
    "count_categorical",
    "ring_update_numeric",
    "ring_update_categorical",
    "warm_up",
]

logger = logging.getLogger(__name__)

F32Matrix = npt.NDArray[np.float32]
I64Array = npt.NDArray[np.int64]

COL_BELOW: Final = 0  # numeric: values below the reference min
NUMERIC_EXTRA_COLS: Final = 4  # below | B bins | above | NaN | ±inf
CATEGORICAL_EXTRA_COLS: Final = 2  # K codes | unseen | NaN or ±inf
DEFAULT_DEPTH: Final = 5  # B = 20 bins -> 32-slot search, the recommended default (DRIFT.md §0)
MAX_DEPTH: Final = 12  # 4096 bins or categories: far past any useful profile

_FuncT = TypeVar("_FuncT", bound=Callable[..., Any])


def _jit(*args: object, **options: object) -> Callable[[_FuncT], _FuncT]:
    """``numba.njit`` typed as identity, so decorated kernels keep their signatures for mypy."""
    njit: Any = numba.njit  # its overloads do not cover forwarded arguments
    return cast(Callable[[_FuncT], _FuncT], njit(*args, **options))


# Explicit signatures. The input tensor and the profile are declared read-only: numba converts a
# writable array to a read-only parameter for free (measured: same dispatch time), and tensors
# decoded with np.frombuffer arrive read-only.
_X = nbt.Array(nbt.float32, 2, "C", readonly=True)
_COLS = nbt.Array(nbt.int64, 1, "C", readonly=True)
_PROF = nbt.Array(nbt.float32, 2, "C", readonly=True)
_COUNTS = nbt.Array(nbt.int64, 2, "C")
_RING = nbt.Array(nbt.int64, 3, "C")
_EPOCHS = nbt.Array(nbt.int64, 1, "C")
_COUNT_SIG: Final = nbt.int64(_X, _COLS, _PROF, _COUNTS, nbt.int64)
_RING_SIG: Final = nbt.int64(_X, _COLS, _PROF, _RING, _EPOCHS, nbt.int64, nbt.int64)


# ----------------------------------------------------------------------------------------------
# Helpers: module-level, so the per-depth closures reference them as globals, never as captured
# dispatchers. ``_search`` and ``_put_numeric`` are separate functions that LLVM inlines at link
# time: inlining them in numba's IR made each kernel take 7 s to compile instead of 1.3 s, for
# the same speed.


@_jit(nogil=True, cache=True)
def _search(prof: F32Matrix, j: int, v: float, depth: int) -> int:
    """Number of the first ``2**depth - 1`` entries of ``prof[j]`` that are <= v (sorted row).

    Fixed-depth binary search: once inlined with ``depth`` a constant the loop is fully unrolled,
    and each level is a compare whose 0/1 result scales the step. The multiply keeps it free of
    branches; a conditional expression here was turned back into branches by LLVM (25-30 ns per
    value against 9 on this machine's Zen 3).
    """
    pos = 0
    step = 1 << depth
    for _ in range(depth):
        step >>= 1
        pos += step * (prof[j, pos + step - 1] <= v)
    return pos


@_jit(inline="always")
def _in_range(v: float, lo: float, hi: float) -> bool:
    # Bitwise & rather than ``and``: one combined test instead of a branch per comparison.
    return (v >= lo) & (v < hi)


@_jit(nogil=True, cache=True)
def _put_numeric(
    counts: I64Array, j: int, v: float, lo: float, hi: float, prof: F32Matrix, depth: int
) -> None:
    """Count one value of feature j, in range or not (the general path)."""
    if (v >= lo) & (v < hi):
        counts[j, 1 + _search(prof, j, v, depth)] += 1
        return
    n_bins = counts.shape[1] - NUMERIC_EXTRA_COLS
    if v != v:
        counts[j, n_bins + 2] += 1
    elif v == np.inf or v == -np.inf:
        counts[j, n_bins + 3] += 1
    elif v < lo:
        counts[j, COL_BELOW] += 1
    else:
        counts[j, n_bins + 1] += 1


@_jit(inline="always")
def _count_numeric_body(
    x: F32Matrix, cols: I64Array, prof: F32Matrix, counts: I64Array, stride: int, depth: int
) -> int:
    """Count rows ``0, stride, 2*stride, ...`` of ``x[:, cols]``; return the number of rows.

    Four searches are issued before their four increments: one search at a time ran at 8-9
    ns/value on this machine, four at a time at 4.1-5.0 (bench.drift_kernels), as the four
    dependent load chains then overlap. Full blocks take four rows of one feature (one profile
    row); the last 1-3 rows, so every 1-row request, take four features of a row (826 ns for
    1 x 32 against 1,112 one feature at a time). An out-of-range value sends its group of
    four down the general path.
    """
    p = 1 << depth  # edge slots; prof[j] = [e_1..e_{B-1}, pad with hi up to p, lo, hi]
    n_feat = cols.shape[0]
    n_rows = int((x.shape[0] + stride - 1) // stride)
    n_block = n_rows - n_rows % 4
    for r in range(0, n_block, 4):
        i0 = r * stride
        i1 = i0 + stride
        i2 = i1 + stride
        i3 = i2 + stride
        for j in range(n_feat):
            c = cols[j]
            v0 = x[i0, c]
            v1 = x[i1, c]
            v2 = x[i2, c]
            v3 = x[i3, c]
            lo = prof[j, p]
            hi = prof[j, p + 1]
            if (
                _in_range(v0, lo, hi)
                & _in_range(v1, lo, hi)
                & _in_range(v2, lo, hi)
                & _in_range(v3, lo, hi)
            ):
                b0 = _search(prof, j, v0, depth)
                b1 = _search(prof, j, v1, depth)
                b2 = _search(prof, j, v2, depth)
                b3 = _search(prof, j, v3, depth)
                counts[j, 1 + b0] += 1
                counts[j, 1 + b1] += 1
                counts[j, 1 + b2] += 1
                counts[j, 1 + b3] += 1
            else:
                _put_numeric(counts, j, v0, lo, hi, prof, depth)
                _put_numeric(counts, j, v1, lo, hi, prof, depth)
                _put_numeric(counts, j, v2, lo, hi, prof, depth)
                _put_numeric(counts, j, v3, lo, hi, prof, depth)
    n_feat4 = n_feat - n_feat % 4
    for r in range(n_block, n_rows):
        i = r * stride
        for j in range(0, n_feat4, 4):
            v0 = x[i, cols[j]]
            v1 = x[i, cols[j + 1]]
            v2 = x[i, cols[j + 2]]
            v3 = x[i, cols[j + 3]]
            lo0 = prof[j, p]
            lo1 = prof[j + 1, p]
            lo2 = prof[j + 2, p]
            lo3 = prof[j + 3, p]
            hi0 = prof[j, p + 1]
            hi1 = prof[j + 1, p + 1]
            hi2 = prof[j + 2, p + 1]
            hi3 = prof[j + 3, p + 1]
            if (
                _in_range(v0, lo0, hi0)
                & _in_range(v1, lo1, hi1)
                & _in_range(v2, lo2, hi2)
                & _in_range(v3, lo3, hi3)
            ):
                b0 = _search(prof, j, v0, depth)
                b1 = _search(prof, j + 1, v1, depth)
                b2 = _search(prof, j + 2, v2, depth)
                b3 = _search(prof, j + 3, v3, depth)
                counts[j, 1 + b0] += 1
                counts[j + 1, 1 + b1] += 1
                counts[j + 2, 1 + b2] += 1
                counts[j + 3, 1 + b3] += 1
            else:
                _put_numeric(counts, j, v0, lo0, hi0, prof, depth)
                _put_numeric(counts, j + 1, v1, lo1, hi1, prof, depth)
                _put_numeric(counts, j + 2, v2, lo2, hi2, prof, depth)
                _put_numeric(counts, j + 3, v3, lo3, hi3, prof, depth)
        for j in range(n_feat4, n_feat):
            _put_numeric(counts, j, x[i, cols[j]], prof[j, p], prof[j, p + 1], prof, depth)
    return n_rows


@_jit(inline="always")
def _count_categorical_body(
    x: F32Matrix, cols: I64Array, prof: F32Matrix, counts: I64Array, stride: int, depth: int
) -> int:
    """Count category codes of rows ``0, stride, ...`` of ``x[:, cols]``; return rows counted.

    ``prof[j]`` holds the sorted category values padded with +inf; the code of a value is the
    position of an exact match. Categorical columns are few (class labels, a handful of input
    codes), so this stays one value at a time.
    """
    n_codes = counts.shape[1] - CATEGORICAL_EXTRA_COLS
    n_feat = cols.shape[0]
    n_rows = int((x.shape[0] + stride - 1) // stride)
    for r in range(n_rows):
        i = r * stride
        for j in range(n_feat):
            v = x[i, cols[j]]
            if v - v == 0.0:  # finite: NaN and ±inf give NaN here
                pos = _search(prof, j, v, depth)
                if pos > 0 and prof[j, pos - 1] == v:
                    counts[j, pos - 1] += 1
                else:
                    counts[j, n_codes] += 1
            else:
                counts[j, n_codes + 1] += 1
    return n_rows


@_jit(inline="always")
def _ring_slot(ring: I64Array, epochs: I64Array, epoch: int) -> int:
    """Slot of ``epoch``; zeroes it the first time this thread writes that epoch (DRIFT.md §6)."""
    slot = int(epoch % ring.shape[0])
    if epochs[slot] != epoch:
        ring[slot, :, :] = 0
        epochs[slot] = epoch
    return slot


# ----------------------------------------------------------------------------------------------
# Per-depth kernels.


class CountKernel(Protocol):
    """A compiled count kernel: adds to ``counts`` and returns the number of rows counted."""

    def __call__(
        self, x: F32Matrix, cols: I64Array, prof: F32Matrix, counts: I64Array, stride: int, /
    ) -> int: ...


class RingKernel(Protocol):
    """A compiled ring kernel: counts into slot ``epoch % S``; returns the rows counted."""

    def __call__(
        self,
        x: F32Matrix,
        cols: I64Array,
        prof: F32Matrix,
        ring: I64Array,
        epochs: I64Array,
        epoch: int,
        stride: int,
        /,
    ) -> int: ...


def _check_depth(depth: int) -> int:
    if not 0 <= depth <= MAX_DEPTH:
        raise ValueError(f"search depth {depth} outside 0..{MAX_DEPTH}")
    return int(depth)


# Each factory compiles (or loads from the numba cache) one kernel for one depth: 1-3 s of LLVM
# on an empty cache, a few ms on a warm one. Call them at start-up or registration, never on the
# request path. The closures capture only the int ``d``.


@functools.cache
def numeric_count_kernel(depth: int) -> CountKernel:
    """The numeric count kernel for search depth ``depth`` (see ``numeric_depth``)."""
    d = _check_depth(depth)

    def count(x: F32Matrix, cols: I64Array, prof: F32Matrix, counts: I64Array, stride: int) -> int:
        return _count_numeric_body(x, cols, prof, counts, stride, d)

    return cast(CountKernel, _jit(_COUNT_SIG, nogil=True, cache=True)(count))


@functools.cache
def numeric_ring_kernel(depth: int) -> RingKernel:
    """The numeric ring kernel for search depth ``depth``."""
    d = _check_depth(depth)

    def ring_update(
        x: F32Matrix,
        cols: I64Array,
        prof: F32Matrix,
        ring: I64Array,
        epochs: I64Array,
        epoch: int,
        stride: int,
    ) -> int:
        slot = _ring_slot(ring, epochs, epoch)
        return _count_numeric_body(x, cols, prof, ring[slot], stride, d)

    return cast(RingKernel, _jit(_RING_SIG, nogil=True, cache=True)(ring_update))


@functools.cache
def categorical_count_kernel(depth: int) -> CountKernel:
    """The categorical count kernel for search depth ``depth`` (see ``categorical_depth``)."""
    d = _check_depth(depth)

    def count(x: F32Matrix, cols: I64Array, prof: F32Matrix, counts: I64Array, stride: int) -> int:
        return _count_categorical_body(x, cols, prof, counts, stride, d)

    return cast(CountKernel, _jit(_COUNT_SIG, nogil=True, cache=True)(count))


@functools.cache
def categorical_ring_kernel(depth: int) -> RingKernel:
    """The categorical ring kernel for search depth ``depth``."""
    d = _check_depth(depth)

    def ring_update(
        x: F32Matrix,
        cols: I64Array,
        prof: F32Matrix,
        ring: I64Array,
        epochs: I64Array,
        epoch: int,
        stride: int,
    ) -> int:
        slot = _ring_slot(ring, epochs, epoch)
        return _count_categorical_body(x, cols, prof, ring[slot], stride, d)

    return cast(RingKernel, _jit(_RING_SIG, nogil=True, cache=True)(ring_update))


# ----------------------------------------------------------------------------------------------
# Packed search arrays (the layout contract with the kernels).


def numeric_depth(bins: int) -> int:
    """Search depth for ``bins`` bins: ``2**depth >= bins`` leaves at least one ``hi`` pad slot,
    so the ``bins - 1`` real edges fit in ``2**depth - 1`` searched slots."""
    if bins < 2:
        raise ValueError(f"need at least 2 bins, got {bins}")
    return (bins - 1).bit_length()


def categorical_depth(n_categories: int) -> int:
    """Search depth for K categories: ``2**depth >= K + 1`` leaves at least one ``+inf`` pad."""
    if n_categories < 1:
        raise ValueError(f"need at least 1 category, got {n_categories}")
    return n_categories.bit_length()


def pack_numeric(
    edges: npt.NDArray[np.float32], lo: npt.NDArray[np.float32], hi: npt.NDArray[np.float32]
) -> F32Matrix:
    """Pack ``[e_1..e_{B-1}, hi pad up to 2**depth, lo, hi]`` per feature (float32 [F, P+2]).

    ``edges`` is ``[F, B-1]``, sorted per row, each below its ``hi`` except padding equal to it.
    """
    n_feat, n_edges = edges.shape
    p = 1 << numeric_depth(n_edges + 1)
    out = np.empty((n_feat, p + 2), np.float32)
    out[:, :n_edges] = edges
    out[:, n_edges:p] = hi[:, None]
    out[:, p] = lo
    out[:, p + 1] = hi
    return out


def pack_categorical(values: npt.NDArray[np.float32], n_values: I64Array) -> F32Matrix:
    """Pack sorted category values per feature, padded with +inf (float32 [F, P]).

    ``values`` is ``[F, Kmax]`` with row j's first ``n_values[j]`` entries sorted and distinct.
    """
    n_feat, k_max = values.shape
    p = 1 << categorical_depth(k_max)
    out = np.full((n_feat, p), np.inf, np.float32)
    for j in range(n_feat):
        k = int(n_values[j])
        out[j, :k] = values[j, :k]
    return out


def numeric_depth_of(prof: F32Matrix) -> int:
    """Search depth of a packed numeric profile (``[F, 2**depth + 2]``)."""
    return int(prof.shape[1] - 2).bit_length() - 1


def categorical_depth_of(prof: F32Matrix) -> int:
    """Search depth of a packed categorical profile (``[F, 2**depth]``)."""
    return int(prof.shape[1]).bit_length() - 1


# ----------------------------------------------------------------------------------------------
# Python wrappers: coerce, then call the compiled kernel. The monitor resolves the kernels once
# and calls them directly; these are for tests, benchmarks and offline use.


def as_rows(x: npt.NDArray[Any]) -> F32Matrix:
    """A request tensor as C-contiguous float32 ``[rows, columns]`` (no copy when it already is).

    A 1-D tensor is one column. Raises ``ValueError`` or ``TypeError`` for non-numeric data.
    """
    arr = np.ascontiguousarray(x, np.float32)
    if arr.ndim == 2:
        return arr
    if arr.ndim == 1:
        return arr.reshape(-1, 1)
    if arr.ndim == 0:
        return arr.reshape(1, 1)
    return arr.reshape(arr.shape[0], -1)


def subsample_stride(n_rows: int, max_rows: int) -> int:
    """Row stride k so that counting every k-th row counts at most ``max_rows`` rows."""
    if max_rows <= 0 or n_rows <= max_rows:
        return 1
    return -(-n_rows // max_rows)


def _cols(cols: I64Array | None, n: int) -> I64Array:
    if cols is None:
        return np.arange(n, dtype=np.int64)
    return np.ascontiguousarray(cols, np.int64)


def count_numeric(
    x: npt.NDArray[Any],
    prof: F32Matrix,
    counts: I64Array,
    *,
    cols: I64Array | None = None,
    stride: int = 1,
) -> int:
    """Add the numeric bin counts of ``x[::stride, cols]`` to ``counts``; return rows counted.

    ``prof`` comes from ``pack_numeric``; ``counts`` is ``int64 [len(cols), B+4]``.
    """
    xr = as_rows(x)
    return numeric_count_kernel(numeric_depth_of(prof))(
        xr, _cols(cols, xr.shape[1]), prof, counts, int(stride)
    )


def count_categorical(
    x: npt.NDArray[Any],
    prof: F32Matrix,
    counts: I64Array,
    *,
    cols: I64Array | None = None,
    stride: int = 1,
) -> int:
    """Add the category counts of ``x[::stride, cols]`` to ``counts``; return rows counted.

    ``prof`` comes from ``pack_categorical``; ``counts`` is ``int64 [len(cols), Kmax+2]``.
    """
    xr = as_rows(x)
    return categorical_count_kernel(categorical_depth_of(prof))(
        xr, _cols(cols, xr.shape[1]), prof, counts, int(stride)
    )


def ring_update_numeric(
    x: npt.NDArray[Any],
    prof: F32Matrix,
    ring: I64Array,
    epochs: I64Array,
    epoch: int,
    *,
    cols: I64Array | None = None,
    stride: int = 1,
) -> int:
    """Count ``x`` into slot ``epoch % S`` of ``ring`` (``int64 [S, F, B+4]``), zeroing the slot
    the first time it sees ``epoch`` (``epochs`` is ``int64 [S]``); return rows counted."""
    xr = as_rows(x)
    return numeric_ring_kernel(numeric_depth_of(prof))(
        xr, _cols(cols, xr.shape[1]), prof, ring, epochs, int(epoch), int(stride)
    )


def ring_update_categorical(
    x: npt.NDArray[Any],
    prof: F32Matrix,
    ring: I64Array,
    epochs: I64Array,
    epoch: int,
    *,
    cols: I64Array | None = None,
    stride: int = 1,
) -> int:
    """Categorical counterpart of ``ring_update_numeric`` (``ring`` is ``int64 [S, F, K+2]``)."""
    xr = as_rows(x)
    return categorical_ring_kernel(categorical_depth_of(prof))(
        xr, _cols(cols, xr.shape[1]), prof, ring, epochs, int(epoch), int(stride)
    )


def warm_up(
    numeric_depths: Iterable[int] = (DEFAULT_DEPTH,),
    categorical_depths: Iterable[int] = (),
    *,
    count: bool = True,
    ring: bool = True,
) -> None:
    """Compile or load the listed kernels and run each once, so that no request pays for it.

    ``count`` and ``ring`` select the kernel kinds (the monitor uses only ring kernels). Blocks:
    about 0.3-0.5 s for the first numba call in a process plus a few ms per kernel on a warm
    cache, 1-3 s per kernel on an empty one. Call before the server reports ready.
    """
    x = np.zeros((1, 1), np.float32)
    cols = np.zeros(1, np.int64)
    epochs = np.full(2, -1, np.int64)
    for depth in sorted(set(numeric_depths)):
        prof = np.zeros((1, (1 << depth) + 2), np.float32)
        slots = np.zeros((2, 1, (1 << depth) + NUMERIC_EXTRA_COLS), np.int64)
        if count:
            numeric_count_kernel(depth)(x, cols, prof, slots[0], 1)
        if ring:
            numeric_ring_kernel(depth)(x, cols, prof, slots, epochs, 0, 1)
        logger.debug("drift numeric kernels ready", extra={"depth": depth})
    for depth in sorted(set(categorical_depths)):
        prof = np.full((1, 1 << depth), np.inf, np.float32)
        slots = np.zeros((2, 1, (1 << depth) + CATEGORICAL_EXTRA_COLS), np.int64)
        if count:
            categorical_count_kernel(depth)(x, cols, prof, slots[0], 1)
        if ring:
            categorical_ring_kernel(depth)(x, cols, prof, slots, epochs, 0, 1)
        logger.debug("drift categorical kernels ready", extra={"depth": depth})
