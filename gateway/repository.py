"""repository.py: finds, loads, warms and closes ONNX Runtime sessions per model version.

Input: a folder ``<repo>/<model>/<version>/model.onnx`` (versions are positive integers), an
optional ``<repo>/<model>/config.toml`` (a ``ModelPolicy``), and the runtime settings.
Output: immutable ``ModelVersion`` objects that validate requests against the graph's
signature and run batches. It owns the inference thread pool, the one door through which
model calls leave the event loop. It knows nothing of HTTP, gRPC or batching.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from gateway.codecs.datatypes import ONNX_TO_V2, V2_TO_NUMPY
from gateway.config import ModelPolicy, RuntimeSettings, load_model_policy
from gateway.errors import (
    GatewayError,
    InvalidInputError,
    ModelExecutionError,
    ModelNotFoundError,
)
from gateway.types import (
    InferRequest,
    InferResponse,
    ModelIndexEntry,
    ModelRef,
    ModelSignature,
    Tensor,
    TensorSpec,
)

__all__ = ["ModelVersion", "ModelRepository", "MODEL_FILE", "PLATFORM"]

logger = logging.getLogger(__name__)

MODEL_FILE: Final = "model.onnx"
PLATFORM: Final = "onnxruntime_onnx"
_WARMUP_REPEATS: Final = 3
_FILL_SHARE: Final = 0.9  # the fill size: the smallest batch this close to the best rows/s

Array = npt.NDArray[Any]

_cuda_preloaded = False


def _preload_cuda() -> None:
    """Load the CUDA and cuDNN libraries from the nvidia-* pip packages once, before the
    first CUDA session (onnxruntime-gpu's ``preload_dlls``): ``pip install
    onnxruntime-gpu[cuda,cudnn]`` then serves on the GPU without LD_LIBRARY_PATH. Libraries
    it cannot find are left to the system's search path, as without it."""
    global _cuda_preloaded
    if _cuda_preloaded:
        return
    _cuda_preloaded = True
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:  # onnxruntime-gpu before 1.21
        return
    try:
        preload()
    except Exception:  # a failed preload must not fail the load: CUDA may still be found
        logger.warning("onnxruntime.preload_dlls failed", exc_info=True)


def _dims(shape: list[int | str | None] | None) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (shape or []))


_NUMERIC: Final = frozenset(
    {
        "FP32",
        "FP64",
        "FP16",
        "INT64",
        "INT32",
        "INT16",
        "INT8",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
    }
)


@dataclass(frozen=True)
class _Schema:
    input_index: int
    columns: npt.NDArray[np.intp]
    names: list[str]
    lo: npt.NDArray[np.float64]
    hi: npt.NDArray[np.float64]
    categories: list[npt.NDArray[Any] | None]


def _inner_run(session: ort.InferenceSession) -> Callable[..., list[Array]]:
    """The session's own run minus its Python-side checks of the feed (``prepare`` has made
    them: every input present, by name), which cost more than a tiny model's call."""
    run: Callable[..., list[Array]] = getattr(session, "_sess", session).run
    return run


class ModelVersion:
    """One loaded model version: an ONNX Runtime session plus its validated signature.

    Immutable once built. ``run`` blocks (it releases the GIL inside ONNX Runtime) and is
    safe to call from several threads at once. ``is_inline`` says whether a batch is cheap
    enough to run on the event loop (decided from the warm-up timing).
    """

    def __init__(
        self,
        name: str,
        version: str,
        path: Path,
        policy: ModelPolicy,
        runtime: RuntimeSettings,
    ) -> None:
        self.name = name
        self.version = version
        self._where = f"model '{name}' version {version}"  # error messages' prefix
        self.ref = ModelRef(name, version)
        self.path = path
        self.policy = policy
        options = ort.SessionOptions()
        options.intra_op_num_threads = policy.intra_op_threads or runtime.intra_op_threads
        options.inter_op_num_threads = runtime.inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 4  # failures reach the caller and our log, not stderr
        available = set(ort.get_available_providers())
        providers = [p for p in runtime.execution_providers if p in available]
        if "CUDAExecutionProvider" in providers:
            _preload_cuda()
        missing = [p for p in runtime.execution_providers if p not in available]
        if missing:
            logger.warning(
                "model %s version %s: execution providers %s are not installed; using %s",
                name,
                version,
                missing,
                providers or ["CPUExecutionProvider"],
            )
        self.session = ort.InferenceSession(
            str(path), sess_options=options, providers=providers or ["CPUExecutionProvider"]
        )
        given = self.session.get_providers()
        dropped = [p for p in providers if p not in given]
        if dropped:  # onnxruntime falls back quietly (its own log is off, above)
            logger.warning(
                "model %s version %s: onnxruntime could not start %s (for CUDA: are the CUDA "
                "and cuDNN libraries installed?); it runs on %s",
                name,
                version,
                dropped,
                given,
            )
        self.device = "GPU" if "CUDAExecutionProvider" in given else "CPU"
        self._run = _inner_run(self.session)
        inputs = tuple(
            TensorSpec(arg.name, self._v2_type(arg.name, arg.type), _dims(arg.shape))
            for arg in self.session.get_inputs()
        )
        outputs = tuple(
            TensorSpec(arg.name, self._v2_type(arg.name, arg.type), _dims(arg.shape))
            for arg in self.session.get_outputs()
        )
        batchable = all(s.shape and s.shape[0] == -1 for s in inputs + outputs)
        self.max_batch_size = policy.max_batch_size if batchable else 0
        self.signature = ModelSignature(
            name=name,
            version=version,
            platform=PLATFORM,
            inputs=inputs,
            outputs=outputs,
            max_batch_size=self.max_batch_size,
            preferred_batch_sizes=tuple(policy.preferred_batch_sizes),
            dynamic_batching=policy.dynamic_batching,
            max_queue_delay_us=policy.max_queue_delay_us,
            instances=policy.instances,
            device=self.device,
        )
        self.input_names = [s.name for s in inputs]
        self.output_names = [s.name for s in outputs]
        # Per input: its index, spec, numpy type, and its rank with the (dimension, size)
        # pairs a request must match (-1 matches any size), checked without a generator.
        self._inputs = {
            s.name: (
                i,
                s,
                V2_TO_NUMPY[s.datatype],
                len(s.shape),
                tuple((d, size) for d, size in enumerate(s.shape) if size != -1),
            )
            for i, s in enumerate(inputs)
        }
        self._outputs = {s.name: (i, s) for i, s in enumerate(outputs)}
        self.is_inline = policy.execution == "inline"
        self.warmup_us: float | None = None
        self.fill_batch_size = max(policy.fill_batch_size, 0)
        """Rows a batch waits for under load (the batcher reads it); see ModelPolicy."""
        self.rows_per_s: dict[int, float] = {}
        """Warm-up throughput by batch size, when the fill size was measured."""
        self.schema_violations: dict[str, int] = {}
        """Requests that broke each declared feature rule (mutated on the loop thread)."""
        self._schema = self._compile_schema(path.parent.parent) if policy.schema else None

    def _compile_schema(self, model_dir: Path) -> _Schema:
        """Column indices and bounds of the declared rules, checked once per request."""
        index = next(
            (i for i, s in enumerate(self.signature.inputs) if s.datatype in _NUMERIC), None
        )
        if index is None:
            raise InvalidInputError(f"model '{self.name}': a schema needs a numeric input to check")
        spec = self.signature.inputs[index]
        width = math.prod(d for d in spec.shape[1:] if d > 0) if len(spec.shape) > 1 else 1
        names_file = model_dir / "feature_names.json"
        names = (
            list(json.loads(names_file.read_text()))
            if names_file.is_file()
            else [f"f{i}" for i in range(width)]
        )
        columns, names_out, lo, hi, cats = [], [], [], [], []
        for feature, rule in self.policy.schema.items():
            if feature not in names:
                raise InvalidInputError(
                    f"model '{self.name}': schema names unknown feature '{feature}'"
                )
            columns.append(names.index(feature))
            names_out.append(feature)
            lo.append(-math.inf if rule.min is None else rule.min)
            hi.append(math.inf if rule.max is None else rule.max)
            cats.append(None if rule.categories is None else np.asarray(rule.categories))
        return _Schema(index, np.asarray(columns), names_out, np.asarray(lo), np.asarray(hi), cats)

    def _check_schema(self, feeds: list[Array], rows: int) -> None:
        schema = self._schema
        assert schema is not None
        x = feeds[schema.input_index].reshape(max(rows, 1), -1)[:, schema.columns]
        bad = ~((x >= schema.lo) & (x <= schema.hi))  # NaN fails both comparisons
        for j, allowed in enumerate(schema.categories):
            if allowed is not None:
                bad[:, j] |= ~np.isin(x[:, j], allowed)
        if not bad.any():
            return
        per_feature = bad.any(axis=0)
        for col in np.flatnonzero(per_feature).tolist():
            name = schema.names[col]
            self.schema_violations[name] = self.schema_violations.get(name, 0) + 1
        if self.policy.reject_invalid:
            j = int(np.flatnonzero(per_feature)[0])
            row = int(np.flatnonzero(bad[:, j])[0])
            raise InvalidInputError(
                f"model '{self.name}' version {self.version}: feature "
                f"'{schema.names[j]}' has invalid value {x[row, j]!r} in row {row} "
                "(outside its declared range or categories)"
            )

    def _v2_type(self, tensor: str, onnx_type: str) -> str:
        try:
            return ONNX_TO_V2[onnx_type]
        except KeyError:
            raise InvalidInputError(
                f"model '{self.name}' version {self.version}: tensor '{tensor}' has type "
                f"{onnx_type}, which the V2 protocol cannot carry"
            ) from None

    # -- requests ------------------------------------------------------------------------

    def prepare(self, request: InferRequest) -> tuple[list[Array], int]:
        """Check a request against the signature; return its feeds in graph order and rows.

        Raises ``InvalidInputError`` naming the model, version and tensor on any mismatch:
        unknown, missing or repeated input; wrong datatype; wrong rank or dimension; batch
        larger than ``max_batch_size``; inputs with different batch sizes; unknown output.
        """
        feeds: list[Array | None] = [None] * len(self.input_names)
        rows = -1
        where = self._where
        for tensor in request.inputs:
            entry = self._inputs.get(tensor.name)
            if entry is None:
                raise InvalidInputError(
                    f"{where} has no input '{tensor.name}'; its inputs are "
                    + ", ".join(repr(n) for n in self.input_names)
                )
            index, spec, dtype, rank, fixed = entry
            if feeds[index] is not None:
                raise InvalidInputError(f"{where}: input '{tensor.name}' is given twice")
            if tensor.datatype != spec.datatype:
                raise InvalidInputError(
                    f"{where}: input '{tensor.name}' has datatype {tensor.datatype}, "
                    f"the model expects {spec.datatype}"
                )
            shape = tensor.shape
            if len(shape) != rank:
                raise self._shape_error(tensor.name, shape, spec)
            for dim, size in fixed:
                if shape[dim] != size:
                    raise self._shape_error(tensor.name, shape, spec)
            if self.max_batch_size:
                batch = shape[0]
                if rows == -1:
                    rows = batch
                elif batch != rows:
                    raise InvalidInputError(
                        f"{where}: inputs disagree on the batch size ({rows} and {batch} "
                        f"for '{tensor.name}')"
                    )
            data = tensor.data
            if data.dtype != dtype:
                data = data.astype(dtype)
            if spec.datatype == "BYTES":
                data = _bytes_to_str(data)
            feeds[index] = data
        for index, feed in enumerate(feeds):
            if feed is None:
                raise InvalidInputError(f"{where}: input '{self.input_names[index]}' is missing")
        if self.max_batch_size:
            if rows < 1:
                raise InvalidInputError(f"{where}: the batch dimension must be at least 1")
            if rows > self.max_batch_size:
                raise InvalidInputError(
                    f"{where}: batch size {rows} exceeds the model's max_batch_size "
                    f"{self.max_batch_size}; split the request"
                )
        else:
            rows = 1
        if self._schema is not None:
            self._check_schema(feeds, rows)  # type: ignore[arg-type]  # all filled by now
        if request.outputs:
            for out in request.outputs:
                if out.name not in self._outputs:
                    raise InvalidInputError(
                        f"{where} has no output '{out.name}'; its outputs are "
                        + ", ".join(repr(n) for n in self.output_names)
                    )
        return feeds, rows  # type: ignore[return-value]  # every slot filled above

    def _shape_error(
        self, name: str, shape: tuple[int, ...], spec: TensorSpec
    ) -> InvalidInputError:
        return InvalidInputError(
            f"{self._where}: input '{name}' has shape {list(shape)}, "
            f"the model expects {list(spec.shape)} (-1 is any size)"
        )

    def run(self, feeds: list[Array]) -> list[Array]:
        """Run one batch (blocking). Raises ``ModelExecutionError`` if the runtime fails."""
        feed = dict(zip(self.input_names, feeds, strict=True))
        try:
            outputs: list[Array] = self._run(self.output_names, feed, None)
        except Exception as exc:  # onnxruntime raises its own exception types
            if type(exc).__name__ != "EPFail":
                raise self._failed(exc) from exc
            try:  # a provider failed: the public run falls back to the CPU provider once
                outputs = self.session.run(self.output_names, feed)
                # The fallback made a new inner session: later calls go to it directly.
                self._run = _inner_run(self.session)
            except Exception as again:
                raise self._failed(again) from again
        return outputs

    def _failed(self, exc: Exception) -> ModelExecutionError:
        return ModelExecutionError(f"model '{self.name}' version {self.version} failed: {exc}")

    def respond(self, request: InferRequest, arrays: list[Array]) -> InferResponse:
        """Build the response for one request from its slice of the model's outputs."""
        specs = self.signature.outputs
        if request.outputs:
            chosen = [self._outputs[o.name][0] for o in request.outputs]
        else:
            chosen = list(range(len(specs)))
        outputs = []
        for index in chosen:
            spec = specs[index]
            array = arrays[index]
            outputs.append(Tensor(spec.name, spec.datatype, array.shape, array))
        return InferResponse(self.name, self.version, outputs, id=request.id, parameters=None)

    # -- life cycle ----------------------------------------------------------------------

    def warm_up(self) -> None:
        """Run a zero batch at size 1 and at max_batch_size; time the larger one.

        With ``execution="auto"`` a model on the CPU runs inline on the event loop when a full
        batch took at most ``inline_max_us`` (a thread hand-off costs about 100 µs). A model
        on a GPU always runs in the pool: inline, the loop would wait out every device call
        instead of decoding the next requests (``bench.scaling`` on an H200, two runs: the
        pool served 1.28x the rows/s over gRPC unary and 1.52-1.91x over a stream with one
        process, 2.3x and 3.1x with four), and a GPU call's warm-up time varies from one start
        to the next (four workers chose differently).
        """
        sizes = [1, self.max_batch_size] if self.max_batch_size > 1 else [1]
        best = math.inf
        for rows in sizes:
            feeds = [self._synthetic(spec, rows) for spec in self.signature.inputs]
            best = math.inf
            for _ in range(_WARMUP_REPEATS):
                start = time.perf_counter_ns()
                self.run(feeds)
                best = min(best, (time.perf_counter_ns() - start) / 1000)
        self.warmup_us = best
        if self.policy.execution == "auto":
            self.is_inline = self.device == "CPU" and best <= self.policy.inline_max_us
        if self.policy.fill_batch_size == -1 and not self.is_inline and self.max_batch_size > 1:
            self.fill_batch_size = self._measure_fill()

    def _measure_fill(self) -> int:
        """The smallest batch (a power of two, or the maximum) whose rows/s at warm-up is
        within ``_FILL_SHARE`` of the best size's."""
        sizes = [
            1 << i for i in range(self.max_batch_size.bit_length()) if 1 << i < self.max_batch_size
        ]
        sizes.append(self.max_batch_size)
        for rows in sizes:
            feeds = [self._synthetic(spec, rows) for spec in self.signature.inputs]
            best_ns = math.inf
            for _ in range(_WARMUP_REPEATS):
                start = time.perf_counter_ns()
                self.run(feeds)
                best_ns = min(best_ns, time.perf_counter_ns() - start)
            self.rows_per_s[rows] = rows * 1e9 / max(best_ns, 1)
        top = max(self.rows_per_s.values())
        return next(rows for rows in sizes if self.rows_per_s[rows] >= _FILL_SHARE * top)

    def _synthetic(self, spec: TensorSpec, rows: int) -> Array:
        shape = [
            rows if (i == 0 and self.max_batch_size) else max(d, 1)
            for i, d in enumerate(spec.shape)
        ]
        if spec.datatype == "BYTES":
            return np.full(shape, "", dtype=np.object_)
        return np.zeros(shape, dtype=V2_TO_NUMPY[spec.datatype])

    def close(self) -> None:
        """Release the session; the object must not be used afterwards."""
        del self._run
        del self.session


def _bytes_to_str(data: Array) -> Array:
    """ONNX Runtime string tensors take ``str`` elements; V2 BYTES arrive as ``bytes``."""
    flat = data.reshape(-1)
    out = np.empty(flat.shape[0], dtype=np.object_)
    for i, item in enumerate(flat):
        out[i] = item.decode("utf-8", "surrogateescape") if isinstance(item, bytes) else str(item)
    return out.reshape(data.shape)


class ModelRepository:
    """The model folder and the versions loaded from it.

    ``load`` builds fresh ``ModelVersion`` objects (the caller swaps them in); a version
    that fails to load is listed as UNAVAILABLE with its reason and the others keep
    serving. All session work runs in the inference pool, never on the event loop.
    """

    def __init__(
        self,
        root: Path,
        runtime: RuntimeSettings,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.root = root
        self._runtime = runtime
        self._overrides = dict(overrides or {})
        self._entries: dict[tuple[str, str], ModelIndexEntry] = {}
        self._pool: ThreadPoolExecutor | None = None

    @property
    def executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            raise RuntimeError("ModelRepository.start() was not called")
        return self._pool

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=self._runtime.inference_workers, thread_name_prefix="inference"
        )

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def model_names(self) -> list[str]:
        """Folders under the repository root that hold at least one version."""
        if not self.root.is_dir():
            return []
        return sorted(d.name for d in self.root.iterdir() if d.is_dir() and self._version_dirs(d))

    @staticmethod
    def _version_dirs(model_dir: Path) -> list[Path]:
        found = [d for d in model_dir.iterdir() if d.is_dir() and d.name.isdigit()]
        return sorted(found, key=lambda d: int(d.name))

    def index(self) -> list[ModelIndexEntry]:
        """Every model version seen, with its state; unloaded-but-present models too."""
        entries = dict(self._entries)
        for name in self.model_names():
            for vdir in self._version_dirs(self.root / name):
                entries.setdefault((name, vdir.name), ModelIndexEntry(name, vdir.name, ""))
        return [entries[key] for key in sorted(entries, key=lambda k: (k[0], int(k[1])))]

    def set_state(self, name: str, version: str, state: str, reason: str = "") -> None:
        self._entries[(name, version)] = ModelIndexEntry(name, version, state, reason)

    async def load(self, name: str, extra: Mapping[str, Any] | None = None) -> list[ModelVersion]:
        """Load every version of ``name`` (blocking work in the pool); return those that
        loaded. Raises ``ModelNotFoundError`` when the folder has no versions and
        ``InvalidInputError`` when its settings are invalid."""
        if "/" in name or name.startswith(".") or not name:
            raise InvalidInputError(f"invalid model name '{name}'")
        model_dir = self.root / name
        if not model_dir.is_dir() or not self._version_dirs(model_dir):
            raise ModelNotFoundError(
                f"model '{name}' is not in the repository (no <repository>/{name}/<version>/"
                f"{MODEL_FILE})"
            )
        try:
            policy = load_model_policy(model_dir, self._overrides.get(name), extra)
        except GatewayError as exc:
            # Client-visible: the repository's absolute path stays on the server.
            exc.message = exc.message.replace(str(self.root), "<repository>")
            raise
        loop = asyncio.get_running_loop()
        loaded: list[ModelVersion] = []
        for vdir in self._version_dirs(model_dir):
            version = vdir.name
            self.set_state(name, version, "LOADING")
            try:
                model = await loop.run_in_executor(
                    self.executor, self._load_version, name, version, vdir, policy
                )
            except Exception as exc:
                reason = exc.message if isinstance(exc, GatewayError) else f"{exc}"
                logger.error("model %s version %s failed to load: %s", name, version, reason)
                # The index and load errors reach clients: no absolute server paths.
                reason = reason.replace(str(self.root), "<repository>")
                self.set_state(name, version, "UNAVAILABLE", reason)
                continue
            loaded.append(model)
        return loaded

    def _load_version(
        self, name: str, version: str, vdir: Path, policy: ModelPolicy
    ) -> ModelVersion:
        path = vdir / MODEL_FILE
        if not path.is_file():
            raise ModelNotFoundError(f"{path.relative_to(self.root)} is missing")
        model = ModelVersion(name, version, path, policy, self._runtime)
        if self._runtime.warmup:
            try:
                model.warm_up()
            except ModelExecutionError as exc:
                # Some models reject all-zero inputs (indices, lookups); they still serve.
                logger.warning(
                    "model %s version %s: warm-up on zero inputs failed (%s); serving it "
                    "without warm-up, in the inference pool",
                    name,
                    version,
                    exc.message,
                )
                model.is_inline = policy.execution == "inline"
        model.signature = dataclasses.replace(
            model.signature,
            execution="inline" if model.is_inline else "pool",
            fill_batch_size=model.fill_batch_size,
            warmup_rows_per_s=tuple(sorted(model.rows_per_s.items())),
        )
        logger.info(
            "loaded model %s version %s (%s, batch %s, fill %s, warm-up %.0f us, %s)",
            name,
            version,
            model.device,
            model.max_batch_size or "off",
            model.fill_batch_size or "off",
            model.warmup_us or 0.0,
            "inline" if model.is_inline else "pool",
        )
        return model
