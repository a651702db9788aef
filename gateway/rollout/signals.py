"""rollout/signals.py: gathers the live measurements a rollout is judged on (``Signals``).

For one rollout (model, stable version, candidate version): per-variant requests, errors,
error rates and p99 latency since the current step began (router traffic snapshots, diffed),
the candidate's worst input feature drift against the reference profile, prediction drift of
candidate against stable outputs (from a ``DriftSource``: this process's monitor, or the sum
of a fleet's replicas), shadow disagreement over the step's window when the
candidate is a shadow, and the outcome comparison from ground-truth feedback when there is
one (``OutcomeWindows``, over the prediction memory). Every window is keyed by the rollout's
id and step (``window_key``) and begins at ``begin_window`` (the controller calls it when a
rollout starts and when a step begins) or at the first gather: a rollout started again for
the same versions never sees an earlier one's numbers. Called from the rollout controller's
worker thread: it only reads snapshots and reports, never mutates serving state.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from gateway.drift.report import DriftReport, DriftSource
from gateway.feedback import PredictionMemory
from gateway.outcomes import OutcomeKindError, OutcomeSnapshot
from gateway.outcomes import compare as compare_outcomes
from gateway.rollout.policy import RolloutState, Signals
from gateway.rollout.sequential import exceedances
from gateway.router import Router
from gateway.traffic import LATENCY_BUCKETS_MS, VariantSnapshot
from gateway.types import ModelRef

__all__ = ["SignalGatherer", "OutcomeSource", "OutcomeWindows", "window_key"]

logger = logging.getLogger(__name__)

# (model, stable, candidate, window key) -> Signals fields (outcome_pvalue, outcome_worse,
# outcome_counts) or None when there is no comparison yet.
OutcomeSource = Callable[[str, str, str, str], "Mapping[str, Any] | None"]
WindowKey = tuple[str, str, int, str]


MIN_LATENCY_HISTORY = 100
"""Stable requests before a window needed to fix its "slow" threshold (a p99 of fewer is
one request's latency)."""


def window_key(state: RolloutState) -> WindowKey:
    """The window a rollout is judged on: one per rollout, step and evaluated status.
    Older states without an id fall back to their versions and creation time."""
    rid = state.rollout_id or f"{state.stable_version}>{state.candidate_version}@{state.created_at}"
    return (state.model, rid, state.step_index, state.status)


def _shadow_counts(snap: VariantSnapshot) -> tuple[int, int]:
    """(compared rows, agreeing rows) of a shadow version, cumulative."""
    compared = snap.shadow.get("compared_rows")
    agreement = snap.shadow.get("agreement")
    n = int(compared) if isinstance(compared, int | float) else 0
    agreed = round(agreement * n) if isinstance(agreement, float) else 0
    return n, agreed


class SignalGatherer:
    """``gather(state) -> Signals`` for the rollout controller."""

    def __init__(
        self,
        router: Router,
        monitor: DriftSource,
        outcomes: OutcomeSource | None = None,
        *,
        traffic: Callable[[str], list[VariantSnapshot]] | None = None,
    ) -> None:
        self._router = router
        self._traffic = router.traffic if traffic is None else traffic
        """Cumulative per-variant counters of a model: this process's, or a fleet's pool."""
        self._monitor = monitor
        self._outcomes = outcomes
        self._lock = threading.Lock()
        self._baselines: dict[WindowKey, dict[str, VariantSnapshot]] = {}

    def begin_window(self, state: RolloutState) -> None:
        """Start ``state``'s window now (a rollout's start, a step's start, a resume)."""
        try:
            now = {s.version: s for s in self._traffic(state.model)}
        except Exception:  # never fails the caller: the first gather starts the window
            logger.exception("signal window of the rollout of %s not started", state.model)
            return
        self._baseline(state, now, fresh=True)

    def _baseline(
        self, state: RolloutState, now: dict[str, VariantSnapshot], *, fresh: bool = False
    ) -> dict[str, VariantSnapshot]:
        key = window_key(state)
        with self._lock:
            if fresh:
                self._baselines[key] = now
            base = self._baselines.setdefault(key, now)
            for old in [k for k in self._baselines if k[0] == state.model and k != key]:
                del self._baselines[old]
        return base

    def candidate_failures(self, state: RolloutState) -> int:
        """The candidate's failed plus (in the current window) slow requests: cheap, for the
        controller's wake-up check (a burst of candidate failures is evaluated at once, not
        at the next tick)."""
        now = {s.version: s for s in self._traffic(state.model)}
        cand = now.get(state.candidate_version)
        if cand is None:
            return 0
        with self._lock:
            base = self._baselines.get(window_key(state))
        if base is None:
            return cand.errors
        before = base.get(state.candidate_version)
        window = cand.minus(before) if before is not None else cand
        slow = self._slow(state, base, window, None).get("candidate_slow", 0)
        return int(cand.errors + slow)

    def __call__(self, state: RolloutState) -> Signals:
        model, stable, candidate = state.model, state.stable_version, state.candidate_version
        now = {s.version: s for s in self._traffic(model)}
        base = self._baseline(state, now)
        window = {v: (snap.minus(base[v]) if v in base else snap) for v, snap in now.items()}
        cand = window.get(candidate)
        stab = window.get(stable)
        signals: dict[str, Any] = {
            "candidate_samples": cand.requests if cand else 0,
            "stable_samples": stab.requests if stab else 0,
            "candidate_errors": cand.errors if cand else 0,
            "stable_errors": stab.errors if stab else 0,
            "candidate_requests_total": now[candidate].requests if candidate in now else 0,
            "candidate_error_rate": cand.error_rate if cand else None,
            "stable_error_rate": stab.error_rate if stab else None,
            "candidate_p99_ms": cand.p(0.99) if cand else None,
            "stable_p99_ms": stab.p(0.99) if stab else None,
        }
        signals.update(self._slow(state, base, cand, stab))
        if candidate in now:
            # Shadow comparisons in this window only (the counters are cumulative).
            n, agreed = _shadow_counts(now[candidate])
            if candidate in base:
                n0, agreed0 = _shadow_counts(base[candidate])
                n, agreed = n - n0, agreed - agreed0
            if n > 0:
                signals["shadow_disagreement"] = 1.0 - agreed / n
        drift = self._drift(model, stable, candidate)
        # The drift monitor's window is rolling, not per rollout: until the step has run for
        # one whole window it still holds rows from before the step, so it is not judged.
        if time.time() - state.step_started_at < drift.pop("window_s", 0.0):
            drift["drift_sufficient"] = False
        signals.update(drift)
        if self._outcomes is not None:
            try:
                outcome = self._outcomes(model, stable, candidate, repr(window_key(state)))
            except Exception:  # one broken signal must not stop the evaluation
                logger.exception("outcome comparison failed for %s", model)
                outcome = None
            if outcome is not None:
                signals.update(outcome)
        return Signals(**signals)

    @staticmethod
    def _slow(
        state: RolloutState,
        base: dict[str, VariantSnapshot],
        cand: VariantSnapshot | None,
        stab: VariantSnapshot | None,
    ) -> dict[str, Any]:
        """Slow requests per arm in the window, "slow" meaning over the p99 ratio times the
        stable version's p99 from before the window (fixed before it: the test stays valid)."""
        ratio = state.policy.thresholds.max_p99_latency_ratio
        before = base.get(state.stable_version)
        if ratio is None or before is None or before.requests < MIN_LATENCY_HISTORY:
            return {}
        p99 = before.p(0.99)
        if p99 is None or p99 == float("inf"):
            return {}
        threshold = ratio * p99

        def slow(snap: VariantSnapshot | None) -> int:
            if snap is None:
                return 0
            return exceedances(snap.latency_counts, LATENCY_BUCKETS_MS, threshold).events

        return {
            "slow_threshold_ms": threshold,
            "candidate_slow": slow(cand),
            "stable_slow": slow(stab),
        }

    def _drift(self, model: str, stable: str, candidate: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        cand_ref, stable_ref = ModelRef(model, candidate), ModelRef(model, stable)
        report: DriftReport | None = None
        try:
            report = self._monitor.report(cand_ref)
        except KeyError:
            return out  # no profile: drift is not measured
        sufficient = report.input_verdict != "insufficient_data"
        out["window_s"] = report.window_s
        if report.inputs:
            worst = report.inputs[0]
            out["input_drift_psi"] = worst.psi
            out["input_drift_ks"] = worst.ks
            out["input_drift_feature"] = worst.name
        try:
            versus = self._monitor.compare(cand_ref, stable_ref)
        except (KeyError, ValueError):
            versus = None
        finite = [f.psi for f in versus.outputs if math.isfinite(f.psi)] if versus else []
        if finite:
            out["prediction_drift_psi"] = max(finite)
        if versus is not None and versus.outputs:
            sufficient = sufficient and versus.output_verdict != "insufficient_data"
        out["drift_sufficient"] = sufficient
        return out


class OutcomeWindows:
    """The ``OutcomeSource`` over the prediction memory: ground truth for a rollout's window
    (keyed by rollout and step), as the signals ``outcome_counts`` (classification: rows and
    wrong rows per arm, for the sequential test, as soon as both arms have a truth) and
    ``outcome_pvalue`` / ``outcome_worse`` (one-sided fixed-sample comparison, once both arms
    have enough joined samples).

    The memory lives on the event-loop thread; the controller asks from its worker thread, so
    the snapshots are taken on ``loop`` (bound at ``start``; None before: no outcome yet).
    """

    def __init__(
        self,
        memory: PredictionMemory,
        *,
        snapshot: Callable[[str, str], OutcomeSnapshot] | None = None,
    ) -> None:
        self._memory = memory
        self._snapshot = snapshot
        """A fleet's pooled ``(model, version) -> OutcomeSnapshot``, read from this thread."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._baselines: dict[str, tuple[OutcomeSnapshot, OutcomeSnapshot]] = {}

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def __call__(
        self, model: str, stable: str, candidate: str, window: str = ""
    ) -> dict[str, Any] | None:
        loop = self._loop
        if loop is None:
            return None
        memory, pooled = self._memory, self._snapshot

        async def snapshots() -> tuple[OutcomeSnapshot, OutcomeSnapshot]:
            return memory.snapshot(model, candidate), memory.snapshot(model, stable)

        if pooled is not None:
            cand, stab = pooled(model, candidate), pooled(model, stable)
        else:
            cand, stab = asyncio.run_coroutine_threadsafe(snapshots(), loop).result(timeout=10)
        # The window starts when this rollout's step was first judged (earlier rollouts and
        # steps must not count).
        key = window or f"{model}/{stable}/{candidate}"
        start = self._baselines.setdefault(key, (cand, stab))
        for old in [k for k in self._baselines if k != key and k.startswith(f"('{model}',")]:
            del self._baselines[old]
        cand, stab = cand.minus(start[0]), stab.minus(start[1])
        out: dict[str, Any] = {}
        if cand.kind == "classification" and cand.n and stab.n:
            out["outcome_counts"] = (cand.n, cand.n - cand.correct, stab.n, stab.n - stab.correct)
        try:
            result = compare_outcomes(cand, stab)
        except OutcomeKindError:
            return out or None
        if result.enough_samples and result.p_value is not None and result.statistic is not None:
            stat = result.statistic
            out["outcome_pvalue"] = result.p_value
            out["outcome_worse"] = stat < 0 if result.test == "two_proportion_z" else stat > 0
        return out or None
