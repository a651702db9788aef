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
from collections.abc import Callable, Mapping
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from gateway.types import ModelRef, Observer

__all__ = ["BufferedObserver"]

Array = npt.NDArray[Any]
_DEFAULT_ROWS: Final = 128


class _Pending:
    __slots__ = ("inputs", "outputs", "rows", "since")

    def __init__(self, since: float) -> None:
        self.rows = 0
        self.since = since
        self.inputs: list[Mapping[str, Array]] = []
        self.outputs: list[Mapping[str, Array]] = []


def _concat(parts: list[Mapping[str, Array]]) -> dict[str, Array]:
    if len(parts) == 1:
        return dict(parts[0])
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


class BufferedObserver:
    """An ``Observer`` that forwards to ``observe`` in batches of rows, per thread."""

    def __init__(
        self,
        observe: Observer,
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

    def __call__(
        self, ref: ModelRef, inputs: Mapping[str, Array], outputs: Mapping[str, Array]
    ) -> None:
        mine: tuple[threading.Lock, dict[ModelRef, _Pending]] | None = getattr(
            self._local, "mine", None
        )
        if mine is None:
            mine = self._local.mine = (threading.Lock(), {})
            with self._registry_lock:
                self._threads.append(mine)
        lock, buffers = mine
        ready = None
        with lock:  # uncontended except while flush_all() empties this thread's buffer
            now = self._clock()
            pending = buffers.get(ref)
            if pending is None:
                pending = buffers[ref] = _Pending(now)
            first = next(iter(inputs.values()), None)
            pending.rows += first.shape[0] if first is not None and first.ndim else 1
            pending.inputs.append(inputs)
            pending.outputs.append(outputs)
            if pending.rows >= self._max_rows or now - pending.since >= self._max_delay_s:
                ready = buffers.pop(ref)
        if ready is not None:
            self._observe(ref, _concat(ready.inputs), _concat(ready.outputs))

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
                self._observe(ref, _concat(pending.inputs), _concat(pending.outputs))
