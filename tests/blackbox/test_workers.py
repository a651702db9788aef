"""``gateway serve --workers 2``: two processes serve HTTP and gRPC on the same ports through
SO_REUSEPORT, sharing one control plane in a private redis-server the gateway starts itself
(no store URL set): a rollback through the admin API reaches both workers, and SIGTERM stops
the workers and the private Redis cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.common import free_port
from gateway.store import RedisStore
from tests.clients import infer

OPERATOR = "workers-operator-secret-01"
X = np.linspace(-1, 1, 32, dtype=np.float32).reshape(1, 32)
BODY = {
    "inputs": [{"name": "INPUT0", "shape": [1, 32], "datatype": "FP32", "data": X.ravel().tolist()}]
}


def _routes(admin_port: int) -> dict[str, float]:
    # A new connection each time: SO_REUSEPORT spreads connections over the workers.
    reply = httpx.get(
        f"http://127.0.0.1:{admin_port}/admin/v1/routes",
        headers={"Authorization": f"Bearer {OPERATOR}"},
        timeout=10,
    )
    route = reply.json()["routes"].get("pair")
    return {v["version"]: float(v["weight"]) for v in route["variants"]} if route else {}


@pytest.mark.skipif(not os.path.exists("/usr/bin/redis-server"), reason="needs redis-server")
def test_two_workers_share_ports_and_one_control_plane(repository: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "pair").symlink_to(repository / "pair")
    data = tmp_path / "data"
    http_port, grpc_port, admin_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_DATA_DIR=str(data),
        GATEWAY_ADMIN__PORT=str(admin_port),
        GATEWAY_ADMIN__TOKENS=f'[{{name = "ops", role = "operator", token = "{OPERATOR}"}}]',
        GATEWAY_LOG_FORMAT="text",
        GATEWAY_GRACE_PERIOD_S="2",
        GATEWAY_DRIFT__ENABLED="false",
    )
    cmd = [sys.executable, "-m", "gateway", "serve", "--workers", "2"]
    cmd += ["--model-repository", str(repo), "--host", "127.0.0.1"]
    cmd += ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while sum("serving pair" in line for line in lines) < 2:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines[-30:])
            assert time.monotonic() < deadline, "".join(lines[-30:])
            lines.append(line)
        serving = [x for x in lines if "serving pair" in x]
        assert all(f"HTTP 127.0.0.1:{http_port} " in x for x in serving), serving
        store = RedisStore(f"unix://{data.resolve() / 'redis' / 'redis.sock'}")
        try:
            alive = [r for r in store.replicas() if r.alive]
            assert len(alive) == 2
        finally:
            store.close()
        _, result = infer("grpc", f"127.0.0.1:{grpc_port}", "pair", {"INPUT0": X})
        assert result.as_numpy("OUTPUT0").shape == (1, 3)
        admin = httpx.Client(
            base_url=f"http://127.0.0.1:{admin_port}/admin/v1",
            headers={"Authorization": f"Bearer {OPERATOR}"},
            timeout=10,
        )
        policy = {"steps": [50, 100], "step_duration_s": 3600, "min_samples": 1_000_000}
        reply = admin.post(
            "/rollouts", json={"model": "pair", "stable": "1", "candidate": "3", "policy": policy}
        )
        assert reply.status_code == 201, reply.text
        assert admin.post("/rollouts/pair/rollback", json={}).status_code == 200
        admin.close()
        # Propagation takes milliseconds; poll (a loaded machine may take longer) until 20
        # reads over fresh connections, spread over both workers, all see the rollback.
        deadline = time.monotonic() + 10
        while not all(_routes(admin_port) == {"1": 100.0, "3": 0.0} for _ in range(20)):
            assert time.monotonic() < deadline, "rollback did not reach both workers"
            time.sleep(0.05)
        with httpx.Client(timeout=10) as http:
            versions = {
                http.post(f"http://127.0.0.1:{http_port}/v2/models/pair/infer", json=BODY).json()[
                    "model_version"
                ]
                for _ in range(20)
            }
        assert versions == {"1"}
        proc.terminate()
        assert proc.wait(30) == 0
        assert not (data / "redis" / "redis.sock").exists()  # the private Redis stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
