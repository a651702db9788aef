"""The dashboard's server-side history: bounded to its span, JSON the page can seed from."""

from __future__ import annotations

import asyncio
import json

from gateway.history import MetricsHistory
from gateway.metrics import DriftSample, OutcomeSample, Snapshot, VariantSample
from gateway.traffic import LATENCY_BUCKETS_MS


def _snapshot() -> Snapshot:
    counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    counts[5] = 7
    return Snapshot(
        variants=[VariantSample("m", "1", 7, 1, LATENCY_BUCKETS_MS, counts, 3.0, 0.9)],
        drift=[DriftSample("m", "1", 500, "drift", 1, 0.4, [("f0", 0.4, 0.2), ("f1", 0.1, 0.05)])],
        outcomes=[OutcomeSample("m", "1", 5, 0.8, None)],
    )


def test_history_keeps_the_span_and_serves_json() -> None:
    now = [1000.0]
    history = MetricsHistory(_snapshot, interval_s=10, span_s=30, clock=lambda: now[0])
    for _ in range(5):
        history.sample()
        now[0] += 10
    body = json.loads(history.json())
    assert body["interval_s"] == 10
    assert [s["t"] for s in body["samples"]] == [1020.0, 1030.0, 1040.0]
    variant = body["samples"][-1]["variants"][0]
    assert (variant["requests"], variant["errors"], variant["accuracy"]) == (7, 1, 0.8)
    assert len(variant["buckets"]) == 17
    assert variant["buckets"][-1] == ["+Inf", 7]
    assert variant["buckets"][0][0] == "0.0005"
    assert body["samples"][-1]["drift"][0]["top"] == [["f0", 0.4], ["f1", 0.1]]


def test_run_samples_until_cancelled() -> None:
    history = MetricsHistory(_snapshot, interval_s=0.01, span_s=1)

    async def main() -> None:
        task = asyncio.create_task(history.run())
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(main())
    assert len(json.loads(history.json())["samples"]) >= 2
