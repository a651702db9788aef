"""workers.py: ``gateway serve --workers N``: N serving processes on the same ports.

One Python process serves about one core (the GIL); N worker processes bind the HTTP, gRPC
and admin ports with SO_REUSEPORT, so the kernel spreads connections among them, and share
one control plane: the ``store.url`` Redis when set, otherwise a private ``redis-server``
this module starts with its data (AOF, fsync always) under ``<data_dir>/redis`` and a unix
socket only this user can open. Without a URL and without the binary, N > 1 is refused with
a clear error. The parent only supervises: it forwards SIGTERM/SIGINT to every worker (each
drains as one process would), stops the rest when one dies, then stops the private Redis.
Knows nothing of what a worker serves.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.process
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Final

import msgspec
import redis

from gateway.app import run
from gateway.config import ConfigError, Settings
from gateway.logs import configure_logging

__all__ = ["serve_workers", "PrivateRedis"]

logger = logging.getLogger(__name__)

REDIS_START_TIMEOUT_S: Final = 10.0
_EXTRA_STOP_S: Final = 10.0  # beyond the grace period before a worker is killed


class PrivateRedis:
    """A ``redis-server`` owned by this process: a unix socket in ``directory`` (mode 700),
    no TCP port, the control plane made durable by an append-only file."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigError(
                "--workers > 1 shares one control plane through Redis: set store.url "
                "(GATEWAY_STORE__URL=redis://...) or install redis-server "
                "(apt-get install redis-server) so the gateway can start a private one"
            )
        self._binary = binary
        self.directory = directory
        self.socket = directory / "redis.sock"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> PrivateRedis:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        self._process = subprocess.Popen(
            [
                self._binary,
                "--port", "0",
                "--unixsocket", str(self.socket),
                "--unixsocketperm", "700",
                "--dir", str(self.directory),
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--save", "",
                "--loglevel", "warning",
                "--logfile", str(self.directory / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C reaches the workers, not the store under them
        )  # fmt: skip
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=0.5)
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        try:
            while True:
                if self._process.poll() is not None:
                    raise ConfigError(
                        f"private redis-server exited ({self._process.returncode}); see "
                        f"{self.directory / 'redis.log'}"
                    )
                try:
                    if client.ping():
                        break
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise ConfigError("private redis-server did not answer within 10 s")
                time.sleep(0.01)
        finally:
            client.close()
        logger.info("private control store at %s", self.url)
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()  # redis-server flushes the AOF and exits on SIGTERM
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _worker(settings: Settings, index: int) -> None:
    configure_logging(settings.log_level, settings.log_format == "json")
    logging.getLogger(__name__).info("worker %d starting", index)
    run(settings, reuse_port=True)


def serve_workers(settings: Settings, count: int) -> int:
    """Run ``count`` workers until SIGTERM/SIGINT (blocking); the exit status: 0 after a
    requested stop, 1 if a worker died on its own."""
    if count < 1:
        raise ConfigError("--workers must be at least 1")
    ports = {"http.port": settings.http.port, "grpc.port": settings.grpc.port}
    ports["admin.port"] = settings.admin.port
    if any(port == 0 for port in ports.values()):
        raise ConfigError(
            f"--workers {count} needs fixed ports to share (port 0 picks one per process): "
            + ", ".join(f"{k}={v}" for k, v in ports.items())
        )
    private: PrivateRedis | None = None
    if not settings.store.url:
        private = PrivateRedis(Path(settings.data_dir).resolve() / "redis").start()
        store = msgspec.structs.replace(settings.store, url=private.url)
        settings = msgspec.structs.replace(settings, store=store)
    context = multiprocessing.get_context("spawn")
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        logger.info("signal %d: stopping %d workers", signum, count)
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    workers: list[multiprocessing.process.BaseProcess] = []
    status = 0
    try:
        for index in range(count):
            spawned = context.Process(
                target=_worker, args=(settings, index), name=f"worker-{index}"
            )
            spawned.start()
            workers.append(spawned)
        logger.info("started %d workers: pids %s", count, [w.pid for w in workers])
        while not stopping.wait(0.2):
            dead = [w for w in workers if not w.is_alive()]
            if dead:
                logger.error(
                    "worker %s exited with %s: stopping the others",
                    dead[0].name,
                    dead[0].exitcode,
                )
                status = 1
                break
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()  # SIGTERM: each worker drains like a single process
        deadline = time.monotonic() + settings.grace_period_s + _EXTRA_STOP_S
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                logger.error("worker %s did not stop in time: killed", worker.name)
                worker.kill()
                worker.join()
        if private is not None:
            private.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status
