"""batcher.py: dynamic batching for one model version: queue -> batch -> model call.

Requests whose non-batch dimensions match are concatenated along axis 0, run as one model
call, and the outputs are split back to each caller. Scheduling is work-conserving by
default: a request on an idle model runs on the next loop iteration (an inline model's in
the caller's own call), and while a call is running new requests queue up and leave
together as the next batch, which under load waits until it holds the model's fill size
(``fill_batch_size``, measured at warm-up; for a second instance, as many rows as the
smallest running batch if fewer, but at least half the fill size) or nothing is running.
Optionally
(``max_queue_delay_us``) a batch may wait for company, Triton style.

Contract: a batch holds at least one request and at most ``max_batch_size`` rows; a queue
holds at most ``max_queue_size`` requests (more get ``OverloadedError`` at once); a request
past its deadline or whose caller went away never reaches the model; a queued request with
a deadline is answered ``DeadlineExceededError`` when the deadline passes (a loop timer per
such request), not when the next batch forms; ``drain()`` runs what is queued at once,
without waiting for company; a failing batch is retried request by request so that one bad
request fails alone.

It knows nothing of HTTP, gRPC or V2 encoding: it sees the model as a ``Runnable``.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from gateway.errors import (
    DeadlineExceededError,
    GatewayError,
    InternalError,
    ModelNotReadyError,
    OverloadedError,
)
from gateway.types import ModelRef, ModelStats, Observer

__all__ = ["Runnable", "Batcher", "merge", "split"]

logger = logging.getLogger(__name__)

Array = npt.NDArray[Any]
_NS_PER_S: Final = 1_000_000_000


class Runnable(Protocol):
    """The model as the batcher needs it."""

    ref: ModelRef
    max_batch_size: int
    is_inline: bool
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: list[Array]) -> list[Array]: ...


def merge(items: list[list[Array]]) -> list[Array]:
    """Concatenate each input of several requests along the batch axis (axis 0)."""
    if len(items) == 1:
        return items[0]
    return [np.concatenate(parts, axis=0) for parts in zip(*items, strict=True)]


def split(outputs: list[Array], rows: list[int]) -> list[list[Array]]:
    """Cut each output back into per-request slices (views), in request order."""
    if len(rows) == 1:
        return [outputs]
    total = sum(rows)
    for out in outputs:
        if out.shape[:1] != (total,):
            raise InternalError(
                f"model returned {out.shape[0] if out.ndim else 0} rows for a batch of {total}"
            )
    result: list[list[Array]] = []
    start = 0
    for n in rows:
        result.append([out[start : start + n] for out in outputs])
        start += n
    return result


class _Item:
    __slots__ = ("deadline", "enqueued_ns", "feeds", "future", "key", "rows", "timer")

    def __init__(
        self,
        feeds: list[Array],
        rows: int,
        key: tuple[tuple[int, ...], ...] | None,
        future: asyncio.Future[list[Array]],
        deadline: float | None,
        enqueued_ns: int,
    ) -> None:
        self.feeds = feeds
        self.rows = rows
        self.key = key
        self.future = future
        self.deadline = deadline
        self.enqueued_ns = enqueued_ns
        self.timer: asyncio.TimerHandle | None = None


class _Outcome:
    """What a worker hands back for one batch: per-item results or errors, and timings."""

    __slots__ = ("infer_ns", "input_ns", "output_ns", "results")

    def __init__(self) -> None:
        self.results: list[list[Array] | BaseException] = []
        self.input_ns = 0
        self.infer_ns = 0
        self.output_ns = 0


class Batcher:
    """Queue and scheduler for one model version; create and ``start`` on the event loop."""

    def __init__(
        self,
        model: Runnable,
        *,
        max_queue_size: int,
        instances: int = 1,
        max_queue_delay_us: int = 0,
        preferred_batch_sizes: tuple[int, ...] = (),
        batching: bool = True,
        executor: Executor | None = None,
        observer: Observer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.ref = model.ref
        self.stats = ModelStats()
        self._max_rows = max(model.max_batch_size, 1)
        self._batching = batching and model.max_batch_size > 0
        self._max_queue = max_queue_size
        self._instances = instances
        self._delay_ns = max_queue_delay_us * 1000
        self._target_rows = max(preferred_batch_sizes, default=self._max_rows)
        self.fill_rows = min(int(getattr(model, "fill_batch_size", 0) or 0), self._max_rows)
        """Under load, a batch waits for this many rows (0: off); see ``_should_fill``."""
        self._executor = executor
        self._observer = observer
        self._clock = clock
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_rows = 0
        self._running = 0
        self._running_rows: list[int] = []
        """The rows of each batch running in the executor (at most ``instances``)."""
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: asyncio.Event | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def is_accepting(self) -> bool:
        return not self._closing

    def run_now(self, feeds: list[Array], rows: int, deadline: float | None) -> list[Array] | None:
        """One request's outputs computed in the caller's own call, when the model may run
        it at once: a started, accepting batcher of an inline model with nothing queued or
        running and no queue delay configured (which asks requests to wait for company);
        None when it must be queued with ``submit`` instead.

        No company could join before the next loop iteration that a queued request would
        wait for, so no batch is lost; the future, the queue entry and the suspension are
        saved. Raises what ``submit`` would: ``DeadlineExceededError`` for a deadline
        already passed, the model's error when its call fails.
        """
        idle = self._idle
        if (
            self._queue
            or self._running
            or self._delay_ns
            or self._closing
            or idle is None
            or not self.model.is_inline
        ):
            return None
        if deadline is not None and deadline <= self._clock():
            self.stats.expired += 1
            raise self._deadline_error()
        self._running += 1
        start = time.perf_counter_ns()
        try:
            outputs = self.model.run(feeds)
        except Exception as exc:
            infer_ns = time.perf_counter_ns() - start
            self._running -= 1
            self._account_alone(rows, infer_ns, infer_ns, False)
            idle.set()  # nothing was queued or running, and nothing could start meanwhile
            raise self._failure(exc) from exc
        infer_ns = time.perf_counter_ns() - start
        if self._observer is not None:
            self._observe(feeds, outputs)
        self._running -= 1
        self._account_alone(rows, infer_ns, time.perf_counter_ns() - start, True)
        idle.set()
        return outputs

    async def submit(self, feeds: list[Array], rows: int, deadline: float | None) -> list[Array]:
        """Queue one request's feeds; return its outputs (all of the model's, in order).

        Raises ``OverloadedError`` at once when the queue is full, ``ModelNotReadyError``
        while draining, ``DeadlineExceededError`` when ``deadline`` (monotonic seconds)
        passes before the batch runs, and the model's error when its own call fails.
        """
        loop = self._loop
        if loop is None or self._idle is None:
            raise ModelNotReadyError(f"model '{self.ref}' is not started")
        if self._closing:
            raise ModelNotReadyError(
                f"model '{self.ref.name}' version {self.ref.version} is unloading"
            )
        if len(self._queue) >= self._max_queue:
            self.stats.rejected += 1
            raise OverloadedError(
                f"model '{self.ref.name}' version {self.ref.version} has {len(self._queue)} "
                "requests queued (max_queue_size); retry later"
            )
        outputs = self.run_now(feeds, rows, deadline)  # an idle inline model: at once
        if outputs is not None:
            return outputs
        future: asyncio.Future[list[Array]] = loop.create_future()
        key = tuple(f.shape[1:] for f in feeds) if self._batching else None
        item = _Item(feeds, rows, key, future, deadline, time.perf_counter_ns())
        self._queue.append(item)
        self._queued_rows += rows
        self._idle.clear()
        if deadline is not None:
            item.timer = loop.call_later(max(deadline - self._clock(), 0.0), self._expire, item)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._dispatch)
        try:
            return await future
        except asyncio.CancelledError:
            # The caller went away (gRPC cancel, client disconnect): leave the queue now.
            if item.timer is not None:
                item.timer.cancel()
            try:
                self._queue.remove(item)
                self._queued_rows -= item.rows
                self.stats.cancelled += 1
                self._check_idle()
            except ValueError:
                pass
            raise

    def hurry(self) -> None:
        """Shutdown begins: from now on no batch waits for company (``max_queue_delay_us``),
        so requests queued for company run at once, while new ones are still accepted."""
        self._delay_ns = 0
        if self._queue and not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._dispatch)

    async def drain(self) -> None:
        """Stop accepting requests, run what is queued without waiting for company, and
        wait until queued and running requests finish."""
        self._closing = True
        self.hurry()
        if self._idle is not None:
            await self._idle.wait()

    # -- scheduling (event-loop thread) ------------------------------------------------

    def _expire(self, item: _Item) -> None:
        """A queued request's deadline passed: answer it now and drop it from the queue.
        Runs only while it is queued (the timer is cancelled when it leaves the queue)."""
        item.timer = None
        try:
            self._queue.remove(item)
        except ValueError:  # already taken into a batch
            return
        self._queued_rows -= item.rows
        if not item.future.done():
            self.stats.expired += 1
            item.future.set_exception(self._deadline_error())
        self._check_idle()

    def _deadline_error(self) -> DeadlineExceededError:
        return DeadlineExceededError(
            f"request to model '{self.ref.name}' version {self.ref.version} "
            "timed out in the queue before it could run"
        )

    def _check_idle(self) -> None:
        if not self._queue and self._running == 0 and self._idle is not None:
            self._idle.set()

    def _dispatch(self) -> None:
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue and self._running < self._instances:
            if self._delay_ns and self._should_wait():
                break
            if self._running and self.fill_rows and self._should_fill():
                break
            batch, rows = self._take()
            if not batch:
                continue
            self._running += 1
            if self.model.is_inline or self._executor is None:
                outcome = self._execute(batch)
                self._finish(batch, rows, outcome)
            else:
                assert self._loop is not None
                fut = self._loop.run_in_executor(self._executor, self._execute, batch)
                self._running_rows.append(rows)
                fut.add_done_callback(functools.partial(self._finish_future, batch, rows))
        self._check_idle()

    def _should_fill(self) -> bool:
        """With a batch running and an instance free: wait (for a batch to finish, or for
        more rows) while the queue is short of the fill size, or, when the smallest running
        batch is smaller, short of that batch's size but never of half the fill size. Under
        load the instances then take turns with batches of about (rows in flight /
        instances) where waiting for the full fill size would leave the free instance idle
        (fewer rows in flight than a running batch plus the fill size), and the free
        instance does not start batches too small to pay for themselves. The finishing
        batch dispatches again, so nothing waits longer than one model call, and a lone
        request on an idle model runs at once."""
        target = self.fill_rows
        running = self._running_rows
        if running:
            target = min(target, max(min(running), target // 2))
        return self._queued_rows < target and self._batching and not self._closing

    def _should_wait(self) -> bool:
        """With a queue delay: wait while the batch is short of its target and young."""
        if self._queued_rows >= self._target_rows or self._closing:
            return False
        waited = time.perf_counter_ns() - self._queue[0].enqueued_ns
        if waited >= self._delay_ns:
            return False
        if self._timer is None and self._loop is not None:
            self._timer = self._loop.call_later(
                (self._delay_ns - waited) / _NS_PER_S, self._dispatch
            )
        return True

    def _take(self) -> tuple[list[_Item], int]:
        """Pop the next batch, a run of compatible requests from the head of the queue, and
        its rows."""
        queue = self._queue
        now = self._clock()
        batch: list[_Item] = []
        rows = 0
        key = None
        while queue:
            item = queue[0]
            if item.future.done():  # cancelled by its caller
                queue.popleft()
                self._queued_rows -= item.rows
                if item.timer is not None:
                    item.timer.cancel()
                continue
            if item.deadline is not None and item.deadline <= now:
                queue.popleft()
                self._queued_rows -= item.rows
                if item.timer is not None:
                    item.timer.cancel()
                self.stats.expired += 1
                item.future.set_exception(self._deadline_error())
                continue
            if batch and (item.key != key or rows + item.rows > self._max_rows):
                break
            if item.timer is not None:
                item.timer.cancel()
                item.timer = None
            queue.popleft()
            self._queued_rows -= item.rows
            batch.append(item)
            rows += item.rows
            key = item.key
            if not self._batching:
                break
        return batch, rows

    # -- execution (worker thread, or the loop thread for inline models) ------------------

    def _execute(self, batch: list[_Item]) -> _Outcome:
        outcome = _Outcome()
        model = self.model
        t0 = time.perf_counter_ns()
        try:
            feeds = merge([item.feeds for item in batch])
            t1 = time.perf_counter_ns()
            outcome.input_ns = t1 - t0
            outputs = self._call(feeds, outcome)
            t2 = time.perf_counter_ns()
            outcome.results = list(split(outputs, [item.rows for item in batch]))
            outcome.output_ns = time.perf_counter_ns() - t2
        except Exception as exc:
            if len(batch) == 1:
                outcome.results = [exc]
                return outcome
            # Isolate the failure: run each request alone so only the bad ones fail.
            logger.warning(
                "batch of %d for %s failed (%s); retrying one by one", len(batch), self.ref, exc
            )
            outcome.results = []
            for item in batch:
                try:
                    outcome.results.append(model.run(item.feeds))
                except Exception as single:
                    outcome.results.append(single)
            outcome.infer_ns = time.perf_counter_ns() - t0
        return outcome

    def _call(self, feeds: list[Array], outcome: _Outcome) -> list[Array]:
        """One model call on merged feeds: its time into ``outcome.infer_ns``, then the
        observer (drift statistics) sees the feeds and outputs; the model's error raises."""
        t0 = time.perf_counter_ns()
        try:
            outputs = self.model.run(feeds)
        finally:
            outcome.infer_ns = time.perf_counter_ns() - t0
        if self._observer is not None:
            self._observe(feeds, outputs)
        return outputs

    def _observe(self, feeds: list[Array], outputs: list[Array]) -> None:
        """The observer (drift statistics) sees one model call's feeds and outputs."""
        observer = self._observer
        if observer is None:
            return
        try:
            observer(feeds, outputs)
        except Exception:  # an observer must never fail a request
            logger.exception("observer failed for %s", self.ref)

    def _finish_future(self, batch: list[_Item], rows: int, fut: asyncio.Future[_Outcome]) -> None:
        try:
            outcome = fut.result()
        except BaseException as exc:  # the pool was shut down under us
            outcome = _Outcome()
            outcome.results = [exc] * len(batch)
        self._running_rows.remove(rows)
        self._finish(batch, rows, outcome)
        self._dispatch()

    def _finish(self, batch: list[_Item], rows: int, outcome: _Outcome) -> None:
        self._running -= 1
        end = time.perf_counter_ns()
        busy_ns = self._account_batch(rows, len(batch), outcome)
        for item, result in zip(batch, outcome.results, strict=True):
            self._account_request(end - item.enqueued_ns, busy_ns, item.rows, result)
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(self._failure(result))
            else:
                item.future.set_result(result)
        self._check_idle()

    def _failure(self, exc: BaseException) -> BaseException:
        """What a caller gets for a failed model call: the gateway's own errors as they are,
        anything else as an internal error naming the model."""
        if isinstance(exc, GatewayError):
            return exc
        return InternalError(f"model '{self.ref}' failed: {exc}")

    def _account_batch(self, rows: int, requests: int, outcome: _Outcome) -> int:
        """The statistics of one model call of ``rows`` rows for ``requests`` requests;
        returns its busy time (ns)."""
        stats = self.stats
        stats.execution_count += 1
        stats.last_inference_ms = time.time_ns() // 1_000_000
        stats.compute_input.add(outcome.input_ns, requests)
        stats.compute_infer.add(outcome.infer_ns, requests)
        stats.compute_output.add(outcome.output_ns, requests)
        per_batch = stats.batch(rows)
        per_batch.compute_input.add(outcome.input_ns)
        per_batch.compute_infer.add(outcome.infer_ns)
        per_batch.compute_output.add(outcome.output_ns)
        return outcome.input_ns + outcome.infer_ns + outcome.output_ns

    def _account_alone(self, rows: int, infer_ns: int, total_ns: int, ok: bool) -> None:
        """``_account_batch`` and ``_account_request`` for a request run alone in its
        caller's call (``run_now``), written out: no input merge or output split, so those
        stages count the call with no time."""
        stats = self.stats
        stats.execution_count += 1
        stats.last_inference_ms = time.time_ns() // 1_000_000
        stats.compute_input.count += 1
        stats.compute_output.count += 1
        infer = stats.compute_infer
        infer.count += 1
        infer.ns += infer_ns
        per_batch = stats.batches.get(rows) or stats.batch(rows)
        per_batch.compute_input.count += 1
        per_batch.compute_output.count += 1
        infer = per_batch.compute_infer
        infer.count += 1
        infer.ns += infer_ns
        queue = stats.queue
        queue.count += 1
        queue.ns += max(total_ns - infer_ns, 0)
        if ok:
            done = stats.success
            stats.inference_count += rows
        else:
            done = stats.fail
        done.count += 1
        done.ns += total_ns

    def _account_request(self, total_ns: int, busy_ns: int, rows: int, result: object) -> None:
        """The statistics of one request: ``total_ns`` from arrival to answer, ``result``
        its outputs or the exception it failed with (None: failed)."""
        stats = self.stats
        stats.queue.add(max(total_ns - busy_ns, 0))
        if result is None or isinstance(result, BaseException):
            stats.fail.add(total_ns)
        else:
            stats.success.add(total_ns)
            stats.inference_count += rows
