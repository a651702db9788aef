"""/metrics text from a snapshot: clean latency buckets, outcomes, feedback, alert deliveries."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import (
    LATENCY_BUCKETS_S,
    OutcomeSample,
    Snapshot,
    VariantSample,
    export_buckets,
    render,
)
from gateway.traffic import LATENCY_BUCKETS_MS


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def test_latency_buckets_are_few_and_round_and_never_overcount() -> None:
    counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    for ms in (0.3, 0.7, 4.0, 40.0, 700.0, 1e9):  # one each, the last in the overflow
        counts[next((i for i, b in enumerate(LATENCY_BUCKETS_MS) if ms <= b), len(counts) - 1)] += 1
    pairs = export_buckets(LATENCY_BUCKETS_MS, counts)
    assert len(pairs) == len(LATENCY_BUCKETS_S) + 1 == 17
    labels = [le for le, _ in pairs]
    assert all(re.fullmatch(r"\d+(\.\d{1,4})?|\+Inf", le) for le in labels), labels
    by = dict(pairs)
    assert by["0.0005"] <= 1  # 0.3 ms (its fine bucket may reach past 0.5 ms)
    assert by["0.001"] == 2
    assert by["0.005"] == 3
    assert by["0.05"] == 4
    assert by["1"] == 5
    assert by["+Inf"] == 6
    values = [n for _, n in pairs]
    assert values == sorted(values)


def test_outcomes_feedback_and_alert_deliveries_are_exported() -> None:
    counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    counts[10] = 3
    snap = Snapshot(
        variants=[VariantSample("m", "1", 3, 0, LATENCY_BUCKETS_MS, counts, 2.0, 1.0)],
        outcomes=[OutcomeSample("m", "1", 40, 0.9, None), OutcomeSample("r", "2", 8, None, 1.5)],
        feedback={"matched": 48, "unknown": 2, "expired": 0, "duplicate": 1, "invalid": 0},
        alerts={"sent": 2, "failed": 1, "dropped": 0},
    )
    text = render(lambda: snap)
    got = _samples(text)
    assert got[("gateway_outcome_samples_total", (("model", "m"), ("version", "1")))] == 40
    assert got[("gateway_outcome_accuracy", (("model", "m"), ("version", "1")))] == 0.9
    assert got[("gateway_outcome_mae", (("model", "r"), ("version", "2")))] == 1.5
    assert got[("gateway_feedback_items_total", (("result", "matched"),))] == 48
    assert got[("gateway_alert_deliveries_total", (("result", "failed"),))] == 1
    buckets = [k for k in got if k[0] == "gateway_request_duration_seconds_bucket"]
    assert len(buckets) == 17
