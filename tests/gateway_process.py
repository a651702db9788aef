"""A gateway in a subprocess (``python -m gateway serve``) on free loopback ports: for tests
that measure the server alone (its RSS, its event loop) or signal it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path


class GatewayProcess:
    """Starts the gateway, reads its ports from the start-up line, and keeps draining its
    output (kept in ``lines``) so the pipe never fills."""

    def __init__(
        self,
        repository: Path,
        data_dir: Path,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        base.update(GATEWAY_DATA_DIR=str(data_dir), GATEWAY_ADMIN__PORT="0")
        base.update(env or {})
        self.proc = subprocess.Popen(
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
            env=base,
            preexec_fn=preexec_fn,
        )
        self.lines: list[str] = []
        self.http_port = self.grpc_port = 0
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            self.lines.append(line)
            match = re.search(r"on HTTP [\d.]+:(\d+) and gRPC [\d.]+:(\d+)", line)
            if match:
                self.http_port, self.grpc_port = int(match.group(1)), int(match.group(2))
                break
            if not line and self.proc.poll() is not None:
                break
        if not self.http_port:
            self.stop()
            raise AssertionError("gateway did not report its ports:\n" + "".join(self.lines))
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def rss_bytes(self) -> int:
        """The server's resident set size."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode
