"""v2_grpc.py: KServe V2 protobuf messages <-> internal types.

Mirrors ``v2_json``: the same function names, the same ``InferRequest``/``InferResponse``.
Inputs come from ``raw_input_contents`` (what tritonclient and perf_analyzer send) or typed
``contents``; outputs always go to ``raw_output_contents``, one per output in order, which
is the only place the C++ client reads them. Metadata, config and statistics messages are
built from the dictionaries ``v2_json`` renders, so both protocols say the same thing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from google.protobuf import json_format

from gateway._proto import grpc_service_pb2 as pb
from gateway._proto import model_config_pb2 as mc
from gateway.codecs import v2_json
from gateway.codecs.datatypes import (
    check_tensor_parameters,
    tensor_from_buffer,
    tensor_from_list,
    tensor_to_bytes,
)
from gateway.codecs.limits import (
    DEFAULT_LIMITS,
    CodecLimits,
    ElementBudget,
    check_count,
    check_model_name,
    client_error,
)
from gateway.errors import InvalidInputError, UnimplementedError
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
    "decode_parameters",
    "model_metadata",
    "model_config",
    "model_statistics",
    "repository_index",
]

# Which typed-contents field carries each datatype (the V2 gRPC spec's table).
_CONTENTS_FIELD: Final = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _param_value(p: pb.InferParameter) -> ParamValue:
    which = p.WhichOneof("parameter_choice")
    if which is None:
        return ""
    value: ParamValue = getattr(p, which)
    return value


def decode_parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, ParamValue] | None:
    if not params:
        return None
    return {key: _param_value(value) for key, value in params.items()}


def decode_infer_request(
    msg: pb.ModelInferRequest, limits: CodecLimits = DEFAULT_LIMITS
) -> InferRequest:
    """Decode a ModelInferRequest; ``InvalidInputError`` names the problem.

    ``raw_input_contents`` must have one entry per input when present, and then no input may
    also carry typed contents. Shapes, counts and sizes are checked against the data present
    and ``limits`` before anything is allocated (``PayloadTooLargeError`` over the limits);
    no exception other than a ``GatewayError`` leaves.
    """
    try:
        return _decode_infer_request(msg, limits)
    except Exception as exc:
        raise client_error(exc, "inference request") from None


def _decode_infer_request(msg: pb.ModelInferRequest, limits: CodecLimits) -> InferRequest:
    # Each field is read once: a protobuf attribute read builds a new Python object.
    model_name = msg.model_name
    check_model_name(model_name)
    msg_inputs = msg.inputs
    n_inputs = len(msg_inputs)
    check_count("inputs", n_inputs, limits.max_inputs)
    msg_outputs = msg.outputs
    check_count("outputs", len(msg_outputs), limits.max_outputs)
    budget = ElementBudget(limits)
    raw = msg.raw_input_contents
    n_raw = len(raw)
    if n_raw and n_raw != n_inputs:
        raise InvalidInputError(
            f"raw_input_contents has {n_raw} entries for {n_inputs} inputs; send one per input"
        )
    inputs: list[Tensor] = []
    # Indexed, and the shape sliced: iterating a protobuf container costs a few times
    # more than indexing it or slicing it into a list.
    for i in range(n_inputs):
        inp = msg_inputs[i]
        name = inp.name
        shape = tuple(inp.shape[:])
        datatype = inp.datatype
        if inp.parameters:
            check_tensor_parameters("input", name, inp.parameters)
        if n_raw:
            if inp.HasField("contents"):
                raise InvalidInputError(
                    f"input '{name}' has both typed contents and raw_input_contents"
                )
            data = tensor_from_buffer(name, datatype, shape, raw[i], budget)
        else:
            field = _CONTENTS_FIELD.get(datatype)
            if field is None:
                if datatype in ("FP16", "BF16"):
                    raise InvalidInputError(
                        f"input '{name}': {datatype} has no typed contents; "
                        "send it in raw_input_contents"
                    )
                raise InvalidInputError(f"input '{name}': unsupported datatype '{datatype}'")
            values = getattr(inp.contents, field)
            data = tensor_from_list(name, datatype, shape, list(values), budget)
        inputs.append(Tensor(name, datatype, shape, data))
    outputs = None
    if msg_outputs:
        outputs = []
        for out in msg_outputs:
            oparams = decode_parameters(out.parameters)
            check_tensor_parameters("output", out.name, oparams)
            outputs.append(RequestedOutput(out.name, None, oparams))
    parameters = decode_parameters(msg.parameters)
    return InferRequest(
        model_name,
        msg.model_version,
        inputs,
        id=msg.id,
        parameters=parameters,
        outputs=outputs,
    )


def encode_infer_response(response: InferResponse, request: InferRequest) -> pb.ModelInferResponse:
    """Encode a response with every output in ``raw_output_contents``."""
    msg = pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id,
    )
    add_output = msg.outputs.add
    raw = msg.raw_output_contents
    for tensor in response.outputs:
        add_output(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        raw.append(tensor_to_bytes(tensor.data, tensor.datatype))
    if response.parameters:
        for key, value in response.parameters.items():
            _set_param(msg.parameters[key], value)
    return msg


def _set_param(p: pb.InferParameter, value: ParamValue) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def model_metadata(signature: ModelSignature, versions: Sequence[str]) -> pb.ModelMetadataResponse:
    msg = pb.ModelMetadataResponse()
    json_format.ParseDict(v2_json.model_metadata(signature, versions), msg)
    return msg


def model_config(signature: ModelSignature) -> pb.ModelConfigResponse:
    config = mc.ModelConfig()
    json_format.ParseDict(v2_json.model_config(signature), config, ignore_unknown_fields=True)
    return pb.ModelConfigResponse(config=config)


def model_statistics(
    entries: Iterable[tuple[str, str, ModelStats]],
) -> pb.ModelStatisticsResponse:
    msg = pb.ModelStatisticsResponse()
    json_format.ParseDict(v2_json.model_statistics(entries), msg)
    return msg


def repository_index(
    entries: Iterable[ModelIndexEntry], ready_only: bool
) -> pb.RepositoryIndexResponse:
    msg = pb.RepositoryIndexResponse()
    for item in v2_json.repository_index(entries, ready_only):
        msg.models.add(**item)
    return msg


def repository_parameters(params: Mapping[str, Any]) -> dict[str, ParamValue]:
    """Load/unload parameters (ModelRepositoryParameter) as plain values."""
    out: dict[str, ParamValue] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        if which == "bytes_param":
            raise UnimplementedError(
                f"load parameter '{key}': uploading model files is not supported; "
                "place them in the model repository"
            )
        if which is not None:
            out[key] = getattr(p, which)
    return out
