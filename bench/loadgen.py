"""python -m bench.loadgen: a closed-loop V2 load generator, the same client for every server.

N workers each keep one request in flight (request -> response -> next request), so the
offered load is concurrency N. Modes:

- ``http-json``: V2 ``POST /v2/models/<m>/infer`` with the tensor as JSON ``data``.
- ``http-binary``: the V2 binary tensor extension (``Inference-Header-Content-Length``,
  ``binary_data_size``; the output requested as binary too).
- ``grpc``: ``ModelInfer`` with ``raw_input_contents`` (what Triton's clients send).
- ``grpc-stream``: ``ModelStreamInfer``, one bidirectional stream per worker.
- ``plain-json``: ``POST <path>`` with ``{"<key>": [[...]]}`` for servers without V2
  (Ray Serve, BentoML); ``--path`` and ``--json-key`` set the route and body.

The client shares two cores with the server, so it must be cheap per request: requests are
encoded once; HTTP is a minimal HTTP/1.1 keep-alive client on an ``asyncio.Protocol``
(status line, Content-Length or chunked body; no header dictionary, no tensor decoding) on
uvloop; gRPC sends pre-serialised bytes through grpc.aio (no per-request protobuf work;
the message is built with the gateway's own generated stubs, which live in a private
descriptor pool). A response counts as an error unless it is HTTP 200 / gRPC OK (and, for
streams, carries no ``error_message``).

Timing: a warm-up, then a fixed measurement window. The process prints ``START`` and
``END`` lines on stdout at the window's edges (so a parent can read the server's CPU time at
the same instants), then one JSON line: throughput (completions in the window / window
length), latency percentiles (ms) of the requests that completed in the window, error
count, and the client's own CPU time per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import resource
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, cast

__all__ = ["MODES", "LoadResult", "Target", "main", "percentile", "run"]

MODES: Final = ("http-json", "http-binary", "grpc", "grpc-stream", "plain-json")
_WORKERS_PER_CHANNEL: Final = 8  # one HTTP/2 connection carries ~8 closed-loop workers well
_RECONNECT_PAUSE_S: Final = 0.05  # keeps a refused connection from spinning a core
_STREAM_CLOSE_S: Final = 5.0  # a server answers a half-close at once; cancel after this
_GRPC_INFER: Final = "/inference.GRPCInferenceService/ModelInfer"
_GRPC_STREAM: Final = "/inference.GRPCInferenceService/ModelStreamInfer"


@dataclass(frozen=True)
class Target:
    """What to call: ``address`` is ``host:port``; ``rows`` x ``width`` FP32 per request."""

    mode: str
    address: str
    model: str
    width: int
    rows: int = 1
    path: str = ""
    json_key: str = "instances"
    input_name: str = "INPUT0"
    output_name: str = "OUTPUT0"
    seed: int = 0

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


@dataclass
class LoadResult:
    """One measurement window. Latencies in ms; throughput in requests/s."""

    mode: str
    concurrency: int
    window_s: float
    count: int
    errors: int
    throughput: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    client_cpu_ms_per_request: float
    first_error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class _Stats:
    """Shared counters; workers append latencies only for completions inside the window."""

    def __init__(self) -> None:
        self.window_start = float("inf")
        self.window_end = float("inf")
        self.stop = False
        self.latencies_ns: list[int] = []
        self.errors = 0
        self.first_error = ""

    def record(self, start_ns: int, ok: bool, error: str = "") -> None:
        end = time.perf_counter_ns()
        if self.window_start <= end * 1e-9 <= self.window_end:
            if ok:
                self.latencies_ns.append(end - start_ns)
            else:
                self.errors += 1
        if not ok and not self.first_error:
            self.first_error = error[:500]


def _values(target: Target) -> list[float]:
    """Realistic rows (standard normal, fixed seed): random bytes would mean NaN and 1e38."""
    rng = random.Random(target.seed)
    return [round(rng.gauss(0.0, 1.0), 6) for _ in range(target.rows * target.width)]


# --------------------------------------------------------------------------- HTTP


def http_request(target: Target) -> bytes:
    """The whole request (head and body), encoded once and reused for every call."""
    values = _values(target)
    shape = [target.rows, target.width]
    path = target.path or f"/v2/models/{target.model}/infer"
    extra_headers = ""
    if target.mode == "http-json":
        body = json.dumps(
            {
                "inputs": [
                    {"name": target.input_name, "shape": shape, "datatype": "FP32", "data": values}
                ],
                "outputs": [{"name": target.output_name}],
            },
            separators=(",", ":"),
        ).encode()
        content_type = "application/json"
    elif target.mode == "http-binary":
        blob = struct.pack(f"<{len(values)}f", *values)
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": target.input_name,
                        "shape": shape,
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": len(blob)},
                    }
                ],
                "outputs": [{"name": target.output_name, "parameters": {"binary_data": True}}],
            },
            separators=(",", ":"),
        ).encode()
        body = header + blob
        content_type = "application/octet-stream"
        extra_headers = f"Inference-Header-Content-Length: {len(header)}\r\n"
    elif target.mode == "plain-json":
        rows = [values[i * target.width : (i + 1) * target.width] for i in range(target.rows)]
        body = json.dumps({target.json_key: rows}, separators=(",", ":")).encode()
        content_type = "application/json"
    else:
        raise ValueError(f"not an HTTP mode: {target.mode}")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {target.address}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra_headers}\r\n"
    )
    return head.encode() + body


class _HttpConnection(asyncio.Protocol):
    """One keep-alive connection; ``call`` writes the request and awaits the status code.

    Parses only what framing needs: the status code, Content-Length or chunked encoding,
    and ``Connection: close``. The body is skipped, never decoded.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False
        self._status = 0
        self._body_left = -1  # bytes of body still to come; -1 while reading the head
        self._chunked = False
        self._close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; both have write/close.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    def call(self, request: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            self._parse()
        except ValueError as exc:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(exc)
            if self.transport is not None:
                self.transport.close()

    def _parse(self) -> None:
        buf = self.buffer
        if self._body_left < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            del buf[: end + 4]
            self._status = int(head[9:12])
            self._chunked = b"transfer-encoding: chunked" in head
            self._close_after = b"connection: close" in head
            if self._chunked:
                self._body_left = 0
            else:
                # "\r\n" first: Inference-Header-Content-Length also ends in content-length.
                at = head.find(b"\r\ncontent-length:")
                if at < 0:
                    raise ValueError("response without Content-Length or chunked encoding")
                stop = head.find(b"\r\n", at + 2)
                self._body_left = int(head[at + 17 : stop if stop > 0 else None])
        if self._chunked:
            if not self._skip_chunks():
                return
        else:
            if len(buf) < self._body_left:
                return
            del buf[: self._body_left]
        self._body_left = -1
        if self._close_after and self.transport is not None:
            self.transport.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self._status)

    def _skip_chunks(self) -> bool:
        """Consume complete chunks; True once the terminating zero-size chunk is read."""
        buf = self.buffer
        while True:
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                return False
            size = int(bytes(buf[:line_end]).split(b";")[0], 16)
            if size == 0:
                trailer_end = buf.find(b"\r\n\r\n", line_end)
                if trailer_end < 0:
                    return False
                del buf[: trailer_end + 4]
                return True
            if len(buf) < line_end + 2 + size + 2:
                return False
            del buf[: line_end + 2 + size + 2]


async def _http_worker(target: Target, request: bytes, stats: _Stats) -> None:
    loop = asyncio.get_running_loop()
    conn: _HttpConnection | None = None
    while not stats.stop:
        if conn is None or conn.closed:
            try:
                _, conn = await loop.create_connection(_HttpConnection, target.host, target.port)
            except OSError as exc:
                stats.record(time.perf_counter_ns(), False, f"connect: {exc}")
                await asyncio.sleep(_RECONNECT_PAUSE_S)
                continue
        start = time.perf_counter_ns()
        try:
            status = await conn.call(request)
        except (ConnectionError, ValueError) as exc:
            stats.record(start, False, str(exc))
            conn = None
            continue
        if status == 200:
            stats.record(start, True)
        else:
            stats.record(start, False, f"HTTP {status}")
    if conn is not None and conn.transport is not None:
        conn.transport.close()


# --------------------------------------------------------------------------- gRPC


def grpc_request(target: Target) -> bytes:
    """A serialised ModelInferRequest with ``raw_input_contents`` (built once)."""
    from gateway._proto import grpc_service_pb2 as pb

    values = _values(target)
    request = pb.ModelInferRequest(model_name=target.model, id="")
    tensor = request.inputs.add()
    tensor.name = target.input_name
    tensor.datatype = "FP32"
    tensor.shape.extend([target.rows, target.width])
    request.outputs.add().name = target.output_name
    request.raw_input_contents.append(struct.pack(f"<{len(values)}f", *values))
    data: bytes = request.SerializeToString()
    return data


def _grpc_options() -> list[tuple[str, Any]]:
    # Unlimited sizes as Triton's clients set them (PROTOCOL.md trap 3); a local subchannel
    # pool so that each channel opens its own TCP connection instead of sharing one.
    return [
        ("grpc.max_send_message_length", -1),
        ("grpc.max_receive_message_length", -1),
        ("grpc.use_local_subchannel_pool", 1),
    ]


async def _grpc_unary_worker(channel: Any, request: bytes, stats: _Stats) -> None:
    import grpc

    # No serializer: bytes go out as they are, and the reply stays undecoded bytes.
    call = channel.unary_unary(_GRPC_INFER)
    while not stats.stop:
        start = time.perf_counter_ns()
        try:
            await call(request)
        except grpc.aio.AioRpcError as exc:
            stats.record(start, False, f"{exc.code()}: {exc.details()}")
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                await asyncio.sleep(_RECONNECT_PAUSE_S)
            continue
        stats.record(start, True)


async def _grpc_stream_worker(channel: Any, request: bytes, stats: _Stats) -> None:
    import grpc

    method = channel.stream_stream(_GRPC_STREAM)
    while not stats.stop:
        stream = method()
        try:
            while not stats.stop:
                start = time.perf_counter_ns()
                await stream.write(request)
                reply = await stream.read()
                if reply is grpc.aio.EOF:
                    stats.record(start, False, "stream closed by server")
                    break
                # ModelStreamInferResponse field 1 is error_message: proto3 writes it (tag
                # 0x0a) only when non-empty, so the first byte tells success apart.
                if reply[:1] == b"\x0a":
                    stats.record(start, False, "stream error_message")
                else:
                    stats.record(start, True)
            await _close_stream(stream)
        except grpc.aio.AioRpcError as exc:
            stats.record(time.perf_counter_ns(), False, f"{exc.code()}: {exc.details()}")
            stream.cancel()
            await asyncio.sleep(_RECONNECT_PAUSE_S)


async def _close_stream(stream: Any) -> None:
    """Half-close and drain: the polite end of a stream. Cancelling 64 streams at once
    (RST_STREAM) crashed tritonserver 2.51's python backend once here; a client that
    finishes normally never does that, so neither does the benchmark."""
    import grpc

    try:
        await asyncio.wait_for(stream.done_writing(), _STREAM_CLOSE_S)
        while await asyncio.wait_for(stream.read(), _STREAM_CLOSE_S) is not grpc.aio.EOF:
            pass
    except (TimeoutError, grpc.aio.AioRpcError):
        stream.cancel()


# --------------------------------------------------------------------------- driver


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of pre-sorted values; 0.0 when empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(
    target: Target,
    concurrency: int,
    warmup_s: float,
    measure_s: float,
    on_window: Callable[[str], None] | None = None,
) -> LoadResult:
    """Drive ``target`` with ``concurrency`` closed-loop workers; blocks for the run.

    ``on_window`` is called with ``"START"`` and ``"END"`` at the window's edges.
    """
    if target.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {target.mode!r}")
    stats = _Stats()
    channels: list[Any] = []
    workers: list[Awaitable[None]] = []
    if target.mode.startswith("grpc"):
        import grpc

        grpc_bytes = grpc_request(target)
        n_channels = (concurrency + _WORKERS_PER_CHANNEL - 1) // _WORKERS_PER_CHANNEL
        channels = [
            grpc.aio.insecure_channel(target.address, options=_grpc_options())
            for _ in range(n_channels)
        ]
        worker = _grpc_stream_worker if target.mode == "grpc-stream" else _grpc_unary_worker
        workers = [
            worker(channels[i // _WORKERS_PER_CHANNEL], grpc_bytes, stats)
            for i in range(concurrency)
        ]
    else:
        http_bytes = http_request(target)
        workers = [_http_worker(target, http_bytes, stats) for _ in range(concurrency)]
    tasks = [asyncio.ensure_future(w) for w in workers]
    try:
        await asyncio.sleep(warmup_s)
        cpu0 = _cpu_s()
        stats.window_start = time.perf_counter()
        if on_window is not None:
            on_window("START")
        await asyncio.sleep(measure_s)
        stats.window_end = time.perf_counter()
        cpu1 = _cpu_s()
        if on_window is not None:
            on_window("END")
        stats.stop = True
        done, pending = await asyncio.wait(tasks, timeout=_STREAM_CLOSE_S + 5.0)
        for task in pending:
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                stats.errors += 1
                stats.first_error = stats.first_error or repr(task.exception())
    finally:
        for task in tasks:
            task.cancel()
        for channel in channels:
            await channel.close()
    window = stats.window_end - stats.window_start
    lat = sorted(stats.latencies_ns)
    count = len(lat)
    return LoadResult(
        mode=target.mode,
        concurrency=concurrency,
        window_s=round(window, 3),
        count=count,
        errors=stats.errors,
        throughput=count / window if window > 0 else 0.0,
        p50_ms=percentile(lat, 50) / 1e6,
        p90_ms=percentile(lat, 90) / 1e6,
        p99_ms=percentile(lat, 99) / 1e6,
        mean_ms=(sum(lat) / count / 1e6) if count else 0.0,
        client_cpu_ms_per_request=1000 * (cpu1 - cpu0) / max(count, 1),
        first_error=stats.first_error,
    )


def _announce(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--address", required=True, help="host:port")
    parser.add_argument("--model", default="mlp_small")
    parser.add_argument("--width", type=int, default=32, help="input features per row")
    parser.add_argument("--rows", type=int, default=1, help="rows per request")
    parser.add_argument("--input-name", default="INPUT0", help="the model's input tensor")
    parser.add_argument("--output-name", default="OUTPUT0", help="the output requested")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--measure-s", type=float, default=10.0)
    parser.add_argument("--path", default="", help="HTTP route (default the V2 infer route)")
    parser.add_argument("--json-key", default="instances", help="plain-json body key")
    parser.add_argument("--no-uvloop", action="store_true", help="plain asyncio loop")
    parser.add_argument("--announce", action="store_true", help="print START/END lines")
    args = parser.parse_args(argv)
    target = Target(
        mode=args.mode,
        address=args.address,
        model=args.model,
        width=args.width,
        rows=args.rows,
        path=args.path,
        json_key=args.json_key,
        input_name=args.input_name,
        output_name=args.output_name,
    )
    coro = run(
        target,
        args.concurrency,
        args.warmup_s,
        args.measure_s,
        _announce if args.announce else None,
    )
    # uvloop only for HTTP: grpc.aio drives its own completion queue and is tested on the
    # default loop.
    use_uvloop = not args.no_uvloop and not args.mode.startswith("grpc")
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            use_uvloop = False
    result = uvloop.run(coro) if use_uvloop else asyncio.run(coro)
    result.extra["uvloop"] = use_uvloop
    _announce(json.dumps(result.__dict__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
