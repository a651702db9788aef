"""Hostile clients against a real gateway process on loopback (issue 15's findings): each
request gets the right client error with a message, the server keeps serving everyone else,
and its memory stays bounded where the finding was about memory."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from gateway._proto import grpc_service_pb2 as pb
from gateway._proto import grpc_service_pb2_grpc as pb_grpc
from tests.gateway_process import GatewayProcess

_MB = 1 << 20


_TOKEN = "hostile-tests-operator-token"
_AUTH = {"authorization": f"Bearer {_TOKEN}"}


@pytest.fixture(scope="module")
def gateway(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("hostile")
    root = tmp / "repo"
    root.mkdir()
    for name in ("identity_all", "mlp_small"):
        (root / name).symlink_to(repository / name)
    # Feedback memory off: it keeps up to 32 MiB of answers by design, which would hide
    # what these tests measure.
    # Model control on (with an operator token), so its routes' limits are what is tested.
    env = {
        "GATEWAY_FEEDBACK__ENABLED": "false",
        "GATEWAY_MODEL_CONTROL__ENABLED": "true",
        "GATEWAY_ADMIN__TOKENS": f'[{{name = "ops", role = "operator", token = "{_TOKEN}"}}]',
    }
    process = GatewayProcess(root, tmp / "data", env=env)
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
def stub(gateway: GatewayProcess) -> Iterator[Any]:
    channel = grpc.insecure_channel(
        gateway.grpc_address, options=[("grpc.max_receive_message_length", 64 * _MB)]
    )
    yield pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
    channel.close()


def _serves(gateway: GatewayProcess, stub: Any) -> None:
    """Another client is still served over both protocols."""
    body = {
        "inputs": [{"name": "INPUT0", "shape": [1, 32], "datatype": "FP32", "data": [0.5] * 32}]
    }
    answer = httpx.post(f"{gateway.http_url}/v2/models/mlp_small/infer", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live


def _http_binary(
    gateway: GatewayProcess, model: str, header: dict[str, Any], blob: bytes
) -> httpx.Response:
    text = json.dumps(header).encode()
    return httpx.post(
        f"{gateway.http_url}/v2/models/{model}/infer",
        content=text + blob,
        headers={"Inference-Header-Content-Length": str(len(text))},
        timeout=30,
    )


def _grpc_code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


# -- finding 1 and 6: declared sizes ------------------------------------------------------------


def test_bytes_shape_of_2_30_is_refused_without_allocating(
    gateway: GatewayProcess, stub: Any
) -> None:
    before = gateway.rss_bytes()
    for _ in range(3):
        header = {
            "inputs": [
                {
                    "name": "in_BYTES",
                    "shape": [1, 2**30],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 7},
                }
            ]
        }
        answer = _http_binary(gateway, "identity_all", header, b"\x03\x00\x00\x00abc")
        assert answer.status_code == 400, answer.text
        assert "in_BYTES" in answer.json()["error"]
        message = pb.ModelInferRequest(model_name="identity_all")
        tensor = message.inputs.add()
        tensor.name, tensor.datatype = "in_BYTES", "BYTES"
        tensor.shape.extend([1, 2**30])
        message.raw_input_contents.append(b"\x03\x00\x00\x00abc")
        code, details = _grpc_code(lambda m=message: stub.ModelInfer(m, timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "in_BYTES" in details
    growth = gateway.rss_bytes() - before
    print(f"RSS growth after 3 x 2 requests of shape [1, 2**30]: {growth / _MB:.1f} MiB")
    assert growth < 16 * _MB
    _serves(gateway, stub)


@pytest.mark.parametrize(
    "shape", [[2**40, 1], [2**62, 2], [0, 2**62, 2**62], [2**63 - 1, 0], [1, 2**25]]
)
def test_absurd_shapes_are_client_errors(
    gateway: GatewayProcess, stub: Any, shape: list[int]
) -> None:
    body = {"inputs": [{"name": "in_FP32", "shape": shape, "datatype": "FP32", "data": [1.0]}]}
    answer = httpx.post(f"{gateway.http_url}/v2/models/identity_all/infer", json=body, timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]
    message = pb.ModelInferRequest(model_name="identity_all")
    tensor = message.inputs.add()
    tensor.name, tensor.datatype = "in_FP32", "FP32"
    tensor.shape.extend(shape)
    message.raw_input_contents.append(b"\x00" * 4)
    code, details = _grpc_code(lambda: stub.ModelInfer(message, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    _serves(gateway, stub)


# -- finding 4: body limits per route ------------------------------------------------------------


def _declared_body(gateway: GatewayProcess, path: str, size: int) -> bytes:
    """Send only the head of a POST that declares ``size`` body bytes; the answer."""
    with socket.create_connection(("127.0.0.1", gateway.http_port)) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {_TOKEN}\r\n"
            f"Content-Length: {size}\r\n\r\n".encode()
            + b"[" * 1024
        )
        sock.settimeout(10)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/mlp_small/feedback",
        "/v2/repository/index",
        "/v2/repository/models/mlp_small/load",
        "/v2/repository/models/mlp_small/unload",
    ],
)
def test_large_bodies_get_413_before_they_are_read(
    gateway: GatewayProcess, stub: Any, path: str
) -> None:
    before = gateway.rss_bytes()
    answer = _declared_body(gateway, path, 72 * _MB)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]

    # Without a Content-Length (chunked), the body is cut off at the limit as it streams.
    def chunks() -> Iterator[bytes]:
        for _ in range(72):
            yield b" " * _MB

    try:
        streamed = httpx.post(
            f"{gateway.http_url}{path}", content=chunks(), headers=_AUTH, timeout=30
        )
        assert streamed.status_code == 413, streamed.text
        assert "exceeds the limit" in streamed.json()["error"]
    except httpx.HTTPError:
        pass  # the server may close the connection while the client is still sending
    growth = gateway.rss_bytes() - before
    print(f"RSS growth for a 72 MiB body on {path}: {growth / _MB:.1f} MiB")
    assert growth < 32 * _MB
    _serves(gateway, stub)


# -- finding 5: a large body does not hold the event loop ---------------------------------------


def _probe(url: str, stop: threading.Event, worst: list[float]) -> None:
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            started = time.perf_counter()
            client.get(url)
            worst.append(time.perf_counter() - started)
            time.sleep(0.002)


def test_many_inputs_in_a_large_body_are_refused_without_holding_the_loop(
    gateway: GatewayProcess, stub: Any
) -> None:
    inputs = ",".join(
        f'{{"name":"i{i}","shape":[1],"datatype":"FP32","data":[1.0]}}' for i in range(400_000)
    )
    body = f'{{"inputs":[{inputs}]}}'.encode()
    assert len(body) > 20 * _MB
    stop = threading.Event()
    latencies: list[float] = []
    prober = threading.Thread(
        target=_probe, args=(f"{gateway.http_url}/v2/health/live", stop, latencies)
    )
    prober.start()
    try:
        time.sleep(0.2)
        answer = httpx.post(
            f"{gateway.http_url}/v2/models/identity_all/infer", content=body, timeout=60
        )
        time.sleep(0.2)
    finally:
        stop.set()
        prober.join()
    assert answer.status_code == 400, answer.text
    assert "inputs" in answer.json()["error"]
    worst = max(latencies)
    print(
        f"{len(body) / _MB:.1f} MiB body of 400k inputs: worst health latency {worst * 1000:.1f} ms"
    )
    assert worst < 2.0  # was 2.6-3.2 s; the number is printed, the bound only catches a regression


def test_64_mib_header_is_refused_without_stalling_others(
    gateway: GatewayProcess, stub: Any
) -> None:
    stop = threading.Event()
    latencies: list[float] = []
    prober = threading.Thread(
        target=_probe, args=(f"{gateway.http_url}/v2/health/live", stop, latencies)
    )
    prober.start()
    sent = 0
    try:
        time.sleep(0.2)
        header = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nx-big: " + b"a" * (64 * _MB)
        with socket.create_connection(("127.0.0.1", gateway.http_port)) as sock:
            view = memoryview(header)
            try:
                while sent < len(header):
                    sent += sock.send(view[sent : sent + _MB])
            except OSError:
                pass
            sock.settimeout(10)
            try:
                answer = sock.recv(4096)
            except OSError:
                answer = b""
        time.sleep(0.2)
    finally:
        stop.set()
        prober.join()
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    worst = max(latencies)
    print(f"64 MiB header: 431 after {sent / _MB:.1f} MiB sent; worst health {worst * 1000:.1f} ms")
    assert sent < 64 * _MB
    assert worst < 1.0  # printed; the bound only catches a regression (was 2.5-3.7 s)


def test_nesting_10k_deep_is_400(gateway: GatewayProcess, stub: Any) -> None:
    deep = "[" * 10_000 + "1" + "]" * 10_000
    bodies = {
        "/v2/models/identity_all/infer": (
            '{"inputs":[{"name":"in_FP32","shape":[1,3],"datatype":"FP32","data":' + deep + "}]}"
        ),
        "/v2/repository/index": '{"parameters":{"x":' + deep + "}}",
        "/v2/repository/models/mlp_small/load": '{"parameters":{"x":' + deep + "}}",
    }
    bodies["/v2/models/mlp_small/infer"] = (
        '{"parameters":{"x":' + deep + '},"inputs":[{"name":"INPUT0","shape":[1,32],'
        '"datatype":"FP32","data":[' + ",".join(["1"] * 32) + "]}]}"
    )
    for path, text in bodies.items():
        answer = httpx.post(
            f"{gateway.http_url}{path}", content=text.encode(), headers=_AUTH, timeout=30
        )
        assert answer.status_code == 400, (path, answer.text)
        assert answer.json()["error"]
    _serves(gateway, stub)


def test_model_names_over_255_bytes_are_400(gateway: GatewayProcess, stub: Any) -> None:
    name = "m" * 300
    for path in (f"/v2/repository/models/{name}/load", f"/v2/models/{name}/infer"):
        answer = httpx.post(f"{gateway.http_url}{path}", content=b"{}", headers=_AUTH, timeout=30)
        assert answer.status_code == 400, (path, answer.text)
        assert "255" in answer.json()["error"]
    code, details = _grpc_code(
        lambda: stub.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name=name),
            metadata=tuple(_AUTH.items()),
            timeout=30,
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "255" in details
    _serves(gateway, stub)


# -- finding 7: a stream that is never read -----------------------------------------------------


def test_unread_stream_stops_its_intake_and_cancel_frees_it(
    gateway: GatewayProcess, stub: Any
) -> None:
    row = np.full((1, 32), 0.5, np.float32).tobytes()
    sent = 0
    limit = 200_000

    def requests() -> Iterator[pb.ModelInferRequest]:
        nonlocal sent
        while sent < limit:
            message = pb.ModelInferRequest(model_name="mlp_small", id=str(sent))
            tensor = message.inputs.add()
            tensor.name, tensor.datatype = "INPUT0", "FP32"
            tensor.shape.extend([1, 32])
            message.raw_input_contents.append(row)
            sent += 1
            yield message

    before = gateway.rss_bytes()
    call = stub.ModelStreamInfer(requests())  # never read
    previous = -1
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(1.0)
        if sent == previous:
            break  # the server stopped reading: flow control reached the client
        previous = sent
    grown = gateway.rss_bytes() - before
    print(
        f"unread stream: {sent} requests taken before the intake stopped, RSS +{grown / _MB:.1f} MB"
    )
    assert sent < limit
    assert grown < 32 * _MB
    call.cancel()
    _serves(gateway, stub)
    time.sleep(0.5)
    assert gateway.rss_bytes() - before < 32 * _MB


def test_stream_errors_are_per_message(gateway: GatewayProcess, stub: Any) -> None:
    good = pb.ModelInferRequest(model_name="mlp_small", id="good")
    tensor = good.inputs.add()
    tensor.name, tensor.datatype = "INPUT0", "FP32"
    tensor.shape.extend([1, 32])
    good.raw_input_contents.append(np.zeros((1, 32), np.float32).tobytes())
    bad = pb.ModelInferRequest(model_name="mlp_small", id="bad")
    tensor = bad.inputs.add()
    tensor.name, tensor.datatype = "INPUT0", "FP32"
    tensor.shape.extend([2**62, 2])
    bad.raw_input_contents.append(b"\x00" * 4)
    answers = {a.infer_response.id: a for a in stub.ModelStreamInfer(iter([bad, good]), timeout=30)}
    assert answers["good"].error_message == ""
    assert answers["bad"].error_message
    assert "internal" not in answers["bad"].error_message


# -- finding 9 and 11: ids and timeouts ---------------------------------------------------------


@pytest.mark.parametrize("given", ["a\r\nb", "x\x00y\x1b[31m", "i" * 100_000])
def test_body_ids_are_sanitised(gateway: GatewayProcess, stub: Any, given: str) -> None:
    body = {
        "id": given,
        "inputs": [{"name": "INPUT0", "shape": [1, 32], "datatype": "FP32", "data": [0.5] * 32}],
    }
    answer = httpx.post(f"{gateway.http_url}/v2/models/mlp_small/infer", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    echoed = answer.headers["x-request-id"]
    assert echoed == answer.json()["id"]
    assert 0 < len(echoed) <= 128
    assert echoed.isprintable()
    assert echoed.isascii()
    message = pb.ModelInferRequest(model_name="mlp_small", id=given)
    tensor = message.inputs.add()
    tensor.name, tensor.datatype = "INPUT0", "FP32"
    tensor.shape.extend([1, 32])
    message.raw_input_contents.append(np.zeros((1, 32), np.float32).tobytes())
    response = stub.ModelInfer(message, timeout=30)
    assert response.id == echoed


@pytest.mark.parametrize("value", ["nan", "inf", "-5", "1e3"])
def test_timeout_headers_that_are_not_numbers_are_400(
    gateway: GatewayProcess, stub: Any, value: str
) -> None:
    body = {
        "inputs": [{"name": "INPUT0", "shape": [1, 32], "datatype": "FP32", "data": [0.5] * 32}]
    }
    answer = httpx.post(
        f"{gateway.http_url}/v2/models/mlp_small/infer",
        json=body,
        headers={"x-request-timeout-ms": value},
        timeout=30,
    )
    assert answer.status_code == 400, answer.text
    assert "x-request-timeout-ms" in answer.json()["error"]
