"""SIGTERM: readiness drops at once, in-flight requests finish, then the process exits."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.gateway_process import GatewayProcess


def test_sigterm_drains_in_flight_requests(tmp_path: Path, repository: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "slow").symlink_to(repository / "slow")
    gateway = GatewayProcess(root, tmp_path / "data")
    proc, port = gateway.proc, gateway.http_port
    try:
        url = gateway.http_url
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
        payload = json.dumps(
            {
                "inputs": [
                    {"name": "INPUT0", "shape": [8, 512], "datatype": "FP32", "data": [0.1] * 4096}
                ]
            }
        )
        request = (
            f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n{payload}"
        ).encode()
        # Four requests fully sent (the queue limit) before the signal.
        sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        for sock in sockets:
            sock.sendall(request)
        time.sleep(0.02)
        gateway.terminate()
        time.sleep(0.05)
        with pytest.raises(httpx.HTTPError):
            # Listener closed: new connections (and so health checks) are refused.
            httpx.get(f"{url}/v2/health/ready", timeout=2).raise_for_status()
        for sock in sockets:
            sock.settimeout(30)
            reply = b""
            while b"\r\n\r\n" not in reply:
                chunk = sock.recv(65536)
                assert chunk, "connection closed before the answer"
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
            sock.close()
        assert proc.wait(30) == 0
    finally:
        gateway.stop()
