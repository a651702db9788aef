"""rollout/ports.py: the callables the rollout controller is given, by role: how it applies
weights, gathers signals, checks versions, starts signal windows, notices new data and sends
alerts. Types only; the app wires the router, the signal gatherer and the alert sender in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeAlias

from gateway.rollout.policy import RolloutState, Signals

__all__ = ["WeightApplier", "SignalSource", "VersionCheck", "WindowStart", "Activity", "AlertSink"]

WeightApplier: TypeAlias = Callable[[str, dict[str, float]], None]
"""``apply(model, {version: percent})``: swap the router's weights atomically. Called from
the controller's worker thread or an admin request's thread, never two at once."""
SignalSource: TypeAlias = Callable[[RolloutState], Signals]
"""``gather(state)``: the current signals for a rollout; cheap, thread-safe, non-blocking."""
VersionCheck: TypeAlias = Callable[[str, Sequence[str]], None]
"""``check(model, versions)``: raise ``InvalidInputError`` naming every version of ``model``
that is not loaded and ready (or the model, when it is unknown)."""
WindowStart: TypeAlias = Callable[[RolloutState], None]
"""``begin_window(state)``: start the signal windows of ``state``'s rollout and step now;
never raises (a window it could not start begins at the first gather instead)."""
Activity: TypeAlias = Callable[[RolloutState], int]
"""``activity(state)``: a cumulative count (the candidate's failed and slow requests) whose growth
wakes the loop for an evaluation before the next tick; cheap, called on the event loop."""


class AlertSink(Protocol):
    """Where rollout events go (``alerts.AlertSender``); must never block or raise."""

    def send(
        self,
        event: str,
        model: str,
        reason: str,
        values: Mapping[str, object],
        extra: Mapping[str, object] | None = None,
    ) -> bool: ...
