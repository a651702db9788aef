"""Dynamic batching seen from outside: many concurrent callers get exactly their own rows,
a full queue answers at once, expired and cancelled requests never reach the model."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest

from gateway._proto import grpc_service_pb2 as pb
from gateway._proto import grpc_service_pb2_grpc as pb_grpc
from tests.clients import PROTOCOLS, Array, client, infer
from tests.conftest import RunningGateway


def _stats(server: RunningGateway, model: str) -> dict[str, Any]:
    conn = client("http", server.http_url)
    stats: dict[str, Any] = conn.get_inference_statistics(model, "1")["model_stats"][0]
    conn.close()
    return stats


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_concurrent_callers_get_their_own_rows(
    server: RunningGateway, repository: Path, protocol: str
) -> None:
    session = ort.InferenceSession(str(repository / "heavy" / "1" / "model.onnx"))
    url = server.http_url if protocol == "http" else server.grpc_url
    before = _stats(server, "heavy")
    failures: list[str] = []
    sent_rows = 0
    lock = threading.Lock()

    def caller(seed: int) -> None:
        nonlocal sent_rows
        rng = np.random.default_rng(seed)
        conn = client(protocol, url)
        try:
            for _ in range(8):
                n = int(rng.integers(1, 9))
                x = rng.standard_normal((n, 256)).astype(np.float32)
                got, _ = infer(protocol, url, "heavy", {"INPUT0": x}, connection=conn)
                want = session.run(None, {"INPUT0": x})[0]
                if got["OUTPUT0"].shape != want.shape or not np.allclose(
                    got["OUTPUT0"], want, rtol=1e-4, atol=1e-5
                ):
                    failures.append(f"seed {seed}: rows differ")
                with lock:
                    sent_rows += n
        except Exception as exc:  # collected and reported below
            failures.append(f"seed {seed}: {exc}")
        finally:
            conn.close()

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    after = _stats(server, "heavy")
    requests = (
        after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
    )
    assert requests == 12 * 8
    assert after["inference_count"] - before["inference_count"] == sent_rows
    executions = after["execution_count"] - before["execution_count"]
    assert executions < requests, "concurrent requests should have shared model calls"
    sizes = {b["batch_size"] for b in after["batch_stats"]}
    assert max(sizes) > 8  # some batch held rows of several callers


async def _flood(
    url: str, bodies: list[dict[str, Any]], headers: dict[str, str] | None = None
) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=f"http://{url}", timeout=60) as c:
        return await asyncio.gather(
            *(c.post("/v2/models/slow/infer", json=b, headers=headers) for b in bodies)
        )


def _slow_body(rows: int, **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "INPUT0",
                "shape": [rows, 512],
                "datatype": "FP32",
                "data": [0.25] * (rows * 512),
            }
        ],
        **extra,
    }


def test_full_queue_answers_at_once_http(server: RunningGateway) -> None:
    responses = asyncio.run(_flood(server.http_url, [_slow_body(8) for _ in range(16)]))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert 503 in codes
    assert 200 in codes
    rejected = [r for r in responses if r.status_code == 503]
    assert "max_queue_size" in rejected[0].json()["error"]


def test_full_queue_answers_at_once_grpc(server: RunningGateway) -> None:
    async def main() -> list[Any]:
        async with grpc.aio.insecure_channel(server.grpc_url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            x = np.full((8, 512), 0.25, np.float32)
            msg = pb.ModelInferRequest(model_name="slow")
            msg.inputs.add(name="INPUT0", datatype="FP32", shape=[8, 512])
            msg.raw_input_contents.append(x.tobytes())
            return await asyncio.gather(
                *(stub.ModelInfer(msg, timeout=60) for _ in range(16)), return_exceptions=True
            )

    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert errors
    assert len(errors) < len(results)
    assert {e.code() for e in errors} == {grpc.StatusCode.RESOURCE_EXHAUSTED}


async def _queued(server: RunningGateway, depth: int) -> None:
    """Until ``depth`` requests wait in the slow model's queue (the call running is not in
    it): the order the tests below need is seen on the server, not assumed from sleeps."""
    assert server.gateway is not None
    batcher = server.gateway.router.resolve("slow", "1").batcher
    deadline = time.monotonic() + 10
    while server.on_loop(lambda: batcher.queue_depth) < depth:
        assert time.monotonic() < deadline, f"never {depth} queued"
        await asyncio.sleep(0.0005)


def test_expired_requests_never_reach_the_model(server: RunningGateway) -> None:
    before = _stats(server, "slow")
    # Three full batches ahead (one running, two waiting) and two late requests: four
    # waiting, the slow model's queue limit. The late ones must arrive before the model is
    # free: two full batches (and what is left of the running one) leave them tens of ms on
    # a busy machine, over connections already open.
    bodies = [_slow_body(8) for _ in range(3)]
    # Queued behind full batches while another runs, a 1 ms deadline (V2 timeout
    # parameter, in µs, and the header) passes before the model is free.
    late = [_slow_body(1, parameters={"timeout": 1000}), _slow_body(1)]

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=f"http://{server.http_url}", timeout=60) as c:
            # Five connections in the pool before the clock starts (keep-alive).
            await asyncio.gather(*(c.get("/v2/health/live") for _ in range(5)))
            first = [asyncio.create_task(c.post("/v2/models/slow/infer", json=b)) for b in bodies]
            await _queued(server, 2)  # one batch running, two waiting
            second = [
                asyncio.create_task(c.post("/v2/models/slow/infer", json=late[0])),
                asyncio.create_task(
                    c.post(
                        "/v2/models/slow/infer", json=late[1], headers={"x-request-timeout-ms": "1"}
                    )
                ),
            ]
            return await asyncio.gather(*first, *second)

    responses = asyncio.run(main())
    assert [r.status_code for r in responses[:3]] == [200, 200, 200]
    for r in responses[3:]:
        assert r.status_code == 504, r.text[:300]
        assert "timed out" in r.json()["error"]
    after = _stats(server, "slow")
    assert after["inference_count"] - before["inference_count"] == 24  # 1-row ones never ran


def test_grpc_deadline_and_cancel_leave_the_queue(server: RunningGateway) -> None:
    before = _stats(server, "slow")

    def request(rows: int) -> pb.ModelInferRequest:
        msg = pb.ModelInferRequest(model_name="slow")
        msg.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 512])
        msg.raw_input_contents.append(np.full((rows, 512), 0.25, np.float32).tobytes())
        return msg

    async def main() -> tuple[list[Any], grpc.StatusCode, bool]:
        async with grpc.aio.insecure_channel(server.grpc_url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            await channel.channel_ready()
            # Three full batches first: the model runs one (milliseconds a call) and two
            # wait, so a one-row request queued now waits at least two whole calls.
            busy = [stub.ModelInfer(request(8), timeout=60) for _ in range(3)]
            await _queued(server, 2)
            cancelled = stub.ModelInfer(request(1), timeout=60)
            await _queued(server, 3)
            cancelled.cancel()
            # A 2 ms deadline passes in the queue (or on the way: either way not run).
            late = stub.ModelInfer(request(1), timeout=0.002)
            try:
                await late
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            answers = [await call for call in busy]
            return answers, code, cancelled.cancelled()

    answers, code, was_cancelled = asyncio.run(main())
    assert len(answers) == 3
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert was_cancelled
    after = _stats(server, "slow")
    assert after["inference_count"] - before["inference_count"] == 24  # 1-row ones never ran


def test_drain_of_batched_direct_results_match_unbatched(
    server: RunningGateway, repository: Path
) -> None:
    """A request served alone equals onnxruntime on the same rows, bit for bit."""
    session = ort.InferenceSession(str(repository / "heavy" / "1" / "model.onnx"))
    x: Array = np.random.default_rng(1).standard_normal((5, 256)).astype(np.float32)
    got, _ = infer("grpc", server.grpc_url, "heavy", {"INPUT0": x})
    assert np.array_equal(got["OUTPUT0"], session.run(None, {"INPUT0": x})[0])
