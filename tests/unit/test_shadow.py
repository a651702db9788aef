"""shadow.py: mirror calls are bounded, never fail the caller, and compare answers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from gateway.errors import ModelExecutionError, OverloadedError
from gateway.shadow import ShadowRunner, compare_outputs
from gateway.traffic import ShadowStats
from gateway.types import InferResponse, Tensor


def _mirror(
    runner: ShadowRunner,
    call: Callable[[], Awaitable[InferResponse]],
    primary: InferResponse,
    stats: ShadowStats,
) -> None:
    """A copy as the router sends one: started if ``admits`` says yes, else counted."""
    if runner.admits(stats):
        runner.start(call, primary, stats)


def _response(data: np.ndarray) -> InferResponse:
    return InferResponse("m", "1", [Tensor("OUTPUT0", "FP32", data.shape, data)])


def test_labels_and_scores_agree_by_row() -> None:
    stats = ShadowStats()
    compare_outputs(np.array([1, 2, 3]), np.array([1, 0, 3]), stats)
    assert (stats.compared_rows, stats.agreed_rows) == (3, 2)
    scores = ShadowStats()
    a = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    b = np.array([[0.6, 0.4], [0.7, 0.3]], np.float32)
    compare_outputs(a, b, scores)
    assert scores.agreement == 0.5  # argmax agrees on the first row only
    assert scores.mean_abs_diff == pytest.approx((0.3 + 0.5) / 2, rel=1e-6)


def test_regression_outputs_compare_by_difference_and_bad_shapes_are_errors() -> None:
    stats = ShadowStats()
    compare_outputs(np.array([[2.0], [4.0]]), np.array([[1.0], [4.0]]), stats)
    assert stats.agreement is None
    assert stats.mean_abs_diff == pytest.approx(0.5)
    assert stats.mean_rel_diff == pytest.approx(0.25)
    compare_outputs(np.zeros((2, 1)), np.zeros((3, 1)), stats)
    assert stats.errors == 1


def test_mirrors_are_bounded_and_failures_are_counted() -> None:
    async def main() -> None:
        runner = ShadowRunner(max_in_flight=2)
        stats = ShadowStats()
        release = asyncio.Event()
        primary = _response(np.array([[1.0, 0.0]], np.float32))

        async def held() -> InferResponse:
            await release.wait()
            return _response(np.array([[0.0, 1.0]], np.float32))

        for _ in range(3):
            _mirror(runner, held, primary, stats)
        assert (stats.sent, stats.dropped) == (2, 1)  # the third is over the bound
        release.set()
        await runner.stop()
        runner, stats = ShadowRunner(), ShadowStats()

        async def overloaded() -> InferResponse:
            raise OverloadedError("queue full")

        async def failed() -> InferResponse:
            raise ModelExecutionError("boom")

        async def broken() -> InferResponse:
            raise RuntimeError("bug")

        for call in (overloaded, failed, broken):
            _mirror(runner, call, primary, stats)
        await asyncio.sleep(0)  # one loop turn: each mirror task runs (and ends) once
        await runner.stop()
        # An overloaded shadow counts as dropped, not sent; the other two as errors.
        assert (stats.sent, stats.dropped, stats.errors) == (2, 1, 2)

    asyncio.run(main())


def test_stop_cancels_mirrors_still_running() -> None:
    async def main() -> None:
        runner = ShadowRunner()
        stats = ShadowStats()
        started = asyncio.Event()

        async def forever() -> InferResponse:
            started.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        _mirror(runner, forever, _response(np.zeros((1, 1), np.float32)), stats)
        await started.wait()
        await runner.stop()
        assert (stats.sent, stats.errors) == (1, 0)

    asyncio.run(main())


def test_cpu_budget_drops_copies_until_the_refill_pays_back_the_cost() -> None:
    now = [0.0]

    async def main() -> None:
        # 10% of a core: the bucket holds 0.1 s of CPU and refills 0.1 s per second.
        runner = ShadowRunner(max_in_flight=100, cpu_share=0.1, clock=lambda: now[0])
        stats = ShadowStats()
        primary = _response(np.array([[1.0, 0.0]], np.float32))

        async def answer() -> InferResponse:
            return primary

        _mirror(runner, answer, primary, stats)
        runner.charge(0.3)  # one expensive call overdraws the bucket by 0.2 s
        for _ in range(5):
            _mirror(runner, answer, primary, stats)
        assert (stats.sent, stats.dropped, stats.over_budget) == (1, 5, 5)
        now[0] = 1.9  # refilled 0.19 s: still 0.01 s in debt
        _mirror(runner, answer, primary, stats)
        assert stats.over_budget == 6
        now[0] = 2.5
        _mirror(runner, answer, primary, stats)
        assert (stats.sent, stats.dropped) == (2, 6)
        assert runner.spent_s == pytest.approx(0.3)
        await runner.stop()

    asyncio.run(main())


def test_no_cpu_budget_when_the_share_is_zero() -> None:
    async def main() -> None:
        runner = ShadowRunner(max_in_flight=100, cpu_share=0.0)
        stats = ShadowStats()
        primary = _response(np.array([[1.0]], np.float32))

        async def answer() -> InferResponse:
            return primary

        runner.charge(100.0)
        _mirror(runner, answer, primary, stats)
        assert (stats.sent, stats.over_budget) == (1, 0)
        await runner.stop()

    asyncio.run(main())
