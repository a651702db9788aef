"""Dynamic batching seen from outside: many concurrent callers get exactly their own rows,
a full queue answers at once, expired and cancelled requests never reach the model."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest

from gateway._proto import grpc_service_pb2 as pb
from gateway._proto import grpc_service_pb2_grpc as pb_grpc
from gateway.batcher import Batcher
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
    async def main() -> tuple[int, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=f"http://{server.http_url}", timeout=60) as c:
            with _pool_held(server) as release:
                posts = [
                    asyncio.create_task(c.post("/v2/models/slow/infer", json=_slow_body(8)))
                    for _ in range(16)
                ]
                refused = await _full_then_refused(server, posts)
                release.set()
            return refused, await asyncio.gather(*posts)

    refused, responses = asyncio.run(main())
    codes = [r.status_code for r in responses]
    assert sorted(codes) == [200] * (16 - refused) + [503] * refused, codes
    rejected = [r for r in responses if r.status_code == 503]
    assert "max_queue_size" in rejected[0].json()["error"]


def test_full_queue_answers_at_once_grpc(server: RunningGateway) -> None:
    async def main() -> tuple[int, list[Any]]:
        async with grpc.aio.insecure_channel(server.grpc_url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            x = np.full((8, 512), 0.25, np.float32)
            msg = pb.ModelInferRequest(model_name="slow")
            msg.inputs.add(name="INPUT0", datatype="FP32", shape=[8, 512])
            msg.raw_input_contents.append(x.tobytes())
            with _pool_held(server) as release:
                calls = [asyncio.ensure_future(stub.ModelInfer(msg, timeout=60)) for _ in range(16)]
                refused = await _full_then_refused(server, calls)
                release.set()
            return refused, await asyncio.gather(*calls, return_exceptions=True)

    refused, results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(errors) == refused, results
    assert {e.code() for e in errors} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert "max_queue_size" in errors[0].details()


async def _full_then_refused(server: RunningGateway, calls: list[Any]) -> int:
    """With every inference thread held, the slow model (one instance, 8-row requests in
    8-row batches, max_queue_size 4) takes one request to run and queues four, and the rest
    are answered at once; returns how many were refused. Eleven, or twelve when all five
    first requests were queued before the first was taken to run (the fifth then met a
    full queue): either way every request is accounted for before the pool is released."""
    batcher = _slow_batcher(server)
    deadline = time.monotonic() + 10
    while True:
        refused: int = sum(call.done() for call in calls)
        depth = server.on_loop(lambda: batcher.queue_depth)
        if depth + 1 + refused == len(calls):  # queued, running, refused
            break
        assert time.monotonic() < deadline, f"{depth} queued, {refused} answered"
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.05)  # nothing more is answered while the pool is held
    assert sum(call.done() for call in calls) == refused
    assert refused in (11, 12)
    return refused


def _slow_batcher(server: RunningGateway) -> Batcher:
    assert server.gateway is not None
    return server.gateway.router.resolve("slow", "1").batcher


async def _until(server: RunningGateway, what: str, check: Callable[[Batcher], bool]) -> None:
    """Until ``check`` holds for the slow model's batcher, read on the gateway's loop: the
    order the tests below need is seen on the server, not assumed from sleeps."""
    batcher = _slow_batcher(server)
    deadline = time.monotonic() + 10
    while not server.on_loop(lambda: check(batcher)):
        assert time.monotonic() < deadline, f"never {what}"
        await asyncio.sleep(0.0005)


async def _queued(server: RunningGateway, depth: int) -> None:
    """Until exactly ``depth`` requests wait in the slow model's queue (the batch taken to
    run is not in it)."""
    await _until(server, f"{depth} queued", lambda b: b.queue_depth == depth)


@contextlib.contextmanager
def _pool_held(server: RunningGateway) -> Iterator[threading.Event]:
    """Every inference thread waits on the event (set it, or leave the block, to go on):
    the first batch dispatched meanwhile counts as running but cannot start, so the
    requests after it queue however slowly they arrive. The order then holds by
    construction, not because the model is slower than the client (a loaded machine
    broke that: the first batch finished before the third request came)."""
    assert server.gateway is not None
    pool = server.gateway.repository.executor
    release = threading.Event()
    workers = server.gateway.settings.runtime.inference_workers
    holders = [pool.submit(release.wait, 60) for _ in range(workers)]
    try:
        yield release
    finally:
        release.set()
        for holder in holders:
            holder.result(10)


def test_expired_requests_never_reach_the_model(server: RunningGateway) -> None:
    before = _stats(server, "slow")
    # Three full batches (one taken to run, two waiting) and two late one-row requests
    # behind them, while no inference thread is free: the late ones' 1 ms deadlines (the
    # V2 timeout parameter, in µs, and the header) pass in the queue.
    bodies = [_slow_body(8) for _ in range(3)]
    late = [_slow_body(1, parameters={"timeout": 1000}), _slow_body(1)]

    async def main() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=f"http://{server.http_url}", timeout=60) as c:
            with _pool_held(server) as release:
                first = [
                    asyncio.create_task(c.post("/v2/models/slow/infer", json=b)) for b in bodies
                ]
                await _queued(server, 2)
                expired = await asyncio.gather(
                    c.post("/v2/models/slow/infer", json=late[0]),
                    c.post(
                        "/v2/models/slow/infer", json=late[1], headers={"x-request-timeout-ms": "1"}
                    ),
                )
                release.set()
                return await asyncio.gather(*first), list(expired)

    served, expired = asyncio.run(main())
    assert [r.status_code for r in served] == [200, 200, 200]
    for r in expired:
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
            with _pool_held(server) as release:
                # Three full batches, no inference thread free: one taken to run, two wait.
                busy = [stub.ModelInfer(request(8), timeout=60) for _ in range(3)]
                await _queued(server, 2)
                cancelled = stub.ModelInfer(request(1), timeout=60)
                await _queued(server, 3)
                batcher = _slow_batcher(server)
                gone = server.on_loop(lambda: batcher.stats.cancelled)
                cancelled.cancel()
                # A 2 ms deadline passes in the queue (or on the way: either way not run).
                late = stub.ModelInfer(request(1), timeout=0.002)
                try:
                    await late
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                # The cancel has reached the queue before the model may run again.
                await _until(server, "the cancel seen", lambda b: b.stats.cancelled > gone)
                await _queued(server, 2)
                release.set()
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


def _config_parameters(protocol: str, url: str, model: str) -> dict[str, str]:
    conn = client(protocol, url)
    try:
        if protocol == "grpc":
            params = conn.get_model_config(model).config.parameters
            return {key: value.string_value for key, value in params.items()}
        return {k: v["string_value"] for k, v in conn.get_model_config(model)["parameters"].items()}
    finally:
        conn.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_model_config_reports_the_batching_choice(server: RunningGateway, protocol: str) -> None:
    """What the load chose is in the model config (Triton's string parameters), as the
    batcher uses it: the slow model runs in the pool with the fill size measured from the
    warm-up's rows/s per batch size; the tiny MLP runs inline, with no fill size."""
    url = server.http_url if protocol == "http" else server.grpc_url
    slow = _config_parameters(protocol, url, "slow")
    assert slow["execution"] == "pool"
    rates = dict(pair.split(":") for pair in slow["warmup_rows_per_s"].split(","))
    assert [int(rows) for rows in rates] == [1, 2, 4, 8]
    assert all(float(rate) > 0 for rate in rates.values())
    assert slow["fill_batch_size"] in rates
    assert int(slow["fill_batch_size"]) == _slow_batcher(server).fill_rows
    small = _config_parameters(protocol, url, "mlp_small")
    assert small == {"execution": "inline", "fill_batch_size": "0"}
