"""bench.feedback_memory: what ground-truth feedback costs the event loop.

``python -m bench.feedback_memory`` times ``PredictionMemory.remember()`` per request at
capacity (so every call also evicts the oldest entry, the steady state under a flood) for a
1 x 3 float32 classifier answer (the headline number), a 1 x 10 one, a 64 x 10 one and a
one-value regressor, next to a bare OrderedDict insert-and-evict as the floor; then
``join()`` per call and per item for 1, 100 and 10,000 (max_batch) one-row items; and the
memory one remembered prediction takes (tracemalloc, at steady state). Every timing is the
best of many interleaved rounds, because the benchmark machines are shared. Writes
bench/results/feedback_memory.json and .md and prints one JSON line.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import tracemalloc
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import msgspec
import numpy as np
import numpy.typing as npt

from bench.common import cpu_name, git_sha
from gateway.feedback import FeedbackItem, FeedbackSettings, PredictionMemory

SEED: Final = 20240917
CAPACITY: Final = 100_000  # entries held while remember() is timed; each call evicts one
IDS: Final = 250_000  # distinct ids cycled through (> CAPACITY, so none is ever replaced)
ROUNDS: Final = 15  # best of this many rounds per measurement
ROUND_NS: Final = 20_000_000  # target duration of one remember() round
JOIN_BATCHES: Final = (1, 100, 10_000)
JOIN_ITEMS_PER_ROUND: Final = 10_000  # items joined per round (prefilled before timing)
MEMORY_ENTRIES: Final = 50_000
RESULTS: Final = Path(__file__).parent / "results"

Array = npt.NDArray[Any]


def _request_ids(n: int, rng: np.random.Generator) -> list[str]:
    """Distinct UUID-shaped ids (36 characters), as clients usually send."""
    raw = rng.integers(0, 2**63, size=(n, 2), dtype=np.int64)
    ids = []
    for a, b in raw.tolist():
        h = f"{a:016x}{b:016x}"
        ids.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    if len(set(ids)) != n:
        raise AssertionError("request ids collided")
    return ids


def _calibrate(call: Callable[[int], object], start: int) -> int:
    iterations = 1
    while True:
        begin = time.perf_counter_ns()
        for i in range(start, start + iterations):
            call(i)
        elapsed = time.perf_counter_ns() - begin
        if elapsed >= ROUND_NS // 4:
            return max(1, iterations * ROUND_NS // max(elapsed, 1))
        iterations *= 2


def best_ns(calls: dict[str, Callable[[int], object]]) -> dict[str, float]:
    """Best ns per call for each named call, measured in interleaved rounds. Each call gets
    a running counter, so it can rotate through distinct ids."""
    counters = dict.fromkeys(calls, 0)
    iterations = {}
    for name, call in calls.items():
        iterations[name] = _calibrate(call, 0)
        counters[name] = 4 * iterations[name]  # past what calibration used
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(ROUNDS):
        for name, call in calls.items():
            n, start = iterations[name], counters[name]
            begin = time.perf_counter_ns()
            for i in range(start, start + n):
                call(i)
            best[name] = min(best[name], (time.perf_counter_ns() - begin) / n)
            counters[name] = start + n
    return best


def _full_memory(ids: list[str], prediction: Array) -> PredictionMemory:
    memory = PredictionMemory(FeedbackSettings(capacity=CAPACITY, max_bytes=2**40))
    for request_id in ids[:CAPACITY]:
        memory.remember(request_id, "bench", "1", prediction)
    return memory


def measure_remember(ids: list[str], rng: np.random.Generator) -> dict[str, float]:
    """ns per remember() at capacity, per prediction shape, and the OrderedDict floor."""
    shapes: dict[str, Array] = {
        "classifier_1x3": rng.dirichlet(np.ones(3), size=1).astype(np.float32),
        "classifier_1x10": rng.dirichlet(np.ones(10), size=1).astype(np.float32),
        "classifier_64x10": rng.dirichlet(np.ones(10), size=64).astype(np.float32),
        "regressor_1x1": rng.normal(size=(1, 1)),
    }
    calls: dict[str, Callable[[int], object]] = {}
    n_ids = len(ids)

    def remember_call(memory: PredictionMemory, prediction: Array) -> Callable[[int], None]:
        def call(i: int) -> None:
            memory.remember(ids[i % n_ids], "bench", "1", prediction)

        return call

    for name, prediction in shapes.items():
        calls[name] = remember_call(_full_memory(ids, prediction), prediction)
    floor: OrderedDict[str, tuple[float, None, None]] = OrderedDict()

    def ordered_dict_floor(i: int) -> None:
        floor[ids[i % n_ids]] = (0.0, None, None)
        if len(floor) > CAPACITY:
            floor.popitem(last=False)

    calls["ordered_dict_floor"] = ordered_dict_floor
    return best_ns(calls)


def measure_join(ids: list[str], rng: np.random.Generator) -> list[dict[str, float]]:
    """ns per join() call and per item, for one-row 3-class predictions and int truths."""
    prediction = rng.dirichlet(np.ones(3), size=1).astype(np.float32)
    truths = rng.integers(0, 3, size=len(ids)).tolist()
    out = []
    for batch in JOIN_BATCHES:
        calls = JOIN_ITEMS_PER_ROUND // batch
        best = float("inf")
        offset = 0
        for _ in range(ROUNDS + 1):  # the first round warms up and is dropped
            memory = PredictionMemory(FeedbackSettings(capacity=CAPACITY, max_bytes=2**40))
            chunk = ids[offset : offset + JOIN_ITEMS_PER_ROUND]
            for request_id in chunk:
                memory.remember(request_id, "bench", "1", prediction)
            batches = [
                [
                    FeedbackItem(request_id, truths[offset + k * batch + j])
                    for j, request_id in enumerate(chunk[k * batch : (k + 1) * batch])
                ]
                for k in range(calls)
            ]
            begin = time.perf_counter_ns()
            for items in batches:
                memory.join(items)
            elapsed = time.perf_counter_ns() - begin
            if memory.counters().matched != JOIN_ITEMS_PER_ROUND:
                raise AssertionError("join did not match every item")
            if offset:
                best = min(best, elapsed / calls)
            offset = (offset + JOIN_ITEMS_PER_ROUND) % (len(ids) - JOIN_ITEMS_PER_ROUND)
        out.append(
            {
                "items_per_call": batch,
                "ns_per_call": round(best, 1),
                "ns_per_item": round(best / batch, 1),
            }
        )
    return out


def measure_memory(ids: list[str], rng: np.random.Generator) -> dict[str, float]:
    """tracemalloc bytes per entry at steady state (filled, then churned once) vs estimate."""
    prediction = rng.dirichlet(np.ones(3), size=1).astype(np.float32)
    memory = PredictionMemory(FeedbackSettings(capacity=MEMORY_ENTRIES, max_bytes=2**40))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for request_id in ids[: 3 * MEMORY_ENTRIES]:  # fill, then churn twice
            memory.remember(request_id, "bench", "1", prediction)
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    # The id strings were allocated before tracing (and live on in ``ids``), so they are
    # not in ``held``; add them back for the full cost of an entry.
    per_id = sys.getsizeof(ids[0])
    counters = memory.counters()
    return {
        "entries": counters.entries,
        "measured_bytes_per_entry": round(held / counters.entries + per_id, 1),
        "estimated_bytes_per_entry": round(counters.bytes_estimate / counters.entries, 1),
        "id_bytes": per_id,
    }


def run() -> dict[str, Any]:
    """Run every measurement; return the result document."""
    rng = np.random.default_rng(SEED)
    load_before = list(os.getloadavg())
    ids = _request_ids(IDS, rng)
    remember = measure_remember(ids, rng)
    join = measure_join(ids, rng)
    memory = measure_memory(ids, rng)
    return {
        "benchmark": "feedback_memory",
        "git_sha": git_sha() or None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "msgspec": msgspec.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "seed": SEED,
        "settings": {
            "capacity": CAPACITY,
            "ids": IDS,
            "rounds": ROUNDS,
            "round_ns": ROUND_NS,
            "join_items_per_round": JOIN_ITEMS_PER_ROUND,
            "ttl_s": FeedbackSettings().ttl_s,
        },
        "remember_ns": {name: round(ns, 1) for name, ns in remember.items()},
        "join": join,
        "memory": memory,
    }


def markdown(result: dict[str, Any]) -> str:
    """The result as a markdown report."""
    rem = result["remember_ns"]
    lines = [
        "# Ground-truth feedback: remember() and join() on the event loop",
        "",
        f"CPU: {result['cpu']} ({result['cpu_count']} CPUs, load average "
        f"{result['load_average_before'][0]:.1f} before, "
        f"{result['load_average_after'][0]:.1f} after), numpy {result['numpy']}, "
        f"Python {result['python']}, git {result['git_sha']}. Best of {ROUNDS} rounds.",
        "",
        f"remember() with {CAPACITY:,} entries held (each call also evicts the oldest):",
        "",
        "| prediction | ns per remember() |",
        "|---|---:|",
        f"| classifier 1 x 3 float32 (headline) | {rem['classifier_1x3']:,.0f} |",
        f"| classifier 1 x 10 float32 | {rem['classifier_1x10']:,.0f} |",
        f"| classifier 64 x 10 float32 | {rem['classifier_64x10']:,.0f} |",
        f"| regressor 1 x 1 float64 | {rem['regressor_1x1']:,.0f} |",
        f"| floor: bare OrderedDict insert + evict | {rem['ordered_dict_floor']:,.0f} |",
        "",
        "join() of one-row 3-class predictions with int truths (time the event loop is held):",
        "",
        "| items per call | µs per call | ns per item |",
        "|---:|---:|---:|",
    ]
    for j in result["join"]:
        lines.append(
            f"| {j['items_per_call']:,} | {j['ns_per_call'] / 1000:,.1f} | "
            f"{j['ns_per_item']:,.0f} |"
        )
    mem = result["memory"]
    lines += [
        "",
        f"Memory per remembered 1 x 3 prediction with a 36-character id, at steady state "
        f"({mem['entries']:,} entries): {mem['measured_bytes_per_entry']:,.0f} B measured "
        f"(tracemalloc, id included), {mem['estimated_bytes_per_entry']:,.0f} B estimated "
        f"(the figure max_bytes is enforced against).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run, write bench/results/feedback_memory.{json,md}, print the JSON on one line."""
    del argv  # no options: one configuration per run
    result = run()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "feedback_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "feedback_memory.md").write_text(markdown(result))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
