"""stats.py: drift statistics, thresholds and verdicts computed from binned counts.

Inputs are the integer count matrices of ``kernels`` (a live window, and either the reference
profile's bin counts or a second window); outputs are per-feature float arrays and verdict
strings. Runs at tick rate, not per request, so this is plain vectorised numpy (about 0.1 ms
for 32 features; DRIFT.md §3); the chi-square quantile comes from ``distributions.py``.
Knows nothing of threads, windows in time, models or files.

Definitions follow DRIFT.md §1.2: out-of-range finite values fold into the first and last real
bin; NaN and ±inf never enter a distribution and are reported as rates instead. PSI floors both
shares at 1e-4; JS is the natural-log Jensen-Shannon distance (as scipy and Evidently report
it); KS is the largest cumulative gap at the interior edges (never above the exact KS); W1 is
the area between the binned CDFs with bin means as positions, in reference-sigma units.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from gateway.distributions import chi2_isf

__all__ = [
    "PSI_EPS",
    "PSI_MODERATE",
    "PSI_MAJOR",
    "Verdict",
    "Severity",
    "WindowStats",
    "numeric_vs_reference",
    "numeric_two_window",
    "categorical_vs_reference",
    "categorical_two_window",
    "psi",
    "js_distance",
    "binned_ks",
    "binned_w1",
    "chi2_goodness_of_fit",
    "chi2_homogeneity",
    "chi2_critical",
    "psi_thresholds",
    "ks_thresholds",
    "chi2_gof_thresholds",
    "verdicts",
    "severities",
    "quality_alerts",
]

F64Array = npt.NDArray[np.float64]
I64Array = npt.NDArray[np.int64]

PSI_EPS: Final = 1e-4  # share floor: keeps ln(a/e) finite for empty bins (DRIFT.md §1.2)
PSI_MODERATE: Final = 0.1  # conventional level; a 0.32 sigma mean shift (DRIFT.md §4.4)
PSI_MAJOR: Final = 0.25  # conventional level; a 0.5 sigma mean shift
NAN_RATE_MARGIN: Final = 0.005  # NaN/inf alert above the reference rate + 0.5 pp (DRIFT.md §4.4)
OUT_OF_RANGE_RATE: Final = 0.01  # out-of-range alert above 1%: new extremes show here first
UNSEEN_RATE: Final = 0.005  # unseen-category alert above 0.5%


class Verdict:
    """Per-feature and overall verdict strings."""

    DRIFT: Final = "drift"
    NO_DRIFT: Final = "no_drift"
    INSUFFICIENT_DATA: Final = "insufficient_data"


class Severity:
    """Effect-size levels from PSI; meaningful only when the verdict is not insufficient_data."""

    NONE: Final = "none"
    MODERATE: Final = "moderate"
    MAJOR: Final = "major"


# ----------------------------------------------------------------------------------------------
# Statistics on binned distributions (rows are features, columns bins; counts or shares).


def _shares(counts: npt.NDArray[np.int64] | F64Array) -> F64Array:
    c = counts.astype(np.float64)
    total = c.sum(axis=1, keepdims=True)
    return np.asarray(np.divide(c, total, out=np.zeros_like(c), where=total > 0), np.float64)


def psi(live: I64Array | F64Array, base: I64Array | F64Array) -> F64Array:
    """Population stability index per row: sum (a - e) ln(a / e), shares floored at 1e-4."""
    a = np.maximum(_shares(live), PSI_EPS)
    e = np.maximum(_shares(base), PSI_EPS)
    return np.asarray(((a - e) * np.log(a / e)).sum(axis=1), np.float64)


def _kl_to_mid(p: F64Array, m: F64Array) -> F64Array:
    ratio = np.divide(p, m, out=np.ones_like(p), where=p > 0)
    return np.asarray((p * np.log(ratio)).sum(axis=1), np.float64)  # 0 log 0 = 0


def js_distance(live: I64Array | F64Array, base: I64Array | F64Array) -> F64Array:
    """Jensen-Shannon distance per row, natural log (scipy's ``jensenshannon`` default)."""
    p = _shares(live)
    q = _shares(base)
    m = 0.5 * (p + q)
    js = 0.5 * _kl_to_mid(p, m) + 0.5 * _kl_to_mid(q, m)
    return np.asarray(np.sqrt(np.maximum(js, 0.0)), np.float64)


def binned_ks(live: I64Array | F64Array, base: I64Array | F64Array) -> F64Array:
    """Largest gap between the cumulative shares at the interior edges, per row."""
    gap = np.abs(np.cumsum(_shares(live), axis=1) - np.cumsum(_shares(base), axis=1))
    if gap.shape[1] < 2:
        return np.zeros(gap.shape[0])
    return np.asarray(gap[:, :-1].max(axis=1), np.float64)


def binned_w1(
    live: I64Array | F64Array, base: I64Array | F64Array, mids: F64Array, std: F64Array
) -> F64Array:
    """Binned Wasserstein-1 in reference-sigma units: sum |A_k - E_k| (mid_k+1 - mid_k) / std.

    0 where std is 0 (a constant reference feature has a single bin).
    """
    gap = np.abs(np.cumsum(_shares(live), axis=1) - np.cumsum(_shares(base), axis=1))
    area = (gap[:, :-1] * np.diff(mids, axis=1)).sum(axis=1)
    return np.asarray(np.divide(area, std, out=np.zeros_like(area), where=std > 0), np.float64)


def chi2_goodness_of_fit(live: I64Array, base_shares: F64Array) -> F64Array:
    """Sum (c - n e)^2 / (n e) over bins with e > 0: live counts against expected shares."""
    c = live.astype(np.float64)
    n = c.sum(axis=1, keepdims=True)
    expected = n * base_shares
    terms = np.divide((c - expected) ** 2, expected, out=np.zeros_like(c), where=expected > 0)
    return np.asarray(terms.sum(axis=1), np.float64)


def chi2_homogeneity(a: I64Array, b: I64Array) -> F64Array:
    """Two-window homogeneity chi-square (2 x bins table, pooled expectations, no correction)."""
    ca = a.astype(np.float64)
    cb = b.astype(np.float64)
    na = ca.sum(axis=1, keepdims=True)
    nb = cb.sum(axis=1, keepdims=True)
    pooled = ca + cb
    total = na + nb
    frac_a = np.divide(na, total, out=np.zeros_like(na), where=total > 0)
    ea = pooled * frac_a
    eb = pooled - ea
    ta = np.divide((ca - ea) ** 2, ea, out=np.zeros_like(ca), where=ea > 0)
    tb = np.divide((cb - eb) ** 2, eb, out=np.zeros_like(cb), where=eb > 0)
    return np.asarray((ta + tb).sum(axis=1), np.float64)


# ----------------------------------------------------------------------------------------------
# Window statistics from count matrices.


@dataclass(frozen=True, slots=True)
class WindowStats:
    """Statistics of one window against a baseline, one entry per feature.

    ``n`` is the finite values the statistics use (out-of-range values included), ``rows`` all
    values counted, ``n_base`` the baseline's finite values. ``df`` is the degrees of freedom
    (real bins or categories, minus one). Rates are fractions of ``rows``; ``ks`` and ``w1``
    are 0 for categorical features, which have no order.
    """

    n: I64Array
    rows: I64Array
    n_base: I64Array
    df: I64Array
    psi: F64Array
    js: F64Array
    ks: F64Array
    w1: F64Array
    chi2: F64Array
    below_min_rate: F64Array
    above_max_rate: F64Array
    nan_rate: F64Array
    inf_rate: F64Array
    unseen_rate: F64Array


def _rate(part: I64Array, rows: I64Array) -> F64Array:
    out = np.zeros(part.shape, np.float64)
    np.divide(part, rows, out=out, where=rows > 0)
    return out


def _fold_numeric(counts: I64Array, last_bin: I64Array) -> I64Array:
    """The B in-range bins with below-min folded into bin 0 and above-max into the last real."""
    n_bins = counts.shape[1] - 4
    bins = counts[:, 1 : n_bins + 1].copy()
    bins[:, 0] += counts[:, 0]
    bins[np.arange(bins.shape[0]), last_bin] += counts[:, n_bins + 1]
    return bins


def _last_real_bin(ref_counts: I64Array) -> I64Array:
    """Index of the last bin with reference mass (padding bins after it are empty)."""
    n_bins = ref_counts.shape[1]
    last = n_bins - 1 - np.argmax(ref_counts[:, ::-1] > 0, axis=1)
    return np.asarray(last, np.int64)


def _numeric_quality(
    counts: I64Array,
) -> tuple[I64Array, I64Array, F64Array, F64Array, F64Array, F64Array]:
    n_bins = counts.shape[1] - 4
    rows = counts.sum(axis=1)
    finite = rows - counts[:, n_bins + 2] - counts[:, n_bins + 3]
    return (
        np.asarray(finite, np.int64),
        np.asarray(rows, np.int64),
        _rate(counts[:, 0], rows),
        _rate(counts[:, n_bins + 1], rows),
        _rate(counts[:, n_bins + 2], rows),
        _rate(counts[:, n_bins + 3], rows),
    )


def numeric_vs_reference(
    counts: I64Array, ref_counts: I64Array, mids: F64Array, std: F64Array
) -> WindowStats:
    """Window ``counts`` (``[F, B+4]``) against the reference bins ``ref_counts`` (``[F, B]``).

    ``chi2`` is the goodness of fit to the reference shares.
    """
    last = _last_real_bin(ref_counts)
    live = _fold_numeric(counts, last)
    n, rows, below, above, nan, inf = _numeric_quality(counts)
    return WindowStats(
        n=n,
        rows=rows,
        n_base=np.asarray(ref_counts.sum(axis=1), np.int64),
        df=np.asarray((ref_counts > 0).sum(axis=1) - 1, np.int64),
        psi=psi(live, ref_counts),
        js=js_distance(live, ref_counts),
        ks=binned_ks(live, ref_counts),
        w1=binned_w1(live, ref_counts, mids, std),
        chi2=chi2_goodness_of_fit(live, _shares(ref_counts)),
        below_min_rate=below,
        above_max_rate=above,
        nan_rate=nan,
        inf_rate=inf,
        unseen_rate=np.zeros(n.shape),
    )


def numeric_two_window(
    counts: I64Array, base_counts: I64Array, ref_counts: I64Array, mids: F64Array, std: F64Array
) -> WindowStats:
    """Window ``counts`` against window ``base_counts`` (both ``[F, B+4]``, same profile).

    ``ref_counts``, ``mids`` and ``std`` come from the shared profile; ``chi2`` is the
    homogeneity chi-square; rates describe ``counts``.
    """
    last = _last_real_bin(ref_counts)
    live = _fold_numeric(counts, last)
    base = _fold_numeric(base_counts, last)
    n, rows, below, above, nan, inf = _numeric_quality(counts)
    return WindowStats(
        n=n,
        rows=rows,
        n_base=np.asarray(base.sum(axis=1), np.int64),
        df=np.asarray((ref_counts > 0).sum(axis=1) - 1, np.int64),
        psi=psi(live, base),
        js=js_distance(live, base),
        ks=binned_ks(live, base),
        w1=binned_w1(live, base, mids, std),
        chi2=chi2_homogeneity(live, base),
        below_min_rate=below,
        above_max_rate=above,
        nan_rate=nan,
        inf_rate=inf,
        unseen_rate=np.zeros(n.shape),
    )


def _categorical_parts(counts: I64Array) -> tuple[I64Array, I64Array, I64Array, I64Array]:
    """(codes, known count, rows, non-finite count); unseen values count as finite."""
    k = counts.shape[1] - 2
    codes = counts[:, :k]
    rows = np.asarray(counts.sum(axis=1), np.int64)
    nonfinite = np.asarray(counts[:, k + 1], np.int64)
    return codes, np.asarray(codes.sum(axis=1), np.int64), rows, nonfinite


def _with_unseen(codes: I64Array, unseen: I64Array) -> I64Array:
    return np.concatenate([codes, unseen[:, None]], axis=1)


def categorical_vs_reference(counts: I64Array, ref_counts: I64Array) -> WindowStats:
    """Window ``counts`` (``[F, K+2]``) against reference code counts ``ref_counts`` (``[F, K]``).

    PSI and JS score the unseen column as a bin whose reference mass is 0 (floored at 1e-4 for
    PSI); the chi-square covers known categories only, unseen values being a quality rate.
    """
    k = counts.shape[1] - 2
    codes, _known, rows, nonfinite = _categorical_parts(counts)
    unseen = np.asarray(counts[:, k], np.int64)
    live = _with_unseen(codes, unseen)
    base = _with_unseen(ref_counts, np.zeros_like(unseen))
    zeros = np.zeros(rows.shape)
    return WindowStats(
        n=rows - nonfinite,
        rows=rows,
        n_base=np.asarray(ref_counts.sum(axis=1), np.int64),
        df=np.asarray((ref_counts > 0).sum(axis=1) - 1, np.int64),
        psi=psi(live, base),
        js=js_distance(live, base),
        ks=zeros,
        w1=zeros,
        chi2=chi2_goodness_of_fit(codes, _shares(ref_counts)),
        below_min_rate=zeros,
        above_max_rate=zeros,
        nan_rate=_rate(nonfinite, rows),
        inf_rate=zeros,
        unseen_rate=_rate(unseen, rows),
    )


def categorical_two_window(
    counts: I64Array, base_counts: I64Array, ref_counts: I64Array
) -> WindowStats:
    """Window ``counts`` against window ``base_counts`` (both ``[F, K+2]``, same profile)."""
    k = counts.shape[1] - 2
    codes, _known, rows, nonfinite = _categorical_parts(counts)
    base_codes, _bknown, base_rows, base_nonfinite = _categorical_parts(base_counts)
    unseen = np.asarray(counts[:, k], np.int64)
    live = _with_unseen(codes, unseen)
    base = _with_unseen(base_codes, np.asarray(base_counts[:, k], np.int64))
    zeros = np.zeros(rows.shape)
    return WindowStats(
        n=rows - nonfinite,
        rows=rows,
        n_base=base_rows - base_nonfinite,
        df=np.asarray((ref_counts > 0).sum(axis=1) - 1, np.int64),
        psi=psi(live, base),
        js=js_distance(live, base),
        ks=zeros,
        w1=zeros,
        chi2=chi2_homogeneity(codes, base_codes),
        below_min_rate=zeros,
        above_max_rate=zeros,
        nan_rate=_rate(nonfinite, rows),
        inf_rate=zeros,
        unseen_rate=_rate(unseen, rows),
    )


# ----------------------------------------------------------------------------------------------
# Thresholds and verdicts.


@functools.cache
def _chi2_isf_cached(q: float, df: int) -> float:
    return chi2_isf(q, df)


def chi2_critical(df: I64Array, tail: float) -> F64Array:
    """Upper-``tail`` chi-square critical value per feature; inf where ``df`` < 1 (one bin)."""
    return np.array(
        [_chi2_isf_cached(tail, d) if d >= 1 else math.inf for d in df.tolist()], np.float64
    )


def _inverse(n: I64Array) -> F64Array:
    nf = n.astype(np.float64)
    return np.asarray(np.divide(1.0, nf, out=np.full(nf.shape, math.inf), where=nf > 0), np.float64)


def psi_thresholds(critical: F64Array, n: I64Array, n_base: I64Array) -> F64Array:
    """Size-aware PSI threshold chi2_{df}(1 - alpha/F) * (1/n + 1/m) (DRIFT.md §4.4)."""
    return np.asarray(critical * (_inverse(n) + _inverse(n_base)), np.float64)


def ks_thresholds(coefficient: float, n: I64Array, n_base: I64Array) -> F64Array:
    """Binned KS threshold c(alpha/F) * sqrt((n + m) / (n m)) = c * sqrt(1/n + 1/m)."""
    return np.asarray(coefficient * np.sqrt(_inverse(n) + _inverse(n_base)), np.float64)


def chi2_gof_thresholds(critical: F64Array, n: I64Array, n_base: I64Array) -> F64Array:
    """Goodness-of-fit threshold against a finite reference: chi2 quantile * (1 + n/m)."""
    nf = n.astype(np.float64)
    ratio = np.divide(nf, n_base, out=np.full(nf.shape, math.inf), where=n_base > 0)
    return np.asarray(critical * (1.0 + ratio), np.float64)


def verdicts(n: I64Array, exceeded: npt.NDArray[np.bool_], min_n: int) -> list[str]:
    """``insufficient_data`` where ``n < min_n``, else drift where ``exceeded``.

    For two windows pass the smaller of the two sizes as ``n``.
    """
    out: list[str] = []
    for ni, hit in zip(n.tolist(), exceeded.tolist(), strict=True):
        if ni < min_n:
            out.append(Verdict.INSUFFICIENT_DATA)
        elif hit:
            out.append(Verdict.DRIFT)
        else:
            out.append(Verdict.NO_DRIFT)
    return out


def severities(psi_values: F64Array, verdict_values: list[str]) -> list[str]:
    """PSI level per feature: none < 0.1 <= moderate < 0.25 <= major; none without data."""
    out: list[str] = []
    for value, verdict in zip(psi_values.tolist(), verdict_values, strict=True):
        if verdict == Verdict.INSUFFICIENT_DATA or value < PSI_MODERATE:
            out.append(Severity.NONE)
        elif value < PSI_MAJOR:
            out.append(Severity.MODERATE)
        else:
            out.append(Severity.MAJOR)
    return out


def quality_alerts(
    stats: WindowStats, ref_nan_rate: F64Array, ref_inf_rate: F64Array
) -> npt.NDArray[np.bool_]:
    """True where a quality rate crossed its absolute threshold (DRIFT.md §4.4)."""
    alert = (
        (stats.nan_rate > ref_nan_rate + NAN_RATE_MARGIN)
        | (stats.inf_rate > ref_inf_rate + NAN_RATE_MARGIN)
        | (stats.below_min_rate + stats.above_max_rate > OUT_OF_RANGE_RATE)
        | (stats.unseen_rate > UNSEEN_RATE)
    )
    return np.asarray(alert, np.bool_)
