"""buffer.py: batches observations for the drift monitor, per thread.

``DriftMonitor.observe`` costs a few microseconds per tensor whatever the row count (Numba
dispatch and bookkeeping), which is most of its cost for one-row requests served one by
one. ``BufferedObserver`` keeps each calling thread's observations (references to arrays
that are never written again) and hands them to the monitor concatenated, once
``max_rows`` rows or ``max_delay_s`` seconds have gathered: the same counts, exactly, for
a fraction of the calls. At most that much of one thread's traffic waits to be counted,
far below the drift window (a minute).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TypeAlias

import numpy as np
import numpy.typing as npt

from gateway.types import ModelRef

__all__ = ["BufferedObserver"]

Array = npt.NDArray[Any]
_DEFAULT_ROWS: Final = 128
MonitorObserve: TypeAlias = Callable[[ModelRef, Mapping[str, Array], Mapping[str, Array]], None]
"""What the observations are forwarded to: ``DriftMonitor.observe`` (tensors by name)."""


class _Pending:
    """One thread's unforwarded observations of one model: names once, arrays per call."""

    __slots__ = ("input_names", "inputs", "output_names", "outputs", "rows", "since")

    def __init__(self, since: float, input_names: Sequence[str], output_names: Sequence[str]):
        self.rows = 0
        self.since = since
        self.input_names = input_names
        self.output_names = output_names
        self.inputs: list[Sequence[Array]] = []
        self.outputs: list[Sequence[Array]] = []

    def forward(self, observe: MonitorObserve, ref: ModelRef) -> None:
        observe(
            ref, _concat(self.input_names, self.inputs), _concat(self.output_names, self.outputs)
        )


def _concat(names: Sequence[str], parts: list[Sequence[Array]]) -> dict[str, Array]:
    if len(parts) == 1:
        return dict(zip(names, parts[0], strict=True))
    return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(names)}


class BufferedObserver:
    """An ``Observer`` that forwards to ``observe`` in batches of rows, per thread."""

    def __init__(
        self,
        observe: MonitorObserve,
        max_rows: int = _DEFAULT_ROWS,
        max_delay_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._observe = observe
        self._max_rows = max_rows
        self._max_delay_s = max_delay_s
        self._clock = clock
        self._local = threading.local()
        self._threads: list[tuple[threading.Lock, dict[ModelRef, _Pending]]] = []
        self._registry_lock = threading.Lock()

    def _mine(self) -> tuple[threading.Lock, dict[ModelRef, _Pending]]:
        """This thread's lock and buffers, made on its first observation."""
        mine: tuple[threading.Lock, dict[ModelRef, _Pending]] | None = getattr(
            self._local, "mine", None
        )
        if mine is None:
            mine = self._local.mine = (threading.Lock(), {})
            with self._registry_lock:
                self._threads.append(mine)
        return mine

    def __call__(
        self,
        ref: ModelRef,
        input_names: Sequence[str],
        inputs: Sequence[Array],
        output_names: Sequence[str],
        outputs: Sequence[Array],
    ) -> None:
        try:
            lock, buffers = self._local.mine
        except AttributeError:
            lock, buffers = self._mine()
        ready = None
        with lock:  # uncontended except while flush_all() empties this thread's buffer
            now = self._clock()
            pending = buffers.get(ref)
            if pending is None:
                pending = buffers[ref] = _Pending(now, input_names, output_names)
            first = inputs[0] if inputs else None
            pending.rows += first.shape[0] if first is not None and first.ndim else 1
            pending.inputs.append(inputs)
            pending.outputs.append(outputs)
            if pending.rows >= self._max_rows or now - pending.since >= self._max_delay_s:
                ready = buffers.pop(ref)
        if ready is not None:
            ready.forward(self._observe, ref)

    def flush_all(self, older_than_s: float = 0.0) -> None:
        """Hand every thread's observations waiting longer than ``older_than_s`` to the
        monitor (called periodically, so quiet traffic is counted too)."""
        now = self._clock()
        with self._registry_lock:
            threads = list(self._threads)
        for lock, buffers in threads:
            with lock:
                due = [r for r, p in buffers.items() if now - p.since >= older_than_s]
                taken = [(r, buffers.pop(r)) for r in due]
            for ref, pending in taken:
                pending.forward(self._observe, ref)
