"""Each kind of bad input, over both protocols: a clear error with the right status, and a
good request right after still succeeds."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from gateway._proto import grpc_service_pb2 as pb
from gateway._proto import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import RunningGateway, gateway_settings

GOOD_ROW = np.linspace(0.0, 1.0, 30, dtype=np.float32)


def _json_body(
    name: str = "features",
    shape: list[int] | None = None,
    datatype: str = "FP32",
    data: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": name,
                "shape": shape or [1, 30],
                "datatype": datatype,
                "data": GOOD_ROW.tolist() if data is None else data,
            }
        ],
        **extra,
    }


def _grpc_request(
    name: str = "features",
    shape: tuple[int, ...] = (1, 30),
    datatype: str = "FP32",
    raw: bytes | None = None,
    model: str = "breast_cancer",
    version: str = "",
) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name=model, model_version=version)
    msg.inputs.add(name=name, datatype=datatype, shape=shape)
    msg.raw_input_contents.append(GOOD_ROW.tobytes() if raw is None else raw)
    return msg


@pytest.fixture(scope="module")
def http(server: RunningGateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://{server.http_url}", timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server: RunningGateway) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.grpc_url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def _assert_http_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    message = response.json()["error"]
    for word in words:
        assert word in message, message


def _assert_grpc_error(
    stub: pb_grpc.GRPCInferenceServiceStub,
    request: pb.ModelInferRequest,
    code: grpc.StatusCode,
    *words: str,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    error: Any = info.value
    assert error.code() == code, error.details()
    for word in words:
        assert word in error.details(), error.details()


def _assert_still_serving(http: httpx.Client, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    ok = http.post("/v2/models/breast_cancer/infer", json=_json_body())
    assert ok.status_code == 200, ok.text
    reply = stub.ModelInfer(_grpc_request(), timeout=30)
    assert len(reply.raw_output_contents) == 2


HTTP_CASES: list[tuple[str, str, dict[str, Any], int, tuple[str, ...]]] = [
    ("unknown model", "/v2/models/nope/infer", _json_body(), 404, ("unknown model", "nope")),
    (
        "unknown version",
        "/v2/models/breast_cancer/versions/9/infer",
        _json_body(),
        404,
        ("version 9",),
    ),
    (
        "unknown input",
        "/v2/models/breast_cancer/infer",
        _json_body(name="feat"),
        400,
        ("no input 'feat'", "features"),
    ),
    (
        "wrong datatype",
        "/v2/models/breast_cancer/infer",
        _json_body(datatype="FP64"),
        400,
        ("FP64", "expects FP32"),
    ),
    (
        "wrong shape",
        "/v2/models/breast_cancer/infer",
        _json_body(shape=[1, 29], data=GOOD_ROW[:29].tolist()),
        400,
        ("[1, 29]", "[-1, 30]"),
    ),
    (
        "data length",
        "/v2/models/breast_cancer/infer",
        _json_body(data=[1.0] * 29),
        400,
        ("29 elements", "needs 30"),
    ),
    (
        "string for number",
        "/v2/models/breast_cancer/infer",
        _json_body(data=["a"] * 30),
        400,
        ("string", "FP32"),
    ),
    (
        "batch too large",
        "/v2/models/breast_cancer/infer",
        _json_body(shape=[65, 30], data=[0.5] * (65 * 30)),
        400,
        ("max_batch_size 64",),
    ),
    (
        "unknown output",
        "/v2/models/breast_cancer/infer",
        _json_body(outputs=[{"name": "nope"}]),
        400,
        ("no output 'nope'",),
    ),
    (
        "unknown datatype",
        "/v2/models/breast_cancer/infer",
        _json_body(datatype="FP8"),
        400,
        ("unsupported datatype 'FP8'",),
    ),
    ("missing inputs", "/v2/models/breast_cancer/infer", {"id": "x"}, 400, ("inputs",)),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [case[1:] for case in HTTP_CASES],
    ids=[case[0] for case in HTTP_CASES],
)
def test_http_bad_request(
    http: httpx.Client,
    stub: pb_grpc.GRPCInferenceServiceStub,
    path: str,
    body: dict[str, Any],
    status: int,
    words: tuple[str, ...],
) -> None:
    _assert_http_error(http.post(path, json=body), status, *words)
    _assert_still_serving(http, stub)


GRPC_CASES: list[tuple[str, pb.ModelInferRequest, grpc.StatusCode, tuple[str, ...]]] = [
    ("unknown model", _grpc_request(model="nope"), grpc.StatusCode.NOT_FOUND, ("unknown model",)),
    ("unknown version", _grpc_request(version="9"), grpc.StatusCode.NOT_FOUND, ("version 9",)),
    (
        "unknown input",
        _grpc_request(name="feat"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("no input 'feat'",),
    ),
    (
        "wrong datatype",
        _grpc_request(datatype="FP64", raw=np.zeros(30).tobytes()),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("FP64", "expects FP32"),
    ),
    (
        "wrong shape",
        _grpc_request(shape=(1, 29), raw=GOOD_ROW[:29].tobytes()),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("[1, 29]",),
    ),
    (
        "data length",
        _grpc_request(raw=GOOD_ROW.tobytes()[:-4]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("116 bytes", "needs 120"),
    ),
    (
        "batch too large",
        _grpc_request(shape=(65, 30), raw=np.zeros((65, 30), np.float32).tobytes()),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("max_batch_size 64",),
    ),
    (
        "negative dim",
        _grpc_request(shape=(-1, 30)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("negative",),
    ),
]


@pytest.mark.parametrize(
    ("request_msg", "code", "words"),
    [case[1:] for case in GRPC_CASES],
    ids=[case[0] for case in GRPC_CASES],
)
def test_grpc_bad_request(
    http: httpx.Client,
    stub: pb_grpc.GRPCInferenceServiceStub,
    request_msg: pb.ModelInferRequest,
    code: grpc.StatusCode,
    words: tuple[str, ...],
) -> None:
    _assert_grpc_error(stub, request_msg, code, *words)
    _assert_still_serving(http, stub)


def test_grpc_raw_count_mismatch(
    http: httpx.Client, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    msg = _grpc_request()
    msg.raw_input_contents.append(b"extra")
    _assert_grpc_error(stub, msg, grpc.StatusCode.INVALID_ARGUMENT, "2 entries for 1 inputs")
    msg = pb.ModelInferRequest(model_name="breast_cancer")
    msg.inputs.add(name="features", datatype="FP32", shape=[1, 30])
    msg.inputs[0].contents.fp32_contents.extend([0.5] * 29)
    _assert_grpc_error(stub, msg, grpc.StatusCode.INVALID_ARGUMENT, "29 elements")
    msg.inputs[0].contents.fp32_contents.append(0.5)
    assert len(stub.ModelInfer(msg, timeout=30).raw_output_contents) == 2
    _assert_still_serving(http, stub)


def test_http_malformed_and_truncated_bodies(
    http: httpx.Client, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    url = "/v2/models/breast_cancer/infer"
    _assert_http_error(http.post(url, content=b'{"inputs": [}'), 400, "malformed JSON")
    _assert_http_error(http.post(url, content=b'{"inputs": [{"name": 1}]}'), 400, "inputs[0].name")
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "shape": [1, 30],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 120},
                }
            ]
        }
    ).encode()
    blob = GOOD_ROW.tobytes()
    # Binary section shorter than binary_data_size.
    body = header + blob[:-8]
    _assert_http_error(
        http.post(url, content=body, headers={"Inference-Header-Content-Length": str(len(header))}),
        400,
        "runs past the end",
    )
    # Header length larger than the body.
    _assert_http_error(
        http.post(
            url, content=header, headers={"Inference-Header-Content-Length": str(len(header) + 10)}
        ),
        400,
        "Inference-Header-Content-Length",
    )
    _assert_http_error(
        http.post(url, content=header + blob, headers={"Inference-Header-Content-Length": "abc"}),
        400,
        "non-negative integer",
    )
    # Bytes beyond the declared binary data.
    _assert_http_error(
        http.post(
            url,
            content=header + blob + b"junk",
            headers={"Inference-Header-Content-Length": str(len(header))},
        ),
        400,
        "4 bytes after",
    )
    ok = http.post(
        url, content=header + blob, headers={"Inference-Header-Content-Length": str(len(header))}
    )
    assert ok.status_code == 200
    _assert_http_error(http.post(url, content=b"{}", headers={"Content-Encoding": "br"}), 415, "br")
    zipped = http.post(
        url,
        content=gzip.compress(json.dumps(_json_body()).encode()),
        headers={"Content-Encoding": "gzip", "Accept-Encoding": "gzip"},
    )
    assert zipped.status_code == 200
    assert zipped.json()["model_name"] == "breast_cancer"
    _assert_still_serving(http, stub)


def test_http_unknown_routes_and_methods(http: httpx.Client) -> None:
    _assert_http_error(http.get("/v2/nothing"), 404)
    _assert_http_error(http.get("/v2/models/breast_cancer/infer"), 405)
    _assert_http_error(http.get("/v2/models/nope"), 404, "unknown model")
    _assert_http_error(http.get("/v2/models/nope/ready"), 503, "not ready")
    _assert_http_error(http.get("/v2/models/nope/config"), 404)
    _assert_http_error(http.get("/v2/models/nope/stats"), 404)


def test_size_limits(repository: Path) -> None:
    from tests.conftest import RunningGateway as Running

    limit = 64 * 1024
    running = Running(
        gateway_settings(
            repository, **{"http.max_request_bytes": limit, "grpc.max_message_bytes": limit}
        )
    ).start()
    try:
        big = np.zeros((64, 30), np.float32)
        body = _json_body(shape=[64, 30], data=big.tolist())
        with httpx.Client(base_url=f"http://{running.http_url}", timeout=30) as http:
            payload = json.dumps(body).encode() + b" " * limit
            _assert_http_error(
                http.post("/v2/models/breast_cancer/infer", content=payload), 413, "limit"
            )
            bomb = gzip.compress(b" " * (4 * limit))
            _assert_http_error(
                http.post(
                    "/v2/models/breast_cancer/infer",
                    content=bomb,
                    headers={"Content-Encoding": "gzip"},
                ),
                413,
                "exceeds",
            )
            ok = http.post("/v2/models/breast_cancer/infer", json=_json_body())
            assert ok.status_code == 200
        with grpc.insecure_channel(running.grpc_url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            msg = _grpc_request(raw=b"\0" * (2 * limit), shape=(1, 2 * limit // 4))
            _assert_grpc_error(stub, msg, grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert len(stub.ModelInfer(_grpc_request(), timeout=30).raw_output_contents) == 2
    finally:
        running.stop()


def test_schema_validation_counts_and_rejects(repository: Path, tmp_path: Path) -> None:
    import shutil

    from tests.conftest import RunningGateway as Running

    root = tmp_path / "repo"
    shutil.copytree(repository / "breast_cancer", root / "breast_cancer")
    rules = {"mean radius": {"min": 0.0, "max": 40.0}, "mean texture": {"min": 0.0}}
    running = Running(
        gateway_settings(
            root,
            **{"models": {"breast_cancer": {"schema": rules, "reject_invalid": True}}},
        )
    ).start()
    try:
        with httpx.Client(base_url=f"http://{running.http_url}", timeout=30) as http:
            row = GOOD_ROW.copy()
            row[0] = 55.0  # mean radius above its declared max
            bad = http.post("/v2/models/breast_cancer/infer", json=_json_body(data=row.tolist()))
            _assert_http_error(bad, 400, "'mean radius'", "55.0")
            ok = http.post("/v2/models/breast_cancer/infer", json=_json_body())
            assert ok.status_code == 200
        assert running.gateway is not None
        model = running.gateway.router.resolve("breast_cancer").model
        assert model.schema_violations["mean radius"] >= 1  # type: ignore[attr-defined]
    finally:
        running.stop()
