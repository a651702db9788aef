"""SIGTERM: readiness drops at once, in-flight requests finish, then the process exits."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def _start(repository: Path) -> tuple[subprocess.Popen[str], int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_DATA_DIR"] = str(repository.parent / "data")
    env["GATEWAY_ADMIN__PORT"] = "0"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--model-repository",
            str(repository),
            "--host",
            "127.0.0.1",
            "--http-port",
            "0",
            "--grpc-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        match = re.search(r"on HTTP [\d.]+:(\d+) and gRPC", line)
        if match:
            return proc, int(match.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    proc.stdout.close()
    raise AssertionError("gateway did not report its ports")


def test_sigterm_drains_in_flight_requests(tmp_path: Path, repository: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "slow").symlink_to(repository / "slow")
    proc, port = _start(root)
    try:
        url = f"http://127.0.0.1:{port}"
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
        proc.send_signal(signal.SIGTERM)
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
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
