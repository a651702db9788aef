"""The rollout controller's evaluation loop (gateway.rollout.loop) on a real event loop:
it evaluates on the tick, at once on ``wake()``, within a poll of news while a rollout is
watched, and does not poll at all while none is."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.rollout.loop import WAKE_POLL_S, ActivityWatch, EvaluationLoop

LONG_TICK_S = 30.0  # never reached in these tests: what they see comes from wakes or news


class _Counts:
    """What the loop asked: news checks and evaluations (the latter from its worker)."""

    def __init__(self) -> None:
        self.news = False
        self.polls = 0
        self._evaluated = 0
        self._lock = threading.Lock()

    def has_news(self) -> bool:
        self.polls += 1
        return self.news

    def evaluate(self) -> None:
        with self._lock:
            self._evaluated += 1

    @property
    def evaluated(self) -> int:
        with self._lock:
            return self._evaluated


@contextlib.asynccontextmanager
async def _running(counts: _Counts, watching: Callable[[], bool]) -> AsyncIterator[EvaluationLoop]:
    """A started loop over ``counts`` with a tick never reached; stopped on exit."""
    loop = EvaluationLoop(counts.evaluate, lambda: LONG_TICK_S, counts.has_news, watching)
    loop.start()
    try:
        yield loop
    finally:
        await loop.stop()


async def _until(check: Callable[[], bool], timeout_s: float = 5.0) -> float:
    """Seconds until ``check()`` holds; fails the test after ``timeout_s``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"not within {timeout_s} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def test_with_no_rollout_to_watch_it_does_not_poll_and_a_wake_still_evaluates() -> None:
    asyncio.run(_no_rollout())


async def _no_rollout() -> None:
    counts = _Counts()
    async with _running(counts, lambda: False) as loop:
        await asyncio.sleep(10 * WAKE_POLL_S)
        assert counts.polls == 1  # the starting count; polling would have made it ~10
        assert counts.evaluated == 0
        loop.wake()
        assert await _until(lambda: counts.evaluated == 1) < 2.0
        await asyncio.sleep(4 * WAKE_POLL_S)
        assert counts.polls == 1
        started = time.monotonic()
        await loop.stop()
        assert time.monotonic() - started < 2.0  # not at the tick
        assert not loop.is_running


def test_while_watching_news_is_evaluated_within_a_poll_not_at_the_tick() -> None:
    asyncio.run(_watching())


async def _watching() -> None:
    counts = _Counts()
    async with _running(counts, lambda: True):
        await asyncio.sleep(4 * WAKE_POLL_S)
        assert counts.evaluated == 0
        assert counts.polls > 1
        counts.news = True
        assert await _until(lambda: counts.evaluated >= 1) < 2.0


def test_polling_starts_once_a_rollout_is_there_to_watch() -> None:
    asyncio.run(_rollout_arrives())


async def _rollout_arrives() -> None:
    counts = _Counts()
    rollouts: list[object] = []
    async with _running(counts, lambda: bool(rollouts)) as loop:
        await asyncio.sleep(4 * WAKE_POLL_S)
        assert counts.polls == 1
        rollouts.append("a rollout")
        loop.wake()  # what starting a rollout does
        await _until(lambda: counts.evaluated == 1)
        counts.news = True
        assert await _until(lambda: counts.evaluated >= 2) < 2.0


def test_a_broken_watching_check_is_logged_and_the_loop_polls(
    caplog: pytest.LogCaptureFixture,
) -> None:
    asyncio.run(_broken_watching())
    assert "rollout activity check failed" in caplog.text


async def _broken_watching() -> None:
    counts = _Counts()

    def broken() -> bool:
        raise RuntimeError("boom")

    async with _running(counts, broken):
        counts.news = True
        assert await _until(lambda: counts.evaluated >= 1) < 2.0


def test_activity_watch_watches_only_while_rollouts_exist() -> None:
    states: list[object] = []
    watch = ActivityWatch(lambda state: 0, lambda: states)  # type: ignore[arg-type,return-value]
    assert not watch.watching()
    states.append(object())
    assert watch.watching()
