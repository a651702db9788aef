"""The V2 repository extension: index, load, unload, and reload under traffic."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.clients import PROTOCOLS, client, infer
from tests.conftest import CONTROL_HEADERS, CONTROL_SETTINGS, RunningGateway, gateway_settings


@pytest.fixture(scope="module")
def own_server(
    repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    """A server on its own copy of the repository: these tests change what is loaded."""
    root = tmp_path_factory.mktemp("repo")
    for name in ("mlp_small", "breast_cancer", "broken"):
        shutil.copytree(repository / name, root / name)
    running = RunningGateway(gateway_settings(root, **CONTROL_SETTINGS)).start()
    yield running
    running.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unload_then_load(own_server: RunningGateway, protocol: str) -> None:
    url = own_server.http_url if protocol == "http" else own_server.grpc_url
    conn = client(protocol, url)
    x = np.ones((2, 32), np.float32)
    conn.unload_model("mlp_small", headers=CONTROL_HEADERS)
    assert not conn.is_model_ready("mlp_small")
    with pytest.raises(InferenceServerException, match="unknown model"):
        infer(protocol, url, "mlp_small", {"INPUT0": x}, connection=conn)
    index = conn.get_model_repository_index(headers=CONTROL_HEADERS)
    states = (
        {m["name"]: (m.get("state"), m.get("reason")) for m in index}
        if protocol == "http"
        else {m.name: (m.state, m.reason) for m in index.models}
    )
    assert states["mlp_small"] == ("UNAVAILABLE", "unloaded")
    with pytest.raises(InferenceServerException, match="not loaded"):
        conn.unload_model("mlp_small", headers=CONTROL_HEADERS)
    conn.load_model("mlp_small", headers=CONTROL_HEADERS)
    assert conn.is_model_ready("mlp_small")
    got, _ = infer(protocol, url, "mlp_small", {"INPUT0": x}, connection=conn)
    assert got["OUTPUT0"].shape == (2, 2)
    conn.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_load_errors_are_clear(own_server: RunningGateway, protocol: str) -> None:
    url = own_server.http_url if protocol == "http" else own_server.grpc_url
    conn = client(protocol, url)
    with pytest.raises(InferenceServerException, match="not in the repository"):
        conn.load_model("no_such_model", headers=CONTROL_HEADERS)
    with pytest.raises(InferenceServerException, match="failed to load model 'broken'"):
        conn.load_model("broken", headers=CONTROL_HEADERS)
    assert conn.is_model_ready("breast_cancer")
    conn.close()


def test_load_with_config_override(own_server: RunningGateway) -> None:
    conn = httpclient.InferenceServerClient(own_server.http_url)
    conn.load_model("mlp_small", config=json.dumps({"max_batch_size": 16}), headers=CONTROL_HEADERS)
    assert conn.get_model_config("mlp_small")["max_batch_size"] == 16
    with pytest.raises(InferenceServerException, match="max_batch_size 16"):
        infer("http", own_server.http_url, "mlp_small", {"INPUT0": np.ones((17, 32), np.float32)})
    conn.load_model("mlp_small", headers=CONTROL_HEADERS)
    assert conn.get_model_config("mlp_small")["max_batch_size"] == 64
    conn.close()


def test_reload_under_traffic_fails_no_request(own_server: RunningGateway) -> None:
    stop = threading.Event()
    failures: list[str] = []
    counts = [0, 0]

    def traffic(protocol: str, slot: int) -> None:
        url = own_server.http_url if protocol == "http" else own_server.grpc_url
        conn = client(protocol, url)
        x = np.ones((3, 32), np.float32)
        while not stop.is_set():
            try:
                got, _ = infer(protocol, url, "mlp_small", {"INPUT0": x}, connection=conn)
                assert got["OUTPUT0"].shape == (3, 2)
                counts[slot] += 1
            except Exception as exc:  # reported below
                failures.append(f"{protocol}: {exc}")
                break
        conn.close()

    threads = [threading.Thread(target=traffic, args=(p, i)) for i, p in enumerate(PROTOCOLS)]
    for t in threads:
        t.start()
    # Both clients are serving before the first reload (a busy machine may be slow to start
    # a thread and open its connection), so the reloads happen under traffic.
    deadline = time.monotonic() + 60
    while min(counts) == 0 and not failures and time.monotonic() < deadline:
        time.sleep(0.01)
    before = list(counts)
    admin = grpcclient.InferenceServerClient(own_server.grpc_url)
    for _ in range(6):
        admin.load_model("mlp_small", headers=CONTROL_HEADERS)
    # And each keeps being served after them.
    deadline = time.monotonic() + 60
    while any(n <= b for n, b in zip(counts, before, strict=True)) and not failures:
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join(60)
    admin.close()
    assert not failures, failures[:3]
    assert all(n > b > 0 for n, b in zip(counts, before, strict=True)), (before, counts)
