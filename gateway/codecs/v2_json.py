"""v2_json.py: KServe V2 REST bodies <-> internal types, JSON and the binary extension.

Decoders and encoders are built once at import. ``decode_infer_request`` takes the raw body
and the ``Inference-Header-Content-Length`` value; ``encode_infer_response`` returns the
body and the JSON length to send in that header (None when every output is JSON). The
metadata, config and statistics renderers serve both front ends: ``v2_grpc`` builds its
messages from the same dictionaries, so the two protocols cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Final

import msgspec

from gateway.codecs.datatypes import (
    V2_TO_CONFIG,
    check_tensor_parameters,
    tensor_from_buffer,
    tensor_from_list,
    tensor_to_bytes,
    tensor_to_list,
)
from gateway.codecs.limits import (
    DEFAULT_LIMITS,
    CodecLimits,
    ElementBudget,
    check_count,
    check_json_depth,
    check_model_name,
    client_error,
)
from gateway.errors import InvalidInputError
from gateway.types import (
    InferRequest,
    InferResponse,
    ModelIndexEntry,
    ModelSignature,
    ModelStats,
    ParamValue,
    RequestedOutput,
    Tensor,
)

__all__ = [
    "decode_infer_request",
    "encode_infer_response",
    "decode_json",
    "encode_json",
    "model_metadata",
    "model_config",
    "model_statistics",
    "repository_index",
    "BINARY_DATA_SIZE",
]

BINARY_DATA_SIZE: Final = "binary_data_size"
_UNSET: Final = msgspec.UNSET


class _Input(msgspec.Struct):
    name: str
    shape: list[Annotated[int, msgspec.Meta(ge=0)]]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = _UNSET


class _Output(msgspec.Struct):
    name: str
    parameters: dict[str, Any] | None = None


class _Request(msgspec.Struct):
    inputs: list[_Input]
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[_Output] | None = None


_request_decoder: Final = msgspec.json.Decoder(_Request)
_any_decoder: Final = msgspec.json.Decoder()
_encoder: Final = msgspec.json.Encoder()


def encode_json(value: object) -> bytes:
    return _encoder.encode(value)


def decode_json(body: bytes, what: str, limits: CodecLimits = DEFAULT_LIMITS) -> Any:
    """Decode any JSON body; ``InvalidInputError`` names ``what`` on malformed input or
    nesting deeper than ``limits.max_json_depth``."""
    try:
        check_json_depth(body, what, limits)
        return _any_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidInputError(f"malformed JSON in {what}: {exc}") from None
    except Exception as exc:
        raise client_error(exc, what) from None


def _params(raw: dict[str, Any] | None, where: str) -> dict[str, ParamValue] | None:
    if not raw:
        return None
    for key, value in raw.items():
        if not isinstance(value, str | int | float | bool):
            raise InvalidInputError(
                f"{where} parameter '{key}' must be a string, number or boolean"
            )
    return raw


def decode_infer_request(
    body: bytes,
    header_length: int | None,
    model_name: str,
    model_version: str,
    limits: CodecLimits = DEFAULT_LIMITS,
) -> InferRequest:
    """Decode a V2 infer body (JSON, optionally followed by binary tensor data).

    Raises ``InvalidInputError`` naming the problem: malformed JSON (with msgspec's path),
    nesting deeper than msgspec's recursion guard, more inputs or outputs than the limits,
    a bad ``Inference-Header-Content-Length``, binary sizes that do not add up, a shape
    that is negative, absurd or does not match its data, a value out of its datatype's
    range, or an input with both ``data`` and binary data. ``PayloadTooLargeError`` when
    consistent inputs are over ``limits.max_elements`` or ``max_decoded_bytes``. Sizes
    are checked before anything is allocated, and no other exception leaves.
    """
    try:
        return _decode_infer_request(body, header_length, model_name, model_version, limits)
    except Exception as exc:
        raise client_error(exc, "inference request") from None


def _decode_infer_request(
    body: bytes,
    header_length: int | None,
    model_name: str,
    model_version: str,
    limits: CodecLimits,
) -> InferRequest:
    check_model_name(model_name)
    size = len(body)
    if header_length is None:
        header_length = size
    elif header_length < 0 or header_length > size:
        raise InvalidInputError(
            f"Inference-Header-Content-Length is {header_length} but the body has {size} bytes"
        )
    view = memoryview(body)
    # No depth pre-scan here: it would cost about 1 ns per byte on every request. The
    # schema bounds the envelope; 'data' is bounded by msgspec's recursion guard (about
    # 1,000 levels, a RecursionError that client_error turns into a 400) and by
    # numpy's 64 dimensions, and parameters must be scalars.
    try:
        req = _request_decoder.decode(view[:header_length])
    except msgspec.ValidationError as exc:
        raise InvalidInputError(f"invalid inference request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidInputError(f"malformed JSON in inference request: {exc}") from None
    check_count("inputs", len(req.inputs), limits.max_inputs)
    if req.outputs:
        check_count("outputs", len(req.outputs), limits.max_outputs)
    budget = ElementBudget(limits)
    offset = header_length
    inputs: list[Tensor] = []
    for inp in req.inputs:
        shape = tuple(inp.shape)
        params = inp.parameters
        binary_size = None
        if params:
            check_tensor_parameters("input", inp.name, params)
            binary_size = params.get(BINARY_DATA_SIZE)
        if binary_size is not None:
            if inp.data is not _UNSET:
                raise InvalidInputError(
                    f"input '{inp.name}' has both 'data' and binary_data_size; send one"
                )
            if (
                not isinstance(binary_size, int)
                or isinstance(binary_size, bool)
                or (binary_size < 0)
            ):
                raise InvalidInputError(
                    f"input '{inp.name}': binary_data_size must be a non-negative integer"
                )
            end = offset + binary_size
            if end > size:
                raise InvalidInputError(
                    f"input '{inp.name}': binary_data_size {binary_size} runs past the end "
                    f"of the body ({size - offset} bytes of binary data remain)"
                )
            data = tensor_from_buffer(inp.name, inp.datatype, shape, view[offset:end], budget)
            offset = end
        elif inp.data is _UNSET:
            raise InvalidInputError(f"input '{inp.name}' has neither 'data' nor binary_data_size")
        else:
            if inp.datatype == "BF16":
                raise InvalidInputError(f"input '{inp.name}': BF16 has no JSON form")
            data = tensor_from_list(inp.name, inp.datatype, shape, inp.data, budget)
        inputs.append(Tensor(inp.name, inp.datatype, shape, data))
    if offset != size:
        raise InvalidInputError(
            f"the body has {size - offset} bytes after the last tensor's binary data"
        )
    parameters = _params(req.parameters, "request")
    binary_output = bool(parameters and parameters.get("binary_data_output") is True)
    outputs = None
    if req.outputs:
        outputs = []
        for out in req.outputs:
            oparams = _params(out.parameters, f"output '{out.name}'")
            binary = None
            if oparams:
                check_tensor_parameters("output", out.name, oparams)
                flag = oparams.get("binary_data")
                if flag is not None:
                    binary = bool(flag)
            outputs.append(RequestedOutput(out.name, binary, oparams))
    return InferRequest(
        model_name,
        model_version,
        inputs,
        id=req.id or "",
        parameters=parameters,
        outputs=outputs,
        binary_output=binary_output,
    )


def encode_infer_response(
    response: InferResponse, request: InferRequest
) -> tuple[bytes, int | None]:
    """Encode a response; binary outputs follow the JSON in output order.

    Returns ``(body, json_length)``; ``json_length`` is None when no output is binary (then
    no Inference-Header-Content-Length header is sent). A JSON output carries no
    ``parameters`` key: the C++ client requires ``binary_data_size`` whenever it is present.
    """
    default_binary = request.binary_output
    flags: Sequence[bool | None]
    if request.outputs:
        flags = [o.binary for o in request.outputs]
    else:
        flags = [None] * len(response.outputs)
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for tensor, flag in zip(response.outputs, flags, strict=True):
        binary = default_binary if flag is None else flag
        if binary:
            blob = tensor_to_bytes(tensor.data, tensor.datatype)
            blobs.append(blob)
            outputs.append(
                {
                    "name": tensor.name,
                    "datatype": tensor.datatype,
                    "shape": list(tensor.shape),
                    "parameters": {BINARY_DATA_SIZE: len(blob)},
                }
            )
        else:
            outputs.append(
                {
                    "name": tensor.name,
                    "datatype": tensor.datatype,
                    "shape": list(tensor.shape),
                    "data": tensor_to_list(tensor.data, tensor.datatype),
                }
            )
    head: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id:
        head["id"] = response.id
    if response.parameters:
        head["parameters"] = response.parameters
    head["outputs"] = outputs
    header = _encoder.encode(head)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


# -- metadata, config, statistics, index (shared with v2_grpc) -------------------------


def model_metadata(signature: ModelSignature, versions: Sequence[str]) -> dict[str, Any]:
    """V2 model metadata; ``shape`` includes the batch dimension as -1 when batching."""
    return {
        "name": signature.name,
        "versions": list(versions),
        "platform": signature.platform,
        "inputs": [
            {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
            for s in signature.inputs
        ],
        "outputs": [
            {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
            for s in signature.outputs
        ],
    }


def _batching_choice(signature: ModelSignature) -> dict[str, Any]:
    """What the load chose, as Triton's string parameters (both protocols carry them):
    ``execution`` (inline or pool), ``fill_batch_size`` and, when the fill size was measured,
    ``warmup_rows_per_s`` ("batch:rows/s" pairs)."""
    if not signature.execution:
        return {}
    chosen = {
        "execution": signature.execution,
        "fill_batch_size": str(signature.fill_batch_size),
    }
    if signature.warmup_rows_per_s:
        chosen["warmup_rows_per_s"] = ",".join(
            f"{rows}:{rate:.0f}" for rows, rate in signature.warmup_rows_per_s
        )
    return {key: {"string_value": value} for key, value in chosen.items()}


def model_config(signature: ModelSignature) -> dict[str, Any]:
    """The model configuration (Triton's form) that perf_analyzer and tritonclient read.

    With ``max_batch_size > 0`` the dims leave out the batch dimension. Every sub-object
    that clients read without a presence check carries its fields explicitly.
    """
    batched = signature.max_batch_size > 0

    def dims(shape: tuple[int, ...]) -> list[int]:
        return list(shape[1:] if batched else shape)

    dynamic: dict[str, Any] = {"max_queue_delay_microseconds": signature.max_queue_delay_us}
    if signature.preferred_batch_sizes:
        dynamic["preferred_batch_size"] = list(signature.preferred_batch_sizes)
    config: dict[str, Any] = {
        "name": signature.name,
        "platform": signature.platform,
        "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": signature.max_batch_size,
        "input": [
            {
                "name": s.name,
                "data_type": V2_TO_CONFIG[s.datatype],
                "format": "FORMAT_NONE",
                "dims": dims(s.shape),
                "is_shape_tensor": False,
                "allow_ragged_batch": False,
                "optional": False,
            }
            for s in signature.inputs
        ],
        "output": [
            {
                "name": s.name,
                "data_type": V2_TO_CONFIG[s.datatype],
                "dims": dims(s.shape),
                "label_filename": "",
                "is_shape_tensor": False,
            }
            for s in signature.outputs
        ],
        "instance_group": [
            {
                "name": signature.name,
                "kind": "KIND_GPU" if signature.device == "GPU" else "KIND_CPU",
                "count": signature.instances,
                "gpus": [],
            }
        ],
        "default_model_filename": "model.onnx",
        "parameters": _batching_choice(signature),
        "model_transaction_policy": {"decoupled": False},
        "response_cache": {"enable": False},
    }
    if batched and signature.dynamic_batching:
        config["dynamic_batching"] = dynamic
    return config


def _duration(count: int, ns: int) -> dict[str, int]:
    return {"count": count, "ns": ns}


def model_statistics(
    entries: Iterable[tuple[str, str, ModelStats]],
) -> dict[str, Any]:
    """``{"model_stats": [...]}`` with every field perf_analyzer reads present."""
    stats_list = []
    for name, version, s in entries:
        stats_list.append(
            {
                "name": name,
                "version": version,
                "last_inference": s.last_inference_ms,
                "inference_count": s.inference_count,
                "execution_count": s.execution_count,
                "inference_stats": {
                    "success": _duration(s.success.count, s.success.ns),
                    "fail": _duration(s.fail.count, s.fail.ns),
                    "queue": _duration(s.queue.count, s.queue.ns),
                    "compute_input": _duration(s.compute_input.count, s.compute_input.ns),
                    "compute_infer": _duration(s.compute_infer.count, s.compute_infer.ns),
                    "compute_output": _duration(s.compute_output.count, s.compute_output.ns),
                    "cache_hit": _duration(0, 0),
                    "cache_miss": _duration(0, 0),
                },
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": _duration(b.compute_input.count, b.compute_input.ns),
                        "compute_infer": _duration(b.compute_infer.count, b.compute_infer.ns),
                        "compute_output": _duration(b.compute_output.count, b.compute_output.ns),
                    }
                    for size, b in sorted(s.batches.items())
                ],
                "memory_usage": [],
                "response_stats": {},
            }
        )
    return {"model_stats": stats_list}


def repository_index(entries: Iterable[ModelIndexEntry], ready_only: bool) -> list[Any]:
    """The repository index: one entry per model version with its state and reason."""
    out = []
    for e in entries:
        if ready_only and e.state != "READY":
            continue
        item: dict[str, str] = {"name": e.name, "version": e.version}
        if e.state:
            item["state"] = e.state
        if e.reason:
            item["reason"] = e.reason
        out.append(item)
    return out
