"""Ground-truth feedback through the real server: joins to the variant that served each
request under a weighted split (both protocols), counts unknown and expired ids, answers
bad payloads clearly, and a candidate that is wrong on purpose is rolled back on outcome
alone."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest

from gateway._proto import feedback_pb2, feedback_pb2_grpc
from gateway.types import Route, Variant
from tests.clients import PROTOCOLS, client, infer
from tests.conftest import RunningGateway, gateway_settings

OPERATOR = "feedback-operator-token"


@pytest.fixture
def repo(repository: Path, tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(repository / "pair", root / "pair")
    return root


def _truth_model(repository: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(repository / "pair" / "1" / "model.onnx"))


def _traffic(
    server: RunningGateway, protocol: str, n: int, seed: int
) -> dict[str, tuple[str, np.ndarray]]:
    """n one-row requests with ids; returns id -> (served version, input row)."""
    url = server.http_url if protocol == "http" else server.grpc_url
    conn = client(protocol, url)
    rng = np.random.default_rng(seed)
    served = {}
    for i in range(n):
        x = rng.standard_normal((1, 32)).astype(np.float32)
        rid = f"{protocol}-{seed}-{i}"
        _, result = infer(protocol, url, "pair", {"INPUT0": x}, request_id=rid, connection=conn)
        r = result.get_response()
        served[rid] = (r["model_version"] if protocol == "http" else r.model_version, x)
    conn.close()
    return served


def _send_feedback(
    server: RunningGateway, protocol: str, items: list[tuple[str, int]]
) -> dict[str, Any]:
    if protocol == "http":
        reply = httpx.post(
            f"http://{server.http_url}/v2/models/pair/feedback",
            json={"items": [{"id": i, "truth": t} for i, t in items]},
        )
        assert reply.status_code == 200, reply.text
        data: dict[str, Any] = reply.json()
        return data
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = feedback_pb2_grpc.FeedbackStub(channel)  # type: ignore[no-untyped-call]
        request = feedback_pb2.FeedbackRequest(model_name="pair")
        for rid, truth in items:
            request.items.add(id=rid, labels=[truth])
        reply = stub.Submit(request, timeout=30)
        return {
            "matched": reply.matched,
            "unknown_ids": reply.unknown,
            "expired_ids": reply.expired,
            "duplicate": reply.duplicate,
            "invalid": reply.invalid,
        }


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_feedback_joins_the_serving_variant(repo: Path, repository: Path, protocol: str) -> None:
    server = RunningGateway(gateway_settings(repo)).start()
    try:
        assert server.gateway is not None
        router = server.gateway.router
        server.on_loop(
            lambda: router.set_route(Route("pair", (Variant("1", 50), Variant("3", 50))))
        )
        served = _traffic(server, protocol, 200, seed=1)
        truth_model = _truth_model(repository)
        items = [
            (rid, int(truth_model.run(None, {"INPUT0": x})[0].argmax()))
            for rid, (_, x) in served.items()
        ]
        result = _send_feedback(server, protocol, [*items, ("never-seen", 1)])
        assert result["matched"] == 200
        assert result["unknown_ids"] == 1
        again = _send_feedback(server, protocol, items[:5])
        assert again["duplicate"] == 5
        outcomes = httpx.get(f"http://{server.http_url}/v2/models/pair/outcomes").json()
        per_version = {v: sum(1 for s, _ in served.values() if s == v) for v in ("1", "3")}
        assert outcomes["versions"]["1"]["n"] == per_version["1"]
        assert outcomes["versions"]["3"]["n"] == per_version["3"]
        assert outcomes["versions"]["1"]["accuracy"] == 1.0  # truth is version 1's answer
        assert outcomes["versions"]["3"]["accuracy"] < 0.9
    finally:
        server.stop()


def test_expired_ids_and_bad_payloads(repo: Path) -> None:
    server = RunningGateway(gateway_settings(repo, **{"feedback.ttl_s": 0.2})).start()
    try:
        served = _traffic(server, "http", 3, seed=2)
        time.sleep(0.3)  # past the TTL: these predictions may no longer be joined
        result = _send_feedback(server, "http", [(rid, 0) for rid in served])
        assert result["matched"] == 0
        assert result["expired_ids"] + result["unknown_ids"] == 3
        url = f"http://{server.http_url}/v2/models/pair/feedback"
        bad = httpx.post(url, content=b'{"items": [{"id": 1}]}')
        assert bad.status_code == 400
        assert "invalid feedback" in bad.json()["error"]
        assert httpx.post(url, content=b"{nope").status_code == 400
        unknown = httpx.post(f"http://{server.http_url}/v2/models/nope/feedback", json=[])
        assert unknown.status_code == 404
        with grpc.insecure_channel(server.grpc_url) as channel:
            stub = feedback_pb2_grpc.FeedbackStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.RpcError) as info:
                stub.Submit(
                    feedback_pb2.FeedbackRequest(
                        model_name="pair", items=[feedback_pb2.FeedbackItem()]
                    )
                )
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop()


def test_wrong_candidate_is_rolled_back_on_feedback_alone(
    repo: Path, repository: Path, tmp_path: Path
) -> None:
    settings = gateway_settings(
        repo,
        **{
            "data_dir": str(tmp_path / "data"),
            "admin.tokens": [{"name": "ops", "role": "operator", "token": OPERATOR}],
        },
    )
    server = RunningGateway(settings).start()
    try:
        assert server.gateway is not None
        admin = httpx.Client(
            base_url=f"http://127.0.0.1:{server.gateway.admin_port}/admin/v1",
            headers={"Authorization": f"Bearer {OPERATOR}"},
        )
        policy = {
            "steps": [50, 100],
            "step_duration_s": 600,
            "evaluation_interval_s": 0.1,
            "min_samples": 10,
            "consecutive_failures": 2,
            "thresholds": {
                "max_error_rate_delta": None,
                "max_p99_latency_ratio": None,
                "candidate_worse_pvalue": 0.001,
            },
        }
        started = admin.post(
            "/rollouts", json={"model": "pair", "stable": "1", "candidate": "3", "policy": policy}
        )
        assert started.status_code == 201, started.text
        truth_model = _truth_model(repository)
        seed = 10
        while admin.get("/rollouts/pair").json()["status"] != "rolled_back":
            served = _traffic(server, "grpc", 100, seed=seed)
            seed += 1
            items = [
                (rid, int(truth_model.run(None, {"INPUT0": x})[0].argmax()))
                for rid, (_, x) in served.items()
            ]
            _send_feedback(server, "grpc", items)
            assert seed < 20, admin.get("/rollouts/pair").json()["last_evaluation"]
            time.sleep(0.3)
        state = admin.get("/rollouts/pair").json()
        assert "outcome" in state["reason"] + str(state["last_evaluation"])
        admin.close()
    finally:
        server.stop()
