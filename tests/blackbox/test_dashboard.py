"""The operator dashboard in a real headless Chromium against a real gateway and admin API;
its static routes; and the Grafana dashboard's queries against the metrics we export.

The browser test needs Debian's Chromium at /usr/bin/chromium and the ``playwright`` package
(``scripts/install-browser`` installs both; ``playwright install`` is never run). Without
them it is skipped, except on CI (``CI`` set), where it fails.

The page is served by the real gateway's admin listener (``Gateway.admin_port``), which
mounts ``dashboard_routes()`` and ``/metrics``; tokens come from ``admin.tokens``.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette

import gateway.metrics
from gateway.config import EXAMPLE_REPOSITORY
from gateway.dashboard import ASSETS, dashboard_routes
from tests.conftest import RunningGateway, gateway_settings

logger = logging.getLogger(__name__)

ROOT: Final = Path(__file__).resolve().parents[2]
ARTIFACTS: Final = ROOT / "tests" / "artifacts"
GRAFANA: Final = ROOT / "dashboards" / "grafana.json"
CHROMIUM: Final = Path("/usr/bin/chromium")
CHROMIUM_ARGS: Final = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MODEL: Final = "breast_cancer"
OPERATOR_SECRET: Final = "dashboard-test-operator-5d1c9a"
VIEWER_SECRET: Final = "dashboard-test-viewer-77e0b2"
ADMIN: Final[Mapping[str, Any]] = {  # gateway_settings already binds it to a free port
    "admin.tokens": [
        {"name": "ops", "role": "operator", "token": OPERATOR_SECRET},
        {"name": "viewer", "role": "viewer", "token": VIEWER_SECRET},
    ],
    "admin.history_interval_s": 0.25,  # the server-side history fills within the test
}
FAST_DRIFT: Final[Mapping[str, Any]] = {
    "drift.sub_window_s": 0.2,
    "drift.sub_windows": 150,  # a 30 s window: nothing expires during the test
    "drift.tick_s": 0.05,
}
SVG_NAMESPACE: Final = "http://www.w3.org/2000/svg"
POLL_MS: Final = 250  # the page's polling interval in this test
WAIT_MS: Final = 15_000  # deadline for anything the page should show; normally < 1 s
OP: Final = {"Authorization": f"Bearer {OPERATOR_SECRET}"}


# -- static routes (no browser) ----------------------------------------------------------------


def _dashboard_app() -> Starlette:
    return Starlette(routes=dashboard_routes("/ops/dashboard", metrics_path="/m"))


def test_dashboard_routes_serve_the_page_and_assets() -> None:
    asyncio.run(_check_dashboard_routes())


async def _check_dashboard_routes() -> None:
    transport = httpx.ASGITransport(app=_dashboard_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as http:
        page = await http.get("/ops/dashboard")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert 'src="/ops/dashboard/static/app.js"' in page.text
        assert 'data-metrics="/m"' in page.text
        assert "__" not in page.text  # every placeholder filled
        assert (await http.get("/ops/dashboard/")).status_code == 200
        for name, media_type in ASSETS.items():
            asset = await http.get(f"/ops/dashboard/static/{name}")
            assert asset.status_code == 200
            assert asset.headers["content-type"] == media_type
            assert asset.headers["x-content-type-options"] == "nosniff"
            # Everything ships in the package: no other origin is ever named (the SVG
            # namespace is an identifier, never fetched).
            text = asset.text.replace(SVG_NAMESPACE, "")
            assert not re.search(r"https?://", text), name
        assert (await http.get("/ops/dashboard/static/..%2F__init__.py")).status_code == 404
        assert (await http.get("/ops/dashboard/static/index.html")).status_code == 404


def test_dashboard_prefix_is_checked() -> None:
    with pytest.raises(ValueError, match="prefix"):
        dashboard_routes("dashboard/")


# -- Grafana ----------------------------------------------------------------------------------


def _exported_names() -> set[str]:
    """Sample names gateway/metrics.py exports, from its source: counters as ``_total``,
    histograms as ``_bucket``/``_sum``/``_count``, gauges as they are."""
    tree = ast.parse(Path(gateway.metrics.__file__).read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args):
            continue
        first = node.args[0]
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            continue
        kind, name = node.func.id, first.value
        if kind == "CounterMetricFamily":
            names.add(name + "_total")
        elif kind == "HistogramMetricFamily":
            names.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
        elif kind == "GaugeMetricFamily":
            names.add(name)
    return names


def _targets(panels: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in panels:
        yield from ((panel, target) for target in panel.get("targets", []))
        yield from _targets(panel.get("panels", []))


def test_grafana_dashboard_queries_only_exported_metrics() -> None:
    board = json.loads(GRAFANA.read_text(encoding="utf-8"))
    exported = _exported_names()
    assert "gateway_variant_requests_total" in exported  # the parser found the families
    # Provisionable from a file: no import-time ${DS_...} inputs, a datasource variable.
    assert "__inputs" not in board
    assert "DS_PROMETHEUS" not in GRAFANA.read_text(encoding="utf-8")
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("request rate", "error", "p99", "batch", "queue", "weight", "shadow", "drift"):
        assert topic in titles, topic
    assert "rollout" in titles
    used: set[str] = set()
    targets = list(_targets(panels))
    assert len(targets) >= 10
    for panel, target in targets:
        expr = target["expr"]
        assert expr.strip(), panel["title"]
        assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        # Identifiers followed by "(" are PromQL functions; the rest must be our metrics.
        names = set(re.findall(r"\bgateway_[a-z0-9_]+\b", expr))
        unknown = names - exported
        assert not unknown, f"{panel['title']}: {sorted(unknown)} not in gateway/metrics.py"
        assert names, f"{panel['title']}: queries no gateway metric"
        used |= names
    for name in (
        "gateway_variant_requests_total",
        "gateway_variant_errors_total",
        "gateway_request_duration_seconds_bucket",
        "gateway_batch_size_bucket",
        "gateway_queue_depth",
        "gateway_route_weight",
        "gateway_shadow_agreement_ratio",
        "gateway_drift_max_psi",
        "gateway_drift_psi",
        "gateway_rollout_state",
        "gateway_outcome_accuracy",
        "gateway_feedback_items_total",
        "gateway_alert_deliveries_total",
    ):
        assert name in used, name


# -- the browser test -------------------------------------------------------------------------


def _require_browser() -> None:
    missing = []
    if not CHROMIUM.is_file():
        missing.append(str(CHROMIUM))
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package")
    if missing:
        why = f"{' and '.join(missing)} not installed: run scripts/install-browser"
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the dashboard browser test: {why}")
        pytest.skip(why)


@dataclass
class _Rig:
    running: RunningGateway
    admin_url: str
    data_url: str


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Rig]:
    _require_browser()
    root = tmp_path_factory.mktemp("dashboard-repo")
    shutil.copytree(EXAMPLE_REPOSITORY / MODEL, root / MODEL)
    running = RunningGateway(gateway_settings(root, **FAST_DRIFT, **ADMIN)).start()
    try:
        assert running.gateway is not None
        port = running.gateway.admin_port
        assert port > 0, "the gateway opened no admin listener"
        yield _Rig(running, f"http://127.0.0.1:{port}", f"http://{running.http_url}")
    finally:
        running.stop()


def _send_traffic(
    http: httpx.Client, data_url: str, requests: int, seed: int, version: str = ""
) -> None:
    """``requests`` inferences of 40 reference rows with "mean radius" shifted (so the
    drift plot has something to show); to ``version``, or routed when "" (random split)."""
    reference = np.load(EXAMPLE_REPOSITORY / MODEL / "reference.npy").astype(np.float32)
    rng = np.random.default_rng(seed)
    path = f"/v2/models/{MODEL}" + (f"/versions/{version}" if version else "") + "/infer"
    for _ in range(requests):
        batch = reference[rng.integers(0, len(reference), 40)].copy()
        batch[:, 0] *= 1.4
        body = {
            "inputs": [
                {
                    "name": "features",
                    "shape": list(batch.shape),
                    "datatype": "FP32",
                    "data": batch.ravel().tolist(),
                }
            ]
        }
        response = http.post(data_url + path, json=body)
        assert response.status_code == 200, response.text


def _send_feedback(http: httpx.Client, data_url: str) -> None:
    """Four answered requests to version 1 with known ids, then their ground truth."""
    reference = np.load(EXAMPLE_REPOSITORY / MODEL / "reference.npy").astype(np.float32)
    ids = [f"dash-feedback-{i}" for i in range(4)]
    for i, rid in enumerate(ids):
        body = {
            "id": rid,
            "inputs": [
                {
                    "name": "features",
                    "shape": [1, 30],
                    "datatype": "FP32",
                    "data": reference[i].tolist(),
                }
            ],
        }
        answer = http.post(f"{data_url}/v2/models/{MODEL}/versions/1/infer", json=body)
        assert answer.status_code == 200, answer.text
    items = [{"id": rid, "truth": 1} for rid in ids]
    sent = http.post(f"{data_url}/v2/models/{MODEL}/feedback", json={"items": items})
    assert sent.status_code == 200, sent.text
    assert sent.json()["matched"] == 4, sent.text


def _route_weights(http: httpx.Client, admin_url: str) -> dict[str, float]:
    response = http.get(f"{admin_url}/admin/v1/routes", headers=OP)
    assert response.status_code == 200, response.text
    variants = response.json()["routes"][MODEL]["variants"]
    return {v["version"]: v["weight"] for v in variants}


def test_dashboard_in_chromium(rig: _Rig) -> None:
    from playwright.sync_api import expect, sync_playwright

    t0 = time.perf_counter()
    http = httpx.Client(timeout=30)
    gw = rig.running.gateway
    assert gw is not None
    split = http.put(
        f"{rig.admin_url}/admin/v1/routes/{MODEL}/weights",
        headers=OP,
        json={"weights": {"1": 70, "2": 30}, "reason": "dashboard test split"},
    )
    assert split.status_code == 200, split.text
    # Pinned traffic makes what the assertions need certain; routed traffic shows the split.
    _send_traffic(http, rig.data_url, 12, seed=1, version="1")
    _send_traffic(http, rig.data_url, 6, seed=2)

    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{rig.admin_url}/dashboard?interval={POLL_MS}")
            by = page.get_by_test_id
            expect(by("connection-status")).to_have_text("not connected")

            # A wrong token: the API's 401 is shown and polling stops.
            by("token-input").fill("not-a-token")
            by("token-save").click()
            expect(by("connection-status")).to_have_text("token rejected")
            expect(by("error-banner")).to_contain_text("401")
            expect(by("error-banner")).to_contain_text("a valid bearer token is required")

            by("token-input").fill(OPERATOR_SECRET)
            by("token-save").click()
            expect(by("connection-status")).to_have_text("connected")
            expect(by("error-banner")).to_be_hidden()
            assert page.evaluate("sessionStorage.getItem('gateway.admin.token')") == (
                OPERATOR_SECRET
            )
            assert by("token-input").input_value() == ""

            # The live split and readiness.
            expect(by(f"split-row-{MODEL}-1")).to_have_attribute("data-weight", "70.0")
            expect(by(f"split-row-{MODEL}-2")).to_have_attribute("data-weight", "30.0")
            expect(by(f"split-row-{MODEL}-1")).to_have_attribute("data-ready", "true")
            expect(by(f"weight-{MODEL}-2")).to_have_text("30.0%")
            expect(by(f"ready-{MODEL}-2")).to_have_text("ready")

            # Request rate and p99 from successive /metrics scrapes.
            expect(by("last-update")).not_to_have_attribute("data-polls", re.compile(r"^[01]$"))
            _send_traffic(http, rig.data_url, 8, seed=3, version="1")
            expect(by(f"rate-{MODEL}-1")).not_to_have_text("—")
            expect(by(f"rate-{MODEL}-1")).not_to_have_text("0.00")
            expect(by(f"p99-{MODEL}-1")).not_to_have_text("—")

            # Drift: a line plot per top feature, a bar chart of PSI per feature.
            plot = by(f"drift-plot-{MODEL}-1")
            expect(plot.locator("svg").first).to_be_visible()
            expect(plot.locator('svg:not([data-testid*="-output-"])')).to_have_count(5)
            expect(by(f"drift-series-{MODEL}-1-mean radius")).to_have_attribute(
                "data-points", re.compile(r"^([2-9]|\d\d+)$")
            )
            expect(by(f"drift-barchart-{MODEL}-1").locator("rect.bar")).to_have_count(30)
            worst = by(f"drift-barchart-{MODEL}-1").locator("rect.bar").first
            expect(worst).to_have_attribute("data-feature", "mean radius")

            # Axes: PSI values on the left, local times (hh:mm:ss) below.
            x_axis = by(f"axis-x-{MODEL}-1-mean radius").locator("text")
            expect(x_axis).to_have_count(2)
            expect(x_axis.first).to_have_text(re.compile(r"^\d\d:\d\d:\d\d$"))
            expect(by(f"axis-y-{MODEL}-1-mean radius").locator("text")).to_have_count(3)
            # Output drift has its own plots.
            outputs = plot.locator('svg[data-testid*="-output-"]')
            expect(outputs.first).to_be_visible()
            expect(outputs.first).to_have_attribute("aria-label", re.compile("output"))

            # Outcomes per variant, from ground truth sent as feedback.
            _send_feedback(http, rig.data_url)
            expect(by(f"outcome-row-{MODEL}-1")).to_have_attribute("data-joined", "4")
            expect(by(f"accuracy-{MODEL}-1")).to_have_text(re.compile(r"^\d+(\.\d)?%$"))

            # A reload keeps the last hour: the server's history seeds the charts at once.
            page.reload()
            expect(by("connection-status")).to_have_text("connected")
            samples = int(page.get_attribute("body", "data-history-samples") or "0")
            assert samples >= 4, samples
            series = by(f"drift-series-{MODEL}-1-mean radius")
            points = int(series.get_attribute("data-points") or "0")
            assert points >= min(samples, 4), (points, samples)
            expect(by(f"outcome-row-{MODEL}-1")).to_have_attribute("data-joined", "4")

            # Set weights through the page: the route changes through the API.
            by(f"weights-input-{MODEL}-1").fill("100")
            by(f"weights-input-{MODEL}-2").fill("0")
            by(f"weights-submit-{MODEL}").click()
            expect(by(f"action-status-{MODEL}")).to_contain_text("A reason is required")
            by(f"reason-{MODEL}").fill("all traffic to 1 (dashboard test)")
            by(f"weights-submit-{MODEL}").click()
            expect(by(f"action-status-{MODEL}")).to_contain_text("Weights set")
            assert _route_weights(http, rig.admin_url) == {"1": 100.0, "2": 0.0}
            expect(by(f"split-row-{MODEL}-1")).to_have_attribute("data-weight", "100.0")

            # A canary started through the API; rolled back from the page.
            started = http.post(
                f"{rig.admin_url}/admin/v1/rollouts",
                headers=OP,
                json={
                    "model": MODEL,
                    "stable": "1",
                    "candidate": "2",
                    "policy": {"steps": [20, 100]},
                    "reason": "dashboard test canary",
                },
            )
            assert started.status_code == 201, started.text
            expect(by(f"rollout-status-{MODEL}")).to_have_text("canary")
            expect(by(f"split-row-{MODEL}-2")).to_have_attribute("data-weight", "20.0")
            expect(by(f"action-resume-{MODEL}")).to_be_disabled()
            by(f"reason-{MODEL}").fill("dashboard test: roll back")
            by(f"action-rollback-{MODEL}").click()
            expect(by(f"action-status-{MODEL}")).to_contain_text("rolled_back")
            expect(by(f"rollout-status-{MODEL}")).to_have_text("rolled_back")
            expect(by(f"history-row-{MODEL}").first).to_contain_text("rollback")
            expect(by(f"split-row-{MODEL}-2")).to_have_attribute("data-weight", "0.0")
            assert _route_weights(http, rig.admin_url) == {"1": 100.0, "2": 0.0}
            status = http.get(f"{rig.admin_url}/admin/v1/rollouts/{MODEL}", headers=OP).json()
            assert status["status"] == "rolled_back"
            assert status["history"][-1]["reason"] == "dashboard test: roll back"
            route = rig.running.on_loop(lambda: gw.router.get_route(MODEL))
            assert route is not None
            assert {v.version: v.weight for v in route.variants}["2"] == 0.0

            # A viewer token reads everything; its changes are refused by the API (403), shown.
            by("token-clear").click()
            expect(by("connection-status")).to_have_text("not connected")
            by("token-input").fill(VIEWER_SECRET)
            by("token-save").click()
            expect(by("connection-status")).to_have_text("connected")
            by(f"reason-{MODEL}").fill("a viewer tries")
            by(f"weights-submit-{MODEL}").click()
            expect(by(f"action-status-{MODEL}")).to_contain_text("403")
            expect(by(f"action-status-{MODEL}")).to_contain_text("viewer")
            assert _route_weights(http, rig.admin_url) == {"1": 100.0, "2": 0.0}

            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        finally:
            browser.close()
    http.close()
    logger.info("dashboard browser test took %.1f s", time.perf_counter() - t0)
