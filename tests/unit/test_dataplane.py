"""dataplane.py: admitting a request (ids, pin, routing key, deadline), remembering answers,
and the statistics selection, on real models loaded through ``control.py``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from bench.models import mlp
from gateway.config import DriftSettings, FeedbackSettings, RuntimeSettings
from gateway.control import ModelLifecycle
from gateway.dataplane import DataPlane
from gateway.drift.buffer import BufferedObserver
from gateway.drift.monitor import DriftMonitor
from gateway.errors import DeadlineExceededError, InvalidInputError, ModelNotFoundError
from gateway.feedback import PredictionMemory
from gateway.repository import ModelRepository
from gateway.router import Router
from gateway.types import FeedbackItem, InferRequest, ParamValue, Route, Tensor, Variant

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _plane(remember: bool = True) -> DataPlane:
    return DataPlane(
        Router(seed=0),
        server_name="t",
        server_version="0",
        is_ready=lambda: True,
        memory=PredictionMemory(FeedbackSettings(enabled=remember)),
    )


def _request(params: dict[str, ParamValue] | None = None, rows: int = 1) -> InferRequest:
    x = np.ones((rows, 4), np.float32)
    return InferRequest("m", "", [Tensor("INPUT0", "FP32", (rows, 4), x)], parameters=params)


def test_request_ids_come_from_the_request_the_caller_or_a_counter() -> None:
    plane = _plane()
    own = _request()
    own.id = "mine"
    plane.admit(own, None, request_id="header")
    assert own.id == "mine"
    given = _request()
    plane.admit(given, None, request_id="header-id")
    assert given.id == "header-id"
    traced = _request()
    plane.admit(traced, None, traceparent=TRACE)
    assert traced.id == "4bf92f3577b34da6a3ce929d0e0e4736"
    a, b = _request(), _request()
    plane.admit(a, None)
    plane.admit(b, None)
    assert a.id and b.id and a.id != b.id  # noqa: PT018 - one fact: two distinct ids
    quiet = _request()
    _plane(remember=False).admit(quiet, None)
    assert quiet.id == ""  # nothing remembers predictions: no id is made up


def test_pin_routing_key_and_deadline() -> None:
    plane = _plane()
    request = _request({"routing_key": 42, "timeout": 250_000})
    before = time.monotonic()
    plane.admit(request, plane.deadline(request, None), pinned="2")
    assert (request.model_version, request.routing_key) == ("2", "42")
    assert request.deadline is not None
    assert before + 0.25 <= request.deadline <= time.monotonic() + 0.25
    keyed = _request({"routing_key": "param"})
    keyed.model_version = "1"
    plane.admit(keyed, plane.deadline(keyed, 1.0), routing_key="header", pinned="2")
    assert (keyed.model_version, keyed.routing_key) == ("1", "header")  # the path wins
    assert plane.deadline(_request({"timeout": 0}), None) is None
    with pytest.raises(DeadlineExceededError):
        plane.deadline(_request(), 0.0)
    for bad in (-1, "soon", True):
        with pytest.raises(InvalidInputError, match="timeout"):
            plane.deadline(_request({"timeout": bad}), None)


Scenario = Callable[[DataPlane], Awaitable[None]]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plane")
    for version in ("1", "2"):
        mlp(root / "m" / version / "model.onnx", [4, 8, 3], seed=int(version), name="m")
    return root


def _serve(root: Path, scenario: Scenario) -> None:
    async def main() -> None:
        repository = ModelRepository(root, RuntimeSettings(inference_workers=1))
        repository.start()
        plane = _plane()
        monitor = DriftMonitor(DriftSettings())
        control = ModelLifecycle(
            repository,
            plane.router,
            monitor,
            BufferedObserver(monitor.observe),
            drift_enabled=False,
        )
        try:
            await control.load("m", {})
            await scenario(plane)
        finally:
            await control.retire_all()
            repository.stop()

    asyncio.run(main())


def test_answers_are_remembered_for_feedback(root: Path) -> None:
    async def scenario(plane: DataPlane) -> None:
        request = _request(rows=2)
        plane.admit(request, None, request_id="r1")
        response = await plane.infer(request)
        labels = [int(c) for c in response.outputs[0].data.argmax(axis=1)]
        result = await plane.feedback("m", [FeedbackItem("r1", list(labels))])
        assert (result.matched, result.unknown_ids) == (1, 0)
        with pytest.raises(ModelNotFoundError):
            await plane.feedback("nope", [FeedbackItem("r1", 0)])
        report = plane.outcomes("m")
        assert report["versions"][response.model_version]["accuracy"] == 1.0

    _serve(root, scenario)


def test_statistics_selection_route_view_and_health(root: Path) -> None:
    async def scenario(plane: DataPlane) -> None:
        assert [(n, v) for n, v, _ in plane.statistics(None)] == [("m", "1"), ("m", "2")]
        assert [(n, v) for n, v, _ in plane.statistics("m", "2")] == [("m", "2")]
        with pytest.raises(ModelNotFoundError):
            plane.statistics("nope")
        assert plane.route_view("m")["variants"] == [{"version": "2", "weight": 1.0, "ready": True}]
        plane.router.set_route(Route("m", (Variant("1", 3), Variant("2", 1))))
        weights = {v["version"]: v["weight"] for v in plane.route_view("m")["variants"]}
        assert weights == {"1": 0.75, "2": 0.25}
        assert plane.is_serving("m", "1") is True
        assert plane.is_serving("nope") is None
        assert plane.is_model_ready("nope") is False

    _serve(root, scenario)
