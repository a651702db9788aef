"""bench.loadgen against a real gateway: every mode the gateway speaks runs clean.

A couple of seconds per mode (the whole file stays under ~30 s), no peer, no network: the
benchmark harness's client must produce zero errors and nonzero throughput, or every
side-by-side number built on it is suspect.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from bench.common import ROOT, GatewayProcess
from bench.models import write_model
from bench.peers.servers import gateway_settings

MODES = ("http-binary", "http-json", "grpc", "grpc-stream")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("bench-smoke")
    write_model(root / "models", "mlp_small", "max_batch_size = 64\n")
    with GatewayProcess(root / "models", gateway_settings(root / "data")) as server:
        yield server


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_loadgen_mode_runs_clean(gateway: GatewayProcess, mode: str) -> None:
    port = gateway.grpc_port if mode.startswith("grpc") else gateway.http_port
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.loadgen",
            "--mode",
            mode,
            "--address",
            f"127.0.0.1:{port}",
            "--model",
            "mlp_small",
            "--width",
            "32",
            "--concurrency",
            "4",
            "--warmup-s",
            "0.5",
            "--measure-s",
            "1.5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["errors"] == 0, result["first_error"]
    assert result["count"] > 0
    assert result["throughput"] > 0
    assert 0 < result["p50_ms"] <= result["p99_ms"]


def test_loadgen_counts_http_errors(gateway: GatewayProcess) -> None:
    """A request the server rejects (unknown model) is an error, not throughput."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.loadgen",
            "--mode",
            "http-json",
            "--address",
            f"127.0.0.1:{gateway.http_port}",
            "--model",
            "no_such_model",
            "--concurrency",
            "2",
            "--warmup-s",
            "0.2",
            "--measure-s",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["count"] == 0
    assert result["errors"] > 0
    assert result["first_error"].startswith("HTTP 4")


def test_batching_served_check_reads_the_device_and_the_answer(gateway: GatewayProcess) -> None:
    """bench.batching's check before a run on another execution provider: the gateway's
    model config names the device, its answer matches an in-process CPU session, and a
    gateway on the CPU fails a check that expects the GPU (a GPU run must not quietly
    measure the CPU)."""
    from bench.batching import CPU, check_served
    from bench.models import MODELS

    path = gateway.repository / "mlp_small" / "1" / "model.onnx"
    width = MODELS["mlp_small"][0]
    checked = check_served(gateway, "mlp_small", path, width, CPU)
    assert checked["instance_kind"] == "KIND_CPU"
    assert checked["max_relative_error_vs_cpu"] < 1e-5
    with pytest.raises(RuntimeError, match="runs mlp_small on KIND_CPU, expected KIND_GPU"):
        check_served(gateway, "mlp_small", path, width, ("CUDAExecutionProvider", *CPU))


def test_batching_reference_refuses_a_provider_it_did_not_get(gateway: GatewayProcess) -> None:
    import onnxruntime as ort

    from bench.batching import ort_session

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    path = gateway.repository / "mlp_small" / "1" / "model.onnx"
    with pytest.raises(RuntimeError, match="asked for CUDAExecutionProvider"):
        ort_session(path, providers=("CUDAExecutionProvider", "CPUExecutionProvider"))


@pytest.mark.slow
def test_gateway_process_runs_workers_and_counts_their_cpu(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """bench.scaling's harness: ``GatewayProcess(workers=2)`` returns once both workers
    serve on the shared ports, their loaded-model lines parse, and the process tree's CPU
    (supervisor, workers, private redis-server) counts the workers' work, which the
    supervisor's own figure does not."""
    from bench.common import cpu_seconds, tree_cpu_seconds
    from bench.scaling import _LOADED

    root = tmp_path_factory.mktemp("bench-workers")
    write_model(root / "models", "mlp_small", "max_batch_size = 8\n")
    settings = gateway_settings(root / "data")
    with GatewayProcess(root / "models", settings, workers=2) as server:
        loaded = _LOADED.findall(server.log_text())
        assert [device for device, _, _ in loaded] == ["CPU", "CPU"], loaded
        tree0, own0 = tree_cpu_seconds(server.pid), cpu_seconds(server.pid)
        done = subprocess.run(
            [
                sys.executable, "-m", "bench.loadgen", "--mode", "grpc",
                "--address", f"127.0.0.1:{server.grpc_port}", "--model", "mlp_small",
                "--width", "32", "--concurrency", "8", "--warmup-s", "0.2", "--measure-s", "1",
            ],
            capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.strip().splitlines()[-1])["errors"] == 0
        tree = tree_cpu_seconds(server.pid) - tree0
        own = cpu_seconds(server.pid) - own0
    assert tree > 0.2, tree  # about a second of serving
    assert own < tree / 4, (own, tree)
