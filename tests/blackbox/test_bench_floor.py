"""bench.floor's smoke mode end to end, and the bare servers' handling of bad input.

The smoke run starts the gateway and the five bare servers on loopback, drives each once
with bench.loadgen (one short round, about 20-30 s on two shared cores) and must report a
CPU-per-request figure and a gateway/bare ratio for every protocol with no failed cell:
every floor figure rests on this harness. The bare servers must refuse a malformed
request with a clear error, never answer it with garbage.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.bare import BadRequestError, Floor
from bench.common import ROOT
from bench.models import write_model
from gateway._proto import grpc_service_pb2 as pb


@pytest.mark.slow
@pytest.mark.timeout(210)
def test_floor_smoke_reports_every_protocol(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.floor", "--smoke", "--results-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=200,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    payload = json.loads((tmp_path / "floor_smoke.json").read_text())
    servers = {(row["server"], row["protocol"]) for row in payload["summary"]}
    assert servers == {
        ("gateway", "grpc"),
        ("gateway", "grpc-stream"),
        ("gateway", "http-binary"),
        ("grpc_aio", "grpc"),
        ("grpc_sync", "grpc"),
        ("grpc_stream", "grpc-stream"),
        ("asgi", "http-binary"),
        ("starlette", "http-binary"),
    }
    for row in payload["summary"]:
        assert row["throughput"] > 0
        assert 0 < row["cpu_ms_per_request"] < 50, row
        assert 0 < row["p50_ms"] <= row["p99_ms"]
    targets = {r["protocol"] for r in payload["ratios"] if r["target"] is not None}
    assert targets == {"grpc", "grpc-stream", "http-binary"}
    assert "Gateway / bare" in (tmp_path / "floor_smoke.md").read_text()


@pytest.fixture(scope="module")
def floor(tmp_path_factory: pytest.TempPathFactory) -> Floor:
    path = write_model(tmp_path_factory.mktemp("floor") / "models", "mlp_small")
    return Floor("mlp_small", str(path))


def _grpc_request(
    shape: list[int], datatype: str = "FP32", nbytes: int = 0
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="mlp_small")
    request.inputs.add(name="INPUT0", datatype=datatype, shape=shape)
    request.raw_input_contents.append(b"\0" * (nbytes or 4 * int(np.prod(shape))))
    return request


def test_bare_grpc_answers_a_row_and_counts_it(floor: Floor) -> None:
    before = floor.success_count
    reply = floor.grpc_infer(_grpc_request([2, 32]))
    assert list(reply.outputs[0].shape) == [2, 2]
    assert len(reply.raw_output_contents[0]) == 16
    assert floor.success_count == before + 1


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (_grpc_request([1, 31]), "shape"),
        (_grpc_request([65, 32]), "shape"),
        (_grpc_request([1, 32], datatype="FP64"), "datatype"),
        (_grpc_request([1, 32], nbytes=64), "bytes"),
    ],
)
def test_bare_grpc_refuses_bad_input(
    floor: Floor, request_: pb.ModelInferRequest, message: str
) -> None:
    with pytest.raises(BadRequestError, match=message):
        floor.grpc_infer(request_)


def test_bare_http_binary_round_trip_and_bad_header_length(floor: Floor) -> None:
    header = b'{"inputs":[{"name":"INPUT0","shape":[1,32],"datatype":"FP32"}]}'
    body = header + np.ones(32, np.float32).tobytes()
    content_type, out, hlen = floor.http_infer(body, len(header))
    assert content_type == b"application/octet-stream"
    assert json.loads(out[:hlen])["outputs"][0]["parameters"]["binary_data_size"] == 8
    assert len(out) == hlen + 8
    with pytest.raises(BadRequestError, match="out of range"):
        floor.http_infer(body, len(body) + 1)


@pytest.mark.timeout(120)
def test_handler_cost_pairs_the_gateway_with_the_bare_handlers() -> None:
    """bench.handler_cost's in-process rounds (one tiny round, nothing written): every
    step answers (a failed infer raises), and each gets a positive cost per request."""
    import uvloop

    from bench.handler_cost import _measure

    cells = uvloop.run(_measure(rounds=1, requests=8, cold_mb=0.25))
    assert set(cells) == {"listener", "features", "cold", "floor", "floor_cold"}
    for part in ("floor", "floor_cold"):
        assert set(cells[part]) == {
            "grpc/bare",
            "grpc/decode",
            "grpc/decode + data plane",
            "grpc/gateway",
            "http/bare",
            "http/gateway",
        }
    assert all(v > 0 for values in cells.values() for costs in values.values() for v in costs)


@pytest.mark.timeout(180)
def test_gateway_handler_probe_serves_the_bare_handler(tmp_path: Path) -> None:
    """bench.floor's probe: the gateway's process answers ModelInfer with the bare handler
    (one row in, its two scores out; a wrong shape refused with INVALID_ARGUMENT) while its
    other RPCs stay the gateway's own (server metadata names the gateway)."""
    import grpc

    from bench.floor import BARE_EXTRA
    from bench.peers.servers import ServerProcess
    from gateway._proto import grpc_service_pb2_grpc as pb_grpc

    spec = next(s for s in BARE_EXTRA if s.name == "gateway_handler")
    path = write_model(tmp_path / "models", "mlp_small", "max_batch_size = 64\n")
    with ServerProcess(spec, {"mlp_small": str(path)}) as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            reply = stub.ModelInfer(_grpc_request([1, 32]), timeout=10)
            assert reply.model_version == "1"
            assert list(reply.outputs[0].shape) == [1, 2]
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(_grpc_request([1, 31]), timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "shape" in (refused.value.details() or "")
            metadata = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10)
            assert metadata.name == "gateway"  # the bare servers answer "bare"
            assert "model_repository" in metadata.extensions
        finally:
            channel.close()
