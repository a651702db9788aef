"""python -m bench.tls: what TLS costs per request on HTTP and gRPC, and what an
unguessable request id costs.

Two gateway processes on the same mlp_small-shaped model, one plain and one with TLS on
its HTTP and gRPC listeners (a CA and server certificate made for the run with
``cryptography``). One asyncio client process per cell keeps ``--concurrency`` requests in
flight over keep-alive connections (HTTP/1.1 JSON with a pre-encoded body; gRPC
ModelInfer with pre-serialised bytes over one channel), plain and TLS cells alternating in
the same run. Reported per cell: the server's CPU time per completed request (the cost
that matters on a saturated replica), throughput and client-side p50 latency. Handshakes
happen before the window (connections are reused, as a client pool or a load balancer
does), so this is the steady-state cost of encryption. Also: request id generation
(``RequestIds.new``, 128 random bits) against ``secrets.token_hex(16)`` and the former
prefix-and-counter ids. Results: bench/results/tls.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import secrets
import ssl
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import grpc

from bench.common import GatewayProcess, cpu_seconds, environment, table
from bench.common import write_results as write
from bench.models import mlp
from gateway._proto import grpc_service_pb2 as pb
from gateway.logs import RequestIds
from tests.certs import Authority

BASE = "[runtime]\ninference_workers = 2\nintra_op_threads = 1\n"
ROWS, FEATURES = 1, 32
INFER_PATH = "/v2/models/m/infer"


def _json_body() -> bytes:
    data = ",".join(["0.5"] * (ROWS * FEATURES))
    return (
        f'{{"inputs":[{{"name":"INPUT0","shape":[{ROWS},{FEATURES}],'
        f'"datatype":"FP32","data":[{data}]}}]}}'
    ).encode()


def _grpc_body() -> bytes:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[ROWS, FEATURES])
    del tensor
    request.raw_input_contents.append(b"\x00\x00\x00\x3f" * (ROWS * FEATURES))
    return request.SerializeToString()


async def _http_worker(
    port: int, context: ssl.SSLContext | None, stop_at: float, latencies: list[float]
) -> int:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1" if context else None
    )
    body = _json_body()
    head = (
        f"POST {INFER_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    done = 0
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        writer.write(head + body)
        status = await reader.readline()
        length = 0
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await reader.readexactly(length)
        if b" 200 " not in status:
            raise RuntimeError(f"HTTP answer {status!r}")
        latencies.append(time.perf_counter() - started)
        done += 1
    writer.close()
    return done


async def _grpc_worker(channel: grpc.aio.Channel, stop_at: float, latencies: list[float]) -> int:
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    body = _grpc_body()
    done = 0
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        await call(body, timeout=30)
        latencies.append(time.perf_counter() - started)
        done += 1
    return done


async def _cell(
    protocol: str,
    port: int,
    pid: int,
    ca: Path | None,
    concurrency: int,
    warmup_s: float,
    window_s: float,
) -> tuple[int, list[float], float, float]:
    """(requests in the window, latencies, window length, server CPU s in the window)."""
    channel: grpc.aio.Channel | None = None
    context: ssl.SSLContext | None = None
    root_pem = await asyncio.to_thread(ca.read_bytes) if ca is not None else b""
    if ca is not None:
        context = ssl.create_default_context(cafile=str(ca))
    if protocol == "grpc":
        target = f"127.0.0.1:{port}"
        channel = (
            grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_pem))
            if ca is not None
            else grpc.aio.insecure_channel(target)
        )
    loop_start = time.perf_counter()
    warm: list[float] = []
    await asyncio.gather(
        *(
            _http_worker(port, context, loop_start + warmup_s, warm)
            if channel is None
            else _grpc_worker(channel, loop_start + warmup_s, warm)
            for _ in range(concurrency)
        )
    )
    latencies: list[float] = []
    cpu0 = cpu_seconds(pid)
    start = time.perf_counter()
    counts = await asyncio.gather(
        *(
            _http_worker(port, context, start + window_s, latencies)
            if channel is None
            else _grpc_worker(channel, start + window_s, latencies)
            for _ in range(concurrency)
        )
    )
    end = time.perf_counter()
    cpu1 = cpu_seconds(pid)
    if channel is not None:
        await channel.close()
    return sum(counts), latencies, end - start, cpu1 - cpu0


def _measure(
    server: GatewayProcess, protocol: str, ca: Path | None, args: argparse.Namespace
) -> dict[str, Any]:
    port = server.http_port if protocol == "http" else server.grpc_port
    requests, latencies, window, cpu = asyncio.run(
        _cell(protocol, port, server.pid, ca, args.concurrency, args.warmup_s, args.window_s)
    )
    return {
        "requests": requests,
        "window_s": window,
        "throughput_rps": requests / window,
        "server_cpu_ms_per_request": 1000 * cpu / max(requests, 1),
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
    }


def _id_costs() -> dict[str, float]:
    ids = RequestIds()
    counter = itertools.count(1)
    prefix = secrets.token_hex(8)
    number = 200_000

    def best(stmt: Any) -> float:
        return min(timeit.repeat(stmt, number=number, repeat=5)) / number * 1e6

    return {
        "request_ids_new_us": best(ids.new),
        "secrets_token_hex16_us": best(lambda: secrets.token_hex(16)),
        "former_prefix_counter_us": best(lambda: f"{prefix}-{next(counter):x}"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--window-s", type=float, default=3.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds; ratios use the medians"
    )
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    mlp(root / "repo" / "m" / "1" / "model.onnx", [32, 64, 2], seed=0, name="m")
    ca = Authority(root / "ca")
    pair = ca.issue("server", server=True)
    tls = f'cert = "{pair.cert}"\nkey = "{pair.key}"\n'
    settings = {
        "plain": BASE,
        "tls": BASE + "[http.tls]\n" + tls + "[grpc.tls]\n" + tls,
    }
    meta = environment()
    meta["command"] = " ".join(["python -m bench.tls", *(argv or sys.argv[1:])])
    meta["concurrency"] = args.concurrency
    meta["load_average_at_start"] = list(os.getloadavg())
    cells: list[dict[str, Any]] = []
    with (
        GatewayProcess(root / "repo", settings["plain"], "plain") as plain,
        GatewayProcess(root / "repo", settings["tls"], "tls") as secure,
    ):
        for rnd in range(args.rounds):
            for protocol in ("http", "grpc"):
                for mode, server in (("plain", plain), ("tls", secure)):
                    cell = _measure(server, protocol, ca.cert if mode == "tls" else None, args)
                    cell.update(round=rnd, protocol=protocol, mode=mode)
                    cells.append(cell)
                    print(json.dumps(cell), flush=True)
    summary: dict[str, dict[str, float]] = {}
    for protocol in ("http", "grpc"):
        for mode in ("plain", "tls"):
            mine = [c for c in cells if c["protocol"] == protocol and c["mode"] == mode]
            summary[f"{protocol}_{mode}"] = {
                key: statistics.median(c[key] for c in mine)
                for key in ("server_cpu_ms_per_request", "throughput_rps", "p50_ms")
            }
    ids = _id_costs()
    payload = {"meta": meta, "cells": cells, "summary": summary, "request_ids": ids}
    rows = []
    for protocol in ("http", "grpc"):
        p, t = summary[f"{protocol}_plain"], summary[f"{protocol}_tls"]
        rows.append(
            [
                protocol,
                p["server_cpu_ms_per_request"],
                t["server_cpu_ms_per_request"],
                f"{t['server_cpu_ms_per_request'] / p['server_cpu_ms_per_request']:.2f}x",
                p["throughput_rps"],
                t["throughput_rps"],
                p["p50_ms"],
                t["p50_ms"],
            ]
        )
    markdown = (
        "# TLS cost per request\n\n"
        f"`{meta['command']}` — concurrency {args.concurrency}, {args.rounds} alternating "
        f"rounds of {args.window_s:g} s windows, medians; one-row mlp_small-shaped model; "
        "client and servers on the same machine. TLS: ECDSA P-256 server certificate, "
        "connections reused (steady state, handshakes outside the window). Load average "
        f"at start {meta['load_average_at_start'][0]:.1f} on a shared machine: compare "
        "within this run only; per-round cells are in tls.json.\n\n"
        + table(
            [
                "protocol",
                "plain server CPU ms/req",
                "TLS server CPU ms/req",
                "TLS/plain",
                "plain req/s",
                "TLS req/s",
                "plain p50 ms",
                "TLS p50 ms",
            ],
            rows,
        )
        + "\n## Request id generation (µs per id, best of 5)\n\n"
        + table(["method", "µs"], [[k, v] for k, v in ids.items()])
    )
    json_path, md_path = write("tls", payload, markdown)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
