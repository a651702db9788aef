"""buffer.py: batches observations for the drift monitor, per model version.

``DriftMonitor.observe`` costs a few microseconds per tensor whatever the row count (Numba
dispatch and bookkeeping), which is most of its cost for one-row requests served one by
one. ``BufferedObserver.channel`` gives each model version's batcher an ``Observer`` that
keeps the model calls' arrays (references to arrays that are never written again) and
hands them to the monitor joined, once ``max_rows`` rows have gathered or, for quiet
traffic, when the periodic ``flush_all`` finds them old enough (the gateway: 0.1 s): the
same counts, exactly, for a fraction of the calls. At most that much of one model's
traffic waits to be counted, far below the drift window (a minute).

The request path pays one deque append and a row count per call: no lock (a deque's
append and popleft are atomic, so any thread may add while another drains, and no array
is lost or counted twice), no clock read but the first after a drain, no per-call hashing.
A drain joins each tensor's arrays with one ``np.concatenate``. Joining their bytes would
be cheaper, but only after Python checks that every part agrees in dtype, row shape and
layout, and those checks cost more than numpy's own: for 128 one-row calls of three
tensors, 0.53-0.58 of the checked join's time in each run (``python -m bench.drift_kernels``;
0.57 µs per call against 1.06 in the first run). Copying each call's bytes while they are
hot instead measured slower in sequence (the per-tensor checks and copies cost more than the
cold reads they save).
"""

from __future__ import annotations

import collections
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TypeAlias

import numpy as np
import numpy.typing as npt

from gateway.types import ModelRef

__all__ = ["BufferedObserver", "ObserverChannel"]

Array = npt.NDArray[Any]
_DEFAULT_ROWS: Final = 128
MonitorObserve: TypeAlias = Callable[[ModelRef, Mapping[str, Array], Mapping[str, Array]], None]
"""What the observations are forwarded to: ``DriftMonitor.observe`` (tensors by name)."""


def _join(parts: list[Array]) -> Array:
    """``parts`` joined along axis 0 (a 0-d part counts as one row)."""
    if len(parts) == 1:
        return parts[0]
    try:
        return np.concatenate(parts)
    except ValueError:  # a 0-d part (or rows that disagree, which raises again)
        return np.concatenate([np.atleast_1d(p) for p in parts])


def _by_name(names: Sequence[str], calls: Sequence[Sequence[Array]]) -> dict[str, Array]:
    """Each named tensor of several calls (each call's tensors in ``names``' order), joined."""
    return {name: _join([call[i] for call in calls]) for i, name in enumerate(names)}


_Part: TypeAlias = tuple[Sequence[Array], Sequence[Array]]


class ObserverChannel:
    """One model version's observations waiting to be counted: an ``Observer``."""

    __slots__ = (
        "__weakref__",
        "_clock",
        "_forward",
        "_input_names",
        "_max_rows",
        "_output_names",
        "_parts",
        "_ref",
        "_rows",
        "since",
    )

    def __init__(
        self,
        forward: MonitorObserve,
        ref: ModelRef,
        input_names: Sequence[str],
        output_names: Sequence[str],
        max_rows: int,
        clock: Callable[[], float],
    ) -> None:
        self._forward = forward
        self._ref = ref
        self._input_names = tuple(input_names)
        self._output_names = tuple(output_names)
        self._max_rows = max_rows
        self._clock = clock
        self._parts: collections.deque[_Part] = collections.deque()
        self._rows = 0
        self.since = 0.0
        """When the oldest waiting observation arrived (monotonic seconds), roughly."""

    def __call__(self, inputs: Sequence[Array], outputs: Sequence[Array]) -> None:
        parts = self._parts
        if not parts:
            self.since = self._clock()
        parts.append((inputs, outputs))
        first = inputs[0] if inputs else None
        # Racy across threads, on purpose: it only decides when to drain, never what.
        rows = self._rows = self._rows + (first.shape[0] if first is not None and first.ndim else 1)
        if rows >= self._max_rows:
            self.drain()

    @property
    def waiting(self) -> bool:
        return bool(self._parts)

    def drain(self) -> None:
        """Forward every waiting observation to the monitor, joined (any thread)."""
        self._rows = 0
        taken: list[_Part] = []
        pop = self._parts.popleft
        try:
            while True:
                taken.append(pop())
        except IndexError:
            pass
        if not taken:
            return
        inputs, outputs = zip(*taken, strict=True)
        self._forward(
            self._ref, _by_name(self._input_names, inputs), _by_name(self._output_names, outputs)
        )


class BufferedObserver:
    """Makes each watched model version's ``ObserverChannel`` and flushes quiet ones."""

    def __init__(
        self,
        observe: MonitorObserve,
        max_rows: int = _DEFAULT_ROWS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._observe = observe
        self._max_rows = max_rows
        self._clock = clock
        self._channels: weakref.WeakSet[ObserverChannel] = weakref.WeakSet()
        self._lock = threading.Lock()

    def channel(
        self, ref: ModelRef, input_names: Sequence[str], output_names: Sequence[str]
    ) -> ObserverChannel:
        """The observer for one model version's calls (its inputs and outputs, in the
        order named); kept while its batcher keeps it."""
        channel = ObserverChannel(
            self._observe, ref, input_names, output_names, self._max_rows, self._clock
        )
        with self._lock:
            self._channels.add(channel)
        return channel

    def flush_all(self, older_than_s: float = 0.0) -> None:
        """Forward every channel's observations once the oldest has waited ``older_than_s``
        (called periodically, so quiet traffic is counted too; with 0, everything)."""
        now = self._clock()
        with self._lock:
            channels = list(self._channels)
        for channel in channels:
            if channel.waiting and now - channel.since >= older_than_s:
                channel.drain()
