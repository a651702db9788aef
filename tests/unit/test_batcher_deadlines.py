"""Deadlines while queued and drain, on a real ONNX Runtime session (a small MLP).

A batcher that waits for company (``max_queue_delay_us`` = 3 s) must still answer a queued
request at its deadline, not when the batch forms, and ``drain()`` must run what is queued
at once instead of letting it wait out the delay.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from bench.models import mlp
from gateway.batcher import Batcher
from gateway.config import ModelPolicy, RuntimeSettings
from gateway.errors import DeadlineExceededError
from gateway.repository import ModelVersion

Array = npt.NDArray[Any]

DELAY_US = 3_000_000  # the batch waits up to 3 s for company
LATE_S = 1.0  # allowed lateness: measured 1-3 ms idle; the bug it catches costs 2.5-3 s


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelVersion]:
    path: Path = tmp_path_factory.mktemp("deadline") / "m" / "1" / "model.onnx"
    mlp(path, [4, 8, 2], name="m")
    policy = ModelPolicy(max_batch_size=64, max_queue_delay_us=DELAY_US, execution="pool")
    version = ModelVersion("m", "1", path, policy, RuntimeSettings())
    yield version
    version.close()


def _feeds(rows: int) -> list[Array]:
    return [np.ones((rows, 4), np.float32)]


def _batcher(model: ModelVersion) -> Batcher:
    batcher = Batcher(
        model,
        max_queue_size=16,
        max_queue_delay_us=DELAY_US,
        executor=None,  # the 4x8x2 model runs in microseconds; the schedule is under test
    )
    batcher.start()
    return batcher


def test_a_queued_request_expires_at_its_deadline_not_at_batch_time(model: ModelVersion) -> None:
    async def main() -> tuple[float, Array]:
        batcher = _batcher(model)
        loop = asyncio.get_running_loop()
        patient = asyncio.ensure_future(batcher.submit(_feeds(1), 1, None))
        start = time.monotonic()
        with pytest.raises(DeadlineExceededError, match="timed out in the queue"):
            await batcher.submit(_feeds(2), 2, start + 0.5)
        late = time.monotonic() - (start + 0.5)
        assert batcher.stats.expired == 1
        assert batcher.queue_depth == 1  # the request without a deadline still waits
        t0 = loop.time()
        await batcher.drain()
        assert loop.time() - t0 < LATE_S  # drain ran it at once, not after the 3 s delay
        (out,) = await patient
        return late, out

    late, out = asyncio.run(main())
    assert 0 <= late < LATE_S
    assert out.shape == (1, 2)
    expected = model.run(_feeds(1))[0]
    assert np.allclose(out, expected)


def test_drain_wakes_the_dispatcher(model: ModelVersion) -> None:
    async def main() -> float:
        batcher = _batcher(model)
        waiting = [asyncio.ensure_future(batcher.submit(_feeds(1), 1, None)) for _ in range(3)]
        for _ in range(3):  # let them queue and the dispatcher decide to wait for company
            await asyncio.sleep(0)
        assert batcher.queue_depth == 3
        start = time.monotonic()
        await batcher.drain()
        results = await asyncio.gather(*waiting)
        assert all(r[0].shape == (1, 2) for r in results)
        assert not batcher.is_accepting
        return time.monotonic() - start

    assert asyncio.run(main()) < LATE_S


def test_hurry_runs_the_waiting_batch_and_still_accepts(model: ModelVersion) -> None:
    async def main() -> float:
        batcher = _batcher(model)
        waiting = [asyncio.ensure_future(batcher.submit(_feeds(1), 1, None)) for _ in range(2)]
        for _ in range(3):
            await asyncio.sleep(0)
        assert batcher.queue_depth == 2
        start = time.monotonic()
        batcher.hurry()
        await asyncio.gather(*waiting)
        # Still accepting, and a new lone request no longer waits for company either.
        assert batcher.is_accepting
        (out,) = await batcher.submit(_feeds(1), 1, None)
        assert out.shape == (1, 2)
        return time.monotonic() - start

    assert asyncio.run(main()) < LATE_S


def test_expiry_leaves_other_requests_and_cancelled_callers_alone(model: ModelVersion) -> None:
    async def main() -> None:
        batcher = _batcher(model)
        now = time.monotonic()
        short = asyncio.ensure_future(batcher.submit(_feeds(1), 1, now + 0.05))
        gone = asyncio.ensure_future(batcher.submit(_feeds(1), 1, now + 0.05))
        long = asyncio.ensure_future(batcher.submit(_feeds(1), 1, now + 30))
        await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(DeadlineExceededError):
            await short
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert batcher.stats.expired == 1
        assert batcher.stats.cancelled == 1
        assert batcher.queue_depth == 1
        await batcher.drain()
        assert (await long)[0].shape == (1, 2)

    asyncio.run(main())
