"""types.py: the internal values that travel between the front ends and the core.

Codecs build these from wire bytes; the router, batcher and repository consume them. No
protocol library is imported here. Tensors hold numpy arrays already shaped; a BYTES tensor
is a numpy object array of ``bytes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

import msgspec
import numpy as np
import numpy.typing as npt

__all__ = [
    "ParamValue",
    "Tensor",
    "TensorSpec",
    "RequestedOutput",
    "InferRequest",
    "InferResponse",
    "ModelRef",
    "Observer",
    "ModelSignature",
    "Duration",
    "BatchStats",
    "ModelStats",
    "ModelIndexEntry",
    "ModelControl",
    "Variant",
    "ShadowTarget",
    "Route",
    "Truth",
    "FeedbackItem",
    "FeedbackResult",
]

ParamValue: TypeAlias = "str | int | float | bool"
Array: TypeAlias = "npt.NDArray[np.generic]"


class Tensor:
    """One named tensor: V2 datatype name, shape, and its numpy data (shaped)."""

    __slots__ = ("data", "datatype", "name", "parameters", "shape")

    def __init__(
        self,
        name: str,
        datatype: str,
        shape: tuple[int, ...],
        data: Array,
        parameters: dict[str, ParamValue] | None = None,
    ) -> None:
        self.name = name
        self.datatype = datatype
        self.shape = shape
        self.data = data
        self.parameters = parameters

    def __repr__(self) -> str:
        return f"Tensor({self.name!r}, {self.datatype}, {self.shape})"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input or output as the model declares it; -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


class RequestedOutput:
    """An output the caller asked for; ``binary`` None means "the request's default"."""

    __slots__ = ("binary", "name", "parameters")

    def __init__(
        self,
        name: str,
        binary: bool | None = None,
        parameters: dict[str, ParamValue] | None = None,
    ) -> None:
        self.name = name
        self.binary = binary
        self.parameters = parameters


class InferRequest:
    """A decoded V2 inference request, the same whichever front end it came from.

    ``model_version`` is "" when the caller left the choice to the gateway.
    ``outputs`` is None when the caller asked for every output. ``deadline`` is a
    ``time.monotonic()`` instant after which nobody waits for the answer.
    """

    __slots__ = (
        "binary_output",
        "deadline",
        "id",
        "inputs",
        "model_name",
        "model_version",
        "outputs",
        "parameters",
        "routing_key",
    )

    def __init__(
        self,
        model_name: str,
        model_version: str,
        inputs: list[Tensor],
        *,
        id: str = "",
        parameters: dict[str, ParamValue] | None = None,
        outputs: list[RequestedOutput] | None = None,
        binary_output: bool = False,
        deadline: float | None = None,
        routing_key: str | None = None,
    ) -> None:
        self.model_name = model_name
        self.model_version = model_version
        self.inputs = inputs
        self.id = id
        self.parameters = parameters
        self.outputs = outputs
        self.binary_output = binary_output
        self.deadline = deadline
        self.routing_key = routing_key


class InferResponse:
    """The answer to one ``InferRequest``: outputs in the order they will be sent."""

    __slots__ = ("id", "model_name", "model_version", "outputs", "parameters")

    def __init__(
        self,
        model_name: str,
        model_version: str,
        outputs: list[Tensor],
        *,
        id: str = "",
        parameters: dict[str, ParamValue] | None = None,
    ) -> None:
        self.model_name = model_name
        self.model_version = model_version
        self.outputs = outputs
        self.id = id
        self.parameters = parameters


@dataclass(frozen=True, slots=True, order=True)
class ModelRef:
    """A (model name, version) pair: what a route variant points at."""

    name: str
    version: str = field(default="")

    def __str__(self) -> str:
        return f"{self.name}/{self.version}" if self.version else self.name


class Observer(Protocol):
    """Receives each of one model version's calls off the response path: the feeds and
    outputs, in the model's input and output order (sequences, so the caller builds no
    dicts). Drift statistics: ``gateway.drift.buffer.ObserverChannel``."""

    def __call__(self, inputs: Sequence[Array], outputs: Sequence[Array]) -> None: ...


@dataclass(frozen=True, slots=True)
class ModelSignature:
    """What clients may know about a loaded model version (metadata and config)."""

    name: str
    version: str
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    """0 when the model has no batch dimension (then shapes are used as declared)."""
    preferred_batch_sizes: tuple[int, ...] = ()
    dynamic_batching: bool = True
    max_queue_delay_us: int = 0
    instances: int = 1
    device: str = "CPU"
    execution: str = ""
    """Where a batch runs once loaded: "inline" (the event loop) or "pool"; "" before."""
    fill_batch_size: int = 0
    """Rows a batch waits for under load (0: off): configured, or measured at warm-up."""
    warmup_rows_per_s: tuple[tuple[int, float], ...] = ()
    """(batch size, rows/s) at warm-up, when the fill size was measured from them."""


class Duration:
    """A count and a cumulative time in nanoseconds (V2 statistics' StatisticDuration)."""

    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


class BatchStats:
    """Per batch size: how many model executions ran at that size and their stage times."""

    __slots__ = ("compute_infer", "compute_input", "compute_output")

    def __init__(self) -> None:
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()


class ModelStats:
    """Cumulative serving statistics of one model version (V2 statistics extension).

    Mutated only on the event-loop thread, so readers there see consistent values.
    ``inference_count`` counts rows, ``execution_count`` model calls.
    """

    __slots__ = (
        "batches",
        "cancelled",
        "compute_infer",
        "compute_input",
        "compute_output",
        "execution_count",
        "expired",
        "fail",
        "inference_count",
        "last_inference_ms",
        "queue",
        "rejected",
        "success",
    )

    def __init__(self) -> None:
        self.last_inference_ms = 0
        self.inference_count = 0
        self.execution_count = 0
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.batches: dict[int, BatchStats] = {}
        self.rejected = 0
        self.expired = 0
        self.cancelled = 0

    def batch(self, size: int) -> BatchStats:
        stats = self.batches.get(size)
        if stats is None:
            stats = self.batches[size] = BatchStats()
        return stats


@dataclass(frozen=True, slots=True)
class ModelIndexEntry:
    """One row of the repository index: a model version and its state."""

    name: str
    version: str
    state: str
    """READY, LOADING, UNLOADING or UNAVAILABLE (the V2 repository extension's names)."""
    reason: str = ""


class ModelControl(Protocol):
    """The V2 repository extension as the front ends see it."""

    def index(self) -> list[ModelIndexEntry]: ...

    async def load(self, name: str, parameters: dict[str, ParamValue]) -> None: ...

    async def unload(self, name: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Variant:
    """One arm of a route: a version of the routed model and its traffic weight (>= 0)."""

    version: str
    weight: float


@dataclass(frozen=True, slots=True)
class ShadowTarget:
    """A version that receives a copy of a sampled share of traffic; its answers are only
    compared, never returned."""

    version: str
    sample_rate: float
    """Share of primary requests mirrored, 0..1."""


@dataclass(frozen=True, slots=True)
class Route:
    """How requests for ``model`` that name no version are split between its versions."""

    model: str
    variants: tuple[Variant, ...]
    shadows: tuple[ShadowTarget, ...] = ()

    def weights(self) -> dict[str, float]:
        return {v.version: v.weight for v in self.variants}


Truth: TypeAlias = "int | float | str | list[int | float | str | list[float]]"


class FeedbackItem(msgspec.Struct, frozen=True):
    """Ground truth for one earlier request: its id and one truth per row of that request.

    A class label is an int or an int in a string ("3"); a regression truth is a number (a
    list of numbers per row for multi-output models). One-row requests may give a scalar.
    """

    id: str
    truth: Truth


class FeedbackResult(msgspec.Struct, frozen=True, kw_only=True):
    """What one join call did with its items."""

    received: int
    matched: int
    unknown_ids: int
    """Never remembered, already evicted or expired and swept, or remembered nowhere here."""
    expired_ids: int
    """Still held but older than ttl_s (removed now)."""
    duplicate: int
    """Already joined (the first truth counts; later ones are ignored)."""
    invalid: int
    """Wrong type or shape for the remembered prediction; the prediction stays joinable."""
    errors: tuple[str, ...] = ()
    """Messages for the first ``feedback.MAX_ERRORS`` invalid items."""
