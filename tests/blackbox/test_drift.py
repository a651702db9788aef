"""Drift end to end: traffic with one shifted feature through the real server shows that
feature drifting; a profile that does not fit its model is refused with the reason."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from gateway.drift.report import DriftReport
from gateway.errors import InvalidInputError
from tests.clients import client, infer
from tests.conftest import RunningGateway, gateway_settings


@pytest.fixture(scope="module")
def drift_server(
    repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    root = tmp_path_factory.mktemp("drift-repo")
    shutil.copytree(repository / "breast_cancer", root / "breast_cancer")
    shutil.copytree(repository / "mlp_small", root / "mlp_small")
    shutil.copy(repository / "breast_cancer" / "profile.npz", root / "mlp_small" / "profile.npz")
    settings = gateway_settings(
        root, **{"drift.sub_window_s": 0.2, "drift.sub_windows": 50, "drift.tick_s": 0.05}
    )
    running = RunningGateway(settings).start()
    yield running
    running.stop()


def _report(server: RunningGateway, version: str, want_rows: int) -> DriftReport:
    assert server.gateway is not None
    gateway = server.gateway
    deadline = time.monotonic() + 30
    while True:
        report = server.on_loop(lambda: gateway.drift_report("breast_cancer", version))
        if report.inputs and report.inputs[0].n >= want_rows:
            return report
        assert time.monotonic() < deadline, report
        time.sleep(0.05)


def test_shifted_feature_is_reported(drift_server: RunningGateway, repository: Path) -> None:
    reference = np.load(repository / "breast_cancer" / "reference.npy")
    rng = np.random.default_rng(11)
    conn = client("grpc", drift_server.grpc_url)
    rows = 0
    for _ in range(25):
        batch = reference[rng.integers(0, len(reference), 60)].copy()
        batch[:, 0] *= 1.4  # "mean radius" shifts; every other feature keeps its reference law
        infer(
            "grpc",
            drift_server.grpc_url,
            "breast_cancer",
            {"features": batch},
            version="1",
            connection=conn,
        )
        rows += 60
    conn.close()
    report = _report(drift_server, "1", rows)
    worst = report.inputs[0]
    assert worst.name == "mean radius"
    assert worst.verdict == "drift"
    others = [f for f in report.inputs[1:] if f.verdict == "drift"]
    assert not others, [(f.name, f.psi) for f in others]
    assert report.profile_hash


def test_profile_that_does_not_fit_is_refused(drift_server: RunningGateway) -> None:
    assert drift_server.gateway is not None
    gateway = drift_server.gateway
    with pytest.raises(InvalidInputError, match=r"30 input features.*32"):
        drift_server.on_loop(lambda: gateway.drift_report("mlp_small"))
    got, _ = infer(
        "http", drift_server.http_url, "mlp_small", {"INPUT0": np.ones((1, 32), np.float32)}
    )
    assert got["OUTPUT0"].shape == (1, 2)  # the model still serves
