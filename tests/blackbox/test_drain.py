"""SIGTERM under load: 32 clients on both protocols (HTTP keep-alive, gRPC unary, gRPC
streams) keep sending while the gateway drains. Every request is answered, or refused
cleanly before the server took it (connection refused, 503, UNAVAILABLE; for gRPC also the
CANCELLED that grpc's core gives calls it had not handed over yet); the process exits 0."""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np

from gateway._proto import grpc_service_pb2 as pb
from gateway._proto import grpc_service_pb2_grpc as pb_grpc
from tests.gateway_process import GatewayProcess

_ROW = np.full((1, 32), 0.5, np.float32)
_BODY = {"inputs": [{"name": "INPUT0", "shape": [1, 32], "datatype": "FP32", "data": [0.5] * 32}]}


def _message(i: int) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="mlp_small", id=str(i))
    tensor = message.inputs.add()
    tensor.name, tensor.datatype = "INPUT0", "FP32"
    tensor.shape.extend([1, 32])
    message.raw_input_contents.append(_ROW.tobytes())
    return message


class _Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.lost: list[str] = []

    def add(self, outcome: str, lost: str | None = None) -> None:
        with self.lock:
            self.counts[outcome] += 1
            if lost is not None:
                self.lost.append(lost)


def _http_client(url: str, stop: threading.Event, tally: _Tally) -> None:
    client = httpx.Client(timeout=30)
    while not stop.is_set():
        try:
            answer = client.post(f"{url}/v2/models/mlp_small/infer", json=_BODY)
        except httpx.ConnectError:
            tally.add("http refused")  # the listener is closed: not accepted
            time.sleep(0.01)
            continue
        except httpx.HTTPError as exc:
            tally.add("http lost", f"http: {type(exc).__name__}: {exc}")
            continue
        if answer.status_code == 200:
            tally.add("http ok")
        elif answer.status_code == 503:
            tally.add("http 503")
        else:
            tally.add("http lost", f"http {answer.status_code}: {answer.text[:200]}")
    client.close()


def _grpc_unary(address: str, stop: threading.Event, tally: _Tally) -> None:
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
    i = 0
    while not stop.is_set():
        i += 1
        try:
            stub.ModelInfer(_message(i), timeout=30)
            tally.add("grpc ok")
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                tally.add("grpc unavailable")
                time.sleep(0.01)
            else:
                tally.add("grpc lost", f"grpc unary {exc.code().name}: {exc.details()}")
    channel.close()


def _grpc_stream(address: str, stop: threading.Event, tally: _Tally) -> None:
    """One request in flight at a time on a long-lived stream; a new stream after one
    ends UNAVAILABLE."""
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
    while not stop.is_set():
        outbox: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()

        def requests(
            box: queue.Queue[pb.ModelInferRequest | None] = outbox,
        ) -> Iterator[pb.ModelInferRequest]:
            while (item := box.get()) is not None:
                yield item

        pending = 0
        try:
            responses = stub.ModelStreamInfer(requests(), timeout=60)
            i = 0
            while not stop.is_set():
                i += 1
                outbox.put(_message(i))
                pending = 1
                answer = next(responses)
                pending = 0
                if answer.error_message:
                    tally.add("stream lost", f"stream error: {answer.error_message}")
                else:
                    tally.add("stream ok")
            outbox.put(None)
            for _ in responses:
                pass
        except grpc.RpcError as exc:
            outbox.put(None)
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                # Sent but not taken: the server said so (UNAVAILABLE, retry).
                tally.add("stream unavailable")
                time.sleep(0.01)
            else:
                tally.add("stream lost", f"stream {exc.code().name}: {exc.details()} {pending}")
    channel.close()


def test_sigterm_under_32_clients_loses_nothing(tmp_path: Path, repository: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "mlp_small").symlink_to(repository / "mlp_small")
    gateway = GatewayProcess(root, tmp_path / "data", env={"GATEWAY_GRACE_PERIOD_S": "20"})
    stop = threading.Event()
    tally = _Tally()
    threads = []
    target: Callable[[str, threading.Event, _Tally], None]
    for i in range(32):
        if i < 16:
            target, address = _http_client, gateway.http_url
        elif i < 24:
            target, address = _grpc_unary, gateway.grpc_address
        else:
            target, address = _grpc_stream, gateway.grpc_address
        threads.append(threading.Thread(target=target, args=(address, stop, tally), daemon=True))
    try:
        for thread in threads:
            thread.start()
        time.sleep(2.0)
        before = dict(tally.counts)
        gateway.terminate()
        code = gateway.proc.wait(40)
        time.sleep(0.5)  # clients see the closed listeners
    finally:
        stop.set()
        for thread in threads:
            thread.join(40)
        gateway.stop()
    print(f"before SIGTERM: {before}; at the end: {dict(tally.counts)}")
    assert code == 0
    assert tally.counts["http ok"] > 0
    assert tally.counts["grpc ok"] > 0
    assert tally.counts["stream ok"] > 0
    # grpc's core cancels the calls it has received but not yet handed to a handler when
    # shutdown starts (grpc/grpc#41785): the client sees CANCELLED for a call the server
    # never began. At most one per gRPC client (one call each in flight); the access log,
    # which records every failed call a handler took, shows none was cancelled.
    core_cancelled = [lost for lost in tally.lost if "CANCELLED: CANCELLED" in lost]
    assert len(core_cancelled) <= 16, core_cancelled
    assert [lost for lost in tally.lost if lost not in core_cancelled] == []
    assert not any('"CANCELLED"' in line for line in gateway.lines)
    assert not any("Traceback" in line for line in gateway.lines), "".join(gateway.lines)[-3000:]
