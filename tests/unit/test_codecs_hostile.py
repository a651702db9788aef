"""Hostile requests against both codecs: each is refused with a client error, before any
allocation its declared sizes would need. A fixed corpus, kept as regression tests."""

from __future__ import annotations

import contextlib
import tracemalloc
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
import pytest

from gateway._proto import grpc_service_pb2 as pb
from gateway.codecs import v2_grpc, v2_json
from gateway.codecs.limits import (
    CodecLimits,
    check_shape,
    json_depth,
    parse_timeout_ms,
    timeout_from_parameter_us,
)
from gateway.errors import InvalidInputError, PayloadTooLargeError
from gateway.types import InferRequest

_MB = 1 << 20


def _binary_body(shape: list[int], datatype: str, blob: bytes) -> tuple[bytes, int]:
    header = msgspec.json.encode(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": shape,
                    "datatype": datatype,
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    )
    return header + blob, len(header)


def _json_body(shape: list[int], datatype: str, data: Any) -> bytes:
    return msgspec.json.encode(
        {"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}]}
    )


def _grpc_raw(shape: list[int], datatype: str, blob: bytes) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="x", datatype=datatype, shape=shape)
    msg.raw_input_contents.append(blob)
    return msg


def _grpc_typed(shape: list[int], datatype: str, values: list[float]) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="m")
    inp = msg.inputs.add(name="x", datatype=datatype, shape=shape)
    inp.contents.fp32_contents.extend(values)
    return msg


Decode = Callable[[list[int], str, bytes], InferRequest]


def _via_binary(shape: list[int], datatype: str, blob: bytes) -> InferRequest:
    body, length = _binary_body(shape, datatype, blob)
    return v2_json.decode_infer_request(body, length, "m", "")


def _via_grpc(shape: list[int], datatype: str, blob: bytes) -> InferRequest:
    return v2_grpc.decode_infer_request(_grpc_raw(shape, datatype, blob))


RAW_DECODERS: list[Decode] = [_via_binary, _via_grpc]
RAW_IDS = ["http-binary", "grpc-raw"]


def _peak_bytes(fn: Callable[[], object]) -> int:
    """Peak traced allocation (numpy's arrays included) while ``fn`` runs."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        with contextlib.suppress(InvalidInputError, PayloadTooLargeError):
            fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


# -- declared sizes against the data present --------------------------------------------------


@pytest.mark.parametrize("decode", RAW_DECODERS, ids=RAW_IDS)
def test_huge_bytes_shape_with_seven_bytes_is_refused_without_allocating(decode: Decode) -> None:
    blob = b"\x03\x00\x00\x00abc"  # one 3-byte element: 7 bytes
    with pytest.raises(InvalidInputError, match="more than 134217728 elements"):
        decode([1, 2**30], "BYTES", blob)
    with pytest.raises(InvalidInputError, match="7 bytes of BYTES data hold at most 1 elements"):
        decode([1, 2**25], "BYTES", blob)
    assert _peak_bytes(lambda: decode([1, 2**30], "BYTES", blob)) < 16 * _MB
    assert _peak_bytes(lambda: decode([1, 2**25], "BYTES", blob)) < 16 * _MB


HOSTILE_SHAPES = [[2**40, 1], [2**62, 2], [0, 2**62, 2**62], [2**63 - 1, 0], [-1, 4], [1] * 33]


@pytest.mark.parametrize("shape", HOSTILE_SHAPES, ids=str)
@pytest.mark.parametrize("datatype", ["FP32", "BYTES", "BOOL"])
@pytest.mark.parametrize("decode", RAW_DECODERS, ids=RAW_IDS)
def test_absurd_shapes_are_client_errors(decode: Decode, datatype: str, shape: list[int]) -> None:
    # Over HTTP a negative dimension is refused by the JSON schema, with msgspec's path.
    with pytest.raises(InvalidInputError, match=r"input 'x'|\.shape\["):
        decode(shape, datatype, b"\x00" * 8)


@pytest.mark.parametrize("shape", HOSTILE_SHAPES, ids=str)
def test_absurd_shapes_are_client_errors_with_json_data(shape: list[int]) -> None:
    # A negative dimension is refused first by the JSON schema, with msgspec's path.
    match = "shape" if min(shape) < 0 else "input 'x'"
    with pytest.raises(InvalidInputError, match=match):
        v2_json.decode_infer_request(_json_body(shape, "FP32", [1.0]), None, "m", "")
    with pytest.raises(InvalidInputError, match="input 'x'"):
        v2_grpc.decode_infer_request(_grpc_typed(shape, "FP32", [1.0]))


def test_data_shorter_than_its_shape_is_refused_before_numpy_walks_it() -> None:
    with pytest.raises(InvalidInputError, match="data has 3 elements, shape \\[1000000\\]"):
        v2_json.decode_infer_request(_json_body([10**6], "FP32", [1, 2, 3]), None, "m", "")


def test_consistent_inputs_over_the_limits_are_too_large() -> None:
    limits = CodecLimits(max_elements=1000, max_decoded_bytes=4096)
    blob = np.zeros(1024, np.float32).tobytes()  # 4 KiB exactly: at the byte limit
    body, length = _binary_body([1024], "FP32", blob)
    with pytest.raises(InvalidInputError, match="more than 1000 elements"):
        v2_json.decode_infer_request(body, length, "m", "", limits)
    limits = CodecLimits(max_elements=2000, max_decoded_bytes=4000)
    with pytest.raises(PayloadTooLargeError, match="4096 bytes decoded"):
        v2_json.decode_infer_request(body, length, "m", "", limits)
    msg = _grpc_raw([1024], "FP32", blob)
    with pytest.raises(PayloadTooLargeError):
        v2_grpc.decode_infer_request(msg, limits)
    ok = v2_grpc.decode_infer_request(msg, CodecLimits(max_decoded_bytes=4096))
    assert ok.inputs[0].shape == (1024,)


def test_the_limits_add_up_over_the_inputs_of_a_request() -> None:
    msg = pb.ModelInferRequest(model_name="m")
    for i in range(3):
        msg.inputs.add(name=f"x{i}", datatype="INT8", shape=[100])
        msg.raw_input_contents.append(bytes(100))
    with pytest.raises(PayloadTooLargeError, match=r"input 'x2'.*300 elements"):
        v2_grpc.decode_infer_request(msg, CodecLimits(max_elements=250))


def test_too_many_inputs_or_outputs_are_refused() -> None:
    limits = CodecLimits(max_inputs=4, max_outputs=2)
    inputs = [{"name": f"x{i}", "shape": [1], "datatype": "FP32", "data": [1]} for i in range(5)]
    body = msgspec.json.encode({"inputs": inputs})
    with pytest.raises(InvalidInputError, match="5 inputs; at most 4"):
        v2_json.decode_infer_request(body, None, "m", "", limits)
    body = msgspec.json.encode({"inputs": inputs[:1], "outputs": [{"name": "a"}] * 3})
    with pytest.raises(InvalidInputError, match="3 outputs; at most 2"):
        v2_json.decode_infer_request(body, None, "m", "", limits)
    msg = pb.ModelInferRequest(model_name="m")
    for i in range(5):
        msg.inputs.add(name=f"x{i}", datatype="FP32", shape=[1])
    with pytest.raises(InvalidInputError, match="5 inputs"):
        v2_grpc.decode_infer_request(msg, limits)


# -- JSON nesting and values ------------------------------------------------------------------


def test_deep_nesting_in_data_parameters_and_other_bodies_is_refused() -> None:
    deep = b"[" * 10_000 + b"]" * 10_000
    data = b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":' + deep + b"}]}"
    with pytest.raises(InvalidInputError, match="inference request nests too deeply"):
        v2_json.decode_infer_request(data, None, "m", "")
    params = b'{"inputs":[],"parameters":{"a":' + deep + b"}}"
    with pytest.raises(InvalidInputError, match="inference request nests too deeply"):
        v2_json.decode_infer_request(params, None, "m", "")
    with pytest.raises(InvalidInputError, match="repository request nests 10000 levels deep"):
        v2_json.decode_json(deep, "repository request")
    # Within msgspec's guard, nested parameters are refused by their scalar-only rule.
    params = b'{"inputs":[],"parameters":{"a":' + b"[" * 500 + b"]" * 500 + b"}}"
    with pytest.raises(InvalidInputError, match="parameter 'a' must be a string"):
        v2_json.decode_infer_request(params, None, "m", "")
    # Data nested within msgspec's guard but deeper than numpy allows is a client error too.
    for datatype, leaf in (("FP32", b"1"), ("BYTES", b'"a"')):
        nested = b"[" * 500 + leaf + b"]" * 500
        body = b'{"inputs":[{"name":"x","shape":[1],"datatype":"%s","data":%s}]}' % (
            datatype.encode(),
            nested,
        )
        with pytest.raises(InvalidInputError, match="input 'x'"):
            v2_json.decode_infer_request(body, None, "m", "")


def test_json_depth_ignores_brackets_inside_strings() -> None:
    assert json_depth(b'{"a": "[[[[{{{{", "b": [["\\"]"]]}') == 3
    assert json_depth(b'["\\\\", [[]]]') == 3
    assert json_depth(b"17") == 0
    assert json_depth(b"") == 0
    assert json_depth(b"[" * 3_000_000) == 3_000_000  # more than one chunk


@pytest.mark.parametrize(
    ("datatype", "value"), [("FP32", 1e308), ("FP32", -3.5e38), ("FP16", 65520.0), ("FP16", 10**6)]
)
def test_float_overflow_in_json_data_is_refused_naming_the_input(
    datatype: str, value: float
) -> None:
    body = _json_body([2], datatype, [1.0, value])
    with pytest.raises(InvalidInputError, match=f"input 'x'.*out of range for datatype {datatype}"):
        v2_json.decode_infer_request(body, None, "m", "")


def test_largest_finite_values_still_pass() -> None:
    top = float(np.finfo(np.float32).max)
    request = v2_json.decode_infer_request(_json_body([2], "FP32", [top, -top]), None, "m", "")
    assert np.isfinite(request.inputs[0].data).all()


def test_overlong_model_names_are_client_errors() -> None:
    body = _json_body([1], "FP32", [1.0])
    with pytest.raises(InvalidInputError, match="model name of 256 bytes"):
        v2_json.decode_infer_request(body, None, "m" * 256, "")
    with pytest.raises(InvalidInputError, match="model name of 300 bytes"):
        v2_grpc.decode_infer_request(pb.ModelInferRequest(model_name="é" * 150))


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xff\xfe",
        b"[]",
        b'{"inputs": 5}',
        b'{"inputs":[{"name":"x","shape":[1e400],"datatype":"FP32","data":[1]}]}',
        b'{"inputs":[{"name":"x","shape":[99999999999999999999999],"datatype":"FP32"}]}',
        b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[[1],2]}]}',
        b'{"inputs":[{"name":"x","shape":[2],"datatype":"INT64","data":[1,99999999999999999999]}]}',
        b'{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":[[["a"]], "b"]}]}',
        b'{"inputs":[{"name":"x","shape":[1],"datatype":"\\u0000","data":[1]}]}',
        b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":{"a":1}}]}',
        b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32",'
        b'"parameters":{"binary_data_size":true}}]}',
    ],
)
def test_malformed_bodies_are_client_errors(body: bytes) -> None:
    with pytest.raises(InvalidInputError):
        v2_json.decode_infer_request(body, None, "m", "")


@pytest.mark.parametrize("length", [-1, 10**30, 3])
def test_hostile_header_lengths_are_client_errors(length: int) -> None:
    body, _ = _binary_body([1], "FP32", bytes(4))
    with pytest.raises(InvalidInputError):
        v2_json.decode_infer_request(body, length, "m", "")


def test_check_shape_counts_in_python_ints() -> None:
    limits = CodecLimits(max_elements=2**70)
    assert check_shape("x", [2**33, 2**33], limits) == 2**66


# -- timeouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "nan",
        "NaN",
        "inf",
        "-inf",
        "Infinity",
        "-1",
        "1e3",
        "",
        " ",
        "1_000",
        "0x10",
        "1" * 40,
        "100000000000",
        "\x00",
        "12\r\nX-Evil: 1",
    ],
)
def test_timeout_header_refuses_what_is_not_a_plain_duration(text: str) -> None:
    with pytest.raises(InvalidInputError, match="x-request-timeout-ms"):
        parse_timeout_ms(text)


def test_timeout_header_parses_milliseconds() -> None:
    assert parse_timeout_ms("250") == 0.25
    assert parse_timeout_ms(b" 12.5 ") == 0.0125
    assert parse_timeout_ms("0") == 0.0
    assert parse_timeout_ms("86400000") == 86_400.0
    with pytest.raises(InvalidInputError, match="over the maximum of 1000 ms"):
        parse_timeout_ms("1001", max_s=1.0)


@pytest.mark.parametrize("value", [-1, True, 1.5, "100", 10**20, float("nan")])
def test_timeout_parameter_refuses_what_is_not_microseconds(value: object) -> None:
    with pytest.raises(InvalidInputError, match="parameter 'timeout'"):
        timeout_from_parameter_us(value)


def test_timeout_parameter_is_microseconds() -> None:
    assert timeout_from_parameter_us(1_500_000) == 1.5


def test_integers_past_int64_are_read_exactly_or_refused() -> None:
    """numpy reads [2**63, 0] as float64 (losing digits) and [2**64] as objects."""
    body = _json_body([3], "UINT64", [2**63, 0, 2**64 - 1])
    request = v2_json.decode_infer_request(body, None, "m", "")
    assert request.inputs[0].data.tolist() == [2**63, 0, 2**64 - 1]
    msg = pb.ModelInferRequest(model_name="m")
    inp = msg.inputs.add(name="x", datatype="UINT64", shape=[3])
    inp.contents.uint64_contents.extend([2**63, 0, 2**64 - 1])
    assert v2_grpc.decode_infer_request(msg).inputs[0].data.tolist() == [2**63, 0, 2**64 - 1]
    for datatype, values in [("UINT64", [2**64, 0]), ("INT64", [2**63, 0]), ("FP64", [10**400])]:
        body = _json_body([len(values)], datatype, values)
        with pytest.raises(InvalidInputError, match=r"input 'x'.*out of range"):
            v2_json.decode_infer_request(body, None, "m", "")


def test_typed_grpc_floats_keep_inf_and_nan_as_raw_contents_do() -> None:
    values = [float("inf"), float("nan"), -1.5]
    typed = v2_grpc.decode_infer_request(_grpc_typed([3], "FP32", values)).inputs[0].data
    raw = _via_grpc([3], "FP32", np.array(values, np.float32).tobytes()).inputs[0].data
    assert np.array_equal(typed, raw, equal_nan=True)
