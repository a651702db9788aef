"""BufferedObserver's channels forward every row, in order, in fewer calls."""

from __future__ import annotations

import gc
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
    buffered = BufferedObserver(rec, max_rows=5)
    channel = buffered.channel(REF, ["x"], ["y"])
    for i in range(12):
        channel([np.full((1, 3), i, np.float32)], [np.array([i])])
    assert len(rec.calls) == 2  # 5 + 5 rows forwarded, 2 waiting
    buffered.flush_all()
    assert len(rec.calls) == 3
    rows = np.concatenate([c[1]["x"] for c in rec.calls])
    assert rows.shape == (12, 3)
    assert rows.dtype == np.float32
    assert rows[:, 0].tolist() == list(range(12))
    assert np.concatenate([c[1]["out_y"] for c in rec.calls]).tolist() == list(range(12))
    assert all(c[0] == REF for c in rec.calls)


def test_arrays_are_joined_along_rows_whatever_their_mix() -> None:
    """Parts of one dtype keep it; a mix of dtypes takes the wider, a strided view joins as
    its values, and a scalar (0-d) output counts as one row: values exact either way."""
    rec = Recorder()
    buffered = BufferedObserver(rec, max_rows=3)
    channel = buffered.channel(REF, ["x"], ["y"])
    channel([np.ones((1, 3), np.float32)], [np.array(7)])
    channel([np.full((2, 3), 2, np.float32)], [np.array([8, 9])])
    joined = rec.calls[0][1]
    assert joined["x"].dtype == np.float32
    assert joined["x"].tolist() == [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    assert joined["out_y"].tolist() == [7, 8, 9]
    wide = np.arange(12, dtype=np.float32).reshape(2, 6)
    channel([np.ones((1, 3), np.float64)], [np.array([10])])
    channel([wide[:, ::2]], [np.array([11, 12])])  # (2, 3), not contiguous
    joined = rec.calls[1][1]
    assert joined["x"].dtype == np.float64
    assert joined["x"].tolist() == [[1, 1, 1], [0, 2, 4], [6, 8, 10]]
    assert joined["out_y"].tolist() == [10, 11, 12]


def test_a_bytes_tensor_joins_with_the_others() -> None:
    """A model with a BYTES input: its object arrays join like any other tensor, so the
    drain forwards every tensor (joining their raw bytes once failed the whole drain)."""
    rec = Recorder()
    buffered = BufferedObserver(rec, max_rows=2)
    channel = buffered.channel(REF, ["text", "x"], ["y"])
    channel([np.array([b"a"], object), np.ones((1, 2), np.float32)], [np.array([1])])
    channel([np.array([b"bc"], object), np.zeros((1, 2), np.float32)], [np.array([0])])
    assert len(rec.calls) == 1
    joined = rec.calls[0][1]
    assert joined["text"].tolist() == [b"a", b"bc"]
    assert joined["x"].tolist() == [[1, 1], [0, 0]]
    assert joined["out_y"].tolist() == [1, 0]


def test_quiet_traffic_is_flushed_by_age_and_threads_are_merged_exactly() -> None:
    rec = Recorder()
    clock = [0.0]
    buffered = BufferedObserver(rec, max_rows=1000, clock=lambda: clock[0])
    channel = buffered.channel(REF, ["x"], [])
    channel([np.zeros((2, 3), np.float32)], [])
    buffered.flush_all(older_than_s=0.1)
    assert not rec.calls  # too young
    clock[0] = 0.2
    buffered.flush_all(older_than_s=0.1)
    assert len(rec.calls) == 1

    def worker() -> None:
        for i in range(2000):
            channel([np.ones((1, 3), np.float32)], [])
            if i % 300 == 0:  # drains race with the other threads' appends
                buffered.flush_all()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    buffered.flush_all()
    assert sum(c[1]["x"].shape[0] for c in rec.calls) == 2 + 4 * 2000


def test_a_dropped_channel_is_forgotten() -> None:
    rec = Recorder()
    buffered = BufferedObserver(rec)
    channel = buffered.channel(REF, ["x"], [])
    channel([np.zeros((1, 3), np.float32)], [])
    buffered.flush_all()
    assert len(rec.calls) == 1
    del channel
    gc.collect()
    buffered.flush_all()
    assert len(rec.calls) == 1
    assert not list(buffered._channels)
