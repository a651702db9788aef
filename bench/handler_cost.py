"""python -m bench.handler_cost: what the gateway's own Python costs per request, in-process.

Served figures (bench.floor, bench.features_cost) include the kernel's socket work, the
client's and a shared machine's noise, which moves them by 10-30% between runs. This
measures the gateway's request path alone, interleaved, so whatever the machine does falls
on every configuration alike:

- ``listener``: uvicorn's httptools protocol and the gateway's listener protocol (header
  limits, header deadline, response writer) fed the same request bytes in memory, the same
  trivial ASGI app behind both.
- ``features``: one gateway per bench.features_cost configuration, all in this process
  (the bundled breast_cancer, which ships a drift profile); their HTTP and gRPC infer
  handlers called directly with the same binary one-row request (bench.features_cost's
  typical row);
- ``cold``: the features again with ``--cold-mb`` MB of memory read between requests
  (not timed), so each request starts with cold caches, as a served one does after the
  kernel's socket work and the client's.
- ``floor``: bench.floor's pairing in-process: the gateway with bench.floor's settings and
  bench.bare's gRPC handler and Starlette route around their own session of the same model
  (mlp_small), each gRPC request parsed from its bytes and its answer serialised; warm and
  (``floor_cold``) cold. Its extra column is the part of bench.floor's gap that is the
  gateway's own Python; the rest of a served request (grpc's core, the kernel, the context
  switches between grpc's threads) is the same for both.

CPU time of the calling thread per request, the least over alternating rounds (noise on a
shared machine only ever adds, and it comes in bursts that can cover half the rounds, so
the median moves with it; the median is reported beside it); background
threads (the drift aggregator, the prediction-log writer) are in bench.features_cost, not
here. Results: bench/results/handler_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from bench.common import environment, table
from bench.common import write_results as write
from bench.features_cost import CONFIGS, typical_row
from bench.peers.servers import gateway_settings

Step = Callable[[], Awaitable[None]]

_MODEL = "breast_cancer"
_REQUEST_BYTES = (
    b"POST /v2/models/m/infer HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: loadgen\r\n"
    b"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: 120\r\n"
    b"Content-Length: 248\r\n\r\n" + b"x" * 248
)


async def _rounds(
    steps: dict[str, Step], rounds: int, requests: int, cold_mb: float = 0.0
) -> dict[str, list[float]]:
    """µs of this thread's CPU per call of each step, ``rounds`` alternating rounds. With
    ``cold_mb``, that many MB of memory are read between calls (not timed), so each call
    starts with caches cold, as a served request does after the sockets, the kernel and
    the other connections' work."""
    names = list(steps)
    for name in names:  # warm every path (caches, first-call allocations)
        for _ in range(requests // 4):
            await steps[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    # One float64 per 64-byte cache line: every line of the block is read.
    trash = np.ones(int(cold_mb * (1 << 20)) // 8)[::8] if cold_mb > 0 else None
    for rnd in range(rounds):
        for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
            step = steps[name]
            if trash is None:
                start = time.thread_time()
                for _ in range(requests):
                    await step()
                spent = time.thread_time() - start
            else:
                spent = 0.0
                for _ in range(requests):
                    trash.sum()
                    start = time.thread_time()
                    await step()
                    spent += time.thread_time() - start
            out[name].append(spent / requests * 1e6)
    return out


# --------------------------------------------------------------------------- listener


class _Transport:
    """What uvicorn's protocol uses of a transport, in memory; counts the writes."""

    def __init__(self) -> None:
        self.written = asyncio.Event()
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.set()

    def writelines(self, data: Iterable[bytes]) -> None:
        self.written.set()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _trivial_app(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"{}"})


def _listener_steps() -> dict[str, Step]:
    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from gateway.config import LimitsSettings
    from gateway.listener_limits import uvicorn_limits

    loop = asyncio.get_running_loop()
    limits = uvicorn_limits(LimitsSettings())
    common: dict[str, Any] = {"lifespan": "off", "access_log": False, "server_header": False}
    common["date_header"] = False
    plain = Config(_trivial_app, http="httptools", **common)
    gateway = Config(_trivial_app, **common, **limits)

    def step(config: Config, cls: type[Any]) -> Step:
        config.load()
        protocol = cls(config=config, server_state=ServerState(), app_state={}, _loop=loop)
        transport = _Transport()
        protocol.connection_made(transport)

        async def one() -> None:
            written = transport.written
            written.clear()
            protocol.data_received(_REQUEST_BYTES)
            await written.wait()  # the app's task answers on the next turns of the loop
            if protocol.cycle is not None and not protocol.cycle.response_complete:
                await asyncio.sleep(0)  # the body follows the head on the same turn

        return one

    return {"uvicorn": step(plain, HttpToolsProtocol), "gateway": step(gateway, limits["http"])}


# --------------------------------------------------------------------------- features


class _GrpcContext:
    """The servicer context calls the infer handler makes, answered in memory."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("user-agent", "grpc-python"),)

    def time_remaining(self) -> float | None:
        return None

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"gRPC infer failed: {code} {details}")


class _Request:
    """One binary V2 infer request of one row, as both front ends receive it: the ASGI
    scope and body (the scope carries the keys Starlette reads; the gateway's app ignores
    them) and the gRPC request's bytes, parsed afresh by each gRPC step."""

    def __init__(self, model: str, path: str, input_name: str, x: np.ndarray) -> None:
        from gateway._proto import grpc_service_pb2 as pb

        head = msgspec.json.encode(
            {
                "inputs": [
                    {
                        "name": input_name,
                        "datatype": "FP32",
                        "shape": list(x.shape),
                        "parameters": {"binary_data_size": x.nbytes},
                    }
                ],
                "parameters": {"binary_data_output": True},
            }
        )
        body = head + x.tobytes()
        self.scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "server": ("127.0.0.1", 8000),
            "client": ("127.0.0.1", 50000),
            "root_path": "",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": [
                (b"content-length", str(len(body)).encode()),
                (b"inference-header-content-length", str(len(head)).encode()),
                (b"content-type", b"application/octet-stream"),
            ],
            "extensions": {},
        }
        self.received = {"type": "http.request", "body": body, "more_body": False}
        tensor = pb.ModelInferRequest.InferInputTensor(
            name=input_name, datatype="FP32", shape=list(x.shape)
        )
        self.grpc = pb.ModelInferRequest(
            model_name=model, inputs=[tensor], raw_input_contents=[x.tobytes()]
        ).SerializeToString()
        self._parse = pb.ModelInferRequest.FromString

    async def receive(self) -> dict[str, Any]:
        return self.received

    async def send(self, event: dict[str, Any]) -> None:
        if event["type"] == "http.response.start" and event["status"] != 200:
            raise RuntimeError(f"HTTP infer answered {event['status']}")

    def http_step(self, app: Any) -> Step:
        """A step that calls ``app`` with a copy of the scope (Starlette writes to it)."""
        scope, receive, send = self.scope, self.receive, self.send

        async def one() -> None:
            await app(dict(scope), receive, send)

        return one

    def grpc_step(self, servicer: Any) -> Step:
        """A step that parses the request's bytes, calls ``servicer``'s ModelInfer and
        serialises its answer, as grpc.aio does around a served call."""
        message, parse, context = self.grpc, self._parse, _GrpcContext()

        async def one() -> None:
            (await servicer.ModelInfer(parse(message), context)).SerializeToString()

        return one


async def _gateway(
    stack: contextlib.AsyncExitStack, root: Path, name: str, settings: str, repository: Path
) -> Any:
    """A gateway in this process with ``settings`` (TOML) on ``repository``, its listeners on
    free ports; stopped when ``stack`` closes."""
    from gateway.app import serve
    from gateway.config import load_settings

    path = root / f"{name}.toml"
    path.write_text(settings)
    overrides: dict[str, Any] = {"model_repository": str(repository)}
    overrides.update({"http.port": 0, "grpc.port": 0, "log_level": "WARNING"})
    return await stack.enter_async_context(serve(load_settings(path, overrides=overrides)))


async def _feature_steps(
    stack: contextlib.AsyncExitStack, root: Path
) -> dict[tuple[str, str], Step]:
    x = np.asarray([typical_row(root / "models" / _MODEL)], np.float32)
    one = _Request(_MODEL, f"/v2/models/{_MODEL}/infer", "features", x)
    steps: dict[tuple[str, str], Step] = {}
    for name, (features, _scrape) in CONFIGS.items():
        # Top-level keys before the first table: the configuration's, then the run's own.
        first, rest = gateway_settings(root / f"data-{name}").split("\n", 1)
        settings = f"{first}\n{features}{rest}"
        gateway = await _gateway(stack, root, name, settings, root / "models")
        steps[(name, "http")] = one.http_step(gateway.http.app)
        steps[(name, "grpc")] = one.grpc_step(gateway.inference)
    return steps


# --------------------------------------------------------------------------- floor


async def _floor_steps(stack: contextlib.AsyncExitStack, root: Path) -> dict[str, Step]:
    """bench.floor's pairing in-process: the gateway with bench.floor's settings (its
    defaults: feedback memory on, 1% access log) and bench.bare's handlers around their own
    session of the same model (mlp_small), gRPC and HTTP binary, each request parsed from
    its bytes and its answer serialised, as a served one is."""
    from bench.bare import Floor, starlette_app
    from bench.floor import MODEL, MODEL_CONFIG
    from bench.models import write_model
    from gateway._proto import grpc_service_pb2 as pb
    from gateway.codecs import v2_grpc

    path = write_model(root / "floor-models", MODEL, MODEL_CONFIG)
    floor = Floor(MODEL, str(path))
    settings = gateway_settings(root / "floor-data")
    gateway = await _gateway(stack, root, "floor", settings, root / "floor-models")
    width = floor.model.input_width
    x = np.linspace(-1.0, 1.0, width, dtype=np.float32).reshape(1, width)
    one = _Request(MODEL, floor.infer_path, "INPUT0", x)
    parse = pb.ModelInferRequest.FromString

    async def grpc_bare() -> None:
        floor.grpc_infer(parse(one.grpc)).SerializeToString()

    # The gateway's handler in stages: the V2 decode alone, then with the data plane's call
    # (admission, routing, validation, the model call and its statistics, the response
    # hook); the full handler adds the encode and the call's bookkeeping.
    plane = gateway.plane

    async def grpc_decode() -> None:
        v2_grpc.decode_infer_request(parse(one.grpc))

    async def grpc_data_plane() -> None:
        infer = v2_grpc.decode_infer_request(parse(one.grpc))
        plane.admit(infer, None)
        await plane.infer(infer)

    return {
        "grpc/bare": grpc_bare,
        "grpc/decode": grpc_decode,
        "grpc/decode + data plane": grpc_data_plane,
        "grpc/gateway": one.grpc_step(gateway.inference),
        "http/bare": one.http_step(starlette_app(floor)),
        "http/gateway": one.http_step(gateway.http.app),
    }


# --------------------------------------------------------------------------- report


async def _measure(rounds: int, requests: int, cold_mb: float) -> dict[str, Any]:
    listener = await _rounds(_listener_steps(), rounds, requests)
    root = Path(tempfile.mkdtemp(prefix="bench-handler-"))
    try:
        from gateway.config import EXAMPLE_REPOSITORY

        shutil.copytree(EXAMPLE_REPOSITORY / _MODEL, root / "models" / _MODEL)
        async with contextlib.AsyncExitStack() as stack:
            steps = await _feature_steps(stack, root)
            by_name = {f"{c}/{p}": s for (c, p), s in steps.items()}
            floor_steps = await _floor_steps(stack, root)
            floor = await _rounds(floor_steps, rounds, requests)
            floor_cold = None
            if cold_mb > 0:
                floor_cold = await _rounds(floor_steps, rounds, max(requests // 4, 1), cold_mb)
            features = await _rounds(by_name, rounds, requests)
            cold = None
            if cold_mb > 0:  # a quarter of the requests: the reads cost more than a request
                cold = await _rounds(by_name, rounds, max(requests // 4, 1), cold_mb)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = {"listener": listener, "features": features, "floor": floor}
    if cold and floor_cold:
        out |= {"cold": cold, "floor_cold": floor_cold}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.handler_cost", description=__doc__)
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds")
    parser.add_argument("--requests", type=int, default=3000, help="requests per cell")
    parser.add_argument(
        "--cold-mb",
        type=float,
        default=8.0,
        help="the features again with this many MB read between requests (0: skip)",
    )
    args = parser.parse_args(argv)
    meta = environment()
    meta["command"] = "python -m bench.handler_cost " + " ".join(argv or sys.argv[1:])
    import uvloop

    cells = uvloop.run(_measure(args.rounds, args.requests, args.cold_mb))
    least = {part: {k: min(v) for k, v in values.items()} for part, values in cells.items()}
    med = {
        part: {k: statistics.median(v) for k, v in values.items()} for part, values in cells.items()
    }

    def row(part: str, label: str, key: str, base: str) -> list[str]:
        cost, median = least[part][key], med[part][key]
        extra, extra_median = cost - least[part][base], median - med[part][base]
        return [part, label, f"{cost:.1f}", f"{extra:+.1f}", f"{median:.1f} ({extra_median:+.1f})"]

    rows = [row("listener", name, name, "uvicorn") for name in least["listener"]]
    for part in ("features", "cold") if "cold" in cells else ("features",):
        for protocol in ("http", "grpc"):
            rows += [
                row(part, f"{protocol} {name}", f"{name}/{protocol}", f"all_off/{protocol}")
                for name in CONFIGS
            ]
    for part in ("floor", "floor_cold") if "floor_cold" in cells else ("floor",):
        rows += [
            row(part, key.replace("/", " "), key, key.split("/")[0] + "/bare")
            for key in cells[part]
        ]
    summary = {"least_us": least, "median_us": med}
    md = (
        "# The gateway's own cost per request, in-process\n\n"
        f"`{meta['command']}` at {meta['git_sha']}, {meta['date']}; {args.rounds} alternating "
        f"rounds of {args.requests} requests per cell; this thread's CPU time, the least "
        "over the rounds (the median beside it). "
        "Listener: uvicorn's httptools protocol vs the gateway's, the same trivial app, "
        "requests fed in memory. Features: breast_cancer, one binary one-row infer request, "
        "the handler called directly; the extra column is over uvicorn's protocol "
        "(listener) or over all-off (features). Cold: the features again with "
        f"{args.cold_mb:g} MB read between requests (not timed), so each request starts with "
        "cold caches as a served one does. Floor: bench.floor's pairing (mlp_small), the "
        "gateway with its defaults against bench.bare's gRPC handler and Starlette route "
        "around their own session, the extra column over the bare one (the gRPC handler also in "
        "stages: the V2 decode alone, then with the data plane's call); floor_cold: the "
        "same cold. gRPC requests are parsed from their bytes and answers serialised, as served; "
        "the in-memory servicer context answers what grpc.aio's builds per call (the call's "
        "metadata: a few µs served).\n\n"
        + table(["part", "configuration", "µs per request", "extra µs", "median (extra)"], rows)
    )
    write("handler_cost", {"meta": meta, "summary": summary, "cells": cells}, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
