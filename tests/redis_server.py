"""A real redis-server for tests: a free loopback port, a temp dir, AOF on, stopped by PID.

Tests start one with ``RedisServer(tmp_path).start()`` (or the ``redis_server`` fixture in
the modules that need it), kill it to simulate a crash, and start it again on the same port
and directory to test recovery. ``scripts/test`` installs Debian's redis-server if missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

from bench.common import free_port

START_TIMEOUT_S = 10.0  # measured: PING answers ~20 ms after start; AOF replay adds little


class RedisServer:
    def __init__(self, directory: Path, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed; scripts/test installs it "
                "(apt-get install -y --no-install-recommends redis-server)"
            )
        self.binary = binary
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert self.process is None, "already running"
        self.process = subprocess.Popen(
            [
                self.binary,
                "--bind", "127.0.0.1",
                "--port", str(self.port),
                "--dir", str(self.directory),
                "--appendonly", "yes",
                # Each write reaches the AOF file before its reply (Redis writes the AOF
                # buffer before replying in every fsync mode but a postponed "everysec"), so a
                # killed process loses nothing acknowledged; without an fsync per write, a
                # disk stall on a busy CI machine cannot outlast the store's 0.4 s timeout.
                "--appendfsync", "no",
                "--save", "",
                "--protected-mode", "yes",
                "--loglevel", "warning",
                "--logfile", str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                if self.process.poll() is not None:
                    log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"redis-server exited with {self.process.returncode}: {log}")
                try:
                    if client.ping():
                        return self
                except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                    pass  # not listening yet, or LOADING the AOF
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server not ready within {START_TIMEOUT_S} s")
                time.sleep(0.005)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL, as a crash: what the AOF acknowledged survives (written before the reply)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(5)

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung server)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()  # SIGKILL also ends a stopped (paused) process
