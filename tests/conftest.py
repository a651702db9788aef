"""Shared fixtures: the test model repository and a real gateway on free ports."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.app import Gateway, serve
from gateway.config import Settings, load_settings
from tests.models import build_repository

T = TypeVar("T")
_COUNTER = itertools.count()

CONTROL_TOKEN = "test-operator-secret"
"""An admin operator token the shared servers accept for V2 model control."""
CONTROL_HEADERS = {"authorization": f"Bearer {CONTROL_TOKEN}"}
CONTROL_SETTINGS: dict[str, Any] = {
    "model_control.enabled": True,
    "admin.tokens": [{"name": "tests", "role": "operator", "token": CONTROL_TOKEN}],
}
"""Settings that turn data-port model control on for ``CONTROL_HEADERS``."""


class RunningGateway:
    """A gateway serving in a background thread with its own event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.gateway: Gateway | None = None
        self._thread = threading.Thread(target=self._run, name="gateway", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self.settings) as gateway:
            self.gateway = gateway
            self._ready.set()
            await self._stop.wait()

    def start(self) -> RunningGateway:
        self._thread.start()
        if not self._ready.wait(120):
            raise TimeoutError("gateway did not start within 120 s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    @property
    def http_url(self) -> str:
        assert self.gateway is not None
        return f"127.0.0.1:{self.gateway.http_port}"

    @property
    def grpc_url(self) -> str:
        assert self.gateway is not None
        return f"127.0.0.1:{self.gateway.grpc_port}"

    def on_loop(self, fn: Callable[[], T]) -> T:
        """Run a plain function on the gateway's loop thread (where its state lives)."""

        async def wrapper() -> T:
            return fn()

        return self.call(wrapper)

    def call(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run a coroutine on the gateway's loop (control actions from tests)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(60)


def gateway_settings(repository: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "model_repository": str(repository),
        "http.host": "127.0.0.1",
        "http.port": 0,
        "grpc.host": "127.0.0.1",
        "grpc.port": 0,
        "grace_period_s": 5.0,
        "admin.host": "127.0.0.1",
        "admin.port": 0,
        "data_dir": str(repository.parent / f"data-{repository.name}-{next(_COUNTER)}"),
    }
    base.update(overrides)
    return load_settings(None, env={}, overrides=base)


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def server(repository: Path) -> Iterator[RunningGateway]:
    running = RunningGateway(gateway_settings(repository, **CONTROL_SETTINGS)).start()
    yield running
    running.stop()
