"""/metrics after known traffic: counts, status codes, batch sizes, latency, drift."""

from __future__ import annotations

import math
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.clients import PROTOCOLS, infer
from tests.conftest import RunningGateway, gateway_settings


def _scrape(server: RunningGateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reply = httpx.get(f"http://{server.http_url}/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def _get(
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counts_after_known_traffic(server: RunningGateway) -> None:
    before = _scrape(server)
    for protocol in PROTOCOLS:
        url = server.http_url if protocol == "http" else server.grpc_url
        for n in (1, 2, 3):
            infer(protocol, url, "mlp_small", {"INPUT0": np.ones((n, 32), np.float32)})
    bad = {"inputs": [{"name": "INPUT0", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    assert (
        httpx.post(f"http://{server.http_url}/v2/models/mlp_small/infer", json=bad).status_code
        == 400
    )
    after = _scrape(server)

    def delta(name: str, **labels: str) -> float:
        return _get(after, name, **labels) - _get(before, name, **labels)

    mv = {"model": "mlp_small", "version": "1"}
    assert delta("gateway_variant_requests_total", **mv) == 7
    assert delta("gateway_variant_errors_total", **mv) == 1
    assert delta("gateway_model_rows_total", **mv) == 12
    assert delta("gateway_model_requests_total", outcome="success", **mv) == 6
    assert delta("gateway_responses_total", protocol="http", code="200") >= 3
    assert delta("gateway_responses_total", protocol="http", code="400") >= 1
    assert delta("gateway_responses_total", protocol="grpc", code="OK") >= 3
    assert delta("gateway_request_duration_seconds_count", **mv) == 6
    assert delta("gateway_batch_size_count", **mv) == delta("gateway_model_executions_total", **mv)
    assert _get(after, "gateway_ready") == 1.0


@pytest.mark.parametrize("metric", ["gateway_drift_max_psi", "gateway_drift_window_rows"])
def test_drift_metrics_for_profiled_models(server: RunningGateway, metric: str) -> None:
    infer(
        "http",
        server.http_url,
        "breast_cancer",
        {"features": np.ones((4, 30), np.float32)},
        version="1",
    )
    rows = (("model", "breast_cancer"), ("version", "1"))
    for _ in range(100):  # the drift window takes the rows within a tick (bounded wait)
        values = _scrape(server)
        if values.get(("gateway_drift_window_rows", rows), 0) > 0:
            break
        time.sleep(0.1)
    assert (
        "gateway_drift_verdict",
        (("model", "breast_cancer"), ("verdict", "drift"), ("version", "1")),
    ) in values
    assert any(name == metric for name, _ in values)


def test_an_idle_model_exports_no_psi(repository: Path) -> None:
    """A fresh gateway: every profiled version has an empty drift window, so no PSI gauge
    is exported, the verdict is insufficient_data and the report's statistics are null
    (never the PSI of 6 that smoothed empty bins give)."""
    server = RunningGateway(gateway_settings(repository)).start()
    try:
        values = _scrape(server)
        idle = (("model", "breast_cancer"), ("version", "1"))
        assert values[("gateway_drift_window_rows", idle)] == 0
        assert ("gateway_drift_max_psi", idle) not in values
        assert not any(name == "gateway_drift_psi" for name, _ in values)
        verdict = (("model", "breast_cancer"), ("verdict", "insufficient_data"), ("version", "1"))
        assert values[("gateway_drift_verdict", verdict)] == 1.0
        gateway = server.gateway
        assert gateway is not None
        report = server.on_loop(lambda: gateway.drift_report("breast_cancer", "1"))
        assert report.verdict == "insufficient_data"
        assert report.inputs
        assert all(f.n == 0 and math.isnan(f.psi) for f in report.inputs)
    finally:
        server.stop()
