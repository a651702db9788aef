"""Connection limits of the listeners against a real server on loopback: header size and
count (431), the header-read timeout (slowloris, idle sockets), the connection cap (503),
and a gateway under a 512-descriptor limit that 600 idle sockets cannot lock clients out of.
"""

from __future__ import annotations

import contextlib
import re
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from gateway._proto import grpc_service_pb2 as pb
from gateway._proto import grpc_service_pb2_grpc as pb_grpc
from gateway.config import LimitsSettings, parse_duration
from gateway.listener_limits import connection_limit, grpc_options
from tests.conftest import RunningGateway, gateway_settings
from tests.gateway_process import GatewayProcess


def _small_repository(tmp: Path, repository: Path) -> Path:
    root = tmp / "repo"
    root.mkdir()
    for name in ("identity_all", "mlp_small"):
        (root / name).symlink_to(repository / name)
    return root


@pytest.fixture(scope="module")
def limited(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    root = _small_repository(tmp_path_factory.mktemp("limits"), repository)
    settings = gateway_settings(
        root,
        **{
            "limits.header_timeout": "1s",
            "limits.keep_alive_timeout": "1s",
            "limits.max_connections": 40,
        },
    )
    running = RunningGateway(settings).start()
    yield running
    running.stop()


def _address(running: RunningGateway) -> tuple[str, int]:
    host, port = running.http_url.split(":")
    return host, int(port)


def _read_all(sock: socket.socket, limit_s: float = 10.0) -> bytes:
    sock.settimeout(limit_s)
    chunks = []
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except (ConnectionResetError, TimeoutError):
        pass
    return b"".join(chunks)


def _status(answer: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3})", answer)
    assert match, answer[:200]
    return int(match.group(1))


def _dribble(sock: socket.socket, data: bytes, delay_s: float, started: float) -> None:
    """Send ``data`` a byte every ``delay_s`` (a slowloris client) until it is sent, the
    server closes, or 8 s have passed since ``started``."""
    try:
        for byte in data:
            sock.send(bytes([byte]))
            time.sleep(delay_s)
            if time.monotonic() - started > 8:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass


def _send_quietly(sock: socket.socket, data: bytes) -> int:
    """Send ``data``; the bytes sent before the server closed the connection."""
    sent = 0
    view = memoryview(data)
    try:
        while sent < len(data):
            sent += sock.send(view[sent : sent + (1 << 20)])
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def _healthy(running: RunningGateway) -> None:
    assert httpx.get(f"http://{running.http_url}/v2/health/ready", timeout=10).status_code == 200


def test_duration_parser() -> None:
    assert parse_duration("10s") == 10.0
    assert parse_duration("250ms") == 0.25
    assert parse_duration("5m") == 300.0
    assert parse_duration(2) == 2.0
    assert parse_duration("1.5") == 1.5
    for bad in ("nan", "inf", "-1s", "ten", True):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


def test_grpc_options_carry_the_limits() -> None:
    options = dict(grpc_options(LimitsSettings(grpc_max_connection_age="1m"), 1 << 20))
    assert options["grpc.max_receive_message_length"] == 1 << 20
    assert options["grpc.max_concurrent_streams"] == 1024
    assert options["grpc.server_handshake_timeout_ms"] == 10_000
    assert options["grpc.max_connection_age_ms"] == 60_000
    assert options["grpc.max_connection_idle_ms"] == 300_000
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        assert connection_limit(LimitsSettings()) == max(16, soft // 4)
    assert connection_limit(LimitsSettings(max_connections=0)) == 0


def test_too_many_headers_get_431(limited: RunningGateway) -> None:
    headers = "".join(f"x-h{i}: v\r\n" for i in range(101))
    with socket.create_connection(_address(limited)) as sock:
        sock.sendall(f"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        answer = _read_all(sock)
    assert _status(answer) == 431
    assert b"more than 100 header fields" in answer
    _healthy(limited)


@pytest.mark.parametrize("size", [80 * 1024, 8 << 20, 64 << 20])
def test_oversized_header_gets_431_before_it_is_read(limited: RunningGateway, size: int) -> None:
    request = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nx-big: " + b"a" * size + b"\r\n\r\n"
    with socket.create_connection(_address(limited)) as sock:
        sent = _send_quietly(sock, request)
        answer = _read_all(sock)
    assert _status(answer) == 431
    assert b"request headers exceed 65536 bytes" in answer
    if size >= 8 << 20:
        assert sent < size  # refused while it was still arriving
    _healthy(limited)


def test_large_url_gets_431(limited: RunningGateway) -> None:
    with socket.create_connection(_address(limited)) as sock:
        _send_quietly(sock, b"GET /" + b"a" * (100 * 1024) + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _status(_read_all(sock)) == 431


def test_headers_within_limits_are_served(limited: RunningGateway) -> None:
    headers = {f"x-h{i}": "v" * 100 for i in range(90)}
    answer = httpx.get(f"http://{limited.http_url}/v2/health/live", headers=headers, timeout=10)
    assert answer.status_code == 200


def test_large_bodies_are_not_counted_as_headers(limited: RunningGateway) -> None:
    # A body the app answers without reading, then the next request on the same connection.
    with httpx.Client(base_url=f"http://{limited.http_url}", timeout=10) as client:
        for _ in range(3):
            answer = client.post("/v2/no-such-route", content=b"x" * (300 * 1024))
            assert answer.status_code == 404
            assert client.get("/v2/health/live").status_code == 200


def test_small_headers_read_together_with_a_large_body_are_served(limited: RunningGateway) -> None:
    # Headers and 200 KiB of body in one write: the first read holds more than the header
    # limit, but only its header part counts.
    body = b"x" * (200 * 1024)
    request = (
        b"POST /v2/no-such-route HTTP/1.1\r\nHost: x\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n" % len(body)
    ) + body
    with socket.create_connection(_address(limited)) as sock:
        sock.sendall(request)
        answer = _read_all(sock)
    assert _status(answer) == 404


def test_slowloris_connection_gets_408(limited: RunningGateway) -> None:
    started = time.monotonic()
    with socket.create_connection(_address(limited)) as sock:
        sock.settimeout(10)
        _dribble(sock, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n", 0.2, started)
        answer = _read_all(sock)
    assert _status(answer) == 408
    assert time.monotonic() - started < 8


def test_a_later_request_gets_its_own_header_time(limited: RunningGateway) -> None:
    """On a kept-alive connection the header timeout counts from each request's first
    byte, not from an earlier request's: a slow second request, begun 0.5 s after the
    first was armed, gets its 408 about 1 s after its own start."""
    with socket.create_connection(_address(limited)) as sock:
        sock.settimeout(10)
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b"\r\n\r\n" not in first:
            first += sock.recv(65536)
        assert _status(first) == 200
        head, _, body = first.partition(b"\r\n\r\n")
        length = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
        assert length is not None
        while len(body) < int(length.group(1)):  # the whole first answer is read
            body += sock.recv(65536)
        time.sleep(0.5)  # the keep-alive timeout is 1 s: the connection is still open
        started = time.monotonic()
        _dribble(sock, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n", 0.1, started)
        answer = _read_all(sock)
        waited = time.monotonic() - started
    assert _status(answer) == 408
    assert 0.9 <= waited < 8


def test_silent_and_idle_connections_are_closed(limited: RunningGateway) -> None:
    silent = [socket.create_connection(_address(limited)) for _ in range(20)]
    try:
        for sock in silent:
            assert _read_all(sock, 10) == b""  # closed by the server, no answer
    finally:
        for sock in silent:
            sock.close()
    # A kept-alive connection that goes idle is closed after keep_alive_timeout.
    started = time.monotonic()
    with socket.create_connection(_address(limited)) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _status(_read_all(sock, 10)) == 200  # read until the server closed it
    assert time.monotonic() - started < 8


def test_2000_idle_connections_are_closed_while_others_are_served(
    repository: Path, tmp_path: Path
) -> None:
    root = _small_repository(tmp_path, repository)
    settings = gateway_settings(root, **{"limits.header_timeout": "2s"})
    running = RunningGateway(settings).start()
    idle: list[socket.socket] = []
    try:
        for _ in range(2000):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(_address(running))
            idle.append(sock)
        _healthy(running)  # served while 2,000 sockets sit idle
        time.sleep(2.5)
        deadline = time.monotonic() + 20
        open_ = list(idle)
        while open_ and time.monotonic() < deadline:
            still = []
            for sock in open_:
                try:
                    if sock.recv(1) != b"":
                        still.append(sock)
                except BlockingIOError:
                    still.append(sock)
                except OSError:
                    pass  # reset: closed too
            open_ = still
            time.sleep(0.2)
        assert open_ == [], f"{len(open_)} idle connections still open"
        _healthy(running)
    finally:
        for sock in idle:
            sock.close()
        running.stop()


def test_connection_cap_answers_503_and_frees_the_socket(limited: RunningGateway) -> None:
    held = [socket.create_connection(_address(limited)) for _ in range(40)]
    try:
        time.sleep(0.2)
        with socket.create_connection(_address(limited)) as extra:
            answer = _read_all(extra)
        assert _status(answer) == 503
        assert b"too many open connections" in answer
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            _healthy(limited)
            break
        except (AssertionError, httpx.HTTPError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _limited_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))


def test_idle_sockets_cannot_lock_out_clients_under_a_512_fd_limit(
    tmp_path: Path, repository: Path
) -> None:
    root = _small_repository(tmp_path, repository)
    gateway = GatewayProcess(
        root,
        tmp_path / "data",
        env={"GATEWAY_LIMITS__HEADER_TIMEOUT": "2s"},
        preexec_fn=_limited_nofile,
    )
    sockets: list[socket.socket] = []
    try:
        http_port, grpc_port = gateway.http_port, gateway.grpc_port
        for i in range(600):
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.connect_ex(("127.0.0.1", http_port if i % 2 else grpc_port))
            sockets.append(sock)
        # Within the header timeout plus a margin both listeners serve new clients.
        served_http = served_grpc = False
        deadline = time.monotonic() + 30
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        while time.monotonic() < deadline and not (served_http and served_grpc):
            if not served_http:
                try:
                    answer = httpx.get(f"http://127.0.0.1:{http_port}/v2/health/live", timeout=2)
                    served_http = answer.status_code == 200
                except httpx.HTTPError:
                    pass
            if not served_grpc:
                with contextlib.suppress(grpc.RpcError):
                    served_grpc = stub.ServerLive(pb.ServerLiveRequest(), timeout=2).live
            time.sleep(0.2)
        channel.close()
        assert served_http
        assert served_grpc
        assert gateway.proc.poll() is None
    finally:
        for sock in sockets:
            sock.close()
        gateway.stop()
