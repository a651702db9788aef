"""TLS and mTLS on the HTTP, gRPC and admin listeners with certificates made in the test,
real clients (tritonclient over HTTPS and gRPC with SSL, httpx, the admin CLI), and a
certificate reload under traffic."""

from __future__ import annotations

import io
import json
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from cryptography import x509
from tritonclient.utils import InferenceServerException

from gateway.admin_client import main as admin_main
from tests.certs import Authority, Pair, mutual_tls
from tests.conftest import RunningGateway, gateway_settings

X = np.ones((2, 32), np.float32)
OPERATOR = "tls-operator-secret-0001"


class Material:
    def __init__(self, folder: Path) -> None:
        self.ca = Authority(folder / "ca")
        self.server = self.ca.issue("server", server=True)
        self.client = self.ca.issue("client", server=False)
        self.stranger = Authority(folder / "other", "other-ca").issue("stranger", server=False)


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    return Material(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def secure(
    repository: Path, material: Material, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    """mTLS on HTTP and gRPC, TLS on the admin listener; reload by SIGHUP path only."""
    root = tmp_path_factory.mktemp("tls-repo")
    shutil.copytree(repository / "mlp_small", root / "mlp_small")
    mutual = mutual_tls(material.server, material.ca.cert)
    settings = gateway_settings(
        root,
        **{
            "http.tls": mutual,
            "grpc.tls": mutual,
            "admin.tls": {"cert": str(material.server.cert), "key": str(material.server.key)},
            "admin.tokens": [{"name": "ops", "role": "operator", "token": OPERATOR}],
        },
    )
    running = RunningGateway(settings).start()
    yield running
    running.stop()


def _http_client(url: str, material: Material) -> Any:
    return httpclient.InferenceServerClient(
        url,
        ssl=True,
        ssl_options={
            "ca_certs": str(material.ca.cert),
            "certfile": str(material.client.cert),
            "keyfile": str(material.client.key),
        },
    )


def _grpc_client(url: str, material: Material, client: Pair | None) -> Any:
    return grpcclient.InferenceServerClient(
        url,
        ssl=True,
        root_certificates=str(material.ca.cert),
        private_key=str(client.key) if client else None,
        certificate_chain=str(client.cert) if client else None,
    )


def _infer(conn: Any, module: Any) -> np.ndarray:
    tensor = module.InferInput("INPUT0", [2, 32], "FP32")
    tensor.set_data_from_numpy(X)
    result: np.ndarray = conn.infer("mlp_small", [tensor]).as_numpy("OUTPUT0")
    return result


def test_mtls_round_trips_with_tritonclient(secure: RunningGateway, material: Material) -> None:
    conn = _http_client(secure.http_url, material)
    assert _infer(conn, httpclient).shape == (2, 2)
    conn.close()
    conn = _grpc_client(secure.grpc_url, material, material.client)
    assert _infer(conn, grpcclient).shape == (2, 2)
    assert conn.is_server_ready()
    conn.close()


def test_clients_without_a_trusted_certificate_are_refused(
    secure: RunningGateway, material: Material
) -> None:
    url = f"https://{secure.http_url}/v2/health/ready"
    trusted = ssl.create_default_context(cafile=str(material.ca.cert))
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, verify=trusted)  # no client certificate
    stranger = ssl.create_default_context(cafile=str(material.ca.cert))
    stranger.load_cert_chain(str(material.stranger.cert), str(material.stranger.key))
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, verify=stranger)  # a certificate from another CA
    trusted.load_cert_chain(str(material.client.cert), str(material.client.key))
    assert httpx.get(url, verify=trusted).status_code == 200
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{secure.http_url}/v2/health/ready")  # plain text on a TLS port
    conn = _grpc_client(secure.grpc_url, material, None)
    with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
        conn.is_server_ready(client_timeout=10)
    conn.close()


def test_admin_cli_over_https(secure: RunningGateway, material: Material, tmp_path: Path) -> None:
    assert secure.gateway is not None
    url = f"https://127.0.0.1:{secure.gateway.admin_port}"
    env = {"GATEWAY_ADMIN_URL": url, "GATEWAY_ADMIN_TOKEN": OPERATOR}
    out, err = io.StringIO(), io.StringIO()
    status = admin_main(["--cacert", str(material.ca.cert), "routes"], env, out, err)
    assert status == 0, err.getvalue()
    err = io.StringIO()
    assert admin_main(["routes"], env, io.StringIO(), err) == 1  # an unknown CA: refused
    assert "certificate" in err.getvalue().lower()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_over_mtls(secure: RunningGateway, material: Material) -> None:
    curl = ["curl", "-sS", "--max-time", "20", "--cacert", str(material.ca.cert)]
    client = ["--cert", str(material.client.cert), "--key", str(material.client.key)]
    url = f"https://{secure.http_url}/v2/models/mlp_small/infer"
    body = json.dumps(
        {"inputs": [{"name": "INPUT0", "shape": [1, 32], "datatype": "FP32", "data": [1.0] * 32}]}
    )
    done = subprocess.run(
        [*curl, *client, "-H", "content-type: application/json", "-d", body, url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outputs"][0]["shape"] == [1, 2]
    refused = subprocess.run([*curl, url, "-d", body], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0  # no client certificate: the handshake fails


def _served_serial(port: int, material: Material) -> int:
    context = ssl.create_default_context(cafile=str(material.ca.cert))
    context.load_cert_chain(str(material.client.cert), str(material.client.key))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_certificate_reload_without_failed_requests(
    repository: Path, material: Material, tmp_path: Path
) -> None:
    # Its own server and files: the certificate is replaced on disk and picked up by the
    # file watcher while clients keep sending on open connections.
    pair = Pair(tmp_path / "server.crt", tmp_path / "server.key")
    material.ca.issue("server", server=True, into=pair)
    tls = {
        "cert": str(pair.cert),
        "key": str(pair.key),
        "client_ca": str(material.ca.cert),
        "reload_interval_s": 0.1,
    }
    root = tmp_path / "repo"
    shutil.copytree(repository / "mlp_small", root / "mlp_small")
    running = RunningGateway(gateway_settings(root, **{"http.tls": tls, "grpc.tls": tls})).start()
    try:
        assert running.gateway is not None
        ports = (running.gateway.http_port, running.gateway.grpc_port)
        old = Authority.serial(pair)
        assert [_served_serial(p, material) for p in ports] == [old, old]
        failures: list[str] = []
        counts = [0, 0]
        stop = threading.Event()

        def traffic(slot: int) -> None:
            conn = (
                _http_client(running.http_url, material)
                if slot == 0
                else _grpc_client(running.grpc_url, material, material.client)
            )
            module = httpclient if slot == 0 else grpcclient
            while not stop.is_set() or counts[slot] < 5:
                try:
                    _infer(conn, module)
                    counts[slot] += 1
                except Exception as exc:  # reported below
                    failures.append(f"{slot}: {exc}")
                    break
            conn.close()

        threads = [threading.Thread(target=traffic, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        material.ca.issue("server", server=True, into=pair)
        new = Authority.serial(pair)
        assert new != old
        assert running.gateway is not None
        tls_state = running.gateway.tls
        deadline = 200
        while any(t.reloads == 0 for t in tls_state.values()) and deadline:
            running.call(_pause)
            deadline -= 1
        stop.set()
        for t in threads:
            t.join(60)
        assert not failures, failures[:3]
        assert min(counts) >= 5
        assert [_served_serial(p, material) for p in ports] == [new, new]
        # New clients work with the new certificate.
        conn = _grpc_client(running.grpc_url, material, material.client)
        assert _infer(conn, grpcclient).shape == (2, 2)
        conn.close()
    finally:
        running.stop()


async def _pause() -> None:
    import asyncio

    await asyncio.sleep(0.05)
