"""python -m bench.auth_checks: what the data-plane credential check costs per request.

Times ``DataPlaneGuard``'s HTTP check (the one the ASGI wrapper runs before the body is
decoded) for an inference request in these cells: no credentials configured; bearer
tokens only (the caller sends its token); tokens and mTLS identity rules together with the
caller using its token, then its certificate identity; and an unknown identity (refused).
Also the per-connection cost of reading a verified certificate's identities
(``tls.peer_identities`` on ``getpeercert()``'s dict, done once per TLS connection when the
listener is mutual) and the gRPC check with identities taken from an auth context. Each
figure is the best of 5 repeats, in microseconds per call. ``--tokens-only`` runs only the
cells that exist without identity support (to compare with an older tree).

``--serve`` measures end to end instead: two gateway processes with mTLS on HTTP and gRPC,
one without data-plane credentials and one with an infer token and an infer identity
(``CN=inferer``); concurrent clients (all holding the ``inferer`` certificate) send one-row
inferences with the token, with only the certificate, or (first server) with nothing, in
alternating rounds. Reported: the server's CPU ms per request (median of the rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

from gateway.auth import DataPlaneGuard
from gateway.config import AdminToken, ClientToken, DataAuthSettings, ModelControlSettings
from gateway.errors import GatewayError

NUMBER = 20_000
CERT: dict[str, Any] = {
    "subject": ((("countryName", "XX"),), (("commonName", "labeler"),)),
    "subjectAltName": (("URI", "spiffe://lab/grader"), ("DNS", "lab.example")),
}


def _guard(clients: list[ClientToken]) -> DataPlaneGuard:
    return DataPlaneGuard(
        DataAuthSettings(clients=clients),
        ModelControlSettings(),
        [AdminToken(name="ops", role="operator", token="o" * 24)],
    )


def _scope(token: str | None, identities: frozenset[str] | None) -> dict[str, Any]:
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    scope: dict[str, Any] = {
        "type": "http",
        "path": "/v2/models/mlp_small/infer",
        "client": ("127.0.0.1", 5000),
        "headers": headers,
    }
    if identities is not None:
        scope["extensions"] = {"tls": {"client_identities": identities}}
    return scope


def _best(fn: Any) -> float:
    return min(timeit.repeat(fn, number=NUMBER, repeat=5)) / NUMBER * 1e6


def _refused(guard: DataPlaneGuard, scope: dict[str, Any]) -> None:
    try:
        guard.check_http(scope)
    except GatewayError:
        return
    raise AssertionError("expected a refusal")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.auth_checks", description=__doc__)
    parser.add_argument("--tokens-only", action="store_true")
    parser.add_argument("--serve", action="store_true", help="end to end (see above)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window-s", type=float, default=2.0)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.rounds, args.window_s)
        return 0
    tokens = [
        ClientToken(name="app", token="infer-secret-0001", scope="infer"),
        ClientToken(name="fb", token="feedback-secret-0001", scope="feedback"),
    ]
    rows: list[tuple[str, float]] = []
    open_guard = _guard([])
    rows.append(("no credentials", _best(lambda: open_guard.check_http(_scope(None, None)))))
    token_guard = _guard(tokens)
    scope = _scope("infer-secret-0001", None)
    rows.append(("tokens only, token", _best(lambda: token_guard.check_http(scope))))
    if not args.tokens_only:
        from gateway.tls import peer_identities

        mixed = _guard(
            [
                *tokens,
                ClientToken(name="runner", identity="CN=inferer", scope="infer"),
                ClientToken(name="lab", identity="CN=labeler", scope="feedback"),
            ]
        )
        inferer = frozenset({"CN=inferer"})
        by_token = _scope("infer-secret-0001", inferer)
        by_identity = _scope(None, inferer)
        unknown = _scope(None, frozenset({"CN=nobody"}))
        rows.append(("tokens+identities, token", _best(lambda: mixed.check_http(by_token))))
        rows.append(("tokens+identities, identity", _best(lambda: mixed.check_http(by_identity))))
        rows.append(("tokens+identities, unknown (401)", _best(lambda: _refused(mixed, unknown))))
        rows.append(("peer_identities per connection", _best(lambda: peer_identities(CERT))))
        context = _Context({"x509_common_name": [b"inferer"], "peer_uri": [], "peer_dns": []})
        from gateway.auth import grpc_peer_identities

        rows.append(
            (
                "gRPC: identities + check",
                _best(lambda: mixed.check_grpc("ModelInfer", (), grpc_peer_identities(context))),
            )
        )
    width = max(len(name) for name, _ in rows)
    for name, micros in rows:
        print(f"{name:<{width}}  {micros:7.2f} us")
    return 0


class _Context:
    """What ``grpc_peer_identities`` reads of a servicer context."""

    def __init__(self, auth: dict[str, list[bytes]]) -> None:
        self._auth = auth

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth


async def _clients(
    protocol: str, port: int, context: Any, creds: Any, token: str, seconds: float
) -> int:
    import grpc

    from bench.tls import _grpc_body, _json_body

    header = f"Authorization: Bearer {token}\r\n" if token else ""
    body = _json_body()
    head = (
        f"POST /v2/models/m/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n{header}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    stop_at = time.perf_counter() + seconds

    async def http_worker() -> int:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"
        )
        done = 0
        while time.perf_counter() < stop_at:
            writer.write(head + body)
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if b" 200 " not in status:
                raise RuntimeError(f"HTTP answer {status!r}")
            done += 1
        writer.close()
        return done

    async def grpc_worker(channel: Any) -> int:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        payload, done = _grpc_body(), 0
        while time.perf_counter() < stop_at:
            await call(payload, timeout=30, metadata=metadata)
            done += 1
        return done

    if protocol == "http":
        return sum(await asyncio.gather(*(http_worker() for _ in range(16))))
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        return sum(await asyncio.gather(*(grpc_worker(channel) for _ in range(16))))


def serve(rounds: int, window_s: float) -> None:
    import ssl

    import grpc

    from bench.common import GatewayProcess, cpu_seconds
    from bench.models import mlp
    from tests.certs import Authority

    root = Path(tempfile.mkdtemp(prefix="bench-auth-"))
    mlp(root / "repo" / "m" / "1" / "model.onnx", [32, 64, 2], seed=0, name="m")
    ca = Authority(root / "ca")
    server, client = ca.issue("server", server=True), ca.issue("inferer", server=False)
    tls = f'cert = "{server.cert}"\nkey = "{server.key}"\nclient_ca = "{ca.cert}"\n'
    base = "[runtime]\ninference_workers = 2\nintra_op_threads = 1\n"
    base += "[http.tls]\n" + tls + "[grpc.tls]\n" + tls
    token = "bench-infer-token-000001"
    guarded = base + (
        f'[[auth.clients]]\nname = "app"\nscope = "infer"\ntoken = "{token}"\n'
        '[[auth.clients]]\nname = "runner"\nscope = "infer"\nidentity = "CN=inferer"\n'
    )
    context = ssl.create_default_context(cafile=str(ca.cert))
    context.load_cert_chain(str(client.cert), str(client.key))
    creds = grpc.ssl_channel_credentials(
        ca.cert.read_bytes(), client.key.read_bytes(), client.cert.read_bytes()
    )
    cells: dict[str, list[float]] = {}
    with (
        GatewayProcess(root / "repo", base, "open") as open_server,
        GatewayProcess(root / "repo", guarded, "guarded") as guarded_server,
    ):
        plan = [("no credentials", open_server, ""), ("token", guarded_server, token)]
        plan.append(("identity", guarded_server, ""))
        for _ in range(rounds):
            for protocol in ("http", "grpc"):
                for name, proc, secret in plan:
                    port = proc.http_port if protocol == "http" else proc.grpc_port
                    asyncio.run(_clients(protocol, port, context, creds, secret, 0.5))  # warm
                    cpu0 = cpu_seconds(proc.pid)
                    count = asyncio.run(_clients(protocol, port, context, creds, secret, window_s))
                    cpu = cpu_seconds(proc.pid) - cpu0
                    key = f"{protocol} {name}"
                    cells.setdefault(key, []).append(1000 * cpu / max(count, 1))
                    print(f"{key:<22} {count / window_s:8.0f} req/s", flush=True)
    print("server CPU ms per request (median of rounds), mTLS, concurrency 16:")
    for key, values in cells.items():
        print(f"  {key:<22} {statistics.median(values):.3f}  {[round(v, 3) for v in values]}")


if __name__ == "__main__":
    raise SystemExit(main())
