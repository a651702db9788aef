"""rollout/loop.py: the rollout controller's background loop: evaluate on a tick, or sooner
when something happened.

In: ``evaluate`` (one pass over every active rollout; runs in the loop's own worker thread,
since a decision writes to the store and calls the router), ``interval_s`` (the tick, read
before each wait), ``has_news`` (a cheap check, on the event loop, that new data arrived:
a candidate's new failed or slow requests) and ``watching`` (whether any rollout is there for
``has_news`` to watch: with none, the loop sleeps to the tick instead of polling). Out: calls
to ``evaluate``. ``wake()`` (any thread) asks for an evaluation now: a new rollout is
evaluated at once, not after a tick.
Knows nothing of the store or the router (``ActivityWatch`` reads only rollout states).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final

from gateway.rollout.policy import RolloutState

__all__ = ["EvaluationLoop", "ActivityWatch", "WAKE_POLL_S"]

logger = logging.getLogger(__name__)

WAKE_POLL_S: Final = 0.05
"""How often ``has_news`` is polled between ticks while a rollout is watched: new failures
are judged within ~50 ms. The check is a counter read, but each poll is a timed wait on the
event loop (about 80 µs of CPU where the loop would otherwise sleep), so a gateway with no
rollout does not poll (idle, in-process, bundled models: 10-13 ms of CPU per second with
the polls, 4-6 without)."""
_STOP_TIMEOUT_S: Final = 10.0  # one evaluation takes milliseconds; longer means it is stuck


class EvaluationLoop:
    """Runs ``evaluate`` every ``interval_s()``, or as soon as ``wake()`` is called or
    ``has_news()`` turns true. ``start`` on the running loop; ``stop`` waits for the
    evaluation in progress."""

    def __init__(
        self,
        evaluate: Callable[[], object],
        interval_s: Callable[[], float],
        has_news: Callable[[], bool] | None = None,
        watching: Callable[[], bool] | None = None,
    ) -> None:
        self._evaluate = evaluate
        self._interval_s = interval_s
        self._has_news = has_news or (lambda: False)
        self._watching = watching or (lambda: has_news is not None)
        self._executor: ThreadPoolExecutor | None = None
        self._stopping: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def is_running(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        if self._task is not None:
            return
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="rollout")
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="rollout")
        self._task.add_done_callback(_done)

    def wake(self) -> None:
        """Evaluate soon instead of at the next tick; from any thread; a no-op when stopped."""
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            wake.set()
        else:
            loop.call_soon_threadsafe(wake.set)

    @staticmethod
    def _check(check: Callable[[], bool], if_broken: bool) -> bool:
        """``check()``, or ``if_broken`` when it raises: a broken check must not stop the
        loop (the tick still runs)."""
        try:
            return check()
        except Exception:
            logger.exception("rollout activity check failed")
            return if_broken

    def _news(self) -> bool:
        return self._check(self._has_news, False)

    def _poll_s(self, left: float) -> float:
        """How long the next wait lasts: to the tick, or ``WAKE_POLL_S`` while watching (or
        when that cannot be told)."""
        return min(WAKE_POLL_S, left) if self._check(self._watching, True) else left

    async def _run(self) -> None:
        assert self._stopping is not None
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        stopping, wake = self._stopping, self._wake
        self._news()  # the starting counts
        while True:
            deadline = loop.time() + self._interval_s()
            while not stopping.is_set() and not wake.is_set():
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(wake.wait(), self._poll_s(left))
                except TimeoutError:
                    if self._news():
                        break
            if stopping.is_set():
                return
            wake.clear()
            await loop.run_in_executor(self._executor, self._evaluate)

    async def stop(self) -> None:
        """Stop after the evaluation in progress, if any."""
        task, self._task = self._task, None
        if task is None:
            return
        assert self._stopping is not None
        self._stopping.set()
        if self._wake is not None:
            self._wake.set()  # the loop may be waiting for the tick, not polling
        try:
            await asyncio.wait_for(task, _STOP_TIMEOUT_S)
        except TimeoutError:
            logger.error("rollout loop did not stop within %.0f s", _STOP_TIMEOUT_S)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        self._loop = self._wake = None


class ActivityWatch:
    """``has_news`` over rollouts: true when some rollout's ``activity`` count (its
    candidate's failed and slow requests) grew since the previous call. A rollout seen for the first
    time is not news (a new rollout is woken for by its start)."""

    def __init__(
        self,
        activity: Callable[[RolloutState], int],
        rollouts: Callable[[], list[RolloutState]],
    ) -> None:
        self._activity = activity
        self._rollouts = rollouts
        self._seen: dict[str, int] = {}

    def watching(self) -> bool:
        """Whether any rollout is there to watch (the loop polls only then)."""
        return bool(self._rollouts())

    def __call__(self) -> bool:
        news = False
        for state in self._rollouts():
            key = state.rollout_id or state.model
            count = self._activity(state)
            if count != self._seen.get(key):
                news = news or key in self._seen
                self._seen[key] = count
        return news


def _done(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("rollout loop crashed", exc_info=task.exception())
