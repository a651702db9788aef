"""monitor.py: DriftMonitor: per-request counting, sliding windows and drift reports per model.

``observe()`` runs in inference workers right after a model call: it bins the batch's input and
output columns into the calling thread's own ring of sub-window count matrices (one numba call
per tensor part, no lock, no allocation after the thread's first request). A background
aggregator copies sealed sub-windows into sliding sums by exact integer addition (DRIFT.md §1.3,
§6). ``report()`` and ``compare()`` hand those sums to ``report.py`` for statistics and
verdicts. The monitor knows models only as ``ModelRef`` and tensors only as named numpy arrays:
nothing of routing, batching, rollout policy or wire formats.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from gateway.config import DriftSettings
from gateway.distributions import ks_coefficient
from gateway.drift import kernels, stats
from gateway.drift.profile import CategoricalProfile, NumericProfile, Profile, TensorProfile
from gateway.drift.report import DriftReport, FeatureDrift, assemble, two_window, vs_reference
from gateway.types import ModelRef

__all__ = ["DriftSettings", "FeatureDrift", "DriftReport", "DriftMonitor"]

logger = logging.getLogger(__name__)

I64Array = npt.NDArray[np.int64]
F64Array = npt.NDArray[np.float64]

MIN_RING_SLOTS: Final = 3  # current + one lagging epoch + one sealed, whatever sub_windows is
STOP_TIMEOUT_S: Final = 5.0  # a tick takes milliseconds; waiting longer means it is stuck


# ----------------------------------------------------------------------------------------------
# Internal state.


@dataclass(eq=False)
class _Ring:
    """One thread's sub-window counts for one part: ``counts[S, F, W]`` and ``epochs[S]``."""

    counts: I64Array
    epochs: I64Array
    collected_upto: int  # the aggregator has copied every epoch <= this one


@dataclass(eq=False)
class _Part:
    """The numeric or the categorical columns of one tensor: one kernel call per request."""

    key: str
    names: tuple[str, ...]
    cols: I64Array
    packed: npt.NDArray[np.float32]
    kernel: kernels.RingKernel
    numeric: NumericProfile | None
    categorical: CategoricalProfile | None
    critical: F64Array  # chi-square critical value per feature at alpha / F, fixed per profile
    ks_coefficient: float
    rings: list[_Ring] = field(default_factory=list)  # appended by request threads
    sealed: dict[int, I64Array] = field(default_factory=dict)  # epoch -> counts, in window
    window: I64Array = field(default_factory=lambda: np.zeros((0, 0), np.int64))

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.cols.shape[0]), self._width())

    def _width(self) -> int:
        if self.numeric is not None:
            return self.numeric.width
        assert self.categorical is not None
        return self.categorical.width


@dataclass(eq=False)
class _TensorPlan:
    tensor: str
    is_input: bool
    n_columns: int
    parts: tuple[_Part, ...]


@dataclass(eq=False)
class _Registration:
    ref: ModelRef
    profile: Profile | None
    plans: tuple[_TensorPlan, ...]
    first_epoch: int
    dropped: int = 0  # racy increments from several threads: a close count, not an exact one
    warned: bool = False


# Per-thread precomputed work for one model: each tensor's name, side, column count and
# kernel calls (kernel, cols, packed profile, ring counts, ring epochs). Tuples, because the
# request path only iterates them.
_Call = tuple[kernels.RingKernel, I64Array, npt.NDArray[np.float32], I64Array, I64Array]
_Step = tuple[str, bool, int, tuple[_Call, ...]]
_ThreadEntry = tuple[_Registration, tuple[_Step, ...]]
_MISSING: Final[Any] = object()
_FLOAT32: Final = np.dtype(np.float32)

# ----------------------------------------------------------------------------------------------


class DriftMonitor:
    """Counts served batches per model version and reports drift; see the module docstring.

    ``clock_ns`` is a monotonic clock in ns (injected so tests need no sleeps);
    ``unix_offset_ns`` maps it to Unix time (default: measured at construction), so sub-window
    epochs line up across replicas. Thread-safe: ``observe`` from any number of threads without
    locks; the other methods share one lock with the aggregator.
    """

    def __init__(
        self,
        settings: DriftSettings,
        *,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        unix_offset_ns: int | None = None,
    ) -> None:
        if settings.sub_window_s <= 0 or settings.sub_windows < 1 or settings.tick_s <= 0:
            raise ValueError("drift sub_window_s, sub_windows and tick_s must be positive")
        if not 0.0 < settings.alpha < 1.0:
            raise ValueError(f"drift alpha must be in (0, 1), got {settings.alpha}")
        self._settings = settings
        self._clock_ns = clock_ns
        self._offset_ns = time.time_ns() - clock_ns() if unix_offset_ns is None else unix_offset_ns
        self._sub_ns = round(settings.sub_window_s * 1e9)
        self._slots = max(settings.sub_windows, MIN_RING_SLOTS)
        self._max_rows = settings.max_rows_per_request
        self._models: dict[ModelRef, _Registration] = {}
        self._local = threading.local()  # .cache: ModelRef -> _ThreadEntry | None
        self._generation = 0  # bumped by (un)register: thread caches rebuild
        self._lock = threading.Lock()
        self._sealed_upto = self._epoch() - 2
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def _epoch(self) -> int:
        return (self._clock_ns() + self._offset_ns) // self._sub_ns

    # -- registration ----------------------------------------------------------------------

    def register(self, ref: ModelRef, profile: Profile | None, input_name: str) -> None:
        """Monitor ``ref``'s tensor ``input_name`` (and the profile's outputs) from now on.

        Check the profile against the model first (``Profile.check_compatible``): a tensor
        whose column count differs is dropped at observe time. Replaces any earlier
        registration of ``ref``, whose windows are dropped. Compiles or loads the kernels the
        profile needs, so it blocks (ms on a warm numba cache, seconds on a cold one): call
        before the model reports ready. ``profile`` None (or monitoring disabled in the
        settings) registers the model without monitoring it.
        """
        plans: tuple[_TensorPlan, ...] = ()
        if profile is not None and self._settings.enabled:
            plans = (self._plan(profile.inputs, input_name, True, profile.inputs.n_columns),)
            n_out = sum(t.n_columns for t in profile.outputs.values())
            plans += tuple(
                self._plan(tensor, name, False, n_out) for name, tensor in profile.outputs.items()
            )
            kernels.warm_up(
                profile.numeric_depths(), profile.categorical_depths(), count=False, ring=True
            )
        with self._lock:
            self._models[ref] = _Registration(ref, profile, plans, self._epoch())
            self._generation += 1
        logger.info(
            "drift monitoring %s",
            ref,
            extra={"profile_hash": profile.hash if profile else None, "input": input_name},
        )

    def unregister(self, ref: ModelRef) -> None:
        """Stop monitoring ``ref`` and drop its windows; unknown refs are ignored."""
        with self._lock:
            self._models.pop(ref, None)
            self._generation += 1

    def _plan(self, tensor: TensorProfile, name: str, is_input: bool, family: int) -> _TensorPlan:
        tail = self._settings.alpha / max(family, 1)
        ks_c = ks_coefficient(tail)
        side = "inputs" if is_input else "outputs"
        parts: list[_Part] = []
        if tensor.numeric is not None:
            num = tensor.numeric
            df = np.asarray((num.ref_counts > 0).sum(axis=1) - 1, np.int64)
            parts.append(
                _Part(
                    key=f"{side}/{name}/numeric",
                    names=tuple(tensor.names[c] for c in num.cols.tolist()),
                    cols=num.cols,
                    packed=num.packed,
                    kernel=kernels.numeric_ring_kernel(num.depth),
                    numeric=num,
                    categorical=None,
                    critical=stats.chi2_critical(df, tail),
                    ks_coefficient=ks_c,
                    window=np.zeros((num.cols.shape[0], num.width), np.int64),
                )
            )
        if tensor.categorical is not None:
            cat = tensor.categorical
            df = np.asarray((cat.ref_counts > 0).sum(axis=1) - 1, np.int64)
            parts.append(
                _Part(
                    key=f"{side}/{name}/categorical",
                    names=tuple(tensor.names[c] for c in cat.cols.tolist()),
                    cols=cat.cols,
                    packed=cat.packed,
                    kernel=kernels.categorical_ring_kernel(cat.depth),
                    numeric=None,
                    categorical=cat,
                    critical=stats.chi2_critical(df, tail),
                    ks_coefficient=ks_c,
                    window=np.zeros((cat.cols.shape[0], cat.width), np.int64),
                )
            )
        return _TensorPlan(name, is_input, tensor.n_columns, tuple(parts))

    def warm_up(self) -> None:
        """Run every registered kernel once (``register`` already compiled them)."""
        with self._lock:
            profiles = [r.profile for r in self._models.values() if r.profile is not None]
        for profile in profiles:
            kernels.warm_up(
                profile.numeric_depths(), profile.categorical_depths(), count=False, ring=True
            )

    # -- request path ----------------------------------------------------------------------

    def observe(
        self,
        ref: ModelRef,
        inputs: Mapping[str, npt.NDArray[Any]],
        outputs: Mapping[str, npt.NDArray[Any]],
    ) -> None:
        """Count one served batch; never blocks, never raises, never compiles.

        Tensors are read as ``[rows, columns]`` (all but the first axis flattened); anything
        but a 2-D C-contiguous float32 array is first copied into one. Missing tensors are
        skipped; a tensor whose column count does not match the profile, or that is not
        numeric, is dropped and counted. Cost: about 2 us for 1 row x 32 features.
        """
        local = self._local
        cache: dict[ModelRef, _ThreadEntry | None] | None = getattr(local, "cache", None)
        if cache is None or local.generation != self._generation:
            cache = self._refresh_thread_cache(cache)
        entry = cache.get(ref, _MISSING)
        if entry is _MISSING:
            entry = cache[ref] = self._thread_entry(ref)
        if entry is None:
            return
        reg, steps = entry
        try:
            epoch = (self._clock_ns() + self._offset_ns) // self._sub_ns
            for tensor_name, is_input, n_columns, calls in steps:
                x = (inputs if is_input else outputs).get(tensor_name)
                if x is None:
                    continue
                if x.dtype is not _FLOAT32 or x.ndim != 2:
                    x = kernels.as_rows(x)
                n_rows, n_cols = x.shape
                if n_cols != n_columns:
                    self._drop(reg, f"{tensor_name} has {n_cols} columns, expected {n_columns}")
                    continue
                stride = 1 if n_rows <= self._max_rows else -(-n_rows // self._max_rows)
                try:
                    for kernel, cols, packed, counts, epochs in calls:
                        kernel(x, cols, packed, counts, epochs, epoch, stride)
                except TypeError:  # float32 but not C-contiguous: the first call refused it
                    x = np.ascontiguousarray(x)
                    for kernel, cols, packed, counts, epochs in calls:
                        kernel(x, cols, packed, counts, epochs, epoch, stride)
        except Exception as exc:  # the observation path must never fail a response
            self._drop(reg, f"{type(exc).__name__}: {exc}")

    def _refresh_thread_cache(
        self, old: dict[ModelRef, _ThreadEntry | None] | None
    ) -> dict[ModelRef, _ThreadEntry | None]:
        """This thread's cache after (un)registrations: keep entries still current."""
        generation = self._generation
        models = self._models
        cache: dict[ModelRef, _ThreadEntry | None] = {}
        for ref, entry in (old or {}).items():
            if entry is not None and models.get(ref) is entry[0]:
                cache[ref] = entry
        self._local.cache = cache
        self._local.generation = generation
        return cache

    def _thread_entry(self, ref: ModelRef) -> _ThreadEntry | None:
        """Create this thread's rings for ``ref`` and hand them to the aggregator."""
        reg = self._models.get(ref)
        if reg is None or not reg.plans:
            return None
        collected = self._epoch() - 1
        steps: list[_Step] = []
        for plan in reg.plans:
            calls: list[_Call] = []
            for part in plan.parts:
                n_feat, width = part.shape
                ring = _Ring(
                    counts=np.zeros((self._slots, n_feat, width), np.int64),
                    epochs=np.full(self._slots, -1, np.int64),
                    collected_upto=collected,
                )
                part.rings.append(ring)  # list.append is atomic under the GIL: no lock
                calls.append((part.kernel, part.cols, part.packed, ring.counts, ring.epochs))
            steps.append((plan.tensor, plan.is_input, plan.n_columns, tuple(calls)))
        return reg, tuple(steps)

    def _drop(self, reg: _Registration, reason: str) -> None:
        reg.dropped += 1
        if not reg.warned:
            reg.warned = True
            logger.warning("drift: dropping observations of %s (%s)", reg.ref, reason)

    # -- aggregator ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the aggregator thread (daemon), ticking every ``tick_s``; idempotent."""
        if not self._settings.enabled or self._thread is not None:
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(self._stop,), name="drift-aggregator", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the aggregator thread and wait for it (up to 5 s)."""
        if self._thread is None or self._stop is None:
            return
        self._stop.set()
        self._thread.join(STOP_TIMEOUT_S)
        if self._thread.is_alive():
            logger.error("drift aggregator did not stop within %.1f s", STOP_TIMEOUT_S)
        self._thread = None
        self._stop = None

    def _run(self, stop: threading.Event) -> None:
        try:
            while not stop.wait(self._settings.tick_s):
                try:
                    self.tick()
                except Exception:
                    logger.exception("drift aggregator tick failed; next tick retries")
        except BaseException:
            logger.exception("drift aggregator thread crashed")
            raise

    def tick(self) -> None:
        """Move sealed sub-windows (epoch <= current - 2) into the sliding sums; expire old ones.

        The one-epoch lag keeps clear of requests still writing the previous sub-window; the
        thread calls this every ``tick_s``, tests call it directly.
        """
        with self._lock:
            sealed_upto = self._epoch() - 2
            oldest = sealed_upto - self._settings.sub_windows + 1
            for reg in self._models.values():
                for plan in reg.plans:
                    for part in plan.parts:
                        self._collect(part, sealed_upto, oldest)
            self._sealed_upto = max(self._sealed_upto, sealed_upto)

    @staticmethod
    def _collect(part: _Part, sealed_upto: int, oldest: int) -> None:
        for ring in tuple(part.rings):
            start = ring.collected_upto
            if sealed_upto <= start:
                continue
            for slot in range(ring.epochs.shape[0]):
                epoch = int(ring.epochs[slot])
                if start < epoch <= sealed_upto and epoch >= oldest:
                    block = ring.counts[slot].copy()
                    merged = part.sealed.get(epoch)
                    if merged is None:
                        part.sealed[epoch] = block.copy()
                    else:
                        merged += block
                    part.window += block
            ring.collected_upto = sealed_upto
        for epoch in [e for e in part.sealed if e < oldest]:
            part.window -= part.sealed.pop(epoch)

    # -- reports ---------------------------------------------------------------------------

    def _require(self, ref: ModelRef) -> _Registration:
        reg = self._models.get(ref)
        if reg is None:
            raise KeyError(f"model {ref} is not registered for drift monitoring")
        return reg

    def _window_s(self, reg: _Registration) -> float:
        oldest = self._sealed_upto - self._settings.sub_windows + 1
        covered = self._sealed_upto - max(oldest, reg.first_epoch) + 1
        return max(covered, 0) * self._settings.sub_window_s

    def report(self, ref: ModelRef) -> DriftReport:
        """Drift of ``ref``'s current window against its reference profile.

        Raises ``KeyError`` for an unregistered ref. Cost: about 0.1 ms per 32 features.
        """
        with self._lock:
            reg = self._require(ref)
            windows = {part.key: part.window.copy() for plan in reg.plans for part in plan.parts}
            window_s = self._window_s(reg)
        return self.report_counts(ref, windows, window_s)

    def report_counts(
        self, ref: ModelRef, windows: Mapping[str, I64Array], window_s: float
    ) -> DriftReport:
        """``report`` over the given window counts (by part key, as ``export_since`` names
        them; a part missing counts as empty): e.g. the sum of many replicas' windows."""
        reg = self._require(ref)
        features: dict[bool, list[FeatureDrift]] = {True: [], False: []}
        for plan in reg.plans:
            for part in plan.parts:
                window = _window_of(part, windows)
                features[plan.is_input] += vs_reference(part, window, self._settings.min_samples)
        return self._assemble(reg, "reference", window_s, features)

    def compare(self, ref_a: ModelRef, ref_b: ModelRef) -> DriftReport:
        """Drift of ``ref_a``'s window (canary) against ``ref_b``'s (stable), inputs and outputs.

        Both must be registered with profiles of the same hash (``ValueError`` otherwise);
        verdicts need ``min_samples_per_arm`` rows in each window.
        """
        with self._lock:
            reg_a, reg_b = self._require(ref_a), self._require(ref_b)
            win_a = {p.key: p.window.copy() for plan in reg_a.plans for p in plan.parts}
            win_b = {p.key: p.window.copy() for plan in reg_b.plans for p in plan.parts}
            window_s = min(self._window_s(reg_a), self._window_s(reg_b))
        return self.compare_counts(ref_a, ref_b, win_a, win_b, window_s)

    def compare_counts(
        self,
        ref_a: ModelRef,
        ref_b: ModelRef,
        win_a: Mapping[str, I64Array],
        win_b: Mapping[str, I64Array],
        window_s: float,
    ) -> DriftReport:
        """``compare`` over the given window counts of both versions (see ``report_counts``)."""
        reg_a, reg_b = self._require(ref_a), self._require(ref_b)
        if reg_a.profile is None or reg_b.profile is None:
            raise ValueError(f"compare {ref_a} with {ref_b}: both need a drift profile")
        if reg_a.profile.hash != reg_b.profile.hash:
            raise ValueError(
                f"compare {ref_a} with {ref_b}: profiles differ "
                f"({reg_a.profile.hash} vs {reg_b.profile.hash})"
            )
        features: dict[bool, list[FeatureDrift]] = {True: [], False: []}
        for plan in reg_a.plans:
            for part in plan.parts:
                features[plan.is_input] += two_window(
                    part,
                    _window_of(part, win_a),
                    _window_of(part, win_b),
                    self._settings.min_samples_per_arm,
                )
        return self._assemble(reg_a, str(ref_b), window_s, features)

    def export_counts(self, ref: ModelRef) -> tuple[int, str, dict[str, I64Array]]:
        """The newest sealed sub-window of ``ref``, for merging across replicas.

        Returns ``(epoch_unix, profile_hash, counts)``: the sub-window's Unix epoch number (it
        starts at ``epoch_unix * sub_window_s`` Unix seconds), the profile hash, and per tensor
        part ("inputs/<name>/numeric", "outputs/<name>/categorical", ...) its int64 count matrix
        summed over threads. Matrices with equal epoch and hash merge by addition.
        """
        with self._lock:
            reg = self._require(ref)
            epoch = self._sealed_upto
            counts = {
                part.key: part.sealed.get(epoch, np.zeros_like(part.window)).copy()
                for plan in reg.plans
                for part in plan.parts
            }
        return epoch, reg.profile.hash if reg.profile else "", counts

    def export_since(
        self, ref: ModelRef, after: int
    ) -> tuple[str, list[tuple[int, dict[str, I64Array]]]]:
        """Every sealed sub-window of ``ref`` after Unix epoch ``after`` still in the window,
        oldest first: ``(profile_hash, [(epoch, counts by part key)])``, an epoch nobody
        counted in as zeros. Each sealed epoch is final, so a replica publishes it once."""
        with self._lock:
            reg = self._require(ref)
            sealed = self._sealed_upto
            first = max(after + 1, sealed - self._settings.sub_windows + 1)
            out = [
                (
                    epoch,
                    {
                        part.key: part.sealed.get(epoch, np.zeros_like(part.window)).copy()
                        for plan in reg.plans
                        for part in plan.parts
                    },
                )
                for epoch in range(first, sealed + 1)
            ]
        return (reg.profile.hash if reg.profile else ""), out

    def epochs(self) -> tuple[int, int, float]:
        """(newest sealed Unix epoch, epochs in a window, seconds per epoch)."""
        return self._sealed_upto, self._settings.sub_windows, self._settings.sub_window_s

    def window_s(self, ref: ModelRef) -> float:
        """Seconds of ``ref``'s window that hold counts (less than a window after it starts)."""
        with self._lock:
            return self._window_s(self._require(ref))

    def profiled(self) -> list[ModelRef]:
        """The registered refs that are counted (a profile, monitoring enabled)."""
        with self._lock:
            return [ref for ref, reg in self._models.items() if reg.profile and reg.plans]

    @staticmethod
    def _assemble(
        reg: _Registration,
        baseline: str,
        window_s: float,
        features: dict[bool, list[FeatureDrift]],
    ) -> DriftReport:
        profile_hash = reg.profile.hash if reg.profile else ""
        return assemble(str(reg.ref), profile_hash, baseline, window_s, features, reg.dropped)


def _window_of(part: _Part, windows: Mapping[str, I64Array]) -> I64Array:
    window = windows.get(part.key)
    if window is None or window.shape != part.window.shape:
        return np.zeros_like(part.window)
    return window
