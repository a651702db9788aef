"""drift/report.py: from window counts to the drift report: per-feature statistics against
thresholds, verdicts and severities, features worst first, verdicts combined per side.

In: one tensor part's count matrices (a live window, and the reference or a second window)
with its profile and critical values. Out: ``FeatureDrift`` entries and the ``DriftReport``
the admin API, the metrics and the rollout signals read. Pure numpy at report time; it knows
nothing of threads, rings or when windows close (``monitor.py`` does).
"""

from __future__ import annotations

import math
from typing import Final, Protocol

import msgspec
import numpy as np
import numpy.typing as npt

from gateway.drift import stats
from gateway.drift.profile import CategoricalProfile, NumericProfile
from gateway.types import ModelRef

__all__ = [
    "FeatureDrift",
    "DriftReport",
    "DriftSource",
    "ReportPart",
    "vs_reference",
    "two_window",
    "assemble",
]

I64Array = npt.NDArray[np.int64]
F64Array = npt.NDArray[np.float64]


class FeatureDrift(msgspec.Struct, frozen=True, kw_only=True):
    """Drift of one feature (input or output column) over the window.

        ``n`` counts the finite values the statistics use, ``n_baseline`` the reference's (or the
        stable window's). ``score`` is the largest statistic/threshold ratio of the feature's tests
        (PSI and KS for numeric, PSI and chi-square for categorical): above 1 is drift. ``ks`` and
        ``w1`` are 0 for categorical features; rates are fractions of the rows counted, and for
        categorical features ``nan_rate`` includes ±inf. Thresholds are inf while n is 0, and the
    statistics (psi, js, ks, w1, chi2) NaN (null in JSON): an empty window has none.
    """

    name: str
    kind: str
    n: int
    n_baseline: int
    psi: float
    js: float
    ks: float
    w1: float
    chi2: float
    psi_threshold: float
    ks_threshold: float
    chi2_threshold: float
    score: float
    verdict: str
    severity: str
    below_min_rate: float
    above_max_rate: float
    nan_rate: float
    inf_rate: float
    unseen_rate: float
    quality_alert: bool


class DriftReport(msgspec.Struct, frozen=True, kw_only=True):
    """Drift of one model version against its reference profile or against another version.

    Features are sorted worst first. ``verdict`` combines all features: drift if any drifts,
    else insufficient_data if any lacks data (or there are none), else no_drift.
    ``input_verdict`` and ``output_verdict`` do the same per side: output drift between canary
    and stable is the rollback signal, input drift against the reference an upstream alert.
    ``replicas`` counts the gateway replicas whose windows were summed (1: this process).
    """

    model: str
    baseline: str
    profile_hash: str
    window_s: float
    verdict: str
    input_verdict: str
    output_verdict: str
    inputs: tuple[FeatureDrift, ...]
    outputs: tuple[FeatureDrift, ...]
    dropped: int
    replicas: int = 1


class DriftSource(Protocol):
    """Drift reports: one process's ``DriftMonitor``, or a fleet's pooled windows."""

    def report(self, ref: ModelRef) -> DriftReport: ...

    def compare(self, ref_a: ModelRef, ref_b: ModelRef) -> DriftReport: ...


class ReportPart(Protocol):
    """What a report needs of one tensor part: its feature names and profile, the
    chi-square critical value per feature and the KS coefficient."""

    names: tuple[str, ...]
    numeric: NumericProfile | None
    categorical: CategoricalProfile | None
    critical: F64Array
    ks_coefficient: float


_VERDICT_RANK: Final = {
    stats.Verdict.DRIFT: 0,
    stats.Verdict.NO_DRIFT: 1,
    stats.Verdict.INSUFFICIENT_DATA: 2,
}


def _combine(verdicts: list[str]) -> str:
    if stats.Verdict.DRIFT in verdicts:
        return stats.Verdict.DRIFT
    if not verdicts or stats.Verdict.INSUFFICIENT_DATA in verdicts:
        return stats.Verdict.INSUFFICIENT_DATA
    return stats.Verdict.NO_DRIFT


def _ratio(statistic: F64Array, threshold: F64Array) -> F64Array:
    return np.divide(
        statistic, threshold, out=np.zeros_like(statistic), where=np.isfinite(threshold)
    )


def vs_reference(part: ReportPart, window: I64Array, min_n: int) -> list[FeatureDrift]:
    """Each feature of ``part``: its live ``window`` against the reference profile."""
    if part.numeric is not None:
        num = part.numeric
        ws = stats.numeric_vs_reference(window, num.ref_counts, num.mids, num.std)
        ref_nan, ref_inf = num.nan_rate, num.inf_rate
    else:
        assert part.categorical is not None
        ws = stats.categorical_vs_reference(window, part.categorical.ref_counts)
        ref_nan, ref_inf = part.categorical.nan_rate, np.zeros(ws.n.shape)
    chi2_thr = stats.chi2_gof_thresholds(part.critical, ws.n, ws.n_base)
    return _features(part, ws, chi2_thr, ws.n, min_n, ref_nan, ref_inf)


def two_window(
    part: ReportPart, win_a: I64Array, win_b: I64Array, min_n_per_arm: int
) -> list[FeatureDrift]:
    """Each feature of ``part``: window ``win_a`` against window ``win_b``."""
    if part.numeric is not None:
        num = part.numeric
        ws = stats.numeric_two_window(win_a, win_b, num.ref_counts, num.mids, num.std)
        ref_nan, ref_inf = num.nan_rate, num.inf_rate
    else:
        assert part.categorical is not None
        cat = part.categorical
        ws = stats.categorical_two_window(win_a, win_b, cat.ref_counts)
        ref_nan, ref_inf = cat.nan_rate, np.zeros(ws.n.shape)
    n_min = np.minimum(ws.n, ws.n_base)
    return _features(part, ws, part.critical, n_min, min_n_per_arm, ref_nan, ref_inf)


def _features(
    part: ReportPart,
    ws: stats.WindowStats,
    chi2_thr: F64Array,
    n_for_verdict: I64Array,
    min_n: int,
    ref_nan: F64Array,
    ref_inf: F64Array,
) -> list[FeatureDrift]:
    psi_thr = stats.psi_thresholds(part.critical, ws.n, ws.n_base)
    is_numeric = part.numeric is not None
    if is_numeric:
        ks_thr = stats.ks_thresholds(part.ks_coefficient, ws.n, ws.n_base)
        second = _ratio(ws.ks, ks_thr)
    else:
        ks_thr = np.zeros(ws.n.shape)
        second = _ratio(ws.chi2, chi2_thr)
    score = np.maximum(_ratio(ws.psi, psi_thr), second)
    verdict = stats.verdicts(n_for_verdict, score > 1.0, min_n)
    severity = stats.severities(ws.psi, verdict)
    alerts = stats.quality_alerts(ws, ref_nan, ref_inf)
    kind = "numeric" if is_numeric else "categorical"
    # An empty window has no statistic: NaN (JSON null), never the divergence of smoothed
    # empty bins from the reference (a PSI of 6 on an idle model).
    empty = np.asarray(n_for_verdict) == 0

    def stat(values: F64Array, j: int) -> float:
        return math.nan if empty[j] else float(values[j])

    return [
        FeatureDrift(
            name=part.names[j],
            kind=kind,
            n=int(ws.n[j]),
            n_baseline=int(ws.n_base[j]),
            psi=stat(ws.psi, j),
            js=stat(ws.js, j),
            ks=stat(ws.ks, j),
            w1=stat(ws.w1, j),
            chi2=stat(ws.chi2, j),
            psi_threshold=float(psi_thr[j]),
            ks_threshold=float(ks_thr[j]),
            chi2_threshold=float(chi2_thr[j]),
            score=float(score[j]),
            verdict=verdict[j],
            severity=severity[j],
            below_min_rate=float(ws.below_min_rate[j]),
            above_max_rate=float(ws.above_max_rate[j]),
            nan_rate=float(ws.nan_rate[j]),
            inf_rate=float(ws.inf_rate[j]),
            unseen_rate=float(ws.unseen_rate[j]),
            quality_alert=bool(alerts[j]),
        )
        for j in range(len(part.names))
    ]


def assemble(
    model: str,
    profile_hash: str,
    baseline: str,
    window_s: float,
    features: dict[bool, list[FeatureDrift]],
    dropped: int,
) -> DriftReport:
    """The report: input (``features[True]``) and output features worst first, verdicts
    combined per side and overall."""

    def worst_first(items: list[FeatureDrift]) -> tuple[FeatureDrift, ...]:
        return tuple(sorted(items, key=lambda f: (_VERDICT_RANK[f.verdict], -f.score)))

    inputs = worst_first(features[True])
    outputs = worst_first(features[False])
    return DriftReport(
        model=model,
        baseline=baseline,
        profile_hash=profile_hash,
        window_s=window_s,
        verdict=_combine([f.verdict for f in (*inputs, *outputs)]),
        input_verdict=_combine([f.verdict for f in inputs]),
        output_verdict=_combine([f.verdict for f in outputs]),
        inputs=inputs,
        outputs=outputs,
        dropped=dropped,
    )
