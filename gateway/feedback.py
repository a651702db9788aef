"""feedback.py: remembers which version served each request id and what it predicted, for a
bounded time and memory, and joins late ground truth to it into per-variant outcome stats.

In: ``remember(request_id, model, version, prediction)`` after each served response, and
``join(items)`` when a client posts ground truth for earlier request ids. Out: per-call join
counts (``FeedbackResult``), memory counters, and per-(model, version) ``OutcomeStats`` from
``outcomes.py``. It knows nothing of HTTP, gRPC, V2 encoding, routing or rollout policy.

Thread model: event-loop thread only, no locks. ``remember()`` and ``join()`` must both be
called there (the front-end handlers run there). bench.feedback_memory on a loaded 2-core
machine: remember() about 3 us per request; join() about 9 us for one item, 1.5 us per item
for 10,000 (max_batch: the loop is held about 15 ms). ``FeedbackSettings`` lives in config.py.

Sizing rule: the memory is sized by bytes, not entries: ``max_bytes`` (32 MiB by default,
about 36 MB of RSS when full of small answers) bounds it whatever the traffic, so a default
server that never receives feedback grows by that much at most; it is on from the start, so
the first ground truth finds its predictions.

Bounds: at most ``capacity`` entries and about ``max_bytes`` of them (whichever binds first;
the oldest go first and are counted as ``evicted``), each younger than ``ttl_s`` (older ones
are removed lazily when looked up and by an amortised sweep from the oldest end, counted as
``expired``). A joined id stays as a small tombstone until it ages out, so a repeat is reported
as ``duplicate``; an id whose entry already left memory is reported as ``unknown``.
"""

from __future__ import annotations

import math
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal, TypeAlias

import msgspec
import numpy as np
import numpy.typing as npt

from gateway.config import FeedbackSettings
from gateway.errors import PayloadTooLargeError
from gateway.outcomes import OutcomeKind, OutcomeSnapshot, OutcomeStats
from gateway.types import FeedbackItem, FeedbackResult, Truth

__all__ = [
    "MAX_ERRORS",
    "ENTRY_OVERHEAD_BYTES",
    "Truth",
    "FeedbackSettings",
    "FeedbackItem",
    "FeedbackResult",
    "MemoryCounters",
    "FeedbackTooLargeError",
    "PredictionKind",
    "PredictionMemory",
]

PredictionKind = Literal["auto", "classification", "regression"]

MAX_ERRORS: Final = 20  # error strings returned per join call; the counts cover the rest
# Bytes per entry beyond its id string and prediction data: the OrderedDict slot and link
# (with the slack a churning dict keeps), the entry tuple, its float timestamp and the bytes
# object's header. tracemalloc measures about 290 B per 1 x 3 classifier entry with a
# 16-character id (65 B) and about 380 B with a 36-character one (85 B) at steady state
# (bench.feedback_memory); tests/unit/test_feedback.py checks the estimate against
# tracemalloc.
ENTRY_OVERHEAD_BYTES: Final = 260
_MAX_LABEL: Final = 2**31 - 1  # labels are stored as int32
_SWEEP_PER_REMEMBER: Final = 2  # > 1 so the sweep outpaces arrivals and the backlog drains

Array: TypeAlias = "npt.NDArray[Any]"
# (remembered at, variant index or _JOINED, prediction's bytes or None once joined, layout,
# row width). The prediction is kept as one bytes object, not an ndarray (an object, its
# data and its shape: three allocations): an entry is allocated on every request and freed
# cold when it is evicted, and on a served request the fewer scattered objects it touches
# the better. Only untracked values (float, int, bytes): the garbage collector untracks
# such a tuple the first time it sees it, so the entries never make its full collections
# longer.
_Entry: TypeAlias = "tuple[float, int, bytes | None, int, int]"
_JOINED: Final = -1
# Once joined an entry is a tombstone: (time, _JOINED, None, layout, 0). Layouts:
_SCORES: Final = 0  # float32 (rows, classes): class scores; outcomes.add_scores takes the
#   argmax, and log-loss from rows that are probability vectors (decided at join, so
#   remember() stays a copy)
_LABELS: Final = 1  # int32 (rows,): predicted class labels (no probabilities, no log-loss)
_VALUES: Final = 2  # float64 (rows, outputs): a regressor's values
_KIND_OF_LAYOUT: Final[tuple[OutcomeKind, ...]] = ("classification", "classification", "regression")
_DTYPE_OF_LAYOUT: Final = (np.dtype(np.float32), np.dtype(np.int32), np.dtype(np.float64))
_FLOAT32: Final = np.dtype(np.float32)
_LABEL: Final = struct.Struct("=i")  # one label as _DTYPE_OF_LAYOUT[_LABELS] holds it


class MemoryCounters(msgspec.Struct, frozen=True, kw_only=True):
    """Cumulative counters of a ``PredictionMemory`` plus its current size."""

    entries: int
    """Entries held now, tombstones of joined ids included."""
    waiting: int
    """Entries held now still waiting for their ground truth. Always
    remembered = waiting + matched + evicted + expired + replaced."""
    bytes_estimate: int
    remembered: int
    replaced: int
    """Unjoined predictions replaced by a later remember() with the same id (the newer
    prediction wins; re-remembering an already joined id starts afresh)."""
    too_large: int
    unsupported: int
    """Predictions of a dtype or shape outcome metrics cannot use (strings, multi-label)."""
    no_id: int
    evicted: int
    """Unjoined predictions dropped for capacity or max_bytes before their ttl."""
    expired: int
    """Unjoined predictions dropped after ttl_s (swept or found too old)."""
    join_calls: int
    items: int
    matched: int
    unknown_ids: int
    expired_ids: int
    duplicate: int
    invalid: int


class FeedbackTooLargeError(PayloadTooLargeError):
    """A feedback call carries more items than ``max_batch``."""


class _InvalidTruthError(ValueError):
    pass


def _label(value: object, n_classes: int) -> int:
    if isinstance(value, bool | np.bool_):
        raise _InvalidTruthError(f"label {value!r} is a boolean, not a class index")
    label: int
    if isinstance(value, int | np.integer):
        label = int(value)
    elif isinstance(value, float | np.floating):
        if not float(value).is_integer():
            raise _InvalidTruthError(f"label {value} is not an integer")
        label = int(value)
    elif isinstance(value, str):
        try:
            label = int(value)
        except ValueError:
            raise _InvalidTruthError(f"label {value[:20]!r} is not an integer") from None
    else:
        raise _InvalidTruthError(f"label {str(value)[:20]} is not an integer")
    if not 0 <= label < n_classes:
        raise _InvalidTruthError(f"label {label} is outside 0..{n_classes - 1}")
    return label


def _labels(truth: object, rows: int, n_classes: int) -> list[int]:
    """One class label per row: a list, or a scalar for a one-row request."""
    if type(truth) is int and rows == 1 and 0 <= truth < n_classes:
        return [truth]  # the common case, without the checks below
    if isinstance(truth, list):
        values: list[object] = truth
    elif rows == 1:
        values = [truth]
    else:
        raise _InvalidTruthError(f"expected a list of {rows} labels, got one value")
    if len(values) != rows:
        raise _InvalidTruthError(f"{len(values)} labels for {rows} rows")
    return [_label(v, n_classes) for v in values]


def _number(value: object) -> float:
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, int | float | np.integer | np.floating
    ):
        raise _InvalidTruthError(f"truth {str(value)[:20]} is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise _InvalidTruthError(f"truth {number} is not finite")
    return number


def _values(truth: object, rows: int, width: int) -> list[float]:
    """rows x width numbers, row-major: nested per row, flat, or a scalar for one value."""
    total = rows * width
    if not isinstance(truth, list):
        if total != 1:
            raise _InvalidTruthError(f"expected a list of {total} values, got one value")
        return [_number(truth)]
    flat: list[object] = truth
    if truth and isinstance(truth[0], list):
        if len(truth) != rows or any(not isinstance(r, list) or len(r) != width for r in truth):
            raise _InvalidTruthError(f"expected {rows} lists of {width} values")
        flat = [v for r in truth for v in r]
    if len(flat) != total:
        raise _InvalidTruthError(f"{len(flat)} values for {rows} rows x {width} outputs")
    return [_number(v) for v in flat]


def _size(request_id: str, data: bytes | None) -> int:
    """Estimated bytes an entry holds (see ENTRY_OVERHEAD_BYTES). ``str.__sizeof__`` is
    what ``sys.getsizeof`` returns for a str (which the garbage collector never tracks, so
    no header is added), for a fifth of the cost."""
    return ENTRY_OVERHEAD_BYTES + request_id.__sizeof__() + (0 if data is None else len(data))


def _prediction(data: bytes, layout: int, width: int) -> Array:
    """A remembered prediction's array again: (rows, width), or (rows,) for labels."""
    array = np.frombuffer(data, _DTYPE_OF_LAYOUT[layout])
    return array if layout == _LABELS else array.reshape(-1, width)


class _Group:
    """Matched pairs of one variant, layout and row width, added to its stats in one call
    (the predictions' bytes become one array here, not one per item)."""

    __slots__ = ("layout", "predictions", "stats", "truths", "width")

    def __init__(self, stats: OutcomeStats, layout: int, width: int) -> None:
        self.stats = stats
        self.layout = layout
        self.width = width
        self.predictions: list[bytes] = []
        self.truths: list[float] = []  # class labels (ints) or regression truths

    def add_to_stats(self) -> None:
        p = self.predictions
        data = _prediction(p[0] if len(p) == 1 else b"".join(p), self.layout, self.width)
        if self.layout == _VALUES:
            self.stats.add_regression(data.reshape(-1), np.array(self.truths, np.float64))
            return
        truth = np.array(self.truths, np.int64)
        if self.layout == _SCORES:
            self.stats.add_scores(data, truth)
        else:
            self.stats.add_classification(data.astype(np.int64), truth)


class PredictionMemory:
    """Served predictions by request id, joined later with ground truth (see module doc).

    ``clock`` returns seconds (monotonic); tests inject a fake one.
    """

    def __init__(
        self, settings: FeedbackSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._settings = settings
        self._clock = clock
        # Settings read on every remember(), copied out of the struct once.
        self._enabled = settings.enabled
        self._ttl_s = settings.ttl_s
        self._capacity = settings.capacity
        self._max_bytes = settings.max_bytes
        self._max_rows = settings.max_rows
        self._max_width = settings.max_values_per_row
        self._sweep_after = -math.inf  # nothing can expire before this instant
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._variant_index: dict[tuple[str, str], int] = {}
        """(model, version) -> its place in ``_by_index`` (what an entry holds)."""
        self._by_index: list[OutcomeStats] = []
        self._bytes = 0
        self._remembered = 0
        self._replaced = 0
        self._waiting = 0
        self._too_large = 0
        self._unsupported = 0
        self._no_id = 0
        self._evicted = 0
        self._expired = 0
        self._join_calls = 0
        self._items = 0
        self._matched = 0
        self._unknown = 0
        self._expired_ids = 0
        self._duplicate = 0
        self._invalid = 0

    def holds(self, request_id: str) -> bool:
        """Whether a prediction with this id is remembered here (joined or not)."""
        return request_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def settings(self) -> FeedbackSettings:
        return self._settings

    # -- remember ----------------------------------------------------------------------------

    def _compact(self, prediction: Array, kind: PredictionKind) -> tuple[bytes, int, int] | None:
        """The prediction as it is stored: its bytes, layout and width (values per row; 0 for
        labels), or None if unusable.

        Always copies: the caller's array may be a view into a whole batch's output. One
        row's label is packed without an array. (remember() copies the usual classifier
        answer, a score matrix, itself, without this call.)
        """
        shape = prediction.shape
        if not shape or prediction.size == 0:
            self._unsupported += 1
            return None
        rows = shape[0]
        width = prediction.size // rows
        if rows > self._max_rows or width > self._max_width:
            self._too_large += 1
            return None
        dkind = prediction.dtype.kind
        if dkind not in "biuf":
            self._unsupported += 1  # string labels, objects
            return None
        if dkind != "f" and kind != "regression":  # a classifier's integer labels
            if width != 1:
                self._unsupported += 1  # multi-label outputs
                return None
            if rows == 1:  # one request's row: packed without an array
                label = int(prediction.item())
                if not 0 <= label <= _MAX_LABEL:
                    self._unsupported += 1
                    return None
                return _LABEL.pack(label), _LABELS, 0
            labels = prediction.reshape(rows)
            if not (bool(labels.min() >= 0) and bool(labels.max() <= _MAX_LABEL)):
                self._unsupported += 1
                return None
            return labels.astype(np.int32).tobytes(), _LABELS, 0
        matrix = prediction if shape == (rows, width) else prediction.reshape(rows, width)
        if kind == "regression" or (kind == "auto" and width == 1):
            return matrix.astype(np.float64).tobytes(), _VALUES, width
        if width == 1:  # kind == "classification": one sigmoid output, P(class 1)
            p = matrix.astype(np.float64)
            if not bool(((p >= 0.0) & (p <= 1.0)).all()):
                self._unsupported += 1
                return None
            return np.concatenate([1.0 - p, p], axis=1).astype(np.float32).tobytes(), _SCORES, 2
        # Probabilities or scores: told apart at join.
        return matrix.astype(np.float32).tobytes(), _SCORES, width

    def remember(
        self,
        request_id: str,
        model: str,
        version: str,
        prediction: Array,
        *,
        kind: PredictionKind = "auto",
    ) -> None:
        """Remember what ``model``/``version`` answered to ``request_id``. Never raises.

        ``prediction`` has the request's rows on axis 0. With ``kind="auto"``: integer labels
        (rows,) or (rows, 1) and float score matrices (rows, classes > 1) are a classifier's
        (log-loss comes from rows that are probability vectors); other float outputs are a
        regressor's. ``kind="classification"`` also reads one float column as P(class 1).
        Amortised O(1) in the number of entries, plus the copy of the prediction. A
        repeated id replaces the earlier prediction.
        """
        if not self._enabled:
            return
        if not request_id:
            self._no_id += 1
            return
        shape = prediction.shape
        data: bytes
        if (  # the usual classifier answer, a (rows, classes) score matrix, inline
            kind == "auto"
            and len(shape) == 2
            and 0 < shape[0] <= self._max_rows
            and 1 < shape[1] <= self._max_width
            and prediction.dtype.kind == "f"
        ):
            if prediction.dtype is not _FLOAT32:
                prediction = prediction.astype(np.float32)
            data, layout, width = prediction.tobytes(), _SCORES, shape[1]
        else:
            compact = self._compact(prediction, kind)
            if compact is None:
                return
            data, layout, width = compact
        size = _size(request_id, data)
        max_bytes = self._max_bytes
        if size > max_bytes:
            self._too_large += 1
            return
        index = self._variant_index.get((model, version))
        if index is None:
            index = self._add_variant(model, version)
        now = self._clock()
        entries = self._entries
        if request_id in entries:
            self._forget(request_id)
        entries[request_id] = (now, index, data, layout, width)
        self._bytes += size
        self._remembered += 1
        self._waiting += 1
        if len(entries) > self._capacity or self._bytes > max_bytes:
            while len(entries) > self._capacity or self._bytes > max_bytes:
                self._drop_oldest(now)
        if now >= self._sweep_after:
            self._sweep(now, _SWEEP_PER_REMEMBER)

    def _add_variant(self, model: str, version: str) -> int:
        index = self._variant_index[(model, version)] = len(self._by_index)
        self._by_index.append(OutcomeStats(model, version))
        return index

    def _forget(self, request_id: str) -> None:
        """Remove the entry a repeated id replaces (counted as replaced unless joined)."""
        data = self._entries.pop(request_id)[2]
        self._bytes -= _size(request_id, data)
        if data is not None:
            self._replaced += 1
            self._waiting -= 1

    def _drop_oldest(self, now: float) -> None:
        request_id, (t, _index, data, _layout, _width) = self._entries.popitem(last=False)
        self._bytes -= _size(request_id, data)
        if data is None:
            return  # a tombstone: only duplicate detection is lost
        self._waiting -= 1
        if t <= now - self._ttl_s:
            self._expired += 1
        else:
            self._evicted += 1

    def _sweep(self, now: float, budget: int) -> int:
        """Drop up to ``budget`` entries older than ttl_s from the oldest end."""
        entries = self._entries
        cutoff = now - self._ttl_s
        dropped = 0
        while dropped < budget and entries:
            request_id, (t, _index, data, _layout, _width) = next(iter(entries.items()))
            if t > cutoff:
                # Nothing expires before the oldest entry does: skip sweeps until then
                # (evictions and joins only make the true oldest younger, never older).
                self._sweep_after = t + self._ttl_s
                break
            del entries[request_id]
            self._bytes -= _size(request_id, data)
            if data is not None:
                self._expired += 1
                self._waiting -= 1
            dropped += 1
        return dropped

    def sweep(self) -> int:
        """Drop every entry older than ttl_s now; returns how many. Optional: remember()
        and join() already sweep a little each call; a periodic task can call this when
        traffic stops."""
        return self._sweep(self._clock(), len(self._entries))

    # -- join --------------------------------------------------------------------------------

    def join(self, items: Sequence[FeedbackItem], model: str | None = None) -> FeedbackResult:
        """Match ground truth to remembered predictions and add each pair to its variant's
        outcome stats. With ``model``, ids remembered for another model count as unknown
        (a per-model feedback endpoint neither sees nor feeds other models' predictions).

        Raises ``FeedbackTooLargeError`` above ``max_batch`` items (nothing is joined then);
        every other problem is counted per item, never raised. Matched pairs are added per
        variant in one vectorised call, so a 10,000-item call costs a few ms, not 10,000
        numpy round trips.
        """
        if len(items) > self._settings.max_batch:
            raise FeedbackTooLargeError(
                f"{len(items)} feedback items in one call; at most {self._settings.max_batch}"
            )
        now = self._clock()
        cutoff = now - self._ttl_s
        entries = self._entries
        matched = unknown = expired = duplicate = invalid = freed_bytes = 0
        errors: list[str] = []
        groups: dict[tuple[int, int, int], _Group] = {}
        claimed: dict[int, OutcomeKind] = {}  # kinds fixed by this call, not yet in stats

        for index, item in enumerate(items):
            request_id = item.id
            if not isinstance(request_id, str) or not request_id:
                invalid += 1
                if len(errors) < MAX_ERRORS:
                    errors.append(f"item {index}: id must be a non-empty string")
                continue
            entry = entries.get(request_id)
            if entry is None:
                unknown += 1
                continue
            t, variant, data, layout, width = entry
            stats = self._by_index[variant] if variant != _JOINED else None
            if model is not None and stats is not None and stats.model != model:
                unknown += 1
                continue
            if t <= cutoff:
                del entries[request_id]
                self._bytes -= _size(request_id, data)
                if data is not None:
                    self._expired += 1
                    self._waiting -= 1
                expired += 1
                continue
            if stats is None or data is None:
                duplicate += 1
                continue
            rows = len(data) // (_DTYPE_OF_LAYOUT[layout].itemsize * (width or 1))
            sid = id(stats)
            kind = _KIND_OF_LAYOUT[layout]
            held = stats.kind or claimed.get(sid)
            try:
                if held is not None and held != kind:
                    raise _InvalidTruthError(
                        f"{stats.model}/{stats.version} already has {held} outcomes"
                    )
                truth: list[int] | list[float]
                if layout == _SCORES:
                    truth = _labels(item.truth, rows, width)
                elif layout == _LABELS:
                    truth = _labels(item.truth, rows, _MAX_LABEL + 1)
                else:
                    truth = _values(item.truth, rows, width)
            except _InvalidTruthError as exc:
                invalid += 1
                if len(errors) < MAX_ERRORS:
                    errors.append(f"item {index} (id {request_id[:64]!r}): {exc}")
                continue
            if held is None:
                claimed[sid] = kind
            key = (sid, layout, width)
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Group(stats, layout, width)
            group.predictions.append(data)
            group.truths.extend(truth)
            entries[request_id] = (t, _JOINED, None, layout, 0)  # keeps its place: ages out
            freed_bytes += len(data)
            matched += 1

        self._bytes -= freed_bytes
        self._waiting -= matched
        for group in groups.values():
            group.add_to_stats()
        self._sweep(now, len(items) + _SWEEP_PER_REMEMBER)

        self._join_calls += 1
        self._items += len(items)
        self._matched += matched
        self._unknown += unknown
        self._expired_ids += expired
        self._duplicate += duplicate
        self._invalid += invalid
        return FeedbackResult(
            received=len(items),
            matched=matched,
            unknown_ids=unknown,
            expired_ids=expired,
            duplicate=duplicate,
            invalid=invalid,
            errors=tuple(errors),
        )

    # -- readers -----------------------------------------------------------------------------

    def variants(self) -> list[tuple[str, str]]:
        """(model, version) pairs that served a remembered prediction since start."""
        return list(self._variant_index)

    def snapshot(self, model: str, version: str) -> OutcomeSnapshot:
        """Cumulative outcomes of one version (empty if it never had a prediction here);
        diff two with ``minus()`` for a window and pass them to ``outcomes.compare``."""
        index = self._variant_index.get((model, version))
        if index is None:
            return OutcomeSnapshot(model, version)
        return self._by_index[index].snapshot()

    def counters(self) -> MemoryCounters:
        return MemoryCounters(
            entries=len(self._entries),
            waiting=self._waiting,
            bytes_estimate=self._bytes,
            remembered=self._remembered,
            replaced=self._replaced,
            too_large=self._too_large,
            unsupported=self._unsupported,
            no_id=self._no_id,
            evicted=self._evicted,
            expired=self._expired,
            join_calls=self._join_calls,
            items=self._items,
            matched=self._matched,
            unknown_ids=self._unknown,
            expired_ids=self._expired_ids,
            duplicate=self._duplicate,
            invalid=self._invalid,
        )
