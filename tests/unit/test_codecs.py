"""The two wire codecs produce the same InferRequest for the same tensors."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import pytest

from gateway._proto import grpc_service_pb2 as pb
from gateway.codecs import v2_grpc, v2_json
from gateway.codecs.datatypes import (
    V2_TO_NUMPY,
    deserialize_bytes,
    serialize_bytes,
    tensor_from_buffer,
    tensor_from_list,
)
from gateway.errors import InvalidInputError, UnimplementedError
from gateway.types import InferRequest, InferResponse, ModelSignature, Tensor, TensorSpec

Array = npt.NDArray[Any]


def _fixtures() -> dict[str, Array]:
    rng = np.random.default_rng(3)
    out: dict[str, Array] = {}
    for name, dtype in V2_TO_NUMPY.items():
        if name == "BYTES":
            out[name] = np.array([[b"a", b""], [b"\xff\x00", "é".encode()]], dtype=object)
        elif name == "BOOL":
            out[name] = np.array([[True, False], [False, True]])
        elif dtype.kind in "iu":
            info = np.iinfo(dtype)  # type: ignore[type-var]  # integer dtypes here
            out[name] = rng.integers(
                max(info.min, -(2**40)), min(info.max, 2**40), (2, 2), dtype=dtype
            )
        else:
            out[name] = rng.standard_normal((2, 2)).astype(dtype)
    return out


def _rest_body(tensors: dict[str, Array], binary: bool) -> tuple[bytes, int | None]:
    inputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in tensors.items():
        entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": name}
        if binary:
            blob = serialize_bytes(array) if name == "BYTES" else array.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif name == "BYTES":
            entry["data"] = [b.decode("latin-1") for b in array.reshape(-1)]
        else:
            entry["data"] = array.reshape(-1).tolist()
        inputs.append(entry)
    header = msgspec.json.encode({"id": "r1", "inputs": inputs, "parameters": {"a": 1}})
    return header + b"".join(blobs), (len(header) if binary else None)


def _grpc_message(tensors: dict[str, Array]) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="m", model_version="1", id="r1")
    msg.parameters["a"].int64_param = 1
    for name, array in tensors.items():
        msg.inputs.add(name=name, datatype=name, shape=array.shape)
        msg.raw_input_contents.append(
            serialize_bytes(array) if name == "BYTES" else array.tobytes()
        )
    return msg


def _same(a: InferRequest, b: InferRequest) -> None:
    assert (a.model_name, a.model_version, a.id) == (b.model_name, b.model_version, b.id)
    assert a.parameters == b.parameters
    assert [t.name for t in a.inputs] == [t.name for t in b.inputs]
    for x, y in zip(a.inputs, b.inputs, strict=True):
        assert (x.datatype, x.shape) == (y.datatype, y.shape)
        assert x.data.dtype == y.data.dtype
        assert x.data.tolist() == y.data.tolist()


def test_rest_binary_and_grpc_raw_decode_to_the_same_request() -> None:
    tensors = _fixtures()
    body, header = _rest_body(tensors, binary=True)
    rest = v2_json.decode_infer_request(body, header, "m", "1")
    grpc = v2_grpc.decode_infer_request(_grpc_message(tensors))
    _same(rest, grpc)


def test_rest_json_decodes_like_binary() -> None:
    tensors = {k: v for k, v in _fixtures().items() if k not in ("BYTES",)}
    body, _ = _rest_body(tensors, binary=False)
    json_req = v2_json.decode_infer_request(body, None, "m", "1")
    body, header = _rest_body(tensors, binary=True)
    _same(json_req, v2_json.decode_infer_request(body, header, "m", "1"))


@pytest.mark.parametrize("offset", [0, 1, 3])
def test_binary_data_at_any_offset_decodes_to_aligned_arrays(offset: int) -> None:
    """Binary data after a JSON header of any length: each numeric tensor comes back with
    its shape and values, aligned for numpy and onnxruntime, and an empty shape works."""
    for name, array in _fixtures().items():
        if name == "BYTES":
            continue
        blob = b"x" * offset + array.tobytes()
        data = tensor_from_buffer(name, name, array.shape, memoryview(blob)[offset:])
        assert data.flags.aligned
        assert data.shape == array.shape
        assert data.tolist() == array.tolist()
        empty = tensor_from_buffer(name, name, (0, 2), memoryview(blob)[offset:offset])
        assert empty.shape == (0, 2)


def test_grpc_typed_contents_decode_like_raw() -> None:
    tensors = {k: v for k, v in _fixtures().items() if k != "FP16"}
    msg = pb.ModelInferRequest(model_name="m", model_version="1", id="r1")
    msg.parameters["a"].int64_param = 1
    fields = {
        "BOOL": "bool_contents",
        "INT64": "int64_contents",
        "UINT64": "uint64_contents",
        "FP32": "fp32_contents",
        "FP64": "fp64_contents",
        "BYTES": "bytes_contents",
    }
    for name, array in tensors.items():
        field = fields.get(name, "uint_contents" if name.startswith("U") else "int_contents")
        tensor = msg.inputs.add(name=name, datatype=name, shape=array.shape)
        getattr(tensor.contents, field).extend(array.reshape(-1).tolist())
    _same(v2_grpc.decode_infer_request(msg), v2_grpc.decode_infer_request(_grpc_message(tensors)))


def test_nested_json_data_is_accepted() -> None:
    body = msgspec.json.encode(
        {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3, 4]]}]}
    )
    req = v2_json.decode_infer_request(body, None, "m", "")
    assert req.inputs[0].data.tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize(
    ("datatype", "values", "words"),
    [
        ("INT32", [1.5, 2.0], "number values"),
        ("UINT8", [256, 1], "out of range"),
        ("BOOL", [1, 0], "integer values"),
        ("FP32", [[1.0], [2.0, 3.0]], "rectangular"),
        ("BYTES", [1, 2], "expected a string"),
    ],
)
def test_bad_list_values_are_named(datatype: str, values: Any, words: str) -> None:
    with pytest.raises(InvalidInputError, match=words):
        tensor_from_list("x", datatype, (2,), values)


def test_bytes_framing_errors() -> None:
    data = serialize_bytes(np.array([b"ab", b"c"], dtype=object))
    assert deserialize_bytes(data, 2, "x").tolist() == [b"ab", b"c"]
    with pytest.raises(InvalidInputError, match="declares 2 bytes"):
        deserialize_bytes(data[:5], 1, "x")
    with pytest.raises(InvalidInputError, match="hold at most 1 elements"):
        deserialize_bytes(data[:5], 2, "x")
    with pytest.raises(InvalidInputError, match="beyond"):
        deserialize_bytes(data + b"z", 2, "x")
    with pytest.raises(InvalidInputError, match="holds 1 elements"):
        deserialize_bytes(serialize_bytes(np.array([b"abcdefg"], dtype=object)), 2, "x")
    with pytest.raises(InvalidInputError, match="needs 8"):
        tensor_from_buffer("x", "FP32", (2,), b"\0" * 7)


def test_response_encoding_binary_and_json() -> None:
    y = np.array([[1.5, 2.5]], np.float32)
    labels = np.array([3], np.int64)
    response = InferResponse(
        "m",
        "1",
        [Tensor("y", "FP32", (1, 2), y), Tensor("label", "INT64", (1,), labels)],
        id="r1",
    )
    request = InferRequest("m", "", [], binary_output=True)
    body, header = v2_json.encode_infer_response(response, request)
    assert header is not None
    head = msgspec.json.decode(body[:header])
    assert head["id"] == "r1"
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert np.frombuffer(body[header : header + 8], np.float32).tolist() == [1.5, 2.5]
    body, header = v2_json.encode_infer_response(response, InferRequest("m", "", []))
    assert header is None
    head = msgspec.json.decode(body)
    assert head["outputs"][1] == {"name": "label", "datatype": "INT64", "shape": [1], "data": [3]}
    assert "parameters" not in head["outputs"][0]
    msg = v2_grpc.encode_infer_response(response, request)
    assert [o.name for o in msg.outputs] == ["y", "label"]
    assert np.frombuffer(msg.raw_output_contents[1], np.int64).tolist() == [3]


def test_metadata_and_config_agree_across_protocols() -> None:
    sig = ModelSignature(
        name="m",
        version="1",
        platform="onnxruntime_onnx",
        inputs=(TensorSpec("x", "FP32", (-1, 4)),),
        outputs=(TensorSpec("y", "BYTES", (-1,)),),
        max_batch_size=16,
        preferred_batch_sizes=(4, 8),
    )
    rest = v2_json.model_config(sig)
    grpc = v2_grpc.model_config(sig).config
    assert rest["input"][0]["dims"] == [4] == list(grpc.input[0].dims)
    assert rest["output"][0]["data_type"] == "TYPE_STRING"
    assert grpc.dynamic_batching.preferred_batch_size == [4, 8]
    assert grpc.max_batch_size == 16
    meta = v2_grpc.model_metadata(sig, ["1"])
    assert list(meta.inputs[0].shape) == v2_json.model_metadata(sig, ["1"])["inputs"][0]["shape"]


def test_unoffered_extensions_are_refused_on_both_codecs() -> None:
    body = msgspec.json.encode(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [1],
                    "datatype": "FP32",
                    "data": [1.0],
                    "parameters": {"shared_memory_region": "r"},
                }
            ]
        }
    )
    with pytest.raises(UnimplementedError, match="shared memory"):
        v2_json.decode_infer_request(body, None, "m", "")
    body = msgspec.json.encode(
        {
            "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}],
            "outputs": [{"name": "y", "parameters": {"classification": 2}}],
        }
    )
    with pytest.raises(UnimplementedError, match="classification"):
        v2_json.decode_infer_request(body, None, "m", "")
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    msg.outputs.add(name="y").parameters["classification"].int64_param = 2
    with pytest.raises(UnimplementedError, match="classification"):
        v2_grpc.decode_infer_request(msg)
