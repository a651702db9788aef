"""traffic.py: per-variant traffic statistics: requests, rows, errors, a latency histogram
and shadow agreement, kept where the rollout controller and the metrics endpoint read them.

Counters are cumulative and mutated only on the event-loop thread; readers take a
``snapshot()`` and diff two snapshots for a window (so no reset ever races a request).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "LATENCY_BUCKETS_MS",
    "LatencyHistogram",
    "ShadowStats",
    "VariantStats",
    "VariantSnapshot",
    "quantile",
]

# Upper bounds (ms) of the latency buckets: 0.1 ms to 10 s, about 26% apart, so a p99 read
# from the histogram is within one bucket (about 26%) of the exact value.
LATENCY_BUCKETS_MS: Final[tuple[float, ...]] = tuple(round(0.1 * 1.26**i, 4) for i in range(50))


class LatencyHistogram:
    """Counts of observations per bucket of ``LATENCY_BUCKETS_MS`` (+ one overflow)."""

    __slots__ = ("counts", "total_ms")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.total_ms = 0.0

    def observe(self, ms: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
        self.total_ms += ms


def quantile(counts: list[int], q: float) -> float | None:
    """The bucket upper bound (ms) under which a fraction ``q`` of observations fall."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        seen += n
        if seen >= rank:
            return LATENCY_BUCKETS_MS[i] if i < len(LATENCY_BUCKETS_MS) else float("inf")
    return float("inf")


class ShadowStats:
    """What mirroring one shadow version produced so far."""

    __slots__ = (
        "abs_diff_sum",
        "agreed_rows",
        "compared_rows",
        "diff_rows",
        "dropped",
        "errors",
        "over_budget",
        "rel_diff_sum",
        "sent",
    )

    def __init__(self) -> None:
        self.sent = 0
        self.dropped = 0
        self.over_budget = 0
        """Drops (counted in ``dropped`` too) because the shadows' CPU budget was spent."""
        self.errors = 0
        self.compared_rows = 0
        self.agreed_rows = 0
        self.abs_diff_sum = 0.0
        self.rel_diff_sum = 0.0
        self.diff_rows = 0

    @property
    def agreement(self) -> float | None:
        """Share of compared rows where the shadow agreed (argmax or exact label)."""
        return self.agreed_rows / self.compared_rows if self.compared_rows else None

    @property
    def mean_abs_diff(self) -> float | None:
        return self.abs_diff_sum / self.diff_rows if self.diff_rows else None

    @property
    def mean_rel_diff(self) -> float | None:
        return self.rel_diff_sum / self.diff_rows if self.diff_rows else None


@dataclass(frozen=True, slots=True)
class VariantSnapshot:
    """Cumulative counters of one (model, version) at one instant."""

    model: str
    version: str
    requests: int
    rows: int
    errors: int
    latency_counts: tuple[int, ...]
    latency_total_ms: float
    shadow: dict[str, float | int | None] = field(default_factory=dict)

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def p(self, q: float) -> float | None:
        return quantile(list(self.latency_counts), q)

    def minus(self, earlier: VariantSnapshot) -> VariantSnapshot:
        """The window between ``earlier`` and this snapshot."""
        return VariantSnapshot(
            self.model,
            self.version,
            self.requests - earlier.requests,
            self.rows - earlier.rows,
            self.errors - earlier.errors,
            tuple(a - b for a, b in zip(self.latency_counts, earlier.latency_counts, strict=True)),
            self.latency_total_ms - earlier.latency_total_ms,
            self.shadow,
        )


class VariantStats:
    """Traffic to one model version: requests, rows, errors and latency (ms)."""

    __slots__ = ("errors", "latency", "model", "requests", "rows", "shadow", "version")

    def __init__(self, model: str, version: str) -> None:
        self.model = model
        self.version = version
        self.requests = 0
        self.rows = 0
        self.errors = 0
        self.latency = LatencyHistogram()
        self.shadow = ShadowStats()
        """Filled when this version is a shadow: how its answers compared."""

    def snapshot(self) -> VariantSnapshot:
        s = self.shadow
        return VariantSnapshot(
            self.model,
            self.version,
            self.requests,
            self.rows,
            self.errors,
            tuple(self.latency.counts),
            self.latency.total_ms,
            {
                "sent": s.sent,
                "dropped": s.dropped,
                "over_budget": s.over_budget,
                "errors": s.errors,
                "compared_rows": s.compared_rows,
                "agreement": s.agreement,
                "mean_abs_diff": s.mean_abs_diff,
                "mean_rel_diff": s.mean_rel_diff,
            },
        )
