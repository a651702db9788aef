"""Inference through the real server with tritonclient (HTTP and gRPC), compared bit for
bit with onnxruntime run directly on the same model file."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from tests.clients import PROTOCOLS, Array, client, infer
from tests.conftest import CONTROL_HEADERS, RunningGateway

BATCH_SIZES = (1, 2, 7, 32, 64)


def _direct(
    repository: Path, model: str, version: str, feeds: dict[str, Array]
) -> dict[str, Array]:
    session = ort.InferenceSession(
        str(repository / model / version / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    onnx_feeds: dict[str, Array] = {}
    for key, value in feeds.items():
        if value.dtype == object:  # onnxruntime string tensors take str, V2 BYTES are bytes
            value = np.array([b.decode() for b in value.reshape(-1)], dtype=object).reshape(
                value.shape
            )
        onnx_feeds[key] = value
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, onnx_feeds), strict=True))


def _rows(repository: Path, n: int, seed: int) -> Array:
    reference: Array = np.load(repository / "breast_cancer" / "reference.npy")
    rng = np.random.default_rng(seed)
    picked = reference[rng.integers(0, len(reference), n)]
    return (picked * rng.uniform(0.9, 1.1, picked.shape)).astype(np.float32)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("version", ["1", "2"])
def test_breast_cancer_matches_onnxruntime(
    server: RunningGateway, repository: Path, protocol: str, binary: bool, version: str
) -> None:
    url = server.http_url if protocol == "http" else server.grpc_url
    conn = client(protocol, url)
    for n in BATCH_SIZES:
        x = _rows(repository, n, seed=n)
        got, _ = infer(
            protocol,
            url,
            "breast_cancer",
            {"features": x},
            version=version,
            outputs=["probabilities", "label"],
            binary=binary,
            connection=conn,
        )
        want = _direct(repository, "breast_cancer", version, {"features": x})
        for name in ("probabilities", "label"):
            assert got[name].dtype == want[name].dtype
            assert got[name].shape == want[name].shape
            assert np.array_equal(got[name], want[name]), (name, n)
    conn.close()


def _identity_inputs(n: int, seed: int) -> dict[str, Array]:
    rng = np.random.default_rng(seed)
    shape = (n, 3)
    feeds: dict[str, Array] = {"in_BOOL": rng.integers(0, 2, shape).astype(bool)}
    for dt in ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64"):
        info = np.iinfo(dt)
        feeds[f"in_{dt.upper()}"] = rng.integers(info.min, info.max, shape, dtype=dt)
    feeds["in_FP16"] = rng.standard_normal(shape).astype(np.float16)
    feeds["in_FP32"] = (rng.standard_normal(shape) * 1e6).astype(np.float32)
    feeds["in_FP64"] = rng.standard_normal(shape) * 1e-300
    words = ["", "a", "héllo", "x" * 300, "tab\there", "日本"]
    feeds["in_BYTES"] = np.array(
        [[words[(i + j) % len(words)].encode() for j in range(3)] for i in range(n)],
        dtype=object,
    )
    return feeds


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_datatype_round_trips(server: RunningGateway, protocol: str, binary: bool) -> None:
    url = server.http_url if protocol == "http" else server.grpc_url
    for n in (1, 5):
        feeds = _identity_inputs(n, seed=n)
        if not binary:
            # JSON numbers are doubles: 64-bit integers beyond 2**53 cannot travel exactly.
            for key in ("in_UINT64", "in_INT64"):
                feeds[key] = (feeds[key] % 2**40).astype(feeds[key].dtype)
        got, _ = infer(protocol, url, "identity_all", feeds, binary=binary)
        for name, array in feeds.items():
            out = got["out_" + name[3:]]
            assert out.shape == array.shape, name
            if array.dtype == object:
                assert out.tolist() == array.tolist(), name
            else:
                assert out.dtype == array.dtype, name
                assert np.array_equal(out, array), name


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_mixed_types_matches_onnxruntime(
    server: RunningGateway, repository: Path, protocol: str, binary: bool
) -> None:
    url = server.http_url if protocol == "http" else server.grpc_url
    rng = np.random.default_rng(7)
    for n in (1, 3, 32):
        feeds: dict[str, Array] = {
            "measurements": rng.standard_normal((n, 4)).astype(np.float32),
            "scale": rng.standard_normal((n, 1)),
            "count": rng.integers(-5, 5, (n, 1)),
            "code": rng.integers(0, 9, (n, 1)).astype(np.int32),
            "flags": rng.integers(0, 2, (n, 2)).astype(bool),
            "pixels": rng.integers(0, 255, (n, 4)).astype(np.uint8),
            "half": rng.standard_normal((n, 2)).astype(np.float16),
            "category": np.array(
                [[["red", "green", "blue", "teal"][i % 4].encode()] for i in range(n)],
                dtype=object,
            ),
        }
        got, _ = infer(protocol, url, "mixed_types", feeds, binary=binary)
        want = _direct(repository, "mixed_types", "1", feeds)
        assert np.array_equal(got["score"], want["score"])
        assert np.array_equal(got["category_id"], want["category_id"])
        assert np.array_equal(got["flags_any"], want["flags_any"])
        assert got["category_echo"].tolist() == feeds["category"].tolist()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_output_selection_and_id_echo(server: RunningGateway, protocol: str) -> None:
    url = server.http_url if protocol == "http" else server.grpc_url
    x = np.zeros((2, 30), np.float32)
    got, result = infer(
        protocol, url, "breast_cancer", {"features": x}, outputs=["label"], request_id="req-42"
    )
    assert list(got) == ["label"]
    response = result.get_response()
    if protocol == "http":
        assert response["id"] == "req-42"
        assert [o["name"] for o in response["outputs"]] == ["label"]
        assert response["model_name"] == "breast_cancer"
        assert response["model_version"] == "1"
    else:
        assert response.id == "req-42"
        assert [o.name for o in response.outputs] == ["label"]
        assert response.model_version == "1"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_model_without_batch_dimension_serves(server: RunningGateway, protocol: str) -> None:
    url = server.http_url if protocol == "http" else server.grpc_url
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    got, _ = infer(protocol, url, "fixed_shape", {"x": x})
    assert np.array_equal(got["y"], x + 1)
    conn = client(protocol, url)
    config = conn.get_model_config("fixed_shape")
    if protocol == "grpc":
        assert config.config.max_batch_size == 0
    else:
        assert config["max_batch_size"] == 0
        assert config["input"][0]["dims"] == [2, 3]
        assert "dynamic_batching" not in config


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_health_metadata_and_config(server: RunningGateway, protocol: str) -> None:
    url = server.http_url if protocol == "http" else server.grpc_url
    conn = client(protocol, url)
    assert conn.is_server_live()
    assert conn.is_server_ready()
    assert conn.is_model_ready("breast_cancer")
    assert conn.is_model_ready("breast_cancer", "2")
    assert not conn.is_model_ready("no_such_model")
    assert not conn.is_model_ready("broken")
    meta = conn.get_server_metadata()
    if protocol == "http":
        assert "binary_tensor_data" in meta["extensions"]
        model = conn.get_model_metadata("breast_cancer")
        assert model["versions"] == ["1", "2"]
        assert model["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 30]}]
        config = conn.get_model_config("breast_cancer")
        assert config["max_batch_size"] == 64
        assert config["input"][0]["dims"] == [30]
        assert config["model_transaction_policy"] == {"decoupled": False}
    else:
        assert "statistics" in meta.extensions
        model = conn.get_model_metadata("breast_cancer")
        assert list(model.versions) == ["1", "2"]
        assert list(model.inputs[0].shape) == [-1, 30]
        config = conn.get_model_config("breast_cancer").config
        assert config.max_batch_size == 64
        assert list(config.input[0].dims) == [30]
    conn.close()


def test_repository_index_reports_broken_model(server: RunningGateway) -> None:
    for protocol in PROTOCOLS:
        url = server.http_url if protocol == "http" else server.grpc_url
        conn = client(protocol, url)
        index = conn.get_model_repository_index(headers=CONTROL_HEADERS)
        if protocol == "grpc":
            entries = {(m.name, m.version): (m.state, m.reason) for m in index.models}
        else:
            entries = {(m["name"], m["version"]): (m.get("state"), m.get("reason")) for m in index}
        assert entries[("breast_cancer", "1")][0] == "READY"
        state, reason = entries[("broken", "1")]
        assert state == "UNAVAILABLE"
        assert reason
        conn.close()


def test_stream_infer_answers_each_request(server: RunningGateway, repository: Path) -> None:
    results: list[Any] = []
    done = threading.Event()
    expected = 20

    def callback(result: Any, error: Any) -> None:
        results.append((result, error))
        if len(results) == expected:
            done.set()

    conn = grpcclient.InferenceServerClient(server.grpc_url)
    conn.start_stream(callback=callback)
    inputs = {}
    for i in range(expected):
        x = _rows(repository, 1 + i % 4, seed=100 + i)
        inputs[f"r{i}"] = x
        tensor = grpcclient.InferInput("features", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        model = "breast_cancer" if i != 5 else "no_such_model"
        conn.async_stream_infer(model, [tensor], request_id=f"r{i}")
    assert done.wait(30)
    conn.stop_stream()
    conn.close()
    errors = [e for _, e in results if e is not None]
    assert len(errors) == 1
    assert "unknown model" in str(errors[0])
    for result, error in results:
        if error is not None:
            continue
        rid = result.get_response().id
        want = _direct(repository, "breast_cancer", "1", {"features": inputs[rid]})
        assert np.array_equal(result.as_numpy("probabilities"), want["probabilities"])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_statistics_count_requests(server: RunningGateway, protocol: str) -> None:
    url = server.http_url if protocol == "http" else server.grpc_url
    conn = client(protocol, url)

    def counts() -> tuple[int, int]:
        stats = conn.get_inference_statistics("mlp_small", "1")
        if protocol == "http":
            s = stats["model_stats"][0]
            return s["inference_count"], s["inference_stats"]["success"]["count"]
        s = stats.model_stats[0]
        return s.inference_count, s.inference_stats.success.count

    rows0, ok0 = counts()
    for n in (1, 3, 5):
        infer(protocol, url, "mlp_small", {"INPUT0": np.ones((n, 32), np.float32)}, connection=conn)
    rows1, ok1 = counts()
    assert rows1 - rows0 == 9
    assert ok1 - ok0 == 3
    conn.close()


def test_keep_alive_responses_are_not_delayed(server: RunningGateway) -> None:
    """Responses leave in two writes (headers, body): without TCP_NODELAY on the accepted
    socket each one waits ~40 ms for the client's delayed ACK."""
    host, port = server.http_url.split(":")
    body = json.dumps(
        {"inputs": [{"name": "INPUT0", "shape": [1, 32], "datatype": "FP32", "data": [0.5] * 32}]}
    ).encode()
    request = (
        f"POST /v2/models/mlp_small/infer HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    took = []
    with socket.create_connection((host, int(port))) as sock:
        for _ in range(9):
            start = time.perf_counter()
            sock.sendall(request)
            reply = b""
            while not (b"\r\n\r\n" in reply and reply.endswith(b"}")):
                reply += sock.recv(65536)
            took.append(time.perf_counter() - start)
            assert reply.startswith(b"HTTP/1.1 200")
    assert sorted(took)[4] < 0.02, took
