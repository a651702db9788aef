"""Property: whatever bytes or message a client sends, a codec either decodes an
``InferRequest`` or raises a client error (InvalidInputError, PayloadTooLargeError, or
UnimplementedError for an extension we do not offer). Nothing else leaves a decoder.

Bodies are built from random fields (shapes from tiny to absurd, every datatype and some
that do not exist, data and parameters of any JSON type and nesting, binary tails and
header lengths that may not add up) and from byte-level mutations of valid bodies. The
profile is bounded (150 examples per test) so the file runs in seconds; FUZZ_EXAMPLES=N
runs a longer campaign (2,000 per test found nothing, 2 minutes).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Literal

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gateway._proto import grpc_service_pb2 as pb
from gateway.codecs import v2_grpc, v2_json
from gateway.codecs.datatypes import V2_TO_NUMPY, tensor_to_bytes
from gateway.codecs.limits import CodecLimits
from gateway.errors import InvalidInputError, PayloadTooLargeError, UnimplementedError
from gateway.types import InferRequest

CLIENT_ERRORS = (InvalidInputError, PayloadTooLargeError, UnimplementedError)
# What client_error() writes for an exception no check anticipated: the boundary keeps
# the server up, but every such input deserves a check of its own with a clear message.
UNANTICIPATED = re.compile(r"invalid inference request: [A-Za-z]+(Error|Exception|Warning): ")

# The profile: bounded examples, no per-example deadline (the machine is shared), the same
# examples every run (a CI result is reproducible); FUZZ_RANDOM=1 explores new ones, e.g.
# `FUZZ_RANDOM=1 FUZZ_EXAMPLES=5000 scripts/test tests/unit/test_codecs_fuzz.py`.
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    derandomize=os.environ.get("FUZZ_RANDOM", "") != "1",
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Small limits, so "too large" paths are reached with small bodies too.
SMALL = CodecLimits(max_inputs=8, max_outputs=8, max_elements=4096, max_decoded_bytes=1 << 16)

DATATYPES = [*V2_TO_NUMPY, "BF16", "", "fp32", "STRING", "FP8"]
HUGE = [2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**64, 2**100, -1, -(2**63)]

dims = st.one_of(
    st.integers(0, 4), st.integers(0, 4), st.sampled_from(HUGE), st.integers(-(2**70), 2**70)
)
shapes = st.one_of(
    st.lists(dims, max_size=5),
    st.lists(st.integers(1, 3), max_size=3),
    st.lists(st.just(1), min_size=30, max_size=40),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 65520.0, 3.5e38, 2**64]),
    st.text(max_size=8),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=16,
)
param_keys = st.one_of(
    st.sampled_from(
        ["binary_data_size", "binary_data", "binary_data_output", "timeout", "shared_memory_region"]
    ),
    st.text(max_size=6),
)
parameters = st.dictionaries(param_keys, json_values, max_size=3)


@st.composite
def data_for(draw: st.DrawFn, shape: list[int], datatype: str) -> Any:
    """Data that may fit the shape (when the shape is small) or may not."""
    count = 1
    for d in shape:
        count *= d
    if 0 <= count <= 16 and draw(st.booleans()):
        if datatype == "BYTES":
            element: st.SearchStrategy[Any] = st.text(max_size=4)
        elif datatype == "BOOL":
            element = st.booleans()
        elif datatype.startswith(("FP", "BF")):
            element = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers())
        else:
            element = st.integers(-(2**65), 2**65)
        return draw(st.lists(element, min_size=count, max_size=count))
    return draw(json_values)


@st.composite
def rest_inputs(draw: st.DrawFn) -> tuple[dict[str, Any], bytes]:
    shape = draw(shapes)
    datatype = draw(st.sampled_from(DATATYPES))
    entry: dict[str, Any] = {"name": draw(st.text(max_size=6)), "shape": shape}
    entry["datatype"] = datatype
    blob = b""
    choice = draw(
        st.sampled_from(["data", "data", "binary", "binary", "both", "neither", "raw-params"])
    )
    if choice in ("data", "both"):
        entry["data"] = draw(data_for(shape, datatype))
    if choice in ("binary", "both"):
        blob = draw(st.binary(max_size=64))
        size = draw(st.one_of(st.just(len(blob)), st.integers(-5, 100), st.sampled_from(HUGE)))
        entry["parameters"] = {"binary_data_size": size}
    if choice == "raw-params":
        entry["parameters"] = draw(parameters)
    if draw(st.integers(0, 7)) == 0:
        entry.pop(draw(st.sampled_from(["name", "shape", "datatype"])))
    return entry, blob


@st.composite
def rest_bodies(draw: st.DrawFn) -> tuple[bytes, int | None]:
    pairs = draw(st.lists(rest_inputs(), max_size=4))
    head: dict[str, Any] = {"inputs": [entry for entry, _ in pairs]}
    if draw(st.booleans()):
        head["id"] = draw(st.one_of(st.text(max_size=20), json_values))
    if draw(st.booleans()):
        head["parameters"] = draw(parameters)
    if draw(st.booleans()):
        head["outputs"] = draw(
            st.lists(
                st.fixed_dictionaries(
                    {"name": st.text(max_size=4)}, optional={"parameters": parameters}
                ),
                max_size=10,
            )
        )
    header = json.dumps(head).encode()
    body = header + b"".join(blob for _, blob in pairs)
    length: int | None = len(header) if any(blob for _, blob in pairs) else None
    if draw(st.booleans()):
        length = draw(st.one_of(st.none(), st.integers(-3, len(body) + 3)))
    if draw(st.integers(0, 7)) == 0:  # byte-level mutation of the whole body
        at = draw(st.integers(0, max(len(body) - 1, 0)))
        cut = draw(st.sampled_from(["flip", "truncate", "insert"]))
        if cut == "flip" and body:
            body = body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1 :]
        elif cut == "truncate":
            body = body[:at]
        else:
            body = body[:at] + draw(st.binary(min_size=1, max_size=8)) + body[at:]
    return body, length


def _check_error(exc: InvalidInputError | PayloadTooLargeError | UnimplementedError) -> None:
    event(type(exc).__name__)
    message = exc.message
    assert not UNANTICIPATED.match(message), message


def _decode_rest(body: bytes, length: int | None, limits: CodecLimits) -> None:
    try:
        request = v2_json.decode_infer_request(body, length, "m", "1", limits)
    except CLIENT_ERRORS as exc:
        _check_error(exc)
        return
    event("decoded")
    assert isinstance(request, InferRequest)
    for tensor in request.inputs:
        assert tensor.data.shape == tuple(tensor.shape)


@FUZZ
@given(rest_bodies(), st.booleans())
def test_rest_decoder_answers_a_request_or_a_client_error(
    case: tuple[bytes, int | None], small: bool
) -> None:
    body, length = case
    _decode_rest(body, length, SMALL if small else CodecLimits())


@FUZZ
@given(st.binary(max_size=256), st.one_of(st.none(), st.integers(-2, 300)))
def test_rest_decoder_survives_arbitrary_bytes(body: bytes, length: int | None) -> None:
    _decode_rest(body, length, CodecLimits())


# -- gRPC ---------------------------------------------------------------------------------------

_TYPED_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "bool_contents": st.lists(st.booleans(), max_size=8),
    "int_contents": st.lists(st.integers(-(2**31), 2**31 - 1), max_size=8),
    "int64_contents": st.lists(st.integers(-(2**63), 2**63 - 1), max_size=8),
    "uint_contents": st.lists(st.integers(0, 2**32 - 1), max_size=8),
    "uint64_contents": st.lists(st.integers(0, 2**64 - 1), max_size=8),
    "fp32_contents": st.lists(st.floats(width=32), max_size=8),
    "fp64_contents": st.lists(st.floats(), max_size=8),
    "bytes_contents": st.lists(st.binary(max_size=6), max_size=8),
}


@st.composite
def grpc_parameter(draw: st.DrawFn, p: pb.InferParameter) -> None:
    which = draw(st.sampled_from(["bool", "int64", "string", "double", "uint64", "none"]))
    if which == "bool":
        p.bool_param = draw(st.booleans())
    elif which == "int64":
        p.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
    elif which == "string":
        p.string_param = draw(st.text(max_size=8))
    elif which == "double":
        p.double_param = draw(st.floats())
    elif which == "uint64":
        p.uint64_param = draw(st.integers(0, 2**64 - 1))


int64_dims = st.one_of(
    st.integers(0, 4),
    st.sampled_from([d for d in HUGE if -(2**63) <= d < 2**63]),
    st.integers(-(2**63), 2**63 - 1),
)


@st.composite
def grpc_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(
        model_name=draw(st.one_of(st.just("m"), st.text(max_size=300))),
        model_version=draw(st.text(max_size=3)),
        id=draw(st.text(max_size=20)),
    )
    n_inputs = draw(st.integers(0, 4))
    use_raw = draw(st.sampled_from(["raw", "typed", "mixed"]))
    for _ in range(n_inputs):
        shape = draw(st.lists(int64_dims, max_size=5))
        datatype = draw(st.sampled_from(DATATYPES))
        inp = msg.inputs.add(name=draw(st.text(max_size=4)), datatype=datatype, shape=shape)
        for key in draw(st.lists(param_keys, max_size=2)):
            draw(grpc_parameter(inp.parameters[key]))
        if use_raw != "raw":
            field = draw(st.sampled_from(sorted(_TYPED_FIELDS)))
            getattr(inp.contents, field).extend(draw(_TYPED_FIELDS[field]))
        if use_raw != "typed":
            count = 1
            for d in shape:
                count *= d
            dtype = V2_TO_NUMPY.get(datatype)
            if dtype is not None and dtype.kind != "O" and 0 <= count <= 64 and draw(st.booleans()):
                raw = draw(
                    st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize)
                )
            else:
                raw = draw(st.binary(max_size=64))
            msg.raw_input_contents.append(raw)
    for _ in range(draw(st.integers(0, 2))):  # entries that may not match the inputs
        msg.raw_input_contents.append(draw(st.binary(max_size=8)))
    for _ in range(draw(st.integers(0, 10))):
        out = msg.outputs.add(name=draw(st.text(max_size=4)))
        for key in draw(st.lists(param_keys, max_size=2)):
            draw(grpc_parameter(out.parameters[key]))
    for key in draw(st.lists(param_keys, max_size=3)):
        draw(grpc_parameter(msg.parameters[key]))
    return msg


def _decode_grpc(msg: pb.ModelInferRequest, limits: CodecLimits) -> None:
    try:
        request = v2_grpc.decode_infer_request(msg, limits)
    except CLIENT_ERRORS as exc:
        _check_error(exc)
        return
    event("decoded")
    assert isinstance(request, InferRequest)
    for tensor in request.inputs:
        assert tensor.data.shape == tuple(tensor.shape)
        assert isinstance(tensor.data, np.ndarray)


@FUZZ
@given(grpc_requests(), st.booleans())
def test_grpc_decoder_answers_a_request_or_a_client_error(
    msg: pb.ModelInferRequest, small: bool
) -> None:
    _decode_grpc(msg, SMALL if small else CodecLimits())


@FUZZ
@given(st.binary(max_size=256))
def test_grpc_decoder_survives_arbitrary_wire_bytes(wire: bytes) -> None:
    msg = pb.ModelInferRequest()
    try:
        msg.ParseFromString(wire)
    except Exception:  # grpcio refuses these before our code runs (INVALID_ARGUMENT/INTERNAL)
        return
    _decode_grpc(msg, CodecLimits())


# -- well-formed requests decode to what was sent ---------------------------------------------

NUMERIC = [name for name, dt in V2_TO_NUMPY.items() if dt.kind != "O"]


@st.composite
def tensors(draw: st.DrawFn) -> tuple[str, np.ndarray[Any, Any]]:
    datatype = draw(st.sampled_from([*NUMERIC, "BYTES"]))
    shape = tuple(draw(st.lists(st.integers(0, 3), min_size=1, max_size=3)))
    if datatype == "BYTES":
        count = int(np.prod(shape))
        items = draw(st.lists(st.binary(max_size=5), min_size=count, max_size=count))
        array = np.empty(count, dtype=object)
        array[:] = items
        return datatype, array.reshape(shape)
    dtype = V2_TO_NUMPY[datatype]
    elements = None
    if dtype.kind == "f":
        width: Literal[16, 32, 64] = (
            16 if dtype.itemsize == 2 else 32 if dtype.itemsize == 4 else 64
        )
        elements = st.floats(allow_nan=False, allow_infinity=False, width=width)
    return datatype, draw(hnp.arrays(dtype, shape, elements=elements))


@FUZZ
@given(st.lists(tensors(), min_size=1, max_size=4), st.booleans())
def test_well_formed_requests_decode_to_what_was_sent_on_both_codecs(
    sent: list[tuple[str, np.ndarray[Any, Any]]], binary: bool
) -> None:
    inputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    msg = pb.ModelInferRequest(model_name="m")
    for i, (datatype, array) in enumerate(sent):
        raw = tensor_to_bytes(array, datatype)
        entry: dict[str, Any] = {"name": f"x{i}", "shape": list(array.shape)}
        entry["datatype"] = datatype
        if binary or datatype == "BYTES":
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        inputs.append(entry)
        msg.inputs.add(name=f"x{i}", datatype=datatype, shape=array.shape)
        msg.raw_input_contents.append(raw)
    header = json.dumps({"inputs": inputs}).encode()
    length = len(header) if blobs else None
    for request in (
        v2_json.decode_infer_request(header + b"".join(blobs), length, "m", ""),
        v2_grpc.decode_infer_request(msg),
    ):
        for (datatype, array), tensor in zip(sent, request.inputs, strict=True):
            assert tensor.datatype == datatype
            assert tensor.data.shape == array.shape
            assert tensor.data.tolist() == array.tolist()
