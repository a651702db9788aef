"""rollout/signals.py: gathers the live measurements a rollout is judged on (``Signals``).

For one rollout (model, stable version, candidate version): per-variant requests, error
rates and p99 latency since the current step began (router traffic snapshots, diffed), the
candidate's worst input feature drift against the reference profile, prediction drift of
candidate against stable outputs, shadow disagreement when the candidate is a shadow, and
the outcome comparison from ground-truth feedback when there is one (``OutcomeWindows``, over
the prediction memory). Called from the rollout controller's worker thread: it only reads
snapshots and reports, never mutates serving state.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from gateway.drift.monitor import DriftMonitor
from gateway.drift.report import DriftReport
from gateway.feedback import PredictionMemory
from gateway.outcomes import OutcomeKindError, OutcomeSnapshot
from gateway.outcomes import compare as compare_outcomes
from gateway.rollout.policy import RolloutState, Signals
from gateway.router import Router
from gateway.traffic import VariantSnapshot
from gateway.types import ModelRef

__all__ = ["SignalGatherer", "OutcomeSource", "OutcomeWindows"]

logger = logging.getLogger(__name__)

# (model, stable, candidate) -> (one-sided p-value "candidate worse", worse?) or None.
OutcomeSource = Callable[[str, str, str], "tuple[float, bool] | None"]


class SignalGatherer:
    """``gather(state) -> Signals`` for the rollout controller."""

    def __init__(
        self,
        router: Router,
        monitor: DriftMonitor,
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
        self._baselines: dict[tuple[Any, ...], dict[str, VariantSnapshot]] = {}

    def __call__(self, state: RolloutState) -> Signals:
        model, stable, candidate = state.model, state.stable_version, state.candidate_version
        now = {s.version: s for s in self._traffic(model)}
        key = (model, stable, candidate, state.step_index, state.status)
        with self._lock:
            base = self._baselines.setdefault(key, now)
            for old in [k for k in self._baselines if k[0] == model and k != key]:
                del self._baselines[old]
        window = {v: (snap.minus(base[v]) if v in base else snap) for v, snap in now.items()}
        cand = window.get(candidate)
        stab = window.get(stable)
        signals: dict[str, Any] = {
            "candidate_samples": cand.requests if cand else 0,
            "stable_samples": stab.requests if stab else 0,
            "candidate_requests_total": now[candidate].requests if candidate in now else 0,
            "candidate_error_rate": cand.error_rate if cand else None,
            "stable_error_rate": stab.error_rate if stab else None,
            "candidate_p99_ms": cand.p(0.99) if cand else None,
            "stable_p99_ms": stab.p(0.99) if stab else None,
        }
        if candidate in now:
            agreement = now[candidate].shadow.get("agreement")
            if isinstance(agreement, float):
                signals["shadow_disagreement"] = 1.0 - agreement
        signals.update(self._drift(model, stable, candidate))
        if self._outcomes is not None:
            try:
                outcome = self._outcomes(model, stable, candidate)
            except Exception:  # one broken signal must not stop the evaluation
                logger.exception("outcome comparison failed for %s", model)
                outcome = None
            if outcome is not None:
                signals["outcome_pvalue"], signals["outcome_worse"] = outcome
        return Signals(**signals)

    def _drift(self, model: str, stable: str, candidate: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        cand_ref, stable_ref = ModelRef(model, candidate), ModelRef(model, stable)
        report: DriftReport | None = None
        try:
            report = self._monitor.report(cand_ref)
        except KeyError:
            return out  # no profile: drift is not measured
        sufficient = report.input_verdict != "insufficient_data"
        if report.inputs:
            worst = report.inputs[0]
            out["input_drift_psi"] = worst.psi
            out["input_drift_ks"] = worst.ks
            out["input_drift_feature"] = worst.name
        try:
            versus = self._monitor.compare(cand_ref, stable_ref)
        except (KeyError, ValueError):
            versus = None
        if versus is not None and versus.outputs:
            out["prediction_drift_psi"] = max(f.psi for f in versus.outputs)
            sufficient = sufficient and versus.output_verdict != "insufficient_data"
        out["drift_sufficient"] = sufficient
        return out


class OutcomeWindows:
    """The ``OutcomeSource`` over the prediction memory: ground truth for a rollout, as
    (one-sided p-value of "candidate worse", whether the observed difference points that
    way), once both arms have enough joined samples since the rollout was first judged.

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
        self._baselines: dict[tuple[str, str, str], tuple[OutcomeSnapshot, OutcomeSnapshot]] = {}

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def __call__(self, model: str, stable: str, candidate: str) -> tuple[float, bool] | None:
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
        # The window starts when this rollout was first judged (earlier rollouts of the
        # same versions must not count).
        start = self._baselines.setdefault((model, stable, candidate), (cand, stab))
        cand, stab = cand.minus(start[0]), stab.minus(start[1])
        try:
            result = compare_outcomes(cand, stab)
        except OutcomeKindError:
            return None
        if not result.enough_samples or result.p_value is None or result.statistic is None:
            return None
        worse = result.statistic < 0 if result.test == "two_proportion_z" else result.statistic > 0
        return result.p_value, worse
