"""Request ids, JSON access logs and the prediction log through the real server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from gateway.predlog import export_sample, read_predictions
from tests.conftest import RunningGateway, gateway_settings


def test_request_ids_and_prediction_log(
    repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "repo"
    shutil.copytree(repository / "mlp_small", root / "mlp_small")
    logs = tmp_path / "predictions"
    settings = gateway_settings(
        root,
        **{
            "predictions.enabled": True,
            "predictions.directory": str(logs),
            "predictions.sample_rate": 1.0,
            "access_log_sample_rate": 1.0,
        },
    )
    server = RunningGateway(settings).start()
    rows = np.arange(64, dtype=np.float32).reshape(2, 32)
    body = {
        "inputs": [
            {"name": "INPUT0", "shape": [2, 32], "datatype": "FP32", "data": rows.ravel().tolist()}
        ]
    }
    try:
        with caplog.at_level("INFO", logger="gateway.access"):
            with httpx.Client(base_url=f"http://{server.http_url}") as http:
                given = http.post(
                    "/v2/models/mlp_small/infer", json=body, headers={"x-request-id": "req-abc"}
                )
                assert given.headers["x-request-id"] == "req-abc"
                assert given.json()["id"] == "req-abc"
                traced = http.post(
                    "/v2/models/mlp_small/infer",
                    json=body,
                    headers={
                        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                    },
                )
                assert traced.json()["id"] == "0af7651916cd43dd8448eb211c80319c"
                generated = http.post("/v2/models/mlp_small/infer", json=body)
                other = http.post("/v2/models/mlp_small/infer", json=body)
                assert generated.json()["id"]
                assert generated.json()["id"] != other.json()["id"]
                assert generated.headers["x-request-id"] == generated.json()["id"]
                bad = http.post(
                    "/v2/models/mlp_small/infer",
                    json={"inputs": []},
                    headers={"x-request-id": "req-bad"},
                )
                assert bad.status_code == 400
                assert bad.headers["x-request-id"] == "req-bad"
            conn = grpcclient.InferenceServerClient(server.grpc_url)
            tensor = grpcclient.InferInput("INPUT0", [2, 32], "FP32")
            tensor.set_data_from_numpy(rows)
            result = conn.infer("mlp_small", [tensor], headers={"x-request-id": "grpc-1"})
            assert result.get_response().id == "grpc-1"
            conn.close()
        access = [r for r in caplog.records if r.name == "gateway.access"]
        ids = {getattr(r, "request_id", None) for r in access}
        assert {"req-abc", "grpc-1", "req-bad"} <= ids
    finally:
        server.stop()
    records = list(read_predictions(logs, "mlp_small", "1"))
    assert {r["request_id"] for r in records} >= {"req-abc", "grpc-1"}
    record: dict[str, Any] = next(r for r in records if r["request_id"] == "req-abc")
    assert record["inputs"]["INPUT0"] == rows.tolist()
    assert len(record["outputs"]["OUTPUT0"]) == 2
    sample = tmp_path / "sample.npy"
    assert export_sample(logs, "mlp_small", "1", "INPUT0", sample) == 2 * len(records)
    assert np.load(sample).shape == (2 * len(records), 32)
    json.dumps(records)  # plain JSON all the way
