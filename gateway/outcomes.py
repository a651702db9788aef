"""outcomes.py: per-variant outcome statistics (accuracy, log-loss, MAE, RMSE) and the tests
that say whether a candidate version does worse than the stable one on ground truth.

In: (prediction, truth) pairs per model version, already matched by ``feedback.py``. Out:
cumulative ``OutcomeStats`` with ``snapshot()`` / ``minus()`` for windows (as in
``traffic.py``), and ``compare()``: metrics with confidence intervals per arm, a one-sided test
of "candidate worse", and a sample-size estimate. Pure arithmetic: no scipy at run time (the
distributions come from ``distributions.py``), no clock, no I/O. It
knows nothing of request ids, routing, rollout policy or wire formats.

``OutcomeStats`` is mutated only on the event-loop thread; readers there take snapshots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec
import numpy as np
import numpy.typing as npt

from gateway.distributions import (
    DEFAULT_POWER,
    accuracy_ci,
    mae_ci,
    mean_ci,
    rmse_ci,
    samples_needed_means,
    samples_needed_two_proportions,
    two_proportion_test,
    welch_t_test,
)

__all__ = [
    "MAX_CONFUSION_CLASSES",
    "LOG_LOSS_FLOOR",
    "PROBA_SUM_TOLERANCE",
    "SMALL_BATCH",
    "OutcomeKind",
    "Moments",
    "OutcomeSnapshot",
    "OutcomeStats",
    "OutcomeKindError",
    "ClassCounts",
    "ArmMetrics",
    "Comparison",
    "compare",
]

OutcomeKind = Literal["classification", "regression"]

# A 64 x 64 int64 confusion matrix is 32 KiB per variant (and per snapshot); labels at or
# above 64 are counted in ``confusion_overflow`` instead, which keeps snapshots cheap.
MAX_CONFUSION_CLASSES: Final = 64
LOG_LOSS_FLOOR: Final = 1e-15  # probability floor, as scikit-learn's log_loss clips
# A row of scores counts as probabilities when it sums to 1 within this: float32 softmax rows
# are within ~1e-6, so this is lenient yet far from any logit vector that happens to be >= 0.
PROBA_SUM_TOLERANCE: Final = 1e-3
# Up to this many rows a Python loop beats numpy's per-call overhead (about 40 numpy calls
# per batch): a one-row join costs ~10 us instead of ~60 us (bench.feedback_memory).
SMALL_BATCH: Final = 16

F64Array = npt.NDArray[np.float64]
I64Array = npt.NDArray[np.int64]

# ----------------------------------------------------------------------------------------------
# Cumulative statistics per variant.


@dataclass(frozen=True, slots=True)
class Moments:
    """Count, mean and sum of squared deviations (Welford's M2) of a series of values."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @property
    def var(self) -> float | None:
        """Sample variance (ddof=1); None below 2 values."""
        return self.m2 / (self.n - 1) if self.n >= 2 else None

    @property
    def total(self) -> float:
        return self.n * self.mean

    def minus(self, earlier: Moments) -> Moments:
        """The moments of the values added after ``earlier`` (Chan's merge, run backwards)."""
        n2 = self.n - earlier.n
        if n2 <= 0:
            return Moments()
        if earlier.n == 0:
            return self
        mean2 = (self.n * self.mean - earlier.n * earlier.mean) / n2
        delta = mean2 - earlier.mean
        m2 = self.m2 - earlier.m2 - delta * delta * earlier.n * n2 / self.n
        return Moments(n2, mean2, max(0.0, m2))


class _RunningMoments:
    __slots__ = ("m2", "mean", "n")

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0

    def add_one(self, value: float) -> None:
        """Welford's update."""
        self.n += 1
        delta = value - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (value - self.mean)

    def add(self, values: F64Array) -> None:
        """Merge a batch (Chan et al.)."""
        nb = int(values.shape[0])
        if nb == 0:
            return
        mb = float(values.mean())
        m2b = float(np.square(values - mb).sum())
        n = self.n + nb
        delta = mb - self.mean
        self.mean += delta * nb / n
        self.m2 += m2b + delta * delta * self.n * nb / n
        self.n = n

    def freeze(self) -> Moments:
        return Moments(self.n, self.mean, self.m2)


class OutcomeKindError(ValueError):
    """Outcomes of one kind were added to a variant that holds the other kind."""


@dataclass(frozen=True, slots=True)
class OutcomeSnapshot:
    """Cumulative outcome counters of one (model, version) at one instant.

    Classification: ``n`` rows, ``correct`` of them; ``log_loss`` over the rows that came with
    probabilities; ``confusion[true, predicted]`` for labels below ``MAX_CONFUSION_CLASSES``,
    the other rows (larger labels, or no predicted class) in ``confusion_overflow``.
    Regression: ``n`` values (rows x outputs); moments of |error| and error^2, sum of errors
    (error = prediction - truth).
    """

    model: str
    version: str
    kind: OutcomeKind | None = None
    n: int = 0
    correct: int = 0
    log_loss: Moments = Moments()
    confusion: I64Array | None = None
    confusion_overflow: int = 0
    abs_error: Moments = Moments()
    sq_error: Moments = Moments()
    sum_error: float = 0.0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.n if self.kind == "classification" and self.n else None

    @property
    def mae(self) -> float | None:
        return self.abs_error.mean if self.abs_error.n else None

    @property
    def rmse(self) -> float | None:
        return math.sqrt(self.sq_error.mean) if self.sq_error.n else None

    @property
    def mean_error(self) -> float | None:
        """Mean signed error (bias): positive when the model over-predicts."""
        return self.sum_error / self.n if self.kind == "regression" and self.n else None

    def minus(self, earlier: OutcomeSnapshot) -> OutcomeSnapshot:
        """The window between ``earlier`` and this snapshot."""
        confusion = self.confusion
        if confusion is not None and earlier.confusion is not None:
            confusion = confusion - earlier.confusion
        return OutcomeSnapshot(
            self.model,
            self.version,
            self.kind,
            self.n - earlier.n,
            self.correct - earlier.correct,
            self.log_loss.minus(earlier.log_loss),
            confusion,
            self.confusion_overflow - earlier.confusion_overflow,
            self.abs_error.minus(earlier.abs_error),
            self.sq_error.minus(earlier.sq_error),
            self.sum_error - earlier.sum_error,
        )


class OutcomeStats:
    """Ground-truth outcomes of one model version, cumulative since it was first served.

    Event-loop thread only (no lock). A variant holds one kind, fixed by its first outcome;
    adding the other kind raises ``OutcomeKindError`` (an empty batch adds nothing).
    Batches of up to ``SMALL_BATCH`` rows are counted in a Python loop, larger ones with
    numpy; both give the same counts (and the same moments up to rounding), so callers may
    add one row or ten thousand at a time.
    """

    __slots__ = (
        "_abs",
        "_confusion",
        "_log_loss",
        "_sq",
        "confusion_overflow",
        "correct",
        "kind",
        "model",
        "n",
        "sum_error",
        "version",
    )

    def __init__(self, model: str, version: str) -> None:
        self.model = model
        self.version = version
        self.kind: OutcomeKind | None = None
        self.n = 0
        self.correct = 0
        self.confusion_overflow = 0
        self.sum_error = 0.0
        self._confusion: I64Array | None = None
        self._log_loss = _RunningMoments()
        self._abs = _RunningMoments()
        self._sq = _RunningMoments()

    def _claim(self, kind: OutcomeKind) -> None:
        if self.kind is None:
            self.kind = kind
        elif self.kind != kind:
            raise OutcomeKindError(
                f"{self.model}/{self.version} has {self.kind} outcomes; got {kind} ones"
            )

    def _start_classification(self, rows: int) -> I64Array:
        self._claim("classification")
        if self._confusion is None:
            self._confusion = np.zeros((MAX_CONFUSION_CLASSES, MAX_CONFUSION_CLASSES), np.int64)
        self.n += rows
        return self._confusion

    def _count_one(self, confusion: I64Array, truth: int, predicted: int) -> None:
        if predicted == truth:
            self.correct += 1
        if 0 <= predicted < MAX_CONFUSION_CLASSES and truth < MAX_CONFUSION_CLASSES:
            confusion[truth, predicted] += 1
        else:
            self.confusion_overflow += 1

    def _count(self, confusion: I64Array, truth: I64Array, predicted: I64Array) -> None:
        k = MAX_CONFUSION_CLASSES
        self.correct += int(np.count_nonzero(predicted == truth))
        inside = (truth < k) & (predicted < k) & (predicted >= 0)
        cells = truth[inside] * k + predicted[inside]
        self.confusion_overflow += int(truth.shape[0]) - int(cells.shape[0])
        confusion += np.bincount(cells, minlength=k * k).reshape(k, k)

    def add_classification(self, predicted: I64Array, truth: I64Array) -> None:
        """Count rows of predicted vs true class labels (1-D, same length, truth >= 0).

        A predicted label of -1 means the model gave no usable class: the row counts as
        wrong and outside the confusion matrix. No probabilities, so no log-loss.
        """
        rows = int(truth.shape[0])
        if predicted.shape != (rows,):
            raise ValueError(f"{predicted.shape} predictions for {rows} truths")
        if rows == 0:
            return
        if rows <= SMALL_BATCH:
            pairs = list(zip(truth.tolist(), predicted.tolist(), strict=True))
            if any(t < 0 or p < -1 for t, p in pairs):
                raise ValueError("class labels must be non-negative")
            confusion = self._start_classification(rows)
            for t, p in pairs:
                self._count_one(confusion, t, p)
            return
        if truth.min() < 0 or predicted.min() < -1:
            raise ValueError("class labels must be non-negative")
        self._count(self._start_classification(rows), truth, predicted)

    def add_scores(self, scores: npt.NDArray[np.floating[Any]], truth: I64Array) -> None:
        """Count rows of a classifier's scores (rows x classes) against true labels.

        The predicted class is the row's argmax (the first on ties); a row with a NaN or inf
        has none (wrong, outside the confusion matrix). Rows that are probability vectors
        (in [0, 1], summing to 1 within 1e-3) also add the log-loss -ln max(p[true], 1e-15);
        other rows are logits or scores and add none. Truth labels must be below the
        number of columns.
        """
        rows = int(truth.shape[0])
        if scores.ndim != 2 or scores.shape[0] != rows:
            raise ValueError(f"scores of shape {scores.shape} for {rows} truths")
        width = int(scores.shape[1])
        if rows == 0:
            return
        if rows <= SMALL_BATCH:
            pairs = list(zip(scores.tolist(), truth.tolist(), strict=True))
            if any(not 0 <= t < width for _, t in pairs):
                raise ValueError(f"class labels must be in 0..{width - 1}")
            confusion = self._start_classification(rows)
            log_loss = self._log_loss
            for row, t in pairs:
                total = sum(row)
                if math.isfinite(total) or all(map(math.isfinite, row)):
                    top = max(row)
                    predicted = row.index(top)
                    if top <= 1.0 and min(row) >= 0.0 and abs(total - 1.0) <= PROBA_SUM_TOLERANCE:
                        log_loss.add_one(-math.log(max(row[t], LOG_LOSS_FLOOR)))
                else:
                    predicted = -1
                self._count_one(confusion, t, predicted)
            return
        if truth.min() < 0 or truth.max() >= width:
            raise ValueError(f"class labels must be in 0..{width - 1}")
        finite = np.isfinite(scores).all(axis=1)
        predicted = scores.argmax(axis=1).astype(np.int64)
        predicted[~finite] = -1
        in_range = ((scores >= 0.0) & (scores <= 1.0)).all(axis=1)
        sums = scores.sum(axis=1, dtype=np.float64)
        proba = in_range & (np.abs(sums - 1.0) <= PROBA_SUM_TOLERANCE)
        self._count(self._start_classification(rows), truth, predicted)
        if proba.any():
            p_true = scores[proba, truth[proba]].astype(np.float64)
            self._log_loss.add(-np.log(np.maximum(p_true, LOG_LOSS_FLOOR)))

    def add_regression(self, predicted: F64Array, truth: F64Array) -> None:
        """Count values of predictions vs true values (1-D float64, same length)."""
        if predicted.shape != truth.shape or predicted.ndim != 1:
            raise ValueError(f"{predicted.shape} predictions for {truth.shape} truths")
        values = int(truth.shape[0])
        if values == 0:
            return
        self._claim("regression")
        self.n += values
        if values <= SMALL_BATCH:
            for p, t in zip(predicted.tolist(), truth.tolist(), strict=True):
                err = p - t
                self.sum_error += err
                self._abs.add_one(abs(err))
                self._sq.add_one(err * err)
            return
        err = predicted - truth
        self.sum_error += float(err.sum())
        self._abs.add(np.abs(err))
        self._sq.add(np.square(err))

    def snapshot(self) -> OutcomeSnapshot:
        confusion = None
        if self._confusion is not None:
            confusion = self._confusion.copy()
            confusion.flags.writeable = False
        return OutcomeSnapshot(
            self.model,
            self.version,
            self.kind,
            self.n,
            self.correct,
            self._log_loss.freeze(),
            confusion,
            self.confusion_overflow,
            self._abs.freeze(),
            self._sq.freeze(),
            self.sum_error,
        )


# ----------------------------------------------------------------------------------------------
# Candidate against stable.


class ClassCounts(msgspec.Struct, frozen=True):
    """One class of a window: rows truly in it, rows predicted as it, and correct ones."""

    label: int
    true: int
    predicted: int
    correct: int


class ArmMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """One arm's metrics over the window; fields of the other kind stay None."""

    model: str
    version: str
    n: int
    """Rows (classification) or values (regression) with ground truth."""
    accuracy: float | None = None
    accuracy_ci: tuple[float, float] | None = None
    """Wilson interval at the comparison's confidence level (1 - alpha)."""
    log_loss: float | None = None
    log_loss_ci: tuple[float, float] | None = None
    log_loss_n: int = 0
    """Rows that came with probabilities (log-loss is over these only)."""
    classes: tuple[ClassCounts, ...] = ()
    mae: float | None = None
    mae_ci: tuple[float, float] | None = None
    rmse: float | None = None
    rmse_ci: tuple[float, float] | None = None
    mean_error: float | None = None


class Comparison(msgspec.Struct, frozen=True, kw_only=True):
    """Candidate vs stable on ground truth over one window (see ``compare``)."""

    kind: OutcomeKind | None
    test: Literal["two_proportion_z", "welch_t", "none"]
    statistic: float | None
    """z or t with the candidate as arm 1: negative z / positive t point to "worse"."""
    df: float | None
    p_value: float | None
    """One-sided p-value for "candidate worse than stable"; None when no test could run."""
    difference: float | None
    """Candidate minus stable: accuracy (share) or MAE (the model's unit)."""
    alpha: float
    min_samples: int
    enough_samples: bool
    candidate_worse: bool
    not_worse_enough_samples: bool
    samples_needed: int | None
    """Per arm, to detect the observed |difference| at alpha with 80% power; None when 0."""
    reason: str
    candidate: ArmMetrics
    stable: ArmMetrics


def _class_counts(confusion: I64Array | None) -> tuple[ClassCounts, ...]:
    if confusion is None:
        return ()
    true = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    diagonal = np.diagonal(confusion)
    return tuple(
        ClassCounts(int(i), int(true[i]), int(predicted[i]), int(diagonal[i]))
        for i in np.flatnonzero((true > 0) | (predicted > 0))
    )


def _arm(snap: OutcomeSnapshot, level: float) -> ArmMetrics:
    if snap.kind == "classification":
        ll = snap.log_loss
        ll_var = ll.var
        return ArmMetrics(
            model=snap.model,
            version=snap.version,
            n=snap.n,
            accuracy=snap.accuracy,
            accuracy_ci=accuracy_ci(snap.correct, snap.n, level) if snap.n else None,
            log_loss=ll.mean if ll.n else None,
            log_loss_ci=mean_ci(ll.mean, ll_var, ll.n, level) if ll_var is not None else None,
            log_loss_n=ll.n,
            classes=_class_counts(snap.confusion),
        )
    if snap.kind == "regression":
        abs_var = snap.abs_error.var
        sq_var = snap.sq_error.var
        return ArmMetrics(
            model=snap.model,
            version=snap.version,
            n=snap.n,
            mae=snap.mae,
            mae_ci=(
                mae_ci(snap.abs_error.mean, abs_var, snap.n, level) if abs_var is not None else None
            ),
            rmse=snap.rmse,
            rmse_ci=rmse_ci(snap.sq_error.mean, sq_var, snap.n, level)
            if sq_var is not None
            else None,
            mean_error=snap.mean_error,
        )
    return ArmMetrics(model=snap.model, version=snap.version, n=0)


def compare(
    candidate: OutcomeSnapshot,
    stable: OutcomeSnapshot,
    alpha: float = 0.05,
    min_samples: int = 100,
    *,
    max_accuracy_drop: float = 0.01,
    max_mae_increase_rel: float = 0.05,
) -> Comparison:
    """Is the candidate worse than the stable version on ground truth (one window each)?

    Classification: pooled two-proportion z-test on accuracy, H1 "candidate accuracy lower".
    Regression: Welch's t-test on absolute errors, H1 "candidate MAE higher". Log-loss and
    RMSE are reported, not tested.

    - ``enough_samples``: each arm has at least ``min_samples`` rows (values).
    - ``candidate_worse``: enough samples and p < alpha.
    - ``not_worse_enough_samples``: enough samples, p >= alpha, and the observed candidate
      metric is within a tolerance of stable: accuracy at most ``max_accuracy_drop`` (share)
      lower, or MAE at most ``max_mae_increase_rel`` (relative) higher. This is a pragmatic
      gate, not an equivalence test; ``samples_needed`` says how far the data is from
      detecting the observed difference.

    Both false means "keep collecting". Raises ``OutcomeKindError`` when the arms hold
    different kinds of outcomes. Intervals are at confidence level 1 - alpha.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    kinds = {s.kind for s in (candidate, stable)} - {None}
    if len(kinds) > 1:
        raise OutcomeKindError(
            f"cannot compare {candidate.kind} outcomes of {candidate.model}/{candidate.version} "
            f"with {stable.kind} outcomes of {stable.model}/{stable.version}"
        )
    kind: OutcomeKind | None = kinds.pop() if kinds else None
    level = 1.0 - alpha
    arm_c, arm_s = _arm(candidate, level), _arm(stable, level)
    enough = candidate.n >= min_samples and stable.n >= min_samples
    test: Literal["two_proportion_z", "welch_t", "none"] = "none"
    statistic = df = p = difference = None
    samples: int | None = None
    within_tolerance = False
    if kind == "classification" and candidate.n and stable.n:
        test = "two_proportion_z"
        statistic, p = two_proportion_test(
            candidate.correct, candidate.n, stable.correct, stable.n, "less"
        )
        acc_c, acc_s = candidate.correct / candidate.n, stable.correct / stable.n
        difference = acc_c - acc_s
        within_tolerance = difference >= -max_accuracy_drop
        samples = samples_needed_two_proportions(acc_c, acc_s, alpha, DEFAULT_POWER)
    elif kind == "regression" and candidate.n >= 2 and stable.n >= 2:
        test = "welch_t"
        a_c, a_s = candidate.abs_error, stable.abs_error
        var_c, var_s = a_c.var or 0.0, a_s.var or 0.0
        statistic, df, p = welch_t_test(a_c.mean, var_c, a_c.n, a_s.mean, var_s, a_s.n, "greater")
        difference = a_c.mean - a_s.mean
        within_tolerance = difference <= max_mae_increase_rel * a_s.mean
        samples = samples_needed_means(
            abs(difference), math.sqrt(var_c), math.sqrt(var_s), alpha, DEFAULT_POWER
        )
    worse = enough and p is not None and p < alpha
    fine = enough and p is not None and p >= alpha and within_tolerance
    if p is None:
        reason = "no test yet: not enough ground truth in one or both arms"
    elif worse:
        reason = f"candidate worse: one-sided p = {p:.3g} < alpha = {alpha}"
    elif not enough:
        reason = f"collecting: fewer than {min_samples} samples in an arm (p = {p:.3g})"
    elif fine:
        reason = f"not worse: p = {p:.3g} >= alpha and the difference is within tolerance"
    else:
        reason = f"undecided: p = {p:.3g} >= alpha but the observed difference exceeds tolerance"
    return Comparison(
        kind=kind,
        test=test,
        statistic=statistic,
        df=df,
        p_value=p,
        difference=difference,
        alpha=alpha,
        min_samples=min_samples,
        enough_samples=enough,
        candidate_worse=worse,
        not_worse_enough_samples=fine,
        samples_needed=samples,
        reason=reason,
        candidate=arm_c,
        stable=arm_s,
    )
