"""Batcher scheduling through its public API, with a fake model (a function of the rows)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from gateway.batcher import Batcher, merge, split
from gateway.errors import DeadlineExceededError, ModelExecutionError, OverloadedError
from gateway.types import ModelRef

Array = npt.NDArray[Any]


class FakeModel:
    """out = 2 * x + row-sum; raises when any value is negative; can block on a gate.
    ``calls`` holds each call's rows in the order the calls began (before the gate), so
    calls that wait on the gate in parallel keep a definite order."""

    def __init__(self, max_batch_size: int = 8, inline: bool = False) -> None:
        self.ref = ModelRef("fake", "1")
        self.max_batch_size = max_batch_size
        self.is_inline = inline
        self.input_names = ["x"]
        self.output_names = ["y", "s"]
        self.calls: list[int] = []
        self.gate: threading.Event | None = None
        self.started = threading.Event()

    def run(self, feeds: list[Array]) -> list[Array]:
        x = feeds[0]
        self.calls.append(x.shape[0])
        self.started.set()
        if self.gate is not None:
            self.gate.wait(10)
        if (x < 0).any():
            raise ModelExecutionError("negative input")
        return [2 * x, x.sum(axis=1)]


def test_merge_and_split_return_each_caller_its_rows() -> None:
    parts = [[np.full((n, 3), i, np.float32)] for i, n in enumerate([1, 4, 2])]
    merged = merge(parts)
    assert merged[0].shape == (7, 3)
    pieces = split([merged[0] * 10], [1, 4, 2])
    for i, piece in enumerate(pieces):
        assert np.array_equal(piece[0], parts[i][0] * 10)


async def _submit_many(batcher: Batcher, sizes: list[int]) -> list[list[Array]]:
    calls = [batcher.submit([np.full((n, 2), i, np.float32)], n, None) for i, n in enumerate(sizes)]
    return await asyncio.gather(*calls)


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "pool"])
def test_concurrent_requests_are_batched_and_split_exactly(inline: bool) -> None:
    model = FakeModel(max_batch_size=8, inline=inline)
    sizes = [1, 3, 2, 1, 4, 1, 1, 2, 8, 1]

    async def main() -> list[list[Array]]:
        with ThreadPoolExecutor(1) as pool:
            # An inline model on an idle batcher runs each request in its own call unless
            # a queue delay asks it to wait for company.
            delay = 50_000 if inline else 0
            batcher = Batcher(model, max_queue_size=100, executor=pool, max_queue_delay_us=delay)
            batcher.start()
            return await _submit_many(batcher, sizes)

    results = asyncio.run(main())
    for i, (n, out) in enumerate(zip(sizes, results, strict=True)):
        assert np.array_equal(out[0], np.full((n, 2), 2 * i, np.float32))
        assert np.array_equal(out[1], np.full(n, 2 * i, np.float32))
    assert sum(model.calls) == sum(sizes)
    assert max(model.calls) <= 8
    assert len(model.calls) < len(sizes)  # some requests shared a call


def test_inline_model_on_an_idle_batcher_runs_in_the_callers_call() -> None:
    model = FakeModel(max_batch_size=8, inline=True)
    sizes = [1, 3, 2]

    async def main() -> tuple[list[list[Array]], Batcher]:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(model, max_queue_size=100, executor=pool)
            batcher.start()
            return await _submit_many(batcher, sizes), batcher

    results, batcher = asyncio.run(main())
    assert model.calls == sizes
    for i, (n, out) in enumerate(zip(sizes, results, strict=True)):
        assert np.array_equal(out[0], np.full((n, 2), 2 * i, np.float32))
    assert batcher.stats.execution_count == 3
    assert batcher.stats.inference_count == sum(sizes)
    assert batcher.queue_depth == 0


def test_a_request_run_in_its_callers_call_is_counted_and_observed_like_a_batch() -> None:
    """The inline path keeps its own accounting: every statistic a batch of one gets, the
    failure counted as a failure, and the drift observer shown every call that answered."""
    model = FakeModel(max_batch_size=8, inline=True)
    seen: list[tuple[int, int]] = []

    def observer(inputs: Sequence[Array], outputs: Sequence[Array]) -> None:
        seen.append((inputs[0].shape[0], outputs[0].shape[0]))

    async def main() -> Batcher:
        batcher = Batcher(model, max_queue_size=10, observer=observer)
        batcher.start()
        for rows in (1, 3, 3):
            assert batcher.run_now([np.ones((rows, 2), np.float32)], rows, None) is not None
        with pytest.raises(ModelExecutionError):
            batcher.run_now([np.full((2, 2), -1, np.float32)], 2, None)
        return batcher

    stats = asyncio.run(main()).stats
    assert seen == [(1, 1), (3, 3), (3, 3)]
    assert stats.execution_count == 4
    assert stats.inference_count == 7
    assert (stats.success.count, stats.fail.count, stats.queue.count) == (3, 1, 4)
    for stage in (stats.compute_input, stats.compute_infer, stats.compute_output):
        assert stage.count == 4
    assert stats.compute_infer.ns > 0
    assert stats.success.ns >= stats.compute_infer.ns - stats.fail.ns
    assert {size: b.compute_infer.count for size, b in stats.batches.items()} == {
        1: 1,
        3: 2,
        2: 1,
    }
    assert stats.last_inference_ms > 0


def test_lone_request_is_not_held_back() -> None:
    model = FakeModel()

    async def main() -> None:
        batcher = Batcher(model, max_queue_size=10)
        batcher.start()
        await asyncio.wait_for(batcher.submit([np.ones((1, 2), np.float32)], 1, None), 1)
        assert batcher.stats.execution_count == 1

    asyncio.run(main())


def test_full_queue_rejects_at_once_and_expired_requests_never_run() -> None:
    model = FakeModel(max_batch_size=1)
    model.gate = threading.Event()

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(model, max_queue_size=2, executor=pool)
            batcher.start()
            loop = asyncio.get_running_loop()
            first = asyncio.create_task(batcher.submit([np.ones((1, 2), np.float32)], 1, None))
            await loop.run_in_executor(None, model.started.wait, 5)
            expired = asyncio.create_task(
                batcher.submit([np.full((1, 2), 7, np.float32)], 1, loop.time() - 1)
            )
            waiting = asyncio.create_task(batcher.submit([np.full((1, 2), 3, np.float32)], 1, None))
            await asyncio.sleep(0)
            with pytest.raises(OverloadedError):
                await batcher.submit([np.ones((1, 2), np.float32)], 1, None)
            assert model.gate is not None
            model.gate.set()
            await first
            with pytest.raises(DeadlineExceededError):
                await expired
            assert np.array_equal((await waiting)[0], np.full((1, 2), 6, np.float32))
            assert batcher.stats.expired == 1
            assert batcher.stats.rejected == 1

    asyncio.run(main())
    assert model.calls == [1, 1]  # the expired request never reached the model


def test_cancelled_request_leaves_the_queue() -> None:
    model = FakeModel(max_batch_size=1)
    model.gate = threading.Event()

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(model, max_queue_size=4, executor=pool)
            batcher.start()
            loop = asyncio.get_running_loop()
            first = asyncio.create_task(batcher.submit([np.ones((1, 2), np.float32)], 1, None))
            await loop.run_in_executor(None, model.started.wait, 5)
            doomed = asyncio.create_task(batcher.submit([np.ones((1, 2), np.float32)], 1, None))
            await asyncio.sleep(0)
            assert batcher.queue_depth == 1
            doomed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed
            assert batcher.queue_depth == 0
            assert model.gate is not None
            model.gate.set()
            await first
            await batcher.drain()

    asyncio.run(main())
    assert model.calls == [1]


def test_one_failing_request_does_not_fail_its_batch() -> None:
    model = FakeModel(max_batch_size=8, inline=True)

    async def main() -> list[Any]:
        batcher = Batcher(model, max_queue_size=10, max_queue_delay_us=50_000)
        batcher.start()
        calls = [batcher.submit([np.full((1, 2), v, np.float32)], 1, None) for v in (1, -1, 2)]
        return await asyncio.gather(*calls, return_exceptions=True)

    good1, bad, good2 = asyncio.run(main())
    assert isinstance(bad, ModelExecutionError)
    assert np.array_equal(good1[0], np.full((1, 2), 2, np.float32))
    assert np.array_equal(good2[0], np.full((1, 2), 4, np.float32))
    assert model.calls[0] == 3  # tried together first, then one by one


def test_incompatible_shapes_go_in_separate_batches() -> None:
    model = FakeModel(max_batch_size=8, inline=True)

    async def main() -> None:
        batcher = Batcher(model, max_queue_size=10)
        batcher.start()
        a = batcher.submit([np.ones((2, 2), np.float32)], 2, None)
        b = batcher.submit([np.ones((1, 3), np.float32)], 1, None)
        out_a, out_b = await asyncio.gather(a, b)
        assert out_a[0].shape == (2, 2)
        assert out_b[0].shape == (1, 3)

    asyncio.run(main())
    assert sorted(model.calls) == [1, 2]


def test_queue_delay_waits_for_company() -> None:
    model = FakeModel(max_batch_size=8, inline=True)

    async def main() -> None:
        # A delay far longer than the test: the batch goes when it reaches its target of 4
        # rows, never by the timer, however slowly a loaded machine runs the loop.
        batcher = Batcher(
            model, max_queue_size=10, max_queue_delay_us=30_000_000, preferred_batch_sizes=(4,)
        )
        batcher.start()
        first = asyncio.create_task(batcher.submit([np.ones((1, 2), np.float32)], 1, None))
        await asyncio.sleep(0.005)
        assert not model.calls  # still waiting for company
        rest = [batcher.submit([np.ones((1, 2), np.float32)], 1, None) for _ in range(3)]
        await asyncio.gather(first, *rest)

    asyncio.run(main())
    assert model.calls == [4]


async def _until(condition: Callable[[], bool]) -> None:
    """Polled: a loaded machine may need more than one tick of the loop (up to 5 s, half
    of what FakeModel's gate holds a call)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)
    assert condition()


@pytest.mark.parametrize(
    ("fill", "first", "target"),
    [
        (4, 6, 4),  # the fill size, when the running batch is larger
        (8, 5, 5),  # the running batch's size, when smaller
        (8, 3, 4),  # but never less than half the fill size
        (4, 1, 2),
    ],
)
def test_under_load_a_free_instance_waits_for_a_full_batch_but_a_lone_request_does_not(
    fill: int, first: int, target: int
) -> None:
    """With a batch of ``first`` rows running, the free second instance waits while fewer
    than ``target`` rows are queued: the fill size, or the running batch's size if smaller,
    but at least half the fill size."""
    model = FakeModel(max_batch_size=8)
    model.fill_batch_size = fill  # type: ignore[attr-defined]  # what warm-up measures
    model.gate = threading.Event()
    waits = target - 1

    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            batcher = Batcher(model, max_queue_size=100, executor=pool, instances=2)
            batcher.start()
            assert batcher.fill_rows == fill
            loop = asyncio.get_running_loop()

            def one(rows: int = 1) -> asyncio.Task[list[Array]]:
                x = np.ones((rows, 2), np.float32)
                return asyncio.create_task(batcher.submit([x], rows, None))

            lone = one(first)  # an idle model: runs at once, alone
            await loop.run_in_executor(None, model.started.wait, 5)
            waiting = [one() for _ in range(waits)]
            await asyncio.sleep(0.01)
            assert batcher.queue_depth == waits  # short of the target: the instance waits
            waiting += [one() for _ in range(target - waits)]
            # The second instance takes the target's rows.
            await _until(lambda: len(model.calls) == 2 and not batcher.queue_depth)
            late = one()  # both instances busy: it queues
            await asyncio.sleep(0.01)
            assert batcher.queue_depth == 1
            assert model.gate is not None
            model.gate.set()
            await asyncio.gather(lone, *waiting, late)
            # The running batches finished with nothing queued: the next lone one runs alone.
            await one()

    asyncio.run(main())
    assert model.calls == [first, target, 1, 1]
