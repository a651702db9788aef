"""rollout/: canary rollouts driven by live signals: signals -> decision -> route weights.

``policy`` holds the vocabulary and its validation, ``decide`` the pure transition table,
``signals`` the measurements a rollout is judged on, ``controller`` the loop that applies
decisions through the store to the router. The names below are re-exported for callers
that want the whole vocabulary in one import.
"""

from __future__ import annotations

from gateway.rollout.controller import RolloutController
from gateway.rollout.decide import decide
from gateway.rollout.policy import (
    ACTIVE_STATUSES,
    CONTROLLER_ACTOR,
    Action,
    Decision,
    Evaluation,
    Measured,
    RolloutPolicy,
    RolloutState,
    RolloutStatus,
    RolloutThresholds,
    Signals,
    Transition,
    Verdict,
)
from gateway.rollout.ports import AlertSink, SignalSource, WeightApplier

__all__ = [
    "RolloutStatus",
    "Action",
    "Verdict",
    "Measured",
    "ACTIVE_STATUSES",
    "CONTROLLER_ACTOR",
    "RolloutThresholds",
    "RolloutPolicy",
    "Signals",
    "Evaluation",
    "Transition",
    "RolloutState",
    "Decision",
    "decide",
    "WeightApplier",
    "SignalSource",
    "AlertSink",
    "RolloutController",
]
