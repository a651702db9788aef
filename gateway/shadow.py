"""shadow.py: mirrors sampled requests to shadow versions and compares their answers.

A mirror call is fire-and-forget: it starts after the primary answer is ready, never
delays or fails the primary, and is bounded (at most ``max_in_flight`` mirror calls at
once; beyond that, and when the shadow's own queue is full, the copy is dropped and
counted). Errors are counted, never surfaced. Comparison per row: for a classifier output
(integer labels, or a 2-D score matrix) the share of rows that agree (argmax), for a
regressor the mean absolute and relative difference.
"""

from __future__ import annotations

import asyncio
import logging
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
    """Owns the in-flight mirror tasks; ``stop()`` cancels the ones still running."""

    def __init__(self, max_in_flight: int = 32) -> None:
        self._max = max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()

    def mirror(
        self,
        call: Callable[[], Awaitable[InferResponse]],
        primary: InferResponse,
        stats: ShadowStats,
    ) -> None:
        """Start ``call`` (the shadow's inference) in the background, or drop it."""
        if len(self._tasks) >= self._max:
            stats.dropped += 1
            return
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
