"""Traffic routing through the real server: weighted splits, sticky keys, pinning, atomic
weight swaps under load, and shadows whose answers never reach the caller."""

from __future__ import annotations

import collections
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from scipy import stats

from gateway.types import Route, ShadowTarget, Variant
from tests.clients import PROTOCOLS, client, infer
from tests.conftest import RunningGateway, gateway_settings

X = np.linspace(-1, 1, 32, dtype=np.float32).reshape(1, 32)


def _set_route(server: RunningGateway, route: Route) -> None:
    assert server.gateway is not None
    router = server.gateway.router
    server.on_loop(lambda: router.set_route(route))


def _served(protocol: str, server: RunningGateway, n: int, **kwargs: Any) -> list[str]:
    url = server.http_url if protocol == "http" else server.grpc_url
    conn = client(protocol, url)
    versions = []
    for _ in range(n):
        _, result = infer(protocol, url, "pair", {"INPUT0": X}, connection=conn, **kwargs)
        response = result.get_response()
        versions.append(response["model_version"] if protocol == "http" else response.model_version)
    conn.close()
    return versions


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_weighted_split(server: RunningGateway, protocol: str) -> None:
    _set_route(server, Route("pair", (Variant("1", 75), Variant("3", 25))))
    counts = collections.Counter(_served(protocol, server, 400))
    assert set(counts) == {"1", "3"}
    # A wrong split fails by far (50/50 over 400 requests: p ~ 1e-30); a right one fails
    # one run in a million, not one CI run in a few hundred.
    p = stats.chisquare([counts["1"], counts["3"]], [300, 100]).pvalue
    assert p > 1e-6, counts


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_sticky_key_and_pin(server: RunningGateway, protocol: str) -> None:
    _set_route(server, Route("pair", (Variant("1", 50), Variant("3", 50))))
    for key in ("alice", "bob", "carol", "dave"):
        headers = {"x-routing-key": key}
        assert len(set(_served(protocol, server, 8, headers=headers))) == 1
        by_param = set(_served(protocol, server, 4, parameters={"routing_key": key}))
        assert by_param == set(_served(protocol, server, 1, headers=headers))
    pinned = _served(protocol, server, 10, headers={"x-model-version": "3"})
    assert set(pinned) == {"3"}


def test_served_version_is_reported_for_load_balancers(server: RunningGateway) -> None:
    _set_route(server, Route("pair", (Variant("3", 1),)))
    body = {
        "inputs": [
            {"name": "INPUT0", "shape": [1, 32], "datatype": "FP32", "data": X.ravel().tolist()}
        ]
    }
    reply = httpx.post(f"http://{server.http_url}/v2/models/pair/infer", json=body)
    assert reply.headers["x-model-version"] == "3"
    assert reply.json()["model_version"] == "3"
    route = httpx.get(f"http://{server.http_url}/v2/models/pair/route").json()
    assert route["variants"][0]["version"] == "3"
    assert route["variants"][0]["ready"]
    conn = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput("INPUT0", [1, 32], "FP32")
    tensor.set_data_from_numpy(X)
    result = conn.infer("pair", [tensor])
    assert result.get_response().model_version == "3"
    conn.close()


def test_weight_swap_under_load_fails_no_request(server: RunningGateway) -> None:
    stop = threading.Event()
    failures: list[str] = []
    seen: collections.Counter[str] = collections.Counter()

    def traffic(protocol: str) -> None:
        url = server.http_url if protocol == "http" else server.grpc_url
        conn = client(protocol, url)
        while not stop.is_set():
            try:
                _, result = infer(protocol, url, "pair", {"INPUT0": X}, connection=conn)
                r = result.get_response()
                seen[r["model_version"] if protocol == "http" else r.model_version] += 1
            except Exception as exc:  # collected
                failures.append(str(exc))
                return
        conn.close()

    threads = [threading.Thread(target=traffic, args=(p,)) for p in PROTOCOLS * 2]
    for t in threads:
        t.start()
    for i in range(40):
        w = i % 5 * 25
        _set_route(server, Route("pair", (Variant("1", 100 - w), Variant("3", w))))
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join(30)
    assert not failures, failures[:3]
    assert seen["1"] > 0
    assert seen["3"] > 0


def _comparison(
    server: RunningGateway,
    version: str,
    sent: int,
    counted: tuple[str, ...] = ("compared_rows", "errors", "dropped"),
) -> dict[str, Any]:
    """The shadow's comparison once its ``counted`` fields add up to ``sent`` copies."""
    deadline = time.monotonic() + 30
    while True:
        route = httpx.get(f"http://{server.http_url}/v2/models/pair/route").json()
        shadow = next(s for s in route["shadows"] if s["version"] == version)
        done = shadow["comparison"]
        if sum(done.get(key, 0) for key in counted) >= sent:
            return dict(done)
        assert time.monotonic() < deadline, done
        time.sleep(0.02)


@pytest.fixture(scope="module")
def unbudgeted(
    repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    """A server of versions 1 to 3 of ``pair`` whose shadows have no CPU budget and room for
    every copy in flight: the agreement test counts every mirrored row, and a budget (charged
    at wall time for inline models) drops copies whenever the machine is busy."""
    root = tmp_path_factory.mktemp("shadow-repo")
    for version in ("1", "2", "3"):
        shutil.copytree(repository / "pair" / version, root / "pair" / version)
    shutil.copy(repository / "pair" / "config.toml", root / "pair" / "config.toml")
    settings = gateway_settings(root, shadow_cpu_share=0.0, shadow_max_in_flight=1000)
    running = RunningGateway(settings).start()
    yield running
    running.stop()


def test_shadow_agreement_on_a_known_pair(unbudgeted: RunningGateway, repository: Path) -> None:
    server = unbudgeted
    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, 32)).astype(np.float32)
    s1 = ort.InferenceSession(str(repository / "pair" / "1" / "model.onnx"))
    s3 = ort.InferenceSession(str(repository / "pair" / "3" / "model.onnx"))
    expected = float(
        np.mean(
            s1.run(None, {"INPUT0": x})[0].argmax(1) == s3.run(None, {"INPUT0": x})[0].argmax(1)
        )
    )
    _set_route(
        server, Route("pair", (Variant("1", 1),), (ShadowTarget("2", 1.0), ShadowTarget("3", 1.0)))
    )
    conn = client("grpc", server.grpc_url)
    for row in x:
        _got, result = infer(
            "grpc", server.grpc_url, "pair", {"INPUT0": row[None, :]}, connection=conn
        )
        assert result.get_response().model_version == "1"  # never a shadow's answer
    conn.close()
    same = _comparison(server, "2", 200)
    other = _comparison(server, "3", 200)
    # This server mirrors only this test's rows, every one of them.
    for shadow in (same, other):
        counts = [shadow.get(k, 0) for k in ("compared_rows", "dropped", "errors")]
        assert counts == [200, 0, 0], shadow
    assert same["agreement"] == 1.0
    assert same["mean_abs_diff"] == 0.0
    assert other["agreement"] == pytest.approx(expected, abs=1e-9)


def test_failing_or_slow_shadow_never_touches_the_primary(server: RunningGateway) -> None:
    _set_route(
        server, Route("pair", (Variant("1", 1),), (ShadowTarget("4", 1.0), ShadowTarget("5", 1.0)))
    )
    want = _served("http", server, 1)
    body = {
        "inputs": [
            {"name": "INPUT0", "shape": [1, 32], "datatype": "FP32", "data": X.ravel().tolist()}
        ]
    }
    with httpx.Client(base_url=f"http://{server.http_url}") as http:
        replies = [http.post("/v2/models/pair/infer", json=body) for _ in range(60)]
    assert {r.status_code for r in replies} == {200}
    assert {r.json()["model_version"] for r in replies} == set(want)
    failing = _comparison(server, "4", 60)
    assert failing["errors"] >= 60 - failing["dropped"]
    # Every copy is sent or dropped at once; the sent ones need not have finished (they
    # run at the lowest priority, behind anything else this machine does).
    slow = _comparison(server, "5", 60, counted=("sent", "dropped"))
    assert slow["sent"] >= 1
    _comparison(server, "5", 1, counted=("compared_rows", "errors"))  # its thread has run
    # The slow shadow ran on its own thread at the lowest CPU priority (nice 19), and
    # nothing else here did (this server runs in the test's process).
    lowest = [tid for tid in map(int, os.listdir("/proc/self/task")) if _nice(tid) == 19]
    assert len(lowest) == 1, lowest
    assert lowest[0] != threading.get_native_id()


def _nice(tid: int) -> int | None:
    try:
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:  # the thread ended since the listing
        return None
