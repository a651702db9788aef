"""PredictionLogger: sampling, files, rotation, back-pressure by dropping, export to a sample."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import msgspec
import numpy as np
import pytest

from gateway.drift.profile import load_sample
from gateway.predlog import (
    PredictionLogger,
    PredictionLogSettings,
    export_sample,
    read_predictions,
    segment_dir,
)

WAIT_S = 10.0  # deadline for the writer thread to reach a point; normally milliseconds


def settings(tmp_path: Path, **fields: object) -> PredictionLogSettings:
    base: dict[str, object] = {"enabled": True, "directory": str(tmp_path), "sample_rate": 1.0}
    base.update(fields)
    return msgspec.convert(base, PredictionLogSettings)


def features(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        threading.Event().wait(0.001)


def files(tmp_path: Path, model: str = "m", version: str = "1") -> list[Path]:
    return sorted(segment_dir(tmp_path, model, version).glob("predictions-*.jsonl"))


def test_records_land_in_files_after_submit_and_stop(tmp_path: Path) -> None:
    log = PredictionLogger(settings(tmp_path))
    log.start()
    x = features(2)
    x[1, 2] = np.nan
    words = np.array([[b"caf\xc3\xa9"], [b"\xff\xfe"]], dtype=object)
    assert log.submit("m", "1", "req-1", {"x": x, "w": words}, {"y": np.array([1, 0])})
    assert log.submit("m", "2", "req-2", {"x": x[:1]}, {"y": np.array([1])})
    log.stop()
    assert (log.sampled, log.written, log.dropped, log.errors) == (2, 2, 0, 0)

    [path] = files(tmp_path)
    assert path.name.startswith("predictions-")
    assert path.name.endswith("-000001.jsonl")
    [raw] = path.read_text().splitlines()
    record = json.loads(raw)
    assert record["model"] == "m"
    assert record["version"] == "1"
    assert record["request_id"] == "req-1"
    assert isinstance(record["ts"], float)
    assert record["inputs"]["x"][0] == pytest.approx(x[0].tolist())
    assert record["inputs"]["x"][1][2] is None  # NaN is not JSON
    assert record["inputs"]["w"] == [["café"], [{"b64": "//4="}]]
    assert record["outputs"] == {"y": [1, 0]}
    assert [r["request_id"] for r in read_predictions(tmp_path, "m", "2")] == ["req-2"]


def test_sampling_by_request_id_respects_the_rate(tmp_path: Path) -> None:
    log = PredictionLogger(settings(tmp_path, sample_rate=0.1))
    n = 20_000
    chosen = sum(log.is_sampled(f"req-{i}") for i in range(n))
    # Binomial(20000, 0.1): sd = 42; 5 sd either way is a one-in-millions false failure,
    # and the hash is deterministic, so this can never flake.
    assert abs(chosen - n * 0.1) < 5 * 42
    assert log.is_sampled("req-7") == log.is_sampled("req-7")  # same id, same answer
    random_chosen = sum(log.is_sampled("") for _ in range(n))
    assert abs(random_chosen - n * 0.1) < 6 * 42
    assert not PredictionLogger(settings(tmp_path, sample_rate=0.0)).is_sampled("a")


def test_submit_counts_only_sampled_requests(tmp_path: Path) -> None:
    log = PredictionLogger(settings(tmp_path, sample_rate=0.25))
    assert not log.submit("m", "1", "before-start", {}, {})  # not started: nothing queued
    log.start()
    queued = sum(log.submit("m", "1", f"id-{i}", {"x": features(1)}, {}) for i in range(2000))
    log.stop()
    assert queued == log.sampled == log.written
    assert 2000 * 0.25 - 5 * 20 < queued < 2000 * 0.25 + 5 * 20
    assert sum(1 for _ in read_predictions(tmp_path, "m", "1")) == queued


class GatedFile(io.BytesIO):
    """A file whose writes block until the test opens the gate: a disk that stalls."""

    def __init__(self, entered: threading.Event, gate: threading.Event) -> None:
        super().__init__()
        self.entered = entered
        self.gate = gate

    def write(self, data: object) -> int:
        self.entered.set()
        assert self.gate.wait(WAIT_S), "test never opened the gate"
        assert isinstance(data, bytes)
        return super().write(data)


def test_a_stalled_writer_makes_submit_drop_and_count_not_block(tmp_path: Path) -> None:
    entered, gate = threading.Event(), threading.Event()
    opened: list[GatedFile] = []

    def opener(path: Path) -> IO[bytes]:
        opened.append(GatedFile(entered, gate))
        return opened[-1]

    # max_queue 4 wakes the writer on the first record (at a quarter full).
    log = PredictionLogger(settings(tmp_path, max_queue=4, flush_interval_s=60.0), opener=opener)
    log.start()
    try:
        x = features(1)
        assert log.submit("m", "1", "first", {"x": x}, {})
        assert entered.wait(WAIT_S), "writer never picked up the first record"
        slowest = 0.0
        results = []
        for i in range(10):
            t0 = time.perf_counter()
            results.append(log.submit("m", "1", f"r{i}", {"x": x}, {}))
            slowest = max(slowest, time.perf_counter() - t0)
        assert results == [True] * 4 + [False] * 6
        assert log.dropped == 6
        assert log.sampled == 11
        assert slowest < 1.0  # measured ~5 µs; a blocked submit would take WAIT_S (10 s)
    finally:
        gate.set()
        log.stop()
    assert log.written == 5
    assert log.errors == 0


def test_files_rotate_at_the_size_limit(tmp_path: Path) -> None:
    log = PredictionLogger(settings(tmp_path, max_file_bytes=1000))
    log.start()
    for i in range(20):
        log.submit("m", "1", f"r{i:02d}", {"x": features(2, seed=i)}, {"y": np.array([i])})
    log.stop()
    paths = files(tmp_path)
    assert len(paths) > 2
    assert all(p.stat().st_size <= 1000 for p in paths)
    ids = [r["request_id"] for r in read_predictions(tmp_path, "m", "1")]
    assert ids == [f"r{i:02d}" for i in range(20)]  # file order is write order


def test_files_rotate_at_the_age_limit(tmp_path: Path) -> None:
    now = [1_700_000_000.0]
    log = PredictionLogger(
        settings(tmp_path, max_file_age_s=60.0, flush_interval_s=0.005), clock=lambda: now[0]
    )
    log.start()
    log.submit("m", "1", "a", {"x": features(1)}, {})
    log.submit("m", "1", "b", {"x": features(1)}, {})
    wait_for(lambda: log.written == 2)  # both in the first file before time moves on
    now[0] += 61.0
    log.submit("m", "1", "c", {"x": features(1)}, {})
    log.stop()
    paths = files(tmp_path)
    assert [p.name for p in paths] == [
        "predictions-20231114T221320Z-000001.jsonl",
        "predictions-20231114T221421Z-000002.jsonl",
    ]
    assert [len(p.read_text().splitlines()) for p in paths] == [2, 1]


def test_export_sample_round_trips_rows(tmp_path: Path) -> None:
    log = PredictionLogger(settings(tmp_path))
    log.start()
    blocks = [features(n, seed=n) for n in (3, 1, 5)]
    for i, block in enumerate(blocks):
        log.submit("m", "1", f"r{i}", {"x": block, "other": np.array([[1.0]])}, {})
    log.submit("m", "1", "no-x", {"other": np.array([[2.0]])}, {})
    log.stop()

    out = tmp_path / "sample" / "reference.npy"
    assert export_sample(tmp_path, "m", "1", "x", out) == 9
    np.testing.assert_array_equal(np.load(out), np.concatenate(blocks))
    sample, names = load_sample(out)  # what `gateway profile build` reads
    assert sample.dtype == np.float32
    assert sample.shape == (9, 4)
    assert names is None
    assert export_sample(tmp_path, "m", "1", "missing", tmp_path / "none.npy") == 0
    assert not (tmp_path / "none.npy").exists()


def test_export_sample_refuses_changing_feature_counts(tmp_path: Path) -> None:
    log = PredictionLogger(settings(tmp_path))
    log.start()
    log.submit("m", "1", "a", {"x": features(1)}, {})
    log.submit("m", "1", "b", {"x": np.zeros((1, 3), np.float32)}, {})
    log.stop()
    with pytest.raises(ValueError, match="3 features"):
        export_sample(tmp_path, "m", "1", "x", tmp_path / "out.npy")


def test_write_errors_are_counted_and_submit_still_succeeds(tmp_path: Path) -> None:
    def broken(path: Path) -> IO[bytes]:
        raise OSError(28, "No space left on device")

    log = PredictionLogger(settings(tmp_path), opener=broken)
    log.start()
    assert log.submit("m", "1", "a", {"x": features(1)}, {})
    log.stop()
    assert (log.written, log.errors) == (0, 1)


def test_names_cannot_escape_the_directory(tmp_path: Path) -> None:
    assert segment_dir(tmp_path, "../etc", "..") == tmp_path / "..%2Fetc" / "%2E%2E"


def test_disabled_logger_starts_nothing(tmp_path: Path) -> None:
    log = PredictionLogger(PredictionLogSettings())
    log.start()
    assert not log.submit("m", "1", "a", {}, {})
    log.stop()


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="no directory"):
        PredictionLogger(msgspec.convert({"enabled": True}, PredictionLogSettings))
    with pytest.raises(msgspec.ValidationError, match="sample_rate"):
        msgspec.convert({"sample_rate": 1.5}, PredictionLogSettings)
