"""predlog.py: samples served predictions and writes them as JSON lines, off the request path.

In: ``(model, version, request_id, inputs, outputs)`` from whoever holds a finished response
(numpy arrays by tensor name). Out: files ``<directory>/<model>/<version>/predictions-<UTC
timestamp>-<seq>.jsonl``, one record per line, rotated on size and age; ``read_predictions``
reads them back and ``export_sample`` turns one input into the ``.npy`` reference sample that
``gateway profile build`` takes, closing the loop from served traffic to a drift profile.

``submit`` never blocks and never raises: it decides sampling, takes a lock for a few
hundred nanoseconds to append to a bounded deque, and returns. A full queue drops the record
and counts it (STYLE §6: the observation path drops, never back-pressures). One background
thread owns every file: it encodes with msgspec, writes, flushes on an interval, rotates.
This module knows nothing of HTTP, gRPC, V2 encoding or the router; it imports nothing from
the gateway.
"""

from __future__ import annotations

import base64
import collections
import logging
import math
import os
import random
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final
from urllib.parse import quote

import msgspec
import numpy as np
import numpy.typing as npt

from gateway.config import PredictionLogSettings
from gateway.files import open_new, private_dir

__all__ = [
    "PredictionLogSettings",
    "PredictionLogger",
    "FileOpener",
    "read_predictions",
    "export_sample",
    "segment_dir",
]

logger = logging.getLogger(__name__)

FileOpener = Callable[[Path], IO[bytes]]
"""Opens a new segment for writing; must not overwrite (``open(path, "xb")`` by default)."""

_FILE_PREFIX: Final = "predictions-"
_FILE_SUFFIX: Final = ".jsonl"
_WAKE_FRACTION: Final = 4  # wake the writer early at 1/4 full, long before drops begin
_STOP_TIMEOUT_S: Final = 30.0  # flushing 10 000 queued records takes well under a second
_HASH_SCALE: Final = float(1 << 32)


class _Record(msgspec.Struct, frozen=True):
    """One line of a prediction log. Tensors are nested lists (shape is the nesting);
    bytes elements are UTF-8 strings, or ``{"b64": ...}`` when not valid UTF-8."""

    ts: float
    request_id: str
    model: str
    version: str
    inputs: dict[str, object]
    outputs: dict[str, object]


_Item = tuple[float, str, str, str, Mapping[str, np.ndarray], Mapping[str, np.ndarray]]


def _safe_part(name: str) -> str:
    """A model or version name as one path component: no separators, never "" or "..".
    Names from the repository are folder names already, so this is only a guard."""
    special = {"": "%00", ".": "%2E", "..": "%2E%2E"}
    return special.get(name) or quote(name, safe="-_.")


def segment_dir(directory: str | Path, model: str, version: str) -> Path:
    """The folder holding the log files of one model version."""
    return Path(directory) / _safe_part(model) / _safe_part(version)


def _bytes_value(value: object) -> object:
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(raw).decode("ascii")}
    return value


def _to_json(array: np.ndarray) -> object:
    """Nested lists for JSON; bytes become text (or base64), NaN and inf become null."""
    kind = array.dtype.kind
    if kind in "OS":
        flat = [_bytes_value(v) for v in array.reshape(-1).tolist()]
        if array.ndim == 0:
            return flat[0]
        return np.array(flat, dtype=object).reshape(array.shape).tolist()
    if kind == "V":
        return base64.b64encode(array.tobytes()).decode("ascii")
    return array.tolist()


def _segment_name(ts: float, seq: int) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(ts))
    return f"{_FILE_PREFIX}{stamp}-{seq:06d}{_FILE_SUFFIX}"


def _open_exclusive(path: Path) -> IO[bytes]:
    return open_new(path)  # 0600; closed by the writer thread


@dataclass(slots=True)
class _Segment:
    """An open log file of one model version (touched only by the writer thread)."""

    path: Path
    file: IO[bytes]
    opened_at: float
    size: int = 0


class PredictionLogger:
    """Samples predictions into a bounded queue; one thread writes them to rotating files.

    ``submit`` is safe from any thread. ``start``/``stop`` belong to the owner (``app.py``).
    ``opener`` and ``clock`` are seams for tests: a slow or failing file, a fake time.
    Memory is bounded by ``max_queue`` records; the arrays are referenced, not copied, so
    callers must not modify them after ``submit`` (the gateway never does: decoded request
    tensors and model outputs are fresh per request).
    """

    def __init__(
        self,
        settings: PredictionLogSettings,
        *,
        opener: FileOpener = _open_exclusive,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Raises ``ValueError`` when enabled without a directory."""
        if settings.enabled and not settings.directory:
            raise ValueError("prediction logging is enabled but has no directory")
        self.settings = settings
        self._opener = opener
        self._clock = clock
        self._threshold = int(settings.sample_rate * _HASH_SCALE)  # of a 32-bit hash
        self._wake_at = max(1, settings.max_queue // _WAKE_FRACTION)
        self._queue: collections.deque[_Item] = collections.deque()
        self._lock = threading.Lock()
        self._is_accepting = False
        self._sampled = 0
        self._dropped = 0
        self._written = 0
        self._errors = 0
        self.deleted = 0
        """Files removed by retention (keep_files, keep_age_s)."""
        self._seq = 0
        self._wake: threading.Event | None = None
        self._stopping: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self._segments: dict[tuple[str, str], _Segment] = {}
        self._encode = msgspec.json.Encoder().encode

    # -- counters -------------------------------------------------------------------------

    @property
    def sampled(self) -> int:
        """Requests chosen by sampling (queued or dropped)."""
        return self._sampled

    @property
    def dropped(self) -> int:
        """Sampled records dropped because the queue was full."""
        return self._dropped

    @property
    def written(self) -> int:
        """Records written to a file (flushed within ``flush_interval_s``)."""
        return self._written

    @property
    def errors(self) -> int:
        """Records lost to an encoding or file-system error (each logged)."""
        return self._errors

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    # -- request path ---------------------------------------------------------------------

    def is_sampled(self, request_id: str) -> bool:
        """Whether a request is logged: a function of its id alone (the CRC-32 of the id
        against ``sample_rate``), so every replica, retry and log line about one request
        agrees. Requests without an id are sampled at random. (A sampling decision needs an
        even spread, not a cryptographic hash: CRC-32 costs a tenth of blake2b per
        request.)"""
        rate = self.settings.sample_rate
        if rate <= 0.0:
            return False
        if rate >= 1.0:
            return True
        if not request_id:
            return random.random() < rate
        return zlib.crc32(request_id.encode("utf-8", "replace")) < self._threshold

    def submit(
        self,
        model: str,
        version: str,
        request_id: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
    ) -> bool:
        """Queue one prediction if sampled; True when queued. Never blocks, never raises:
        False when not started, not sampled, or dropped because the queue is full."""
        try:
            if not self._is_accepting or not self.is_sampled(request_id):
                return False
            item: _Item = (self._clock(), model, version, request_id, inputs, outputs)
            with self._lock:
                if not self._is_accepting:  # checked again under the lock: see stop()
                    return False
                self._sampled += 1
                if len(self._queue) >= self.settings.max_queue:
                    self._dropped += 1
                    return False
                self._queue.append(item)
                depth = len(self._queue)
            if depth == self._wake_at and self._wake is not None:
                self._wake.set()
            return True
        except Exception:  # the request path must never fail because of logging
            logger.exception("prediction log submit failed")
            return False

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread (nothing when disabled). Creates the directory."""
        if not self.settings.enabled or self._thread is not None:
            return
        private_dir(self.settings.directory)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(self._wake, self._stopping),
            name="prediction-log-writer",
            daemon=True,
        )
        self._is_accepting = True
        self._thread.start()
        logger.info(
            "prediction log: %.4g of requests to %s",
            self.settings.sample_rate,
            self.settings.directory,
        )

    def stop(self, timeout_s: float = _STOP_TIMEOUT_S) -> None:
        """Stop accepting, write what is queued, flush and close every file, join (blocks
        up to ``timeout_s``; a writer stuck on a dead disk is logged and left behind)."""
        with self._lock:  # no submit appends after this, so the final drain sees everything
            self._is_accepting = False
        thread, stopping, wake = self._thread, self._stopping, self._wake
        if thread is None or stopping is None or wake is None:
            return
        stopping.set()
        wake.set()
        thread.join(timeout_s)
        if thread.is_alive():
            logger.error("prediction log writer did not finish within %.0f s", timeout_s)
            return
        self._thread = None
        logger.info(
            "prediction log stopped: %d written, %d dropped, %d errors",
            self._written,
            self._dropped,
            self._errors,
        )

    # -- writer thread --------------------------------------------------------------------

    def _run(self, wake: threading.Event, stopping: threading.Event) -> None:
        interval = self.settings.flush_interval_s
        try:
            while not stopping.is_set():
                wake.wait(interval)
                wake.clear()
                self._drain()
                self._flush_and_age()
        except BaseException:
            logger.exception("prediction log writer crashed")
            raise
        finally:
            self._drain()
            for key in list(self._segments):
                self._close(key)

    def _drain(self) -> None:
        queue = self._queue
        while queue:
            try:
                item = queue.popleft()
            except IndexError:
                return
            self._write(item)

    def _write(self, item: _Item) -> None:
        ts, model, version, request_id, inputs, outputs = item
        try:
            line = (
                self._encode(
                    _Record(
                        ts,
                        request_id,
                        model,
                        version,
                        {k: _to_json(np.asarray(v)) for k, v in inputs.items()},
                        {k: _to_json(np.asarray(v)) for k, v in outputs.items()},
                    )
                )
                + b"\n"
            )
        except Exception as exc:
            self._errors += 1
            logger.warning("prediction of %s/%s not logged: %s", model, version, exc)
            return
        key = (model, version)
        try:
            segment = self._segment(key, len(line))
            segment.file.write(line)
            segment.size += len(line)
            self._written += 1
        except OSError as exc:
            self._errors += 1
            logger.error("prediction log write for %s/%s failed: %s", model, version, exc)
            self._close(key)

    def _segment(self, key: tuple[str, str], incoming: int) -> _Segment:
        now = self._clock()
        segment = self._segments.get(key)
        # A record larger than max_file_bytes gets a file of its own rather than being lost.
        if segment is not None and (
            (segment.size > 0 and segment.size + incoming > self.settings.max_file_bytes)
            or now - segment.opened_at >= self.settings.max_file_age_s
        ):
            self._close(key)
            segment = None
        if segment is None:
            folder = private_dir(segment_dir(self.settings.directory, *key))
            self._retain(folder)
            while True:
                self._seq += 1
                path = folder / _segment_name(now, self._seq)
                try:
                    file = self._opener(path)
                except FileExistsError:  # a restart within the same second
                    continue
                break
            segment = _Segment(path, file, now)
            self._segments[key] = segment
        return segment

    def _retain(self, folder: Path) -> None:
        """Delete this folder's closed files beyond ``keep_files`` (oldest first) and those
        older than ``keep_age_s`` (by modification time). Runs when a file rotates."""
        keep, max_age = self.settings.keep_files, self.settings.keep_age_s
        if keep <= 0 and max_age <= 0:
            return
        try:
            files = sorted(
                (p.stat().st_mtime, p.name, p)
                for p in folder.iterdir()
                if p.name.startswith(_FILE_PREFIX) and p.name.endswith(_FILE_SUFFIX)
            )
        except OSError as exc:
            logger.warning("prediction log retention skipped in %s: %s", folder.name, exc)
            return
        expired = time.time() - max_age
        for index, (mtime, _name, path) in enumerate(files):
            beyond_count = keep > 0 and index < len(files) - keep
            if beyond_count or (max_age > 0 and mtime < expired):
                try:
                    path.unlink()
                    self.deleted += 1
                except OSError as exc:
                    logger.warning("prediction log file %s not deleted: %s", path.name, exc)

    def _flush_and_age(self) -> None:
        now = self._clock()
        for key, segment in list(self._segments.items()):
            if now - segment.opened_at >= self.settings.max_file_age_s:
                self._close(key)
                continue
            try:
                segment.file.flush()
            except OSError as exc:
                logger.error("prediction log flush of %s failed: %s", segment.path, exc)
                self._close(key)

    def _close(self, key: tuple[str, str]) -> None:
        segment = self._segments.pop(key, None)
        if segment is None:
            return
        try:
            segment.file.close()
        except OSError as exc:
            logger.error("prediction log close of %s failed: %s", segment.path, exc)


# -- reading back -------------------------------------------------------------------------


def read_predictions(
    directory: str | Path, model: str, version: str
) -> Iterator[dict[str, object]]:
    """Every logged record of one model version, oldest file first, in write order.

    A truncated last line (the process died mid-write) is skipped with a warning. Yields
    nothing when the version has no logs."""
    folder = segment_dir(directory, model, version)
    if not folder.is_dir():
        return
    decode = msgspec.json.Decoder(dict[str, object]).decode
    for path in sorted(folder.glob(f"{_FILE_PREFIX}*{_FILE_SUFFIX}")):
        with path.open("rb") as file:
            for number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                try:
                    yield decode(line)
                except msgspec.DecodeError:
                    logger.warning("%s:%d: unreadable record skipped", path, number)


def _rows(value: object, where: str) -> npt.NDArray[np.float32]:
    if isinstance(value, list):
        cleaned: object = _nulls_to_nan(value)
    else:
        cleaned = [value]
    try:
        array = np.asarray(cleaned, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: input is not a numeric tensor") from None
    if array.ndim <= 1:
        return array.reshape(1, -1)
    return array.reshape(array.shape[0], -1)


def _nulls_to_nan(value: list[object]) -> list[object]:
    return [
        _nulls_to_nan(v) if isinstance(v, list) else (math.nan if v is None else v) for v in value
    ]


def export_sample(
    directory: str | Path, model: str, version: str, input_name: str, out_path: str | Path
) -> int:
    """Write the logged rows of one input as a float32 ``[rows, features]`` ``.npy`` at
    ``out_path`` (atomically), the reference sample ``gateway profile build`` reads.

    A request tensor ``[batch, ...]`` gives ``batch`` rows (trailing dimensions flattened);
    a 1-D tensor gives one row. Nulls (NaN and inf were logged as null) read as NaN.
    Returns the rows written; 0 writes nothing. Raises ``ValueError`` when the input is not
    numeric or its feature count changes between records.
    """
    blocks: list[npt.NDArray[np.float32]] = []
    features: int | None = None
    for number, record in enumerate(read_predictions(directory, model, version), 1):
        inputs = record.get("inputs")
        if not isinstance(inputs, dict) or input_name not in inputs:
            continue
        rows = _rows(inputs[input_name], f"{model}/{version} record {number} '{input_name}'")
        if features is None:
            features = rows.shape[1]
        elif rows.shape[1] != features:
            raise ValueError(
                f"{model}/{version} record {number}: input '{input_name}' has "
                f"{rows.shape[1]} features, earlier records have {features}"
            )
        blocks.append(rows)
    if not blocks:
        logger.warning("no logged rows of %s/%s input '%s'", model, version, input_name)
        return 0
    sample = np.concatenate(blocks, axis=0)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with partial.open("wb") as file:
        np.save(file, sample, allow_pickle=False)
    os.replace(partial, out)
    return int(sample.shape[0])
