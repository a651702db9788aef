"""profile.py: reference profiles for drift monitoring: build, hash, save, load, check.

A profile describes one model's reference data: for every input column (and every model output
column) the bins or categories the request-path kernels count into, the reference's own counts
in them, and what the statistics need besides (bin means, sigma, reference NaN/inf rates). It
is built offline from a reference sample (DRIFT.md §1.1), stored as a single ``.npz`` without
pickle, and identified by a hash of its bins: counts merge only when hashes match. This module
knows nothing of windows, threads or the server; it uses ``kernels`` only for the packed
layout.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from gateway.drift import kernels

__all__ = [
    "NumericProfile",
    "CategoricalProfile",
    "TensorProfile",
    "Profile",
    "build_profile",
    "build_tensor_profile",
    "save_profile",
    "load_profile",
    "load_sample",
]

F32Array = npt.NDArray[np.float32]
F64Array = npt.NDArray[np.float64]
I64Array = npt.NDArray[np.int64]

FORMAT_VERSION: Final = 1  # bump when the .npz layout changes; load refuses other versions
HASH_HEX_CHARS: Final = 16  # 64 bits of sha256: collisions irrelevant at a few profiles per model
MAX_BINS: Final = (1 << kernels.MAX_DEPTH) - 1  # the kernels' largest search
MAX_CATEGORIES: Final = (1 << kernels.MAX_DEPTH) - 1


@dataclass(frozen=True, eq=False)
class NumericProfile:
    """Quantile bins of the numeric columns ``cols`` of one tensor (``F`` rows, ``B`` bins).

    ``edges[f]`` holds the distinct interior edges, padded with ``hi[f]``; ``lo`` is the
    reference min, ``hi`` the next float32 above its max. ``ref_counts[f, k]`` counts the
    finite reference values in bin k (padding bins hold 0), ``mids`` their means (padding bins
    repeat the last real mean), ``std`` the reference sigma; ``nan_rate``/``inf_rate`` are the
    reference's own fractions.
    """

    cols: I64Array
    edges: F32Array
    lo: F32Array
    hi: F32Array
    ref_counts: I64Array
    mids: F64Array
    std: F64Array
    nan_rate: F64Array
    inf_rate: F64Array
    packed: F32Array = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "packed", kernels.pack_numeric(self.edges, self.lo, self.hi))

    @property
    def bins(self) -> int:
        """B, the number of bins (real and padding) per feature."""
        return int(self.ref_counts.shape[1])

    @property
    def depth(self) -> int:
        """Search depth of the count kernel for this profile."""
        return kernels.numeric_depth(self.bins)

    @property
    def width(self) -> int:
        """Columns of this profile's count matrix, B + 4."""
        return self.bins + kernels.NUMERIC_EXTRA_COLS


@dataclass(frozen=True, eq=False)
class CategoricalProfile:
    """Categories of the columns ``cols`` of one tensor (``F`` rows, up to ``Kmax`` codes).

    ``values[f, :n_values[f]]`` are the sorted category values (code = position; the rest is
    +inf padding), ``ref_counts[f, k]`` the reference count of code k, ``nan_rate`` the
    reference's fraction of NaN or ±inf.
    """

    cols: I64Array
    values: F32Array
    n_values: I64Array
    ref_counts: I64Array
    nan_rate: F64Array
    packed: F32Array = field(init=False)

    def __post_init__(self) -> None:
        packed = kernels.pack_categorical(self.values, self.n_values)
        object.__setattr__(self, "packed", packed)

    @property
    def n_codes(self) -> int:
        """Kmax, the number of code columns per feature."""
        return int(self.ref_counts.shape[1])

    @property
    def depth(self) -> int:
        """Search depth of the count kernel for this profile."""
        return kernels.categorical_depth(self.n_codes)

    @property
    def width(self) -> int:
        """Columns of this profile's count matrix, Kmax + 2."""
        return self.n_codes + kernels.CATEGORICAL_EXTRA_COLS


@dataclass(frozen=True, eq=False)
class TensorProfile:
    """The profile of one tensor: a name per column, split into numeric and categorical parts.

    ``dtype_name`` is the numpy dtype of the reference data the profile was built from.
    """

    names: tuple[str, ...]
    dtype_name: str
    numeric: NumericProfile | None
    categorical: CategoricalProfile | None

    @property
    def n_columns(self) -> int:
        """Columns of the tensor (after flattening all but the batch axis)."""
        return len(self.names)


@dataclass(frozen=True, eq=False)
class Profile:
    """A model's reference profile: its input tensor and any number of outputs, by name.

    ``hash`` identifies the binning (edges, categories, column layout), ``rows`` is the size of
    the reference sample.
    """

    inputs: TensorProfile
    outputs: Mapping[str, TensorProfile]
    rows: int
    hash: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hash", _profile_hash(self.inputs, self.outputs))

    def check_compatible(self, n_features: int, dtype_name: str) -> None:
        """Raise ``ValueError`` unless a model input of ``n_features`` columns of numpy dtype
        ``dtype_name`` (for example "float32") is what this profile was built from."""
        expected = self.inputs.n_columns
        if n_features != expected:
            raise ValueError(
                f"drift profile {self.hash} describes {expected} input features, "
                f"but the model input has {n_features}"
            )
        try:
            given = np.dtype(dtype_name).name
        except TypeError as exc:
            raise ValueError(
                f"drift profile {self.hash}: {dtype_name!r} is not a numpy dtype name"
            ) from exc
        if given != self.inputs.dtype_name:
            raise ValueError(
                f"drift profile {self.hash} was built from {self.inputs.dtype_name} data, "
                f"but the model input is {given}"
            )

    def numeric_depths(self) -> set[int]:
        """Numeric kernel depths this profile needs (for warm-up)."""
        parts = [self.inputs, *self.outputs.values()]
        return {t.numeric.depth for t in parts if t.numeric is not None}

    def categorical_depths(self) -> set[int]:
        """Categorical kernel depths this profile needs (for warm-up)."""
        parts = [self.inputs, *self.outputs.values()]
        return {t.categorical.depth for t in parts if t.categorical is not None}


# ----------------------------------------------------------------------------------------------
# Building.


def _numeric_profile(
    sample: F32Array, cols: list[int], names: Sequence[str], bins: int
) -> NumericProfile:
    n_feat = len(cols)
    edges = np.empty((n_feat, bins - 1), np.float32)
    lo = np.empty(n_feat, np.float32)
    hi = np.empty(n_feat, np.float32)
    ref_counts = np.zeros((n_feat, bins), np.int64)
    mids = np.empty((n_feat, bins), np.float64)
    std = np.empty(n_feat, np.float64)
    nan_rate = np.empty(n_feat, np.float64)
    inf_rate = np.empty(n_feat, np.float64)
    probs = np.arange(1, bins) / bins
    for j, c in enumerate(cols):
        col = sample[:, c]
        finite = col[np.isfinite(col)]
        if finite.size == 0:
            raise ValueError(f"feature {names[c]!r} has no finite reference values")
        lo[j] = finite.min()
        hi[j] = np.nextafter(finite.max(), np.float32(np.inf))
        # inverted_cdf returns sample values, so every real bin [e_k, e_k+1) holds e_k itself;
        # edges equal to lo would leave the first bin empty (DRIFT.md §1.1: ties removed).
        quantiles = np.quantile(finite, probs, method="inverted_cdf").astype(np.float32)
        distinct = np.unique(quantiles)
        distinct = distinct[distinct > lo[j]]
        edges[j, : distinct.size] = distinct
        edges[j, distinct.size :] = hi[j]
        index = np.searchsorted(distinct, finite, side="right")
        n_real = distinct.size + 1
        ref_counts[j, :n_real] = np.bincount(index, minlength=n_real)
        sums = np.bincount(index, weights=finite.astype(np.float64), minlength=n_real)
        mids[j, :n_real] = sums / ref_counts[j, :n_real]
        mids[j, n_real:] = mids[j, n_real - 1]
        std[j] = float(np.std(finite.astype(np.float64)))
        nan_rate[j] = float(np.isnan(col).mean())
        inf_rate[j] = float(np.isinf(col).mean())
    return NumericProfile(
        cols=np.asarray(cols, np.int64),
        edges=edges,
        lo=lo,
        hi=hi,
        ref_counts=ref_counts,
        mids=mids,
        std=std,
        nan_rate=nan_rate,
        inf_rate=inf_rate,
    )


def _categorical_profile(
    sample: F32Array,
    spec: Mapping[int, Sequence[float] | None],
    names: Sequence[str],
) -> CategoricalProfile:
    cols = sorted(spec)
    per_col: list[F32Array] = []
    for c in cols:
        col = sample[:, c]
        given = spec[c]
        if given is None:
            values = np.unique(col[np.isfinite(col)])
        else:
            values = np.asarray(given, np.float32)
            if values.ndim != 1 or not np.isfinite(values).all():
                raise ValueError(f"categories of {names[c]!r} must be a list of finite numbers")
            if np.unique(values).size != values.size:
                raise ValueError(f"categories of {names[c]!r} repeat a value")
            values = np.sort(values)
        if values.size == 0:
            raise ValueError(f"categorical feature {names[c]!r} has no categories")
        if values.size > MAX_CATEGORIES:
            raise ValueError(
                f"categorical feature {names[c]!r} has {values.size} categories "
                f"(at most {MAX_CATEGORIES}); profile it as numeric"
            )
        per_col.append(values.astype(np.float32))
    k_max = max(v.size for v in per_col)
    values_arr = np.full((len(cols), k_max), np.inf, np.float32)
    n_values = np.zeros(len(cols), np.int64)
    ref_counts = np.zeros((len(cols), k_max), np.int64)
    nan_rate = np.empty(len(cols), np.float64)
    for j, (c, values) in enumerate(zip(cols, per_col, strict=True)):
        col = sample[:, c]
        values_arr[j, : values.size] = values
        n_values[j] = values.size
        pos = np.searchsorted(values, col)
        known = (pos < values.size) & (values[np.minimum(pos, values.size - 1)] == col)
        ref_counts[j, : values.size] = np.bincount(pos[known], minlength=values.size)
        nan_rate[j] = float((~np.isfinite(col)).mean())
    return CategoricalProfile(
        cols=np.asarray(cols, np.int64),
        values=values_arr,
        n_values=n_values,
        ref_counts=ref_counts,
        nan_rate=nan_rate,
    )


def _as_matrix(data: npt.NDArray[Any], what: str) -> tuple[F32Array, str]:
    arr = np.asarray(data)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{what} must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise ValueError(f"{what} has no rows")
    matrix = arr.reshape(arr.shape[0], -1) if arr.ndim != 1 else arr.reshape(-1, 1)
    return np.ascontiguousarray(matrix, np.float32), arr.dtype.name


def build_tensor_profile(
    sample: npt.NDArray[Any],
    names: Sequence[str],
    bins: int = 20,
    categorical: Mapping[int, Sequence[float] | None] | None = None,
    *,
    what: str = "sample",
) -> TensorProfile:
    """Profile one tensor's reference values (``[m, ...]``, flattened to ``[m, F]``).

    Columns listed in ``categorical`` (index -> category values, or None to take the distinct
    finite values of the sample) get a categorical profile, the rest quantile bins.
    """
    if not 2 <= bins <= MAX_BINS:
        raise ValueError(f"bins must be in 2..{MAX_BINS}, got {bins}")
    matrix, dtype_name = _as_matrix(sample, what)
    n_cols = matrix.shape[1]
    if len(names) != n_cols:
        raise ValueError(f"{what} has {n_cols} columns but {len(names)} names were given")
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: column names repeat")
    spec = dict(categorical or {})
    bad = [c for c in spec if not 0 <= c < n_cols]
    if bad:
        raise ValueError(f"categorical column indices {bad} outside 0..{n_cols - 1}")
    numeric_cols = [c for c in range(n_cols) if c not in spec]
    return TensorProfile(
        names=tuple(names),
        dtype_name=dtype_name,
        numeric=_numeric_profile(matrix, numeric_cols, names, bins) if numeric_cols else None,
        categorical=_categorical_profile(matrix, spec, names) if spec else None,
    )


def build_profile(
    sample: npt.NDArray[Any],
    feature_names: Sequence[str] | None = None,
    bins: int = 20,
    categorical: Mapping[int, Sequence[float] | None] | None = None,
    outputs: Mapping[str, npt.NDArray[Any]] | None = None,
) -> Profile:
    """Build a profile from a reference sample (``[m, F]``, ideally m >= 50k; DRIFT.md §0).

    ``feature_names`` default to "f0".."f{F-1}". ``outputs`` maps output names to the stable
    model's outputs on the same rows: integer or bool outputs (class labels) get categorical
    profiles, float outputs (scores, probabilities) quantile bins; a ``[m, C]`` output yields
    columns "name[0]".."name[C-1]". Raises ``ValueError`` on empty or non-numeric data.
    """
    arr = np.asarray(sample)
    n_rows = arr.shape[0] if arr.ndim else 0
    n_cols = int(np.prod(arr.shape[1:], dtype=np.int64)) if arr.ndim > 1 else 1
    names = list(feature_names) if feature_names is not None else [f"f{j}" for j in range(n_cols)]
    inputs = build_tensor_profile(arr, names, bins, categorical, what="reference sample")
    out_profiles: dict[str, TensorProfile] = {}
    for name, data in (outputs or {}).items():
        arr = np.asarray(data)
        out = np.asarray(data)
        if out.shape[:1] != (n_rows,):
            raise ValueError(f"output {name!r} has shape {out.shape}, the sample has {n_rows} rows")
        out_cols = int(np.prod(out.shape[1:], dtype=np.int64))
        col_names = [name] if out_cols == 1 else [f"{name}[{j}]" for j in range(out_cols)]
        is_label = out.dtype.kind in "biu"
        spec: dict[int, Sequence[float] | None] | None = (
            dict.fromkeys(range(out_cols)) if is_label else None
        )
        out_profiles[name] = build_tensor_profile(
            out, col_names, bins, spec, what=f"output {name!r}"
        )
    return Profile(inputs=inputs, outputs=out_profiles, rows=n_rows)


# ----------------------------------------------------------------------------------------------
# Hash, save, load.


def _profile_hash(inputs: TensorProfile, outputs: Mapping[str, TensorProfile]) -> str:
    digest = hashlib.sha256()
    for label, tensor in [("inputs", inputs), *sorted(outputs.items())]:
        digest.update(f"tensor:{label}:{tensor.n_columns}\n".encode())
        if tensor.numeric is not None:
            num = tensor.numeric
            for arr in (num.cols, num.edges, num.lo, num.hi):
                digest.update(np.ascontiguousarray(arr).tobytes())
        digest.update(b"categorical\n")
        if tensor.categorical is not None:
            cat = tensor.categorical
            for arr in (cat.cols, cat.values, cat.n_values):
                digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()[:HASH_HEX_CHARS]


_NUMERIC_FIELDS: Final = (
    "cols",
    "edges",
    "lo",
    "hi",
    "ref_counts",
    "mids",
    "std",
    "nan_rate",
    "inf_rate",
)
_CATEGORICAL_FIELDS: Final = ("cols", "values", "n_values", "ref_counts", "nan_rate")


def _tensor_arrays(prefix: str, tensor: TensorProfile) -> dict[str, npt.NDArray[Any]]:
    out: dict[str, npt.NDArray[Any]] = {
        f"{prefix}.names": np.array(tensor.names, dtype=np.str_),
        f"{prefix}.dtype": np.array(tensor.dtype_name, dtype=np.str_),
    }
    if tensor.numeric is not None:
        for name in _NUMERIC_FIELDS:
            out[f"{prefix}.num.{name}"] = getattr(tensor.numeric, name)
    if tensor.categorical is not None:
        for name in _CATEGORICAL_FIELDS:
            out[f"{prefix}.cat.{name}"] = getattr(tensor.categorical, name)
    return out


def save_profile(profile: Profile, path: str | Path) -> None:
    """Write ``profile`` to one ``.npz`` file (plain arrays and strings, no pickle)."""
    arrays: dict[str, npt.NDArray[Any]] = {
        "format_version": np.array(FORMAT_VERSION, np.int64),
        "hash": np.array(profile.hash, dtype=np.str_),
        "rows": np.array(profile.rows, np.int64),
        "output_names": np.array(list(profile.outputs), dtype=np.str_),
    }
    arrays.update(_tensor_arrays("in", profile.inputs))
    for i, tensor in enumerate(profile.outputs.values()):
        arrays.update(_tensor_arrays(f"out{i}", tensor))
    with open(path, "wb") as fh:
        np.savez(fh, allow_pickle=False, **arrays)


def _load_tensor(files: Mapping[str, npt.NDArray[Any]], prefix: str) -> TensorProfile:
    numeric = None
    if f"{prefix}.num.cols" in files:
        numeric = NumericProfile(**{n: files[f"{prefix}.num.{n}"] for n in _NUMERIC_FIELDS})
    categorical = None
    if f"{prefix}.cat.cols" in files:
        categorical = CategoricalProfile(
            **{n: files[f"{prefix}.cat.{n}"] for n in _CATEGORICAL_FIELDS}
        )
    return TensorProfile(
        names=tuple(str(s) for s in files[f"{prefix}.names"].tolist()),
        dtype_name=str(files[f"{prefix}.dtype"]),
        numeric=numeric,
        categorical=categorical,
    )


def load_profile(path: str | Path) -> Profile:
    """Read a profile written by ``save_profile``; ``ValueError`` if damaged or another format."""
    with np.load(path, allow_pickle=False) as npz:
        files = {name: npz[name] for name in npz.files}
    try:
        version = int(files["format_version"])
        if version != FORMAT_VERSION:
            raise ValueError(f"profile format {version}, this gateway reads {FORMAT_VERSION}")
        output_names = [str(s) for s in files["output_names"].tolist()]
        profile = Profile(
            inputs=_load_tensor(files, "in"),
            outputs={name: _load_tensor(files, f"out{i}") for i, name in enumerate(output_names)},
            rows=int(files["rows"]),
        )
    except KeyError as exc:
        raise ValueError(f"{path}: not a drift profile (missing {exc})") from exc
    stored = str(files["hash"])
    if profile.hash != stored:
        raise ValueError(f"{path}: profile hash {profile.hash} does not match stored {stored}")
    return profile


# ----------------------------------------------------------------------------------------------
# Reference samples.


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text.strip() == ""  # an empty field is a missing value, not a header
    return True


def _load_csv(path: Path) -> tuple[F32Array, list[str] | None]:
    with open(path, newline="") as fh:
        first = next(csv.reader(fh), None)
    if first is None:
        raise ValueError(f"{path}: empty CSV file")
    has_header = not all(_is_number(cell) for cell in first)
    data = np.genfromtxt(
        path, delimiter=",", skip_header=1 if has_header else 0, dtype=np.float64, ndmin=2
    )
    names = [cell.strip() for cell in first] if has_header else None
    return np.ascontiguousarray(data, np.float32), names


def load_sample(path: str | Path, key: str | None = None) -> tuple[F32Array, list[str] | None]:
    """Load a reference sample as float32 ``[m, F]`` plus column names when the file has them.

    ``.npy``; ``.npz`` (array ``key``, default the first); ``.csv`` (numeric, comma-separated,
    optional header row, empty fields read as NaN). Never unpickles. Raises ``ValueError``.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    names: list[str] | None = None
    if suffix == ".npy":
        data = np.load(p, allow_pickle=False)
    elif suffix == ".npz":
        with np.load(p, allow_pickle=False) as npz:
            if not npz.files:
                raise ValueError(f"{p}: no arrays")
            name = key if key is not None else npz.files[0]
            if name not in npz.files:
                raise ValueError(f"{p}: no array {name!r} (has {', '.join(npz.files)})")
            data = npz[name]
    elif suffix == ".csv":
        data, names = _load_csv(p)
    else:
        raise ValueError(f"{p}: unsupported sample format {suffix!r} (use .npy, .npz or .csv)")
    if data.dtype.kind not in "biuf":
        raise ValueError(f"{p}: sample must be numeric, got dtype {data.dtype}")
    if data.ndim == 1:
        data = data.reshape(-1, 1)
    if data.ndim != 2:
        raise ValueError(f"{p}: sample must be 2-D [rows, features], got shape {data.shape}")
    if names is not None and len(names) != data.shape[1]:
        names = None
    if data.size == 0:
        raise ValueError(f"{p}: sample is empty")
    return np.ascontiguousarray(data, np.float32), names
