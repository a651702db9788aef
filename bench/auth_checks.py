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
"""

from __future__ import annotations

import argparse
import timeit
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
        guard._check_http(scope)
    except GatewayError:
        return
    raise AssertionError("expected a refusal")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.auth_checks", description=__doc__)
    parser.add_argument("--tokens-only", action="store_true")
    args = parser.parse_args(argv)
    tokens = [
        ClientToken(name="app", token="infer-secret-0001", scope="infer"),
        ClientToken(name="fb", token="feedback-secret-0001", scope="feedback"),
    ]
    rows: list[tuple[str, float]] = []
    open_guard = _guard([])
    rows.append(("no credentials", _best(lambda: open_guard._check_http(_scope(None, None)))))
    token_guard = _guard(tokens)
    scope = _scope("infer-secret-0001", None)
    rows.append(("tokens only, token", _best(lambda: token_guard._check_http(scope))))
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
        rows.append(("tokens+identities, token", _best(lambda: mixed._check_http(by_token))))
        rows.append(("tokens+identities, identity", _best(lambda: mixed._check_http(by_identity))))
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


if __name__ == "__main__":
    raise SystemExit(main())
