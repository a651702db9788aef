"""Drift count kernels against plain-numpy reference implementations (STYLE.md §8, §10)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.drift import kernels
from gateway.drift.profile import build_tensor_profile

# Bin counts for search depths 1, 2, 4, 5 and 6 (each depth is one more kernel to compile).
BINS = (2, 3, 10, 20, 64)
PROPERTY = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


def reference_numeric(x: F32, edges: F32, lo: F32, hi: F32, stride: int = 1) -> I64:
    """The count matrix by np.searchsorted, one feature at a time."""
    rows = x[::stride]
    n_bins = edges.shape[1] + 1
    out = np.zeros((x.shape[1], n_bins + 4), np.int64)
    for f in range(x.shape[1]):
        v = rows[:, f]
        col = np.searchsorted(edges[f], v, side="right") + 1
        col[v < lo[f]] = 0
        col[v >= hi[f]] = n_bins + 1
        col[np.isnan(v)] = n_bins + 2
        col[np.isinf(v)] = n_bins + 3
        out[f] = np.bincount(col, minlength=n_bins + 4)
    return out


def reference_categorical(x: F32, values: list[F32], stride: int = 1) -> I64:
    """Category code counts by dictionary lookup."""
    rows = x[::stride]
    k_max = max(v.size for v in values)
    out = np.zeros((x.shape[1], k_max + 2), np.int64)
    for f, vals in enumerate(values):
        code = {float(v): k for k, v in enumerate(vals.tolist())}
        for v in rows[:, f].tolist():
            if not np.isfinite(v):
                out[f, k_max + 1] += 1
            elif v in code:
                out[f, code[v]] += 1
            else:
                out[f, k_max] += 1
    return out


def reference_sample(kind: str, rng: np.random.Generator, m: int, n_feat: int) -> F32:
    """Reference data with the shapes that break binning: ties, point masses, heavy tails."""
    if kind == "normal":
        data = rng.standard_normal((m, n_feat))
    elif kind == "heavy":
        data = rng.lognormal(0.0, 3.0, (m, n_feat)) * rng.choice([-1.0, 1.0], (m, n_feat))
    elif kind == "discrete":
        data = rng.integers(0, 4, (m, n_feat)).astype(np.float64)
    elif kind == "point_mass":
        data = np.where(rng.random((m, n_feat)) < 0.6, 0.0, rng.standard_normal((m, n_feat)))
    else:
        data = np.full((m, n_feat), 1.5)
    return data.astype(np.float32)


def live_sample(rng: np.random.Generator, edges: F32, lo: F32, hi: F32, rows: int) -> F32:
    """Values from the reference range, exactly on edges, one ulp below, out of range, NaN/inf."""
    n_feat = edges.shape[0]
    x = (rng.standard_normal((rows, n_feat)) * 3.0).astype(np.float32)
    for f in range(n_feat):
        bounds = np.array([lo[f], hi[f]], np.float32)
        specials = np.concatenate(
            [
                edges[f],
                np.nextafter(edges[f], np.float32(-np.inf)),
                bounds,
                np.nextafter(bounds, np.float32(-np.inf)),
                np.array([np.nan, np.inf, -np.inf, 3e38, -3e38], np.float32),
            ]
        ).astype(np.float32)
        pick = rng.random(rows) < 0.5
        x[pick, f] = rng.choice(specials, int(pick.sum()))
    return x


@PROPERTY
@given(
    bins=st.sampled_from(BINS),
    kind=st.sampled_from(["normal", "heavy", "discrete", "point_mass", "constant"]),
    rows=st.integers(1, 70),
    n_feat=st.integers(1, 9),
    stride=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_numeric_counts_match_searchsorted(
    bins: int, kind: str, rows: int, n_feat: int, stride: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    sample = reference_sample(kind, rng, 500, n_feat)
    num = build_tensor_profile(sample, [f"f{j}" for j in range(n_feat)], bins).numeric
    assert num is not None
    x = live_sample(rng, num.edges, num.lo, num.hi, rows)
    counts = np.zeros((n_feat, bins + 4), np.int64)
    counted = kernels.count_numeric(x, num.packed, counts, stride=stride)
    assert counted == len(range(0, rows, stride))
    np.testing.assert_array_equal(counts, reference_numeric(x, num.edges, num.lo, num.hi, stride))


@PROPERTY
@given(
    n_values=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    rows=st.integers(1, 40),
    stride=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_categorical_counts_match_lookup(
    n_values: list[int], rows: int, stride: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    values = [
        np.sort(rng.choice(np.arange(-3, 9), k, replace=False)).astype(np.float32) for k in n_values
    ]
    k_max = max(n_values)
    table = np.full((len(values), k_max), np.inf, np.float32)
    for f, vals in enumerate(values):
        table[f, : vals.size] = vals
    packed = kernels.pack_categorical(table, np.array(n_values, np.int64))
    pool = np.array([-4, -3, 0, 0.5, 1, 2, 3, 5, 8, 9, np.nan, np.inf, -np.inf], np.float32)
    x = rng.choice(pool, (rows, len(values))).astype(np.float32)
    counts = np.zeros((len(values), k_max + 2), np.int64)
    counted = kernels.count_categorical(x, packed, counts, stride=stride)
    assert counted == len(range(0, rows, stride))
    np.testing.assert_array_equal(counts, reference_categorical(x, values, stride))


def _normal_profile(n_feat: int = 32, bins: int = 20) -> Any:
    rng = np.random.default_rng(7)
    sample = rng.standard_normal((5000, n_feat)).astype(np.float32)
    num = build_tensor_profile(sample, [f"f{j}" for j in range(n_feat)], bins).numeric
    assert num is not None
    return num


def test_column_subset_counts_only_those_columns() -> None:
    num = _normal_profile(n_feat=6)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((33, 10)).astype(np.float32)
    cols = np.array([9, 0, 4, 4, 7, 2], np.int64)
    counts = np.zeros((6, num.width), np.int64)
    kernels.count_numeric(x, num.packed, counts, cols=cols)
    expected = reference_numeric(np.ascontiguousarray(x[:, cols]), num.edges, num.lo, num.hi)
    np.testing.assert_array_equal(counts, expected)


def test_ring_update_zeroes_a_slot_once_per_epoch() -> None:
    num = _normal_profile()
    rng = np.random.default_rng(4)
    x = rng.standard_normal((16, 32)).astype(np.float32)
    ring = np.full((3, 32, num.width), 99, np.int64)  # garbage: must be cleared on first use
    epochs = np.full(3, -1, np.int64)
    one = reference_numeric(x, num.edges, num.lo, num.hi)
    kernels.ring_update_numeric(x, num.packed, ring, epochs, 10)
    kernels.ring_update_numeric(x, num.packed, ring, epochs, 10)
    np.testing.assert_array_equal(ring[10 % 3], 2 * one)
    assert epochs[10 % 3] == 10
    kernels.ring_update_numeric(x, num.packed, ring, epochs, 13)  # same slot, next lap
    np.testing.assert_array_equal(ring[13 % 3], one)
    assert epochs[13 % 3] == 13
    np.testing.assert_array_equal(ring[11 % 3], 99)  # other slots untouched


def test_categorical_ring_update_counts_into_the_epoch_slot() -> None:
    packed = kernels.pack_categorical(np.array([[0, 1, 2]], np.float32), np.array([3], np.int64))
    ring = np.zeros((4, 1, 5), np.int64)
    epochs = np.full(4, -1, np.int64)
    labels = np.array([0, 1, 1, 2, 7], np.int64)  # int64 labels are coerced; 7 is unseen
    kernels.ring_update_categorical(labels, packed, ring, epochs, 6)
    np.testing.assert_array_equal(ring[2, 0], [1, 2, 1, 1, 0])


def test_wrong_dtype_or_layout_raises_instead_of_compiling() -> None:
    num = _normal_profile()
    kernel = kernels.numeric_count_kernel(num.depth)
    counts = np.zeros((32, num.width), np.int64)
    cols = np.arange(32, dtype=np.int64)
    with pytest.raises(TypeError):
        kernel(np.zeros((2, 32), np.float64), cols, num.packed, counts, 1)
    with pytest.raises(TypeError):
        kernel(np.zeros((32, 2), np.float32).T, cols, num.packed, counts, 1)
    assert len(kernel.signatures) == 1  # type: ignore[attr-defined]  # numba dispatcher


def test_wrappers_coerce_other_dtypes_and_read_only_arrays() -> None:
    num = _normal_profile()
    rng = np.random.default_rng(5)
    x64 = rng.standard_normal((9, 32))
    x32 = x64.astype(np.float32)
    frozen = x32.copy()
    frozen.flags.writeable = False
    expected = reference_numeric(x32, num.edges, num.lo, num.hi)
    for x in (x64, np.asfortranarray(x32), frozen):
        counts = np.zeros((32, num.width), np.int64)
        kernels.count_numeric(x, num.packed, counts)
        np.testing.assert_array_equal(counts, expected)


@pytest.mark.parametrize(
    ("n_rows", "cap", "stride"), [(1, 256, 1), (256, 256, 1), (257, 256, 2), (1024, 256, 4)]
)
def test_subsample_stride_caps_rows(n_rows: int, cap: int, stride: int) -> None:
    assert kernels.subsample_stride(n_rows, cap) == stride
    assert len(range(0, n_rows, stride)) <= cap


@pytest.mark.parametrize(("bins", "depth"), [(2, 1), (3, 2), (16, 4), (17, 5), (20, 5), (64, 6)])
def test_numeric_depth_leaves_a_pad_slot(bins: int, depth: int) -> None:
    assert kernels.numeric_depth(bins) == depth
    assert 2**depth >= bins


def test_warm_up_runs_each_kernel() -> None:
    kernels.warm_up((5,), (2,))
