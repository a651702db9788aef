"""history.py: the last hour of the dashboard's figures, kept by the server.

In: a ``metrics.Snapshot`` source (the telemetry), sampled every ``interval_s`` by ``run()``
on the event loop. Out: ``json()``, the samples oldest first, each ``{"t", "variants":
[{model, version, requests, errors, weight, buckets: [["le", cumulative]], accuracy, mae,
outcome_samples}], "drift": [{model, version, top: [[feature, psi]]}]}``, so a dashboard
that reloads (or opens later) draws the last hour at once instead of starting empty. The
ring holds ``span_s / interval_s`` samples (360 by default: some 100 KiB per model version).
The figures are those of ``/metrics``, which the admin listener already serves without a
token.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import Any, Final

import msgspec

from gateway.metrics import Snapshot, export_buckets

__all__ = ["MetricsHistory"]

logger = logging.getLogger(__name__)

TOP_FEATURES: Final = 8  # drift features kept per version and sample (the page plots 5)
_encode = msgspec.json.Encoder().encode


class MetricsHistory:
    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        interval_s: float = 10.0,
        span_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not interval_s > 0 or not span_s >= interval_s:
            raise ValueError("history: interval_s must be > 0 and span_s >= interval_s")
        self.interval_s = interval_s
        self._snapshot = snapshot
        self._clock = clock
        self._samples: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=max(1, int(span_s / interval_s))
        )

    def sample(self) -> None:
        s = self._snapshot()
        outcomes = {(o.model, o.version): o for o in s.outcomes}
        variants = []
        for v in s.variants:
            o = outcomes.get((v.model, v.version))
            variants.append(
                {
                    "model": v.model,
                    "version": v.version,
                    "requests": v.requests,
                    "errors": v.errors,
                    "weight": v.weight,
                    "buckets": [
                        [le, n] for le, n in export_buckets(v.latency_bucket_ms, v.latency_counts)
                    ],
                    "accuracy": o.accuracy if o else None,
                    "mae": o.mae if o else None,
                    "outcome_samples": o.samples if o else 0,
                }
            )
        drift = [
            {
                "model": d.model,
                "version": d.version,
                "top": [[name, psi] for name, psi, _ in list(d.top)[:TOP_FEATURES]],
            }
            for d in s.drift
        ]
        self._samples.append({"t": self._clock(), "variants": variants, "drift": drift})

    def json(self) -> bytes:
        return _encode({"interval_s": self.interval_s, "samples": list(self._samples)})

    async def run(self) -> None:
        """Sample now and every ``interval_s`` until cancelled; a failed sample is logged."""
        while True:
            try:
                self.sample()
            except Exception:
                logger.exception("dashboard history sample failed")
            await asyncio.sleep(self.interval_s)
