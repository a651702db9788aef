"""mTLS client identities as data-plane credentials, with certificates made in the test and
real clients (httpx over HTTPS, tritonclient and a grpc stub over TLS): the certificate's
CN or SAN URI holds one scope like a bearer token (401 unknown, 403 wrong scope, the
feedback rate per identity), and a client CA removed on reload refuses its clients."""

from __future__ import annotations

import shutil
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from gateway._proto import feedback_pb2, feedback_pb2_grpc
from tests.certs import Authority, Pair, mutual_tls
from tests.conftest import RunningGateway, gateway_settings

X = np.ones((2, 32), np.float32)
BODY = {"inputs": [{"name": "INPUT0", "shape": [2, 32], "datatype": "FP32", "data": [1.0] * 64}]}
GRADE = {"items": [{"id": "nope", "truth": 1}]}


class Material:
    def __init__(self, folder: Path) -> None:
        self.ca = Authority(folder / "ca")
        self.server = self.ca.issue("server", server=True)
        self.inferer = self.ca.issue("inferer", server=False)
        self.labeler = self.ca.issue("labeler", server=False)
        self.grader = self.ca.issue("grader", server=False, uris=("spiffe://lab/grader",))
        self.nobody = self.ca.issue("nobody", server=False)


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    return Material(tmp_path_factory.mktemp("id-certs"))


@pytest.fixture(scope="module")
def gateway(
    repository: Path, material: Material, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    root = tmp_path_factory.mktemp("id-repo")
    shutil.copytree(repository / "mlp_small", root / "mlp_small")
    mutual = mutual_tls(material.server, material.ca.cert)
    settings = gateway_settings(
        root,
        **{
            "http.tls": mutual,
            "grpc.tls": mutual,
            "auth.clients": [
                {"name": "runner", "scope": "infer", "identity": "CN=inferer"},
                {"name": "lab", "scope": "feedback", "identity": "CN=labeler"},
                {"name": "grader", "scope": "feedback", "identity": "URI:spiffe://lab/grader"},
            ],
            "auth.feedback_rate": 0.001,
            "auth.feedback_burst": 3,
        },
    )
    running = RunningGateway(settings).start()
    yield running
    running.stop()


def _client_context(ca: Path, client: Pair) -> ssl.SSLContext:
    """A TLS client context trusting ``ca`` and presenting ``client``'s certificate."""
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(client.cert), str(client.key))
    return context


def _https(ca: Path, client: Pair) -> httpx.Client:
    return httpx.Client(verify=_client_context(ca, client), timeout=30)


def _triton(url: str, ca: Path, client: Pair) -> Any:
    return grpcclient.InferenceServerClient(
        url,
        ssl=True,
        root_certificates=str(ca),
        private_key=str(client.key),
        certificate_chain=str(client.cert),
    )


def _grpc_infer(conn: Any) -> np.ndarray:
    tensor = grpcclient.InferInput("INPUT0", [2, 32], "FP32")
    tensor.set_data_from_numpy(X)
    result: np.ndarray = conn.infer("mlp_small", [tensor]).as_numpy("OUTPUT0")
    return result


def _grpc_feedback(url: str, ca: Path, client: Pair) -> grpc.StatusCode:
    credentials = grpc.ssl_channel_credentials(
        ca.read_bytes(), client.key.read_bytes(), client.cert.read_bytes()
    )
    with grpc.secure_channel(url, credentials) as channel:
        stub = feedback_pb2_grpc.FeedbackStub(channel)  # type: ignore[no-untyped-call]
        try:
            stub.Submit(feedback_pb2.FeedbackRequest(model_name="mlp_small"), timeout=30)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    return grpc.StatusCode.OK


def test_identities_hold_one_scope_over_https(gateway: RunningGateway, material: Material) -> None:
    base = f"https://{gateway.http_url}/v2/models/mlp_small"
    ca = material.ca.cert
    with _https(ca, material.inferer) as inferer:
        assert inferer.post(f"{base}/infer", json=BODY).status_code == 200
        assert inferer.get(base).status_code == 200  # metadata: infer scope
        refused = inferer.post(f"{base}/feedback", json=GRADE)
        assert refused.status_code == 403, refused.text
        assert "identity 'runner'" in refused.text
    with _https(ca, material.nobody) as nobody:  # trusted CA, unknown identity
        assert nobody.post(f"{base}/infer", json=BODY).status_code == 401
        assert nobody.post(f"{base}/feedback", json=GRADE).status_code == 401
    with _https(ca, material.labeler) as labeler:
        assert labeler.post(f"{base}/infer", json=BODY).status_code == 403
        assert labeler.post(f"{base}/feedback", json=GRADE).status_code == 200


def test_identities_hold_one_scope_over_grpc(gateway: RunningGateway, material: Material) -> None:
    ca = material.ca.cert
    conn = _triton(gateway.grpc_url, ca, material.inferer)
    assert _grpc_infer(conn).shape == (2, 2)
    assert conn.is_server_ready()
    conn.close()
    for client, status in ((material.nobody, "UNAUTHENTICATED"), (material.labeler, "DENIED")):
        conn = _triton(gateway.grpc_url, ca, client)
        with pytest.raises(InferenceServerException) as caught:
            _grpc_infer(conn)
        assert status in str(caught.value.status()), caught.value
        conn.close()
    assert (
        _grpc_feedback(gateway.grpc_url, ca, material.inferer) == grpc.StatusCode.PERMISSION_DENIED
    )
    assert _grpc_feedback(gateway.grpc_url, ca, material.nobody) == grpc.StatusCode.UNAUTHENTICATED
    assert _grpc_feedback(gateway.grpc_url, ca, material.grader) == grpc.StatusCode.OK


def test_feedback_rate_is_kept_per_identity(gateway: RunningGateway, material: Material) -> None:
    url = f"https://{gateway.http_url}/v2/models/mlp_small/feedback"
    with _https(material.ca.cert, material.grader) as grader:
        # grader (SAN URI) may have used one call of its burst of 3 over gRPC.
        statuses = [grader.post(url, json=GRADE).status_code for _ in range(4)]
    assert statuses[0] == 200, statuses
    assert statuses[-1] == 429, statuses
    assert _grpc_feedback(gateway.grpc_url, material.ca.cert, material.grader) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    with _https(material.ca.cert, material.labeler) as labeler:  # its own bucket
        assert labeler.post(url, json=GRADE).status_code == 200


def _live(port: int, context: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[bytes, Any]:
    """The first bytes of a raw HTTPS answer and the TLS session (for resumption)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls,
    ):
        tls.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        try:
            answer = tls.recv(15)
        except (ssl.SSLError, OSError):
            answer = b""
        return answer, tls.session


def test_a_client_ca_removed_on_reload_refuses_its_clients(
    repository: Path, material: Material, tmp_path: Path
) -> None:
    old_ca, new_ca = Authority(tmp_path / "old", "old-ca"), Authority(tmp_path / "new", "new-ca")
    old_client = old_ca.issue("inferer", server=False)
    new_client = new_ca.issue("inferer", server=False)
    bundle = tmp_path / "client-ca.pem"
    shutil.copy(old_ca.cert, bundle)
    tls = {
        "cert": str(material.server.cert),
        "key": str(material.server.key),
        "client_ca": str(bundle),
        "reload_interval_s": 0,
    }
    root = tmp_path / "repo"
    shutil.copytree(repository / "mlp_small", root / "mlp_small")
    running = RunningGateway(gateway_settings(root, **{"http.tls": tls, "grpc.tls": tls})).start()
    try:
        url = f"https://{running.http_url}/v2/models/mlp_small/infer"
        ca = material.ca.cert
        with _https(ca, old_client) as client:
            assert client.post(url, json=BODY).status_code == 200
        conn = _triton(running.grpc_url, ca, old_client)
        assert _grpc_infer(conn).shape == (2, 2)
        conn.close()
        assert running.gateway is not None
        raw = _client_context(ca, old_client)
        answer, session = _live(running.gateway.http_port, raw, None)
        assert answer == b"HTTP/1.1 200 OK"
        shutil.copy(new_ca.cert, bundle)  # the old CA is gone from the bundle
        assert running.gateway is not None
        for listener in running.gateway.tls.values():
            assert listener.reload()  # what SIGHUP and the file watcher call
        with pytest.raises(httpx.HTTPError), _https(ca, old_client) as client:
            client.post(url, json=BODY)
        # Nor by resuming a TLS session made before the reload (no session tickets).
        try:
            answer = _live(running.gateway.http_port, raw, session)[0]
        except (ssl.SSLError, OSError):  # refused in the handshake
            answer = b""
        assert answer == b"", "a session from before the reload was resumed"
        conn = _triton(running.grpc_url, ca, old_client)
        with pytest.raises(InferenceServerException):
            _grpc_infer(conn)
        conn.close()
        with _https(ca, new_client) as client:
            assert client.post(url, json=BODY).status_code == 200
        conn = _triton(running.grpc_url, ca, new_client)
        assert _grpc_infer(conn).shape == (2, 2)
        conn.close()
    finally:
        running.stop()


def test_identity_on_a_grpc_stream(gateway: RunningGateway, material: Material) -> None:
    ca = material.ca.cert
    for client, expect_ok in ((material.inferer, True), (material.labeler, False)):
        results: list[Any] = []
        conn = _triton(gateway.grpc_url, ca, client)
        conn.start_stream(callback=lambda result, error, out=results: out.append(error or result))
        tensor = grpcclient.InferInput("INPUT0", [2, 32], "FP32")
        tensor.set_data_from_numpy(X)
        try:
            conn.async_stream_infer("mlp_small", [tensor])
        except InferenceServerException:
            # The refusal ends the stream before any request is read; it may come first.
            assert not expect_ok
        conn.stop_stream()  # waits for the stream to end
        conn.close()
        assert len(results) == 1, results
        if expect_ok:
            assert results[0].as_numpy("OUTPUT0").shape == (2, 2)
        else:
            assert isinstance(results[0], InferenceServerException)
            assert "scope 'feedback'" in str(results[0])


def test_an_mtls_listener_keeps_the_header_limits(
    gateway: RunningGateway, material: Material
) -> None:
    """The mTLS protocol (identities in the scope) is the limited protocol too: too many
    header fields get 431, as on a plain listener."""
    context = _client_context(material.ca.cert, material.inferer)
    headers = "".join(f"x-h{i}: v\r\n" for i in range(101))
    host, port = gateway.http_url.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(f"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b"more than 100 header fields" in answer
