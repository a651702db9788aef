"""PredictionMemory: bounded memory, TTL, join counting, per-variant outcomes, end to end."""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.feedback import (
    MAX_ERRORS,
    FeedbackItem,
    FeedbackResult,
    FeedbackSettings,
    FeedbackTooLargeError,
    PredictionKind,
    PredictionMemory,
    Truth,
)
from gateway.outcomes import compare

PROPERTY = settings(max_examples=100, deadline=None, derandomize=True, database=None)

# A 3-class probability row whose argmax is class 1.
PROBA: npt.NDArray[np.float32] = np.array([[0.1, 0.7, 0.2]], np.float32)


class FakeClock:
    """Seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**overrides: Any) -> tuple[PredictionMemory, FakeClock]:
    clock = FakeClock()
    return PredictionMemory(FeedbackSettings(**overrides), clock=clock), clock


def items(*pairs: tuple[str, Truth]) -> list[FeedbackItem]:
    return [FeedbackItem(i, t) for i, t in pairs]


def result(
    received: int,
    *,
    matched: int = 0,
    unknown_ids: int = 0,
    expired_ids: int = 0,
    duplicate: int = 0,
    invalid: int = 0,
) -> FeedbackResult:
    """A result without error strings (they are compared separately)."""
    return FeedbackResult(
        received=received,
        matched=matched,
        unknown_ids=unknown_ids,
        expired_ids=expired_ids,
        duplicate=duplicate,
        invalid=invalid,
    )


def counts(res: FeedbackResult) -> FeedbackResult:
    return msgspec.structs.replace(res, errors=())


# -- joining ---------------------------------------------------------------------------------


def test_join_feeds_the_variant_that_served_each_request() -> None:
    mem, _ = make()
    mem.remember("a", "iris", "1", PROBA)
    mem.remember("b", "iris", "2", PROBA)
    mem.remember("c", "iris", "2", np.array([[0.8, 0.1, 0.1], [0.2, 0.2, 0.6]], np.float32))
    res = mem.join(items(("a", 1), ("b", 0), ("c", [0, 2])))
    assert counts(res) == result(received=3, matched=3)
    v1, v2 = mem.snapshot("iris", "1"), mem.snapshot("iris", "2")
    assert (v1.n, v1.correct) == (1, 1)
    assert (v2.n, v2.correct) == (3, 2)
    assert v2.log_loss.n == 3
    assert v2.log_loss.mean == pytest.approx(
        -np.log(np.array([0.1, 0.8, 0.6], np.float32).astype(np.float64)).mean(), rel=1e-12
    )
    assert sorted(mem.variants()) == [("iris", "1"), ("iris", "2")]
    assert mem.snapshot("iris", "3").n == 0


def test_a_per_model_join_ignores_other_models_ids() -> None:
    mem, _ = make()
    mem.remember("a", "iris", "1", PROBA)
    mem.remember("b", "churn", "1", PROBA)
    res = mem.join(items(("a", 1), ("b", 1)), model="iris")
    assert counts(res) == result(received=2, matched=1, unknown_ids=1)
    assert mem.join(items(("b", 1)), model="churn").matched == 1


def test_unknown_expired_duplicate_and_invalid_are_counted() -> None:
    mem, clock = make(ttl_s=60.0)
    mem.remember("old", "m", "1", PROBA)
    clock.now += 61.0
    mem.remember("x", "m", "1", PROBA)  # its sweep drops "old" (expired)
    mem.remember("y", "m", "1", PROBA)
    mem.remember("z", "m", "1", PROBA)
    res = mem.join(
        items(
            ("x", 1),
            ("x", 1),  # duplicate within one call
            ("nobody", 1),
            ("y", [1, 2]),  # two truths for one row
            ("z", "two"),
            ("", 1),
        )
    )
    assert counts(res) == result(received=6, matched=1, duplicate=1, unknown_ids=1, invalid=3)
    assert res.errors == (
        "item 3 (id 'y'): 2 labels for 1 rows",
        "item 4 (id 'z'): label 'two' is not an integer",
        "item 5: id must be a non-empty string",
    )
    assert mem.join(items(("old", 1))).unknown_ids == 1  # swept, so no longer known
    c = mem.counters()
    assert (c.expired, c.matched, c.duplicate, c.invalid, c.unknown_ids) == (1, 1, 1, 3, 2)
    assert c.join_calls == 2
    assert c.items == 7


def test_an_entry_past_its_ttl_and_not_yet_swept_is_reported_expired() -> None:
    mem, clock = make(ttl_s=60.0)
    mem.remember("a", "m", "1", PROBA)
    clock.now += 59.0
    assert mem.join(items(("a", 1))).matched == 1
    mem.remember("b", "m", "1", PROBA)
    clock.now += 60.5
    res = mem.join(items(("b", 1), ("a", 1)))
    assert counts(res) == result(received=2, expired_ids=2)  # a's tombstone aged out too
    assert len(mem) == 0
    assert mem.counters().expired == 1  # b only: a had been joined


def test_sweep_drops_every_expired_entry() -> None:
    mem, clock = make(ttl_s=10.0)
    for i in range(50):
        mem.remember(f"r{i}", "m", "1", PROBA)
    clock.now += 5.0
    mem.remember("young", "m", "1", PROBA)
    clock.now += 6.0
    assert mem.sweep() == 50
    assert len(mem) == 1
    assert mem.counters().expired == 50
    assert mem.counters().waiting == 1


def test_invalid_truth_leaves_the_prediction_joinable() -> None:
    mem, _ = make()
    mem.remember("a", "m", "1", PROBA)
    assert mem.join(items(("a", 7))).invalid == 1  # 3 classes: 7 is out of range
    assert mem.join(items(("a", 1))).matched == 1


def test_only_the_first_errors_are_reported() -> None:
    mem, _ = make()
    for i in range(30):
        mem.remember(f"r{i}", "m", "1", PROBA)
    res = mem.join(items(*((f"r{i}", -1) for i in range(30))))
    assert res.invalid == 30
    assert len(res.errors) == MAX_ERRORS


def test_a_feedback_call_above_max_batch_is_refused_whole() -> None:
    mem, _ = make(max_batch=5)
    mem.remember("a", "m", "1", PROBA)
    with pytest.raises(FeedbackTooLargeError, match="6 feedback items"):
        mem.join(items(*(("a", 1) for _ in range(6))))
    assert mem.join(items(("a", 1))).matched == 1


def test_feedback_items_decode_from_json() -> None:
    body = b'[{"id": "a", "truth": 2}, {"id": "b", "truth": ["1", 0]}, {"id": "c", "truth": 0.5}]'
    decoded = msgspec.json.decode(body, type=list[FeedbackItem])
    assert decoded == [FeedbackItem("a", 2), FeedbackItem("b", ["1", 0]), FeedbackItem("c", 0.5)]
    regression = msgspec.json.decode(b'{"id": "d", "truth": [[1, 2.5]]}', type=FeedbackItem)
    assert regression.truth == [[1.0, 2.5]]


# -- prediction layouts and truth formats ----------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "kind", "truth", "correct", "log_loss_rows"),
    [
        (PROBA, "auto", 1, 1, 1),
        (PROBA, "auto", "1", 1, 1),  # a label in a string
        (PROBA, "auto", 1.0, 1, 1),  # an integral float
        (PROBA, "auto", [2], 0, 1),  # a one-row list
        (np.array([[2.0, -1.0, 0.5]], np.float32), "auto", 0, 1, 0),  # logits: argmax only
        (np.array([3, 1], np.int64), "auto", [3, 2], 1, 0),  # labels
        (np.array([[3], [1]], np.int32), "auto", [3, 1], 2, 0),  # labels (rows, 1)
        (np.array([3], np.int64), "auto", 3, 1, 0),  # one row's label
        (np.array([[2]], np.uint8), "classification", [1], 0, 0),  # one row's label (1, 1)
        (np.array([True]), "auto", 1, 1, 0),  # a boolean label
        (np.array([[0.9], [0.2]]), "classification", [1, 1], 1, 2),  # one sigmoid column
        (np.array([[0.6, 0.4], [0.3, 0.7]], np.float64), "auto", [0, 0], 1, 2),  # float64 proba
    ],
)
def test_classifier_predictions(
    prediction: npt.NDArray[Any],
    kind: PredictionKind,
    truth: Truth,
    correct: int,
    log_loss_rows: int,
) -> None:
    mem, _ = make()
    mem.remember("a", "m", "1", prediction, kind=kind)
    assert mem.join(items(("a", truth))).matched == 1
    snap = mem.snapshot("m", "1")
    assert snap.kind == "classification"
    assert snap.correct == correct
    assert snap.log_loss.n == log_loss_rows


@pytest.mark.parametrize(
    ("prediction", "kind", "truth", "abs_errors"),
    [
        (np.array([1.5]), "auto", 1.0, [0.5]),
        (np.array([[1.5], [2.0]], np.float32), "auto", [1, 4.0], [0.5, 2.0]),
        (np.array([[1.0, 2.0], [3.0, 4.0]]), "regression", [[1, 1], [1, 1]], [0, 1, 2, 3]),
        (np.array([[1.0, 2.0], [3.0, 4.0]]), "regression", [1, 1, 1, 1], [0, 1, 2, 3]),
        (np.array([7, 9], np.int64), "regression", [8, 8], [1, 1]),  # integer outputs
        (np.array([7], np.int64), "regression", 8, [1]),  # one row's integer output
    ],
)
def test_regressor_predictions(
    prediction: npt.NDArray[Any], kind: PredictionKind, truth: Truth, abs_errors: list[float]
) -> None:
    mem, _ = make()
    mem.remember("a", "m", "1", prediction, kind=kind)
    assert mem.join(items(("a", truth))).matched == 1
    snap = mem.snapshot("m", "1")
    assert snap.kind == "regression"
    assert snap.n == len(abs_errors)
    assert snap.mae == pytest.approx(float(np.mean(abs_errors)))


@pytest.mark.parametrize(
    ("prediction", "truth", "message"),
    [
        (PROBA, True, "boolean"),
        (PROBA, 1.5, "not an integer"),
        (PROBA, 3, "outside 0..2"),
        (PROBA, [1, 1], "2 labels for 1 rows"),
        (PROBA, [[1]], "label [1] is not an integer"),
        (np.array([1, 2], np.int64), 1, "expected a list of 2 labels"),
        (np.array([1.0, 2.0]), [1.0], "1 values for 2 rows x 1 outputs"),
        (np.array([1.0]), "1.0", "not a number"),
        (np.array([1.0]), float("nan"), "not finite"),
        (np.array([[1.0]]), [[1.0, 2.0]], "expected 1 lists of 1 values"),
        (np.array([1.0]), [[1.0], 2.0], "expected 1 lists of 1 values"),
    ],
)
def test_invalid_truths_say_why(prediction: npt.NDArray[Any], truth: Truth, message: str) -> None:
    mem, _ = make()
    mem.remember("a", "m", "1", prediction)
    res = mem.join(items(("a", truth)))
    assert res.invalid == 1
    assert message in res.errors[0]


def test_a_variant_keeps_one_kind_of_outcome() -> None:
    mem, _ = make()
    mem.remember("r", "m", "1", np.array([1.0]))
    mem.remember("c", "m", "1", PROBA)
    res = mem.join(items(("r", 1.0), ("c", 1)))
    assert res.matched == 1
    assert "m/1 already has regression outcomes" in res.errors[0]


def test_unusable_predictions_are_counted_not_stored() -> None:
    mem, _ = make(max_rows=4, max_values_per_row=8)
    mem.remember("", "m", "1", PROBA)
    mem.remember("big-rows", "m", "1", np.zeros((5, 3), np.float32))
    mem.remember("big-row", "m", "1", np.zeros((1, 9), np.float32))
    mem.remember("strings", "m", "1", np.array([b"cat"], dtype=object))
    mem.remember("scalar", "m", "1", np.array(1.0))
    mem.remember("multilabel", "m", "1", np.array([[0, 1]], np.int64))
    mem.remember("negative", "m", "1", np.array([-1], np.int64))
    mem.remember("past-int32", "m", "1", np.array([[2**31]], np.int64))
    mem.remember("sigmoid-out-of-range", "m", "1", np.array([[1.5]]), kind="classification")
    c = mem.counters()
    assert (c.no_id, c.too_large, c.unsupported, c.remembered, len(mem)) == (1, 2, 6, 0, 0)


def test_probabilities_scores_and_nan_rows_in_one_join() -> None:
    mem, _ = make()
    mem.remember("proba", "m", "1", PROBA)  # class 1, log-loss -ln 0.7
    mem.remember("logits", "m", "1", np.array([[3.0, -1.0, 0.0]], np.float32))  # class 0
    mem.remember("nan", "m", "1", np.array([[np.nan, 1.0, 0.0]], np.float32))  # no class
    assert mem.join(items(("proba", 1), ("logits", 0), ("nan", 1))).matched == 3
    snap = mem.snapshot("m", "1")
    assert (snap.n, snap.correct, snap.confusion_overflow) == (3, 2, 1)
    assert snap.log_loss.n == 1
    assert snap.log_loss.mean == pytest.approx(-np.log(np.float64(np.float32(0.7))))


def test_the_prediction_is_copied() -> None:
    mem, _ = make()
    batch = np.array([[0.1, 0.7, 0.2], [0.8, 0.1, 0.1]], np.float32)
    mem.remember("a", "m", "1", batch[:1])  # a view into a batch's output
    batch[0] = [1.0, 0.0, 0.0]
    mem.join(items(("a", 1)))
    assert mem.snapshot("m", "1").correct == 1


def test_a_repeated_id_replaces_the_earlier_prediction() -> None:
    mem, _ = make()
    mem.remember("a", "m", "1", PROBA)
    mem.remember("a", "m", "2", np.array([[0.9, 0.05, 0.05]], np.float32))
    assert mem.counters().replaced == 1
    mem.join(items(("a", 0)))
    assert mem.snapshot("m", "1").n == 0
    assert mem.snapshot("m", "2").correct == 1


def test_disabled_memory_remembers_nothing() -> None:
    mem, _ = make(enabled=False)
    mem.remember("a", "m", "1", PROBA)
    assert len(mem) == 0
    assert mem.join(items(("a", 1))).unknown_ids == 1


# -- bounds ----------------------------------------------------------------------------------


def test_memory_stays_bounded_under_a_flood_without_feedback() -> None:
    capacity = 10_000
    mem, _ = make(capacity=capacity)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):  # fill, then churn once so the OrderedDict reaches its size
            mem.remember(f"request-{i:08d}", "m", "1", PROBA)
        filled = tracemalloc.get_traced_memory()[0] - base
        for i in range(20_000, 100_000):
            mem.remember(f"request-{i:08d}", "m", "1", PROBA)
        flooded = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    c = mem.counters()
    assert len(mem) == capacity
    assert c.evicted == 90_000
    assert c.waiting == capacity
    assert flooded - filled < 0.02 * filled  # growth stopped at capacity
    # The bytes estimate tracks what tracemalloc sees (0.85x to 1x in practice).
    assert 0.7 * c.bytes_estimate < flooded < 1.3 * c.bytes_estimate
    assert c.bytes_estimate < capacity * 500


def test_remembered_entries_leave_the_garbage_collectors_lists() -> None:
    """An entry holds only values the collector does not track, so after one collection
    it is untracked: 200,000 remembered predictions never lengthen a full collection."""
    mem, _ = make()
    mem.remember("a", "m", "1", PROBA)
    mem.remember("b", "m", "2", PROBA)
    gc.collect()
    assert len(mem) == 2
    assert not any(gc.is_tracked(entry) for entry in mem._entries.values())
    result = mem.join([FeedbackItem("a", 1)], model="m")  # joins still find the variant
    assert result.matched == 1
    gc.collect()
    assert not gc.is_tracked(mem._entries["a"])


def test_max_bytes_binds_for_large_predictions() -> None:
    mem, _ = make(max_bytes=1_000_000)
    rows = np.full((256, 10), 0.1, np.float32)  # 10 KiB of probabilities per entry
    for i in range(500):
        mem.remember(f"r{i}", "m", "1", rows)
    c = mem.counters()
    assert c.bytes_estimate <= 1_000_000
    assert c.evicted == 500 - len(mem)
    assert 80 < len(mem) < 100


@st.composite
def operations(draw: st.DrawFn) -> list[tuple[str, int, int]]:
    """(op, id number, argument): remember (argument: rows), join (argument: truth), advance
    (argument: seconds)."""
    return draw(
        st.lists(
            st.tuples(
                st.sampled_from(["remember", "remember", "join", "advance"]),
                st.integers(0, 30),
                st.integers(0, 4),
            ),
            max_size=120,
        )
    )


@PROPERTY
@given(ops=operations(), capacity=st.integers(1, 12))
def test_counters_balance_and_bounds_hold(ops: list[tuple[str, int, int]], capacity: int) -> None:
    mem, clock = make(capacity=capacity, ttl_s=10.0, max_bytes=4000)
    for op, number, argument in ops:
        request_id = f"r{number}"
        if op == "remember":
            mem.remember(request_id, "m", str(number % 2), np.full((argument + 1, 1), 2.0))
        elif op == "join":
            res = mem.join(items((request_id, [1.0] * (argument + 1))))
            assert res.received == 1
        else:
            clock.now += argument * 3.0
        c = mem.counters()
        assert len(mem) <= capacity
        assert c.bytes_estimate <= 4000
        assert 0 <= c.waiting <= c.entries
        assert c.remembered == c.waiting + c.matched + c.evicted + c.expired + c.replaced
        assert c.items == c.matched + c.unknown_ids + c.expired_ids + c.duplicate + c.invalid
    mem.sweep()
    assert mem.sweep() == 0


# -- end to end ------------------------------------------------------------------------------


def test_a_wrong_candidate_is_caught_from_joined_feedback() -> None:
    """Stable answers right 90% of the time, the candidate 55%; 300 requests each."""
    mem, _ = make()
    rng = np.random.default_rng(2024)
    feedback: list[FeedbackItem] = []
    for i in range(600):
        version, accuracy = ("2", 0.55) if i % 2 else ("1", 0.9)
        truth = int(rng.integers(0, 3))
        predicted = truth if rng.random() < accuracy else (truth + 1) % 3
        proba = np.full((1, 3), 0.1, np.float32)
        proba[0, predicted] = 0.8
        mem.remember(f"req-{i}", "churn", version, proba)
        feedback.append(FeedbackItem(f"req-{i}", str(truth)))
    assert mem.join(feedback).matched == 600
    worse = compare(mem.snapshot("churn", "2"), mem.snapshot("churn", "1"), min_samples=100)
    assert worse.candidate_worse
    assert worse.p_value is not None
    assert worse.p_value < 1e-6


def test_an_equal_candidate_is_not_worse_from_joined_feedback() -> None:
    mem, _ = make()
    rng = np.random.default_rng(7)
    feedback: list[FeedbackItem] = []
    for i in range(4000):
        version = str(1 + i % 2)
        truth = float(rng.normal())
        mem.remember(f"req-{i}", "price", version, np.array([truth + rng.normal(0, 0.5)]))
        feedback.append(FeedbackItem(f"req-{i}", truth))
    assert mem.join(feedback).matched == 4000
    same = compare(mem.snapshot("price", "2"), mem.snapshot("price", "1"))
    assert same.test == "welch_t"
    assert not same.candidate_worse
    assert same.not_worse_enough_samples


def test_default_memory_is_bounded_by_bytes_when_no_feedback_comes() -> None:
    """The default sizing rule: max_bytes binds (not capacity), so a server that never
    gets feedback holds a fixed amount. Measured RSS for 1M remembers of 1x3 answers with
    the defaults: +36 MB over warm-up, inside the 64 MB budget."""
    defaults = FeedbackSettings()
    assert defaults.max_bytes <= 32 * 1024 * 1024
    mem, _ = make()
    answer = np.array([[0.1, 0.7, 0.2]], np.float32)
    prefix = "0123456789abcdef-"
    for i in range(130_000):  # about 111k such entries fill 32 MiB
        mem.remember(f"{prefix}{i:x}", "m", "1", answer)
    counters = mem.counters()
    assert counters.bytes_estimate <= defaults.max_bytes
    assert counters.evicted > 0  # bytes bound before capacity (200k entries)
    assert counters.entries < defaults.capacity
