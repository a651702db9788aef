"""SIGTERM: readiness drops at once, in-flight requests finish, then the process exits."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import httpx

from tests.gateway_process import GatewayProcess


def _queued(url: str) -> float:
    """The slow model's queue depth, from the gateway's own metrics."""
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("gateway_queue_depth{") and 'model="slow"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_sigterm_drains_in_flight_requests(tmp_path: Path, repository: Path) -> None:
    root = tmp_path / "repo"
    (root / "slow" / "1").mkdir(parents=True)
    shutil.copy(repository / "slow" / "1" / "model.onnx", root / "slow" / "1" / "model.onnx")
    # The queued requests wait up to a minute for company: only the drain runs them.
    (root / "slow" / "config.toml").write_text(
        'max_batch_size = 8\nexecution = "pool"\nmax_queue_size = 4\n'
        "max_queue_delay_us = 60000000\n"
    )
    gateway = GatewayProcess(root, tmp_path / "data")
    proc, port = gateway.proc, gateway.http_port
    try:
        url = gateway.http_url
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
        payload = json.dumps(
            {
                "inputs": [
                    {"name": "INPUT0", "shape": [1, 512], "datatype": "FP32", "data": [0.1] * 512}
                ]
            }
        )
        request = (
            f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n{payload}"
        ).encode()
        # Four requests (the queue limit) in the queue, seen there, before the signal.
        sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        for sock in sockets:
            sock.sendall(request)
        deadline = time.monotonic() + 20
        while _queued(url) < 4:
            assert time.monotonic() < deadline, "the requests never queued"
            time.sleep(0.01)
        gateway.terminate()
        deadline = time.monotonic() + 5
        while True:
            # Listener closed: new connections (and so health checks) are refused.
            try:
                httpx.get(f"{url}/v2/health/ready", timeout=2).raise_for_status()
            except httpx.HTTPError:
                break
            assert time.monotonic() < deadline, "still ready after SIGTERM"
            time.sleep(0.01)
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
