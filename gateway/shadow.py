"""shadow.py: mirrors sampled requests to shadow versions and compares their answers.

A mirror call is fire-and-forget: it starts after the primary answer is ready, never
delays or fails the primary, and is bounded twice: at most ``max_in_flight`` mirror calls
at once, and a CPU budget (a token bucket of seconds refilled at ``cpu_share`` of wall time,
shared by every shadow; the caller charges each call the time it ran). Beyond either, and
when the shadow's own queue is full, the copy is dropped and counted (``over_budget``
counts the budget's share of the drops). Errors are counted, never surfaced. Comparison
per row: for a classifier output (integer labels, or a 2-D score matrix) the share of rows
that agree (argmax), for a regressor the mean absolute and relative difference.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from gateway.errors import GatewayError, OverloadedError
from gateway.traffic import ShadowStats
from gateway.types import InferResponse

__all__ = ["ShadowRunner", "compare_outputs"]

logger = logging.getLogger(__name__)

Array = npt.NDArray[Any]
_REL_EPS: Final = 1e-12
_BURST_S: Final = 1.0  # the bucket holds at most this many wall seconds' worth of budget


def compare_outputs(primary: Array, shadow: Array, stats: ShadowStats) -> None:
    """Fold one pair of answers (same rows) into ``stats``."""
    if primary.shape != shadow.shape or primary.ndim == 0:
        stats.errors += 1
        return
    rows = primary.shape[0]
    if primary.dtype.kind in "iub" or primary.dtype.kind in "OSU":
        agree = primary.reshape(rows, -1) == shadow.reshape(rows, -1)
        stats.compared_rows += rows
        stats.agreed_rows += int(agree.all(axis=1).sum())
        return
    if primary.ndim == 2 and primary.shape[1] > 1:
        stats.compared_rows += rows
        stats.agreed_rows += int((primary.argmax(axis=1) == shadow.argmax(axis=1)).sum())
    diff = np.abs(primary.astype(np.float64) - shadow.astype(np.float64)).reshape(rows, -1)
    scale = np.abs(primary.astype(np.float64)).reshape(rows, -1) + _REL_EPS
    stats.abs_diff_sum += float(diff.mean(axis=1).sum())
    stats.rel_diff_sum += float((diff / scale).mean(axis=1).sum())
    stats.diff_rows += rows


class ShadowRunner:
    """Owns the in-flight mirror tasks; ``stop()`` cancels the ones still running.

    ``cpu_share`` (0..1; 0 or less: no CPU budget) is the share of one core's time that
    mirror calls may use on average; a call is admitted while the bucket is not empty and
    the time it ran (``charge``) is taken out afterwards, so one expensive call may
    overdraw the bucket and the copies after it wait until the refill has paid it back.
    """

    def __init__(
        self,
        max_in_flight: int = 32,
        cpu_share: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max = max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()
        self._share = cpu_share
        self._clock = clock
        self._capacity = max(cpu_share, 0.0) * _BURST_S
        self._tokens = self._capacity
        self._refilled = clock()
        self.spent_s = 0.0
        """Seconds charged to mirror calls so far (the time each ran)."""

    def _admit(self) -> bool:
        if self._share <= 0:
            return True
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._refilled) * self._share)
        self._refilled = now
        return self._tokens > 0

    def charge(self, seconds: float) -> None:
        """Take the time one mirror call ran out of the budget."""
        self.spent_s += seconds
        if self._share > 0:
            self._tokens -= seconds

    def admits(self, stats: ShadowStats) -> bool:
        """Whether a copy may start now (in flight and budget); a refused copy is counted
        as dropped here, so a caller asks before it builds the call."""
        if len(self._tasks) >= self._max:
            stats.dropped += 1
            return False
        if not self._admit():
            stats.dropped += 1
            stats.over_budget += 1
            return False
        return True

    def start(
        self,
        call: Callable[[], Awaitable[InferResponse]],
        primary: InferResponse,
        stats: ShadowStats,
    ) -> None:
        """Start an admitted ``call`` in the background (``admits`` said yes just before)."""
        stats.sent += 1
        task = asyncio.get_running_loop().create_task(self._run(call, primary, stats))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self,
        call: Callable[[], Awaitable[InferResponse]],
        primary: InferResponse,
        stats: ShadowStats,
    ) -> None:
        try:
            answer = await call()
        except OverloadedError:
            stats.sent -= 1
            stats.dropped += 1
            return
        except GatewayError:
            stats.errors += 1
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("shadow call failed")
            stats.errors += 1
            return
        if answer.outputs and primary.outputs:
            compare_outputs(primary.outputs[0].data, answer.outputs[0].data, stats)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
