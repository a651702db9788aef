"""BufferedObserver forwards every row, in order, in fewer calls."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.drift.buffer import BufferedObserver
from gateway.types import ModelRef

REF = ModelRef("m", "1")


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[ModelRef, dict[str, npt.NDArray[Any]]]] = []
        self.lock = threading.Lock()

    def __call__(
        self,
        ref: ModelRef,
        inputs: Mapping[str, npt.NDArray[Any]],
        outputs: Mapping[str, npt.NDArray[Any]],
    ) -> None:
        with self.lock:
            self.calls.append((ref, {**inputs, **{"out_" + k: v for k, v in outputs.items()}}))


def test_rows_are_forwarded_exactly_and_in_order() -> None:
    rec = Recorder()
    clock = [0.0]
    buffered = BufferedObserver(rec, max_rows=5, max_delay_s=10, clock=lambda: clock[0])
    for i in range(12):
        buffered(REF, ["x"], [np.full((1, 3), i, np.float32)], ["y"], [np.array([i])])
    assert len(rec.calls) == 2  # 5 + 5 rows forwarded, 2 waiting
    buffered.flush_all()
    rows = np.concatenate([c[1]["x"] for c in rec.calls])
    assert rows[:, 0].tolist() == list(range(12))
    assert np.concatenate([c[1]["out_y"] for c in rec.calls]).tolist() == list(range(12))


def test_quiet_traffic_is_flushed_by_age_and_threads_are_merged_exactly() -> None:
    rec = Recorder()
    clock = [0.0]
    buffered = BufferedObserver(rec, max_rows=1000, max_delay_s=0.5, clock=lambda: clock[0])
    buffered(REF, ["x"], [np.zeros((2, 3), np.float32)], [], [])
    buffered.flush_all(older_than_s=0.1)
    assert not rec.calls  # too young
    clock[0] = 0.2
    buffered.flush_all(older_than_s=0.1)
    assert len(rec.calls) == 1

    def worker() -> None:
        for _ in range(500):
            buffered(REF, ["x"], [np.ones((1, 3), np.float32)], [], [])

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    buffered.flush_all()
    assert sum(c[1]["x"].shape[0] for c in rec.calls) == 2 + 4 * 500
