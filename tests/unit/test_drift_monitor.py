"""DriftMonitor through its public API, with an injected clock: no sleeps, fixed seeds."""

from __future__ import annotations

import threading

import msgspec
import numpy as np
import numpy.typing as npt
import pytest

from gateway.drift.monitor import DriftMonitor, DriftReport, DriftSettings
from gateway.drift.profile import Profile, build_profile
from gateway.types import ModelRef

N_FEATURES = 32
SUB_WINDOW_S = 5.0
STABLE = ModelRef("m", "1")
CANARY = ModelRef("m", "2")

F32 = npt.NDArray[np.float32]


class FakeClock:
    """Monotonic nanoseconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now_ns = 0

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, sub_windows: int) -> None:
        self.now_ns += int(sub_windows * SUB_WINDOW_S * 1e9)


def scores(x: F32) -> F32:
    """A stand-in model output: one score column."""
    return np.asarray(1.0 / (1.0 + np.exp(-x[:, :1] - x[:, 1:2])), np.float32)


def labels(x: F32) -> npt.NDArray[np.int64]:
    """A stand-in class-label output."""
    return (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)


@pytest.fixture(scope="module")
def profile() -> Profile:
    rng = np.random.default_rng(100)
    ref = rng.standard_normal((50_000, N_FEATURES)).astype(np.float32)
    return build_profile(ref, outputs={"score": scores(ref), "label": labels(ref)})


def make_monitor(
    profile: Profile, **overrides: int | float | bool
) -> tuple[DriftMonitor, FakeClock]:
    clock = FakeClock()
    settings = msgspec.structs.replace(DriftSettings(), **overrides)
    monitor = DriftMonitor(settings, clock_ns=clock, unix_offset_ns=0)
    monitor.register(STABLE, profile, "x")
    return monitor, clock


def feed(monitor: DriftMonitor, ref: ModelRef, x: F32, batch: int = 64) -> None:
    for start in range(0, x.shape[0], batch):
        rows = x[start : start + batch]
        monitor.observe(ref, {"x": rows}, {"score": scores(rows), "label": labels(rows)})


def settle(monitor: DriftMonitor, clock: FakeClock) -> None:
    """Seal the current sub-window (aggregator lag is two epochs) and collect it."""
    clock.advance(2)
    monitor.tick()


def test_half_sigma_shift_is_flagged_on_that_feature_only(profile: Profile) -> None:
    monitor, clock = make_monitor(profile)
    x = np.random.default_rng(1).standard_normal((2000, N_FEATURES)).astype(np.float32)
    x[:, 7] += 0.5
    feed(monitor, STABLE, x)
    settle(monitor, clock)
    report = monitor.report(STABLE)
    assert report.verdict == "drift"
    assert report.input_verdict == "drift"
    assert report.inputs[0].name == "f7"
    assert report.inputs[0].verdict == "drift"
    assert report.inputs[0].severity in {"moderate", "major"}  # PSI ~ 0.245
    assert [f.verdict for f in report.inputs[1:]] == ["no_drift"] * (N_FEATURES - 1)
    assert all(f.n == 2000 for f in report.inputs)
    assert report.profile_hash == profile.hash
    assert report.window_s == SUB_WINDOW_S  # one sealed sub-window so far
    msgspec.json.encode(report)  # the admin API can serve it as is


def test_no_shift_stays_quiet_over_twenty_windows(profile: Profile) -> None:
    monitor, clock = make_monitor(profile)
    rng = np.random.default_rng(2)
    flagged = 0
    for _ in range(20):
        feed(monitor, STABLE, rng.standard_normal((2000, N_FEATURES)).astype(np.float32))
        settle(monitor, clock)
        report = monitor.report(STABLE)
        assert all(f.n == 2000 for f in report.inputs)  # the previous window has expired
        flagged += sum(f.verdict == "drift" for f in report.inputs)
        clock.advance(DriftSettings().sub_windows)
        monitor.tick()
    assert flagged <= 0.01 * 20 * N_FEATURES


def test_counts_from_two_threads_merge_exactly(profile: Profile) -> None:
    monitor, clock = make_monitor(profile)
    rng = np.random.default_rng(3)
    chunks = [rng.standard_normal((1500, N_FEATURES)).astype(np.float32) for _ in range(2)]
    barrier = threading.Barrier(2)

    def work(x: F32) -> None:
        barrier.wait()
        feed(monitor, STABLE, x, batch=7)

    threads = [threading.Thread(target=work, args=(chunk,)) for chunk in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    settle(monitor, clock)
    epoch, profile_hash, counts = monitor.export_counts(STABLE)
    assert epoch == 0
    assert profile_hash == profile.hash
    assert set(counts) == {
        "inputs/x/numeric",
        "outputs/score/numeric",
        "outputs/label/categorical",
    }
    assert counts["inputs/x/numeric"].sum(axis=1).tolist() == [3000] * N_FEATURES
    assert counts["outputs/label/categorical"].sum() == 3000
    assert all(f.n == 3000 for f in monitor.report(STABLE).inputs)


def test_canary_output_drift_against_stable(profile: Profile) -> None:
    monitor, clock = make_monitor(profile)
    monitor.register(CANARY, profile, "x")
    rng = np.random.default_rng(4)
    stable_x = rng.standard_normal((2500, N_FEATURES)).astype(np.float32)
    canary_x = rng.standard_normal((2500, N_FEATURES)).astype(np.float32)
    feed(monitor, STABLE, stable_x)
    for start in range(0, 2500, 64):  # same inputs distribution, a worse model: scores shift
        rows = canary_x[start : start + 64]
        shifted = np.clip(scores(rows) + 0.2, 0.0, 1.0).astype(np.float32)
        monitor.observe(CANARY, {"x": rows}, {"score": shifted, "label": labels(rows)})
    settle(monitor, clock)
    report = monitor.compare(CANARY, STABLE)
    assert report.baseline == "m/1"
    assert report.model == "m/2"
    assert report.input_verdict == "no_drift"
    assert report.output_verdict == "drift"
    assert report.outputs[0].name == "score"
    assert report.outputs[0].n == report.outputs[0].n_baseline == 2500


def test_too_few_rows_is_insufficient_data(profile: Profile) -> None:
    monitor, clock = make_monitor(profile)
    x = np.random.default_rng(5).standard_normal((500, N_FEATURES)).astype(np.float32)
    x[:, 0] += 3.0  # even a huge shift gets no verdict on 500 rows
    feed(monitor, STABLE, x)
    settle(monitor, clock)
    report = monitor.report(STABLE)
    assert report.verdict == "insufficient_data"
    assert {f.severity for f in report.inputs} == {"none"}


def test_window_slides_and_expires(profile: Profile) -> None:
    monitor, clock = make_monitor(profile, sub_windows=3)
    x = np.random.default_rng(6).standard_normal((100, N_FEATURES)).astype(np.float32)
    feed(monitor, STABLE, x)  # epoch 0
    monitor.tick()
    assert monitor.report(STABLE).inputs[0].n == 0  # not sealed yet
    clock.advance(1)
    feed(monitor, STABLE, x)  # epoch 1
    clock.advance(1)
    monitor.tick()  # epoch 2: epoch 0 sealed
    assert monitor.report(STABLE).inputs[0].n == 100
    clock.advance(1)
    monitor.tick()  # epoch 3: epochs 0-1 sealed
    assert monitor.report(STABLE).inputs[0].n == 200
    clock.advance(2)
    monitor.tick()  # epoch 5: window holds epochs 1-3
    report = monitor.report(STABLE)
    assert report.inputs[0].n == 100
    assert report.window_s == 3 * SUB_WINDOW_S


def test_large_batches_are_subsampled(profile: Profile) -> None:
    monitor, clock = make_monitor(profile, max_rows_per_request=100)
    x = np.random.default_rng(7).standard_normal((1000, N_FEATURES)).astype(np.float32)
    feed(monitor, STABLE, x, batch=1000)
    settle(monitor, clock)
    assert monitor.report(STABLE).inputs[0].n == 100  # every 10th row


def test_other_dtypes_and_layouts_count_like_float32(profile: Profile) -> None:
    x = np.random.default_rng(8).standard_normal((64, N_FEATURES))
    results = []
    for variant in (x.astype(np.float32), x, np.asfortranarray(x.astype(np.float32))):
        monitor, clock = make_monitor(profile)
        monitor.observe(STABLE, {"x": variant}, {})
        settle(monitor, clock)
        results.append(monitor.export_counts(STABLE)[2]["inputs/x/numeric"])
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


def test_bad_tensors_are_dropped_and_counted(profile: Profile) -> None:
    monitor, clock = make_monitor(profile)
    monitor.observe(STABLE, {"x": np.zeros((4, 5), np.float32)}, {})
    monitor.observe(STABLE, {"x": np.array([[b"a"] * N_FEATURES], dtype=object)}, {})
    monitor.observe(STABLE, {}, {})  # missing tensors are skipped, not dropped
    settle(monitor, clock)
    report = monitor.report(STABLE)
    assert report.dropped == 2
    assert report.inputs[0].n == 0


def test_unknown_and_unprofiled_models(profile: Profile) -> None:
    monitor, _ = make_monitor(profile)
    monitor.observe(ModelRef("other"), {"x": np.zeros((1, 3), np.float32)}, {})
    monitor.register(CANARY, None, "x")
    monitor.observe(CANARY, {"x": np.zeros((1, 3), np.float32)}, {})
    report = monitor.report(CANARY)
    assert (report.verdict, report.inputs, report.profile_hash) == ("insufficient_data", (), "")
    with pytest.raises(KeyError, match="not registered"):
        monitor.report(ModelRef("other"))
    with pytest.raises(ValueError, match="need a drift profile"):
        monitor.compare(CANARY, STABLE)


def test_compare_refuses_different_profiles(profile: Profile) -> None:
    monitor, _ = make_monitor(profile)
    ref = np.random.default_rng(9).standard_normal((2000, N_FEATURES)).astype(np.float32)
    monitor.register(CANARY, build_profile(ref), "x")
    with pytest.raises(ValueError, match="profiles differ"):
        monitor.compare(CANARY, STABLE)


def test_reregistering_starts_a_fresh_window(profile: Profile) -> None:
    monitor, clock = make_monitor(profile)
    x = np.random.default_rng(10).standard_normal((50, N_FEATURES)).astype(np.float32)
    feed(monitor, STABLE, x)
    settle(monitor, clock)
    assert monitor.report(STABLE).inputs[0].n == 50
    monitor.register(STABLE, profile, "x")
    feed(monitor, STABLE, x[:10])
    settle(monitor, clock)
    assert monitor.report(STABLE).inputs[0].n == 10
    monitor.unregister(STABLE)
    monitor.observe(STABLE, {"x": x}, {})  # ignored
    with pytest.raises(KeyError):
        monitor.report(STABLE)


def test_aggregator_thread_starts_and_stops(profile: Profile) -> None:
    def aggregators() -> set[threading.Thread]:
        # Gateways started by other tests run aggregators of their own: compare sets.
        return {t for t in threading.enumerate() if t.name == "drift-aggregator"}

    others = aggregators()
    monitor, _ = make_monitor(profile, tick_s=0.01)
    monitor.start()
    monitor.start()  # idempotent
    assert len(aggregators() - others) == 1
    monitor.stop()
    monitor.stop()
    assert not aggregators() - others
    disabled, _ = make_monitor(profile, enabled=False)
    disabled.start()
    assert not aggregators() - others
    assert isinstance(monitor.report(STABLE), DriftReport)
