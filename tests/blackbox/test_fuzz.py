"""Generated hostile requests against a real gateway process, over HTTP (httpx, one
kept-alive connection) and gRPC (a grpcio channel): random bodies, shapes, datatypes,
parameters, ids, binary tails and header lengths (the codec fuzzers' strategies), random
timeout, id, encoding headers and model names. Every request gets an answer below 500 (or
501 for an extension not offered; a gRPC code other than INTERNAL, UNKNOWN, DATA_LOSS and
UNAVAILABLE), no connection is dropped, and the server's RSS stays bounded.

FUZZ_REQUESTS sets the requests per protocol: 1,000 by default (about 25 s per protocol,
mostly Hypothesis drawing the cases); CI runs FUZZ_REQUESTS=5000.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gateway._proto import grpc_service_pb2 as pb
from gateway._proto import grpc_service_pb2_grpc as pb_grpc
from tests.gateway_process import GatewayProcess
from tests.unit.test_codecs_fuzz import grpc_requests, rest_bodies

REQUESTS = int(os.environ.get("FUZZ_REQUESTS", "1000"))
CAMPAIGN = settings(
    max_examples=REQUESTS,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    phases=(Phase.explicit, Phase.generate),  # no shrinking: a failure prints its input
)
_MB = 1 << 20
# A campaign's time grows with its size: about 25 ms per case on a busy machine.
CAMPAIGN_TIMEOUT = pytest.mark.timeout(int(60 + REQUESTS * 0.1))

models = st.one_of(
    st.sampled_from(["mlp_small", "identity_all", "identity_all", "nope"]),
    st.text(alphabet=string.ascii_letters + "._-%", min_size=1, max_size=300),
)
header_text = st.text(alphabet=string.printable.strip(), max_size=40)
headers = st.dictionaries(
    st.sampled_from(
        [
            "x-request-timeout-ms",
            "x-request-id",
            "content-encoding",
            "accept-encoding",
            "x-model-version",
            "x-routing-key",
            "traceparent",
        ]
    ),
    st.one_of(header_text, st.sampled_from(["nan", "inf", "-1", "1e9", "gzip", "identity"])),
    max_size=3,
)


@pytest.fixture(scope="module")
def gateway(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("fuzz")
    root = tmp / "repo"
    root.mkdir()
    for name in ("identity_all", "mlp_small"):
        (root / name).symlink_to(repository / name)
    process = GatewayProcess(root, tmp / "data", env={"GATEWAY_ACCESS_LOG_SAMPLE_RATE": "0"})
    yield process
    assert process.stop() == 0


class _Seen:
    def __init__(self) -> None:
        self.codes: dict[Any, int] = {}

    def add(self, code: Any) -> None:
        self.codes[code] = self.codes.get(code, 0) + 1


@CAMPAIGN_TIMEOUT
def test_http_fuzz(gateway: GatewayProcess) -> None:
    seen = _Seen()
    before = gateway.rss_bytes()
    with httpx.Client(base_url=gateway.http_url, timeout=30) as client:

        @CAMPAIGN
        @given(rest_bodies(), models, headers, st.booleans())
        def one(case: tuple[bytes, int | None], model: str, extra: dict[str, str], v: bool) -> None:
            body, length = case
            sent = dict(extra)
            if length is not None:
                sent["inference-header-content-length"] = str(length)
            path = f"/v2/models/{model}/versions/1/infer" if v else f"/v2/models/{model}/infer"
            answer = client.post(path, content=body, headers=sent)
            seen.add(answer.status_code)
            # 501: an extension the server does not offer (shared memory), a client error.
            assert answer.status_code < 500 or answer.status_code == 501, (
                answer.status_code,
                answer.text[:300],
                body[:300],
            )
            if answer.status_code != 200:
                assert answer.json()["error"]

        one()
    grown = gateway.rss_bytes() - before
    print(f"HTTP: {REQUESTS} requests, statuses {seen.codes}, RSS +{grown / _MB:.1f} MB")
    assert grown < 64 * _MB
    assert gateway.proc.poll() is None


_SERVER_FAULTS = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNAVAILABLE,
}


@CAMPAIGN_TIMEOUT
def test_grpc_fuzz(gateway: GatewayProcess) -> None:
    seen = _Seen()
    before = gateway.rss_bytes()
    channel = grpc.insecure_channel(gateway.grpc_address)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]

    @CAMPAIGN
    @given(grpc_requests(), st.one_of(st.none(), models), st.booleans())
    def one(message: pb.ModelInferRequest, model: str | None, stream: bool) -> None:
        if model is not None:
            message.model_name = model
        if stream:
            answers = list(stub.ModelStreamInfer(iter([message]), timeout=30))
            assert len(answers) == 1
            seen.add("stream error" if answers[0].error_message else "stream ok")
            assert "internal error" not in answers[0].error_message
            return
        code, details = grpc.StatusCode.OK, "ok"
        try:
            stub.ModelInfer(message, timeout=30)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
        seen.add(code.name)
        assert code not in _SERVER_FAULTS, (code, details)
        assert details

    try:
        one()
    finally:
        channel.close()
    grown = gateway.rss_bytes() - before
    print(f"gRPC: {REQUESTS} requests, codes {seen.codes}, RSS +{grown / _MB:.1f} MB")
    assert grown < 64 * _MB
    assert gateway.proc.poll() is None
