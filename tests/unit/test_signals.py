"""rollout/signals.py: the signals a rollout is judged on, gathered from real traffic.

Two real model versions (and one that always fails) are loaded through ``control.py`` and
served through the data plane; the gatherer reads the router's traffic windows and, through
``OutcomeWindows``, the prediction memory's ground truth, from a worker thread as the
rollout controller does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import numpy as np
import pytest

from bench.models import failing, mlp
from gateway.config import DriftSettings, FeedbackSettings, RuntimeSettings
from gateway.control import ModelLifecycle
from gateway.dataplane import DataPlane
from gateway.drift.buffer import BufferedObserver
from gateway.drift.monitor import DriftMonitor
from gateway.errors import ModelExecutionError
from gateway.feedback import PredictionMemory
from gateway.repository import ModelRepository
from gateway.rollout.policy import RolloutPolicy, RolloutState
from gateway.rollout.signals import OutcomeWindows, SignalGatherer
from gateway.router import Router
from gateway.types import FeedbackItem, InferRequest, Tensor

ROWS = 150  # above compare()'s 100 samples per arm


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("signals")
    mlp(root / "m" / "1" / "model.onnx", [32, 16, 3], seed=0, name="m")
    mlp(root / "m" / "2" / "model.onnx", [32, 16, 3], seed=9, name="m")
    failing(root / "m" / "3" / "model.onnx", outputs=3)
    (root / "m" / "config.toml").write_text('max_batch_size = 256\ndefault_version = "1"\n')
    return root


def _state(stable: str, candidate: str, step_index: int = 0, rid: str = "r1") -> RolloutState:
    return RolloutState(
        model="m",
        stable_version=stable,
        candidate_version=candidate,
        rollout_id=rid,
        status="canary",
        policy=msgspec.convert({"steps": [5, 50]}, RolloutPolicy),
        step_index=step_index,
        candidate_weight=5.0,
        step_started_at=0.0,
        created_at=0.0,
        updated_at=0.0,
        actor="test",
        reason="test",
    )


Scenario = Callable[[DataPlane, SignalGatherer], Awaitable[None]]


def _run(root: Path, scenario: Scenario) -> None:
    """Serve ``m`` through the real parts and run ``scenario`` on the event loop."""

    async def main() -> None:
        repository = ModelRepository(root, RuntimeSettings(inference_workers=1))
        repository.start()
        router = Router(seed=0)
        monitor = DriftMonitor(DriftSettings())
        control = ModelLifecycle(
            repository, router, monitor, BufferedObserver(monitor.observe), drift_enabled=False
        )
        memory = PredictionMemory(FeedbackSettings())
        plane = DataPlane(
            router, server_name="t", server_version="0", is_ready=lambda: True, memory=memory
        )
        outcomes = OutcomeWindows(memory)
        outcomes.start(asyncio.get_running_loop())
        try:
            await control.load("m", {})
            await scenario(plane, SignalGatherer(router, monitor, outcomes))
        finally:
            await control.retire_all()
            repository.stop()

    asyncio.run(main())


async def _infer(plane: DataPlane, version: str, rows: int = 1) -> np.ndarray:
    x = np.random.default_rng(int(version)).normal(size=(rows, 32)).astype(np.float32)
    request = InferRequest("m", version, [Tensor("INPUT0", "FP32", (rows, 32), x)])
    plane.admit(request, None, request_id=f"req-{version}-{rows}")
    response = await plane.infer(request)
    return response.outputs[0].data


def _labels(scores: np.ndarray, shift: int) -> list[int | float | str | list[float]]:
    """Class labels per row: the predicted class (shift 0) or another one (shift 1)."""
    return [(int(c) + shift) % 3 for c in scores.argmax(axis=1)]


def test_traffic_windows_restart_with_each_step(root: Path) -> None:
    async def scenario(plane: DataPlane, gather: SignalGatherer) -> None:
        first = await asyncio.to_thread(gather, _state("1", "2"))
        assert (first.candidate_samples, first.stable_samples) == (0, 0)
        for _ in range(3):
            await _infer(plane, "1")
        await _infer(plane, "2")
        seen = await asyncio.to_thread(gather, _state("1", "2"))
        assert (seen.candidate_samples, seen.stable_samples) == (1, 3)
        assert (seen.candidate_error_rate, seen.stable_error_rate) == (0.0, 0.0)
        assert seen.candidate_p99_ms is not None
        assert seen.candidate_p99_ms > 0
        assert seen.candidate_requests_total == 1
        # A new step starts a new window; the cumulative count carries on.
        await _infer(plane, "2")
        step = await asyncio.to_thread(gather, _state("1", "2", step_index=1))
        assert (step.candidate_samples, step.candidate_requests_total) == (0, 2)
        # No drift profile is registered: drift is not measured, so not judged.
        assert step.input_drift_psi is None
        assert not step.drift_sufficient
        assert step.outcome_pvalue is None

    _run(root, scenario)


def test_a_failing_candidate_shows_its_error_rate(root: Path) -> None:
    async def scenario(plane: DataPlane, gather: SignalGatherer) -> None:
        await asyncio.to_thread(gather, _state("1", "3"))
        await _infer(plane, "1")
        for _ in range(2):
            with pytest.raises(ModelExecutionError):
                await _infer(plane, "3")
        seen = await asyncio.to_thread(gather, _state("1", "3"))
        assert (seen.candidate_samples, seen.candidate_error_rate) == (2, 1.0)
        assert seen.stable_error_rate == 0.0

    _run(root, scenario)


def test_outcomes_count_from_the_first_judgement_and_see_a_worse_candidate(root: Path) -> None:
    async def scenario(plane: DataPlane, gather: SignalGatherer) -> None:
        stable = await _infer(plane, "1", ROWS)
        candidate = await _infer(plane, "2", ROWS)
        # Truth for the earlier predictions: the stable version right, the candidate wrong.
        right, wrong = _labels(stable, 0), _labels(candidate, 1)
        await plane.feedback("m", [FeedbackItem(f"req-1-{ROWS}", right)])
        await plane.feedback("m", [FeedbackItem(f"req-2-{ROWS}", wrong)])
        # Joined before this rollout was first judged: not in its window.
        before = await asyncio.to_thread(gather, _state("1", "2"))
        assert before.outcome_pvalue is None
        stable = await _infer(plane, "1", ROWS + 1)
        candidate = await _infer(plane, "2", ROWS + 1)
        right, wrong = _labels(stable, 0), _labels(candidate, 1)
        result = await plane.feedback(
            "m",
            [FeedbackItem(f"req-1-{ROWS + 1}", right), FeedbackItem(f"req-2-{ROWS + 1}", wrong)],
        )
        assert result.matched == 2
        after = await asyncio.to_thread(gather, _state("1", "2"))
        assert after.outcome_worse is True
        assert after.outcome_pvalue is not None
        assert after.outcome_pvalue < 1e-6

    _run(root, scenario)


def test_a_rollout_started_again_never_inherits_the_earlier_window(root: Path) -> None:
    async def scenario(plane: DataPlane, gather: SignalGatherer) -> None:
        await asyncio.to_thread(gather.begin_window, _state("1", "3", rid="old"))
        for _ in range(3):
            with pytest.raises(ModelExecutionError):
                await _infer(plane, "3")
        old = await asyncio.to_thread(gather, _state("1", "3", rid="old"))
        assert (old.candidate_samples, old.candidate_errors) == (3, 3)
        assert gather.candidate_failures(_state("1", "3", rid="old")) == 3
        # The same versions, a new rollout: its window starts empty.
        await asyncio.to_thread(gather.begin_window, _state("1", "3", rid="new"))
        new = await asyncio.to_thread(gather, _state("1", "3", rid="new"))
        assert (new.candidate_samples, new.candidate_errors) == (0, 0)
        with pytest.raises(ModelExecutionError):
            await _infer(plane, "3")
        new = await asyncio.to_thread(gather, _state("1", "3", rid="new"))
        assert (new.candidate_samples, new.candidate_errors, new.stable_errors) == (1, 1, 0)

    _run(root, scenario)
