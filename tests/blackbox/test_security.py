"""Access control on the data listeners, model control, request ids, private files and
all-or-nothing control-plane changes, against real servers and real clients."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from gateway._proto import feedback_pb2, feedback_pb2_grpc
from gateway.app import Gateway
from gateway.files import DataDirError
from tests.clients import infer
from tests.conftest import CONTROL_HEADERS, RunningGateway, gateway_settings

OPERATOR, VIEWER = "op-secret-security-tests", "viewer-secret-security-tests"
INFER, FEEDBACK = "infer-secret", "feedback-secret"
X = np.ones((1, 32), np.float32)


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def locked(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """Default model control (off), data-plane tokens, internal endpoints on admin only,
    every prediction logged."""
    root = tmp_path_factory.mktemp("locked")
    for name in ("mlp_small", "pair"):
        shutil.copytree(repository / name, root / name)
    settings = gateway_settings(
        root,
        **{
            "admin.tokens": [
                {"name": "ops", "role": "operator", "token": OPERATOR},
                {"name": "eve", "role": "viewer", "token": VIEWER},
            ],
            "auth.clients": [
                {"name": "app", "scope": "infer", "token": INFER},
                {"name": "labeler", "scope": "feedback", "token": FEEDBACK},
            ],
            "auth.feedback_rate": 0.001,
            "auth.feedback_burst": 3,
            "http.internal_endpoints": "admin",
            "predictions.enabled": True,
            "predictions.sample_rate": 1.0,
            "predictions.flush_interval_s": 0.05,
        },
    )
    running = RunningGateway(settings).start()
    yield running
    running.stop()


def _admin(server: RunningGateway) -> str:
    assert server.gateway is not None
    return f"http://127.0.0.1:{server.gateway.admin_port}"


# -- model control ----------------------------------------------------------------------------


def test_model_control_is_off_by_default_on_both_protocols(locked: RunningGateway) -> None:
    base = f"http://{locked.http_url}"
    for path in ("/v2/repository/index", "/v2/repository/models/mlp_small/unload"):
        reply = httpx.post(base + path, headers=_bearer(OPERATOR))
        assert reply.status_code == 403
        assert "model_control.enabled" in reply.json()["error"]
    # Cross-site, as a web page would send it: still refused.
    reply = httpx.post(
        base + "/v2/repository/models/mlp_small/unload",
        content=b"{}",
        headers={"origin": "https://evil.example", "content-type": "text/plain"},
    )
    assert reply.status_code == 403
    conn = grpcclient.InferenceServerClient(locked.grpc_url)
    with pytest.raises(InferenceServerException, match="PERMISSION_DENIED"):
        conn.unload_model("mlp_small", headers=_bearer(OPERATOR))
    with pytest.raises(InferenceServerException, match="PERMISSION_DENIED"):
        conn.get_model_repository_index(headers=_bearer(OPERATOR))
    conn.close()
    assert httpx.get(f"{base}/v2/models/mlp_small/ready", headers=_bearer(INFER)).status_code == 200


def test_admin_api_loads_and_unloads_audited(locked: RunningGateway) -> None:
    api = _admin(locked) + "/admin/v1"
    url = f"{api}/models/mlp_small/unload"
    assert httpx.post(url, headers=_bearer(VIEWER)).status_code == 403
    assert httpx.post(url).status_code == 401
    reply = httpx.post(url, json={"reason": "maintenance"}, headers=_bearer(OPERATOR))
    assert reply.status_code == 200, reply.text
    ready = httpx.get(f"http://{locked.http_url}/v2/models/mlp_small/ready", headers=_bearer(INFER))
    assert ready.status_code != 200
    too_big = {"parameters": {"config": '{"max_batch_size": 1500000}'}}
    reply = httpx.post(f"{api}/models/mlp_small/load", json=too_big, headers=_bearer(OPERATOR))
    assert reply.status_code == 400
    assert "max_batch_size" in reply.json()["error"]
    reply = httpx.post(f"{api}/models/mlp_small/load", json={}, headers=_bearer(OPERATOR))
    assert reply.status_code == 200, reply.text
    index = httpx.post(f"{api}/models/index", headers=_bearer(VIEWER)).json()["models"]
    assert any(m["name"] == "mlp_small" and m["versions"][0]["ready"] for m in index)
    audit = httpx.get(f"{api}/audit?model=mlp_small", headers=_bearer(VIEWER)).json()["entries"]
    actions = [(e["actor"], e["action"]) for e in audit]
    assert ("ops", "model_unload") in actions
    assert ("ops", "model_load") in actions


def test_enabled_model_control_needs_an_operator_and_same_site(server: RunningGateway) -> None:
    base = f"http://{server.http_url}/v2/repository"
    assert httpx.post(f"{base}/index").status_code == 401
    assert httpx.post(f"{base}/index", headers={"authorization": "Bearer nope"}).status_code == 401
    assert httpx.post(f"{base}/index", headers=CONTROL_HEADERS).status_code == 200
    foreign = {**CONTROL_HEADERS, "origin": "https://evil.example", "content-type": "text/plain"}
    reply = httpx.post(f"{base}/models/mlp_small/load", content=b"{}", headers=foreign)
    assert reply.status_code == 403
    assert "cross-site" in reply.json()["error"]
    plain = {**CONTROL_HEADERS, "content-type": "text/plain"}
    reply = httpx.post(f"{base}/models/mlp_small/load", content=b"{}", headers=plain)
    assert reply.status_code == 415
    conn = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
        conn.get_model_repository_index()
    assert conn.get_model_repository_index(headers=CONTROL_HEADERS).models
    conn.close()


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ('{"max_batch_size": 1500000}', "max_batch_size"),
        ('{"dynamic_batching": {"max_queue_delay_microseconds": 1e10}}', "max_queue_delay_us"),
        ('{"instance_group": [{"count": 1000}]}', "instances"),
    ],
)
def test_load_configs_are_bounded(server: RunningGateway, config: str, field: str) -> None:
    conn = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException, match=field):
        conn.load_model("breast_cancer", config=config, headers=CONTROL_HEADERS)
    assert conn.is_model_ready("breast_cancer")
    conn.close()


# -- data-plane tokens, feedback, request ids -------------------------------------------------


def test_inference_needs_an_infer_token(locked: RunningGateway) -> None:
    url = locked.http_url
    for headers, status in (({}, 401), (_bearer(FEEDBACK), 403), (_bearer("x"), 401)):
        reply = httpx.post(
            f"http://{url}/v2/models/mlp_small/infer",
            json={
                "inputs": [
                    {"name": "INPUT0", "shape": [1, 32], "datatype": "FP32", "data": [1.0] * 32}
                ]
            },
            headers=headers,
        )
        assert reply.status_code == status, reply.text
    got, _ = infer("http", url, "mlp_small", {"INPUT0": X}, headers=_bearer(INFER))
    assert got["OUTPUT0"].shape == (1, 2)
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
        infer("grpc", locked.grpc_url, "mlp_small", {"INPUT0": X})
    with pytest.raises(InferenceServerException, match="PERMISSION_DENIED"):
        infer("grpc", locked.grpc_url, "mlp_small", {"INPUT0": X}, headers=_bearer(FEEDBACK))
    got, _ = infer("grpc", locked.grpc_url, "mlp_small", {"INPUT0": X}, headers=_bearer(INFER))
    assert got["OUTPUT0"].shape == (1, 2)
    # Health stays open for probes.
    assert httpx.get(f"http://{url}/v2/health/ready").status_code == 200


def test_feedback_needs_a_feedback_token_and_is_rate_limited(locked: RunningGateway) -> None:
    url = f"http://{locked.http_url}/v2/models/pair/feedback"
    body = {"items": [{"id": "nope", "truth": 1}]}
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers=_bearer(INFER)).status_code == 403
    with grpc.insecure_channel(locked.grpc_url) as channel:
        stub = feedback_pb2_grpc.FeedbackStub(channel)  # type: ignore[no-untyped-call]
        request = feedback_pb2.FeedbackRequest(model_name="pair")
        with pytest.raises(grpc.RpcError) as caught:
            stub.Submit(request, timeout=30, metadata=tuple(_bearer(INFER).items()))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    statuses = [httpx.post(url, json=body, headers=_bearer(FEEDBACK)).status_code for _ in range(5)]
    assert statuses[:3] == [200, 200, 200]
    assert statuses[-1] == 429


def test_assigned_request_ids_are_random_and_guesses_match_nothing(server: RunningGateway) -> None:
    ids = []
    for _ in range(20):
        _, result = infer("http", server.http_url, "pair", {"INPUT0": X})
        ids.append(result.get_response()["id"])
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), ids[:3]
    assert len(set(ids)) == len(ids)
    # Neighbours of a seen id (counter-style guesses) and prefixes match no prediction.
    seen = ids[-1]
    guesses = [seen[:-1] + c for c in "0123456789abcdef" if seen[:-1] + c != seen]
    guesses += [f"{int(seen, 16) + d:032x}" for d in (1, -1, 2)] + [seen[:16]]
    reply = httpx.post(
        f"http://{server.http_url}/v2/models/pair/feedback",
        json={"items": [{"id": g, "truth": 1} for g in guesses]},
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["matched"] == 0


# -- operational details ----------------------------------------------------------------------


def test_internal_endpoints_on_admin_only(locked: RunningGateway) -> None:
    data, admin = f"http://{locked.http_url}", _admin(locked)
    for path in ("/metrics", "/v2/models/pair/route", "/v2/models/pair/outcomes"):
        assert httpx.get(data + path, headers=_bearer(INFER)).status_code == 404, path
        assert httpx.get(admin + path).status_code == 200, path


def test_405_names_the_allowed_methods(locked: RunningGateway) -> None:
    reply = httpx.get(f"http://{locked.http_url}/v2/models/mlp_small/infer", headers=_bearer(INFER))
    assert reply.status_code == 405
    assert reply.headers["allow"] == "POST"
    reply = httpx.delete(f"{_admin(locked)}/admin/v1/audit")
    assert reply.status_code == 405
    assert "GET" in reply.headers["allow"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_are_private(locked: RunningGateway) -> None:
    infer("http", locked.http_url, "mlp_small", {"INPUT0": X}, headers=_bearer(INFER))
    data_dir = Path(locked.settings.data_dir)
    assert _mode(data_dir) == 0o700
    assert _mode(data_dir / "control.sqlite3") == 0o600
    logs = data_dir / "predictions"
    assert locked.gateway is not None
    assert locked.gateway.predictions is not None
    deadline = 100
    files: list[Path] = []
    while not files and deadline:
        files = [p for p in logs.rglob("*.jsonl")]
        deadline -= 1
        locked.call(_sleep)
    assert files
    assert _mode(logs) == 0o700
    for path in files:
        assert _mode(path) == 0o600
        assert _mode(path.parent) == 0o700


async def _sleep() -> None:
    import asyncio

    await asyncio.sleep(0.05)


def test_unknown_model_error_has_no_server_path(server: RunningGateway) -> None:
    conn = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException) as caught:
        conn.load_model("no_such_model", headers=CONTROL_HEADERS)
    assert str(server.settings.repository_path()) not in str(caught.value)
    assert "<repository>" in str(caught.value)
    conn.close()


def test_unwritable_data_dir_is_one_line_naming_the_path(repository: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    settings = gateway_settings(repository, data_dir=str(blocker / "data"))
    with pytest.raises(DataDirError) as caught:
        Gateway(settings)._start_control_plane()
    message = str(caught.value)
    assert "\n" not in message
    assert str(blocker / "data") in message


# -- all-or-nothing ---------------------------------------------------------------------------


def _read_only(server: RunningGateway, on: bool) -> None:
    assert server.gateway is not None
    assert server.gateway.store is not None
    store: Any = server.gateway.store
    with store._lock:  # the store's one connection: writes now fail as on a full disk
        store._db.execute(f"PRAGMA query_only={'ON' if on else 'OFF'}")


def test_a_change_that_cannot_be_recorded_changes_nothing(locked: RunningGateway) -> None:
    api = _admin(locked) + "/admin/v1"
    auth = _bearer(OPERATOR)
    reply = httpx.put(f"{api}/routes/pair/weights", json={"weights": {"1": 1}}, headers=auth)
    assert reply.status_code == 200, reply.text
    assert locked.gateway is not None
    live = locked.on_loop(lambda: locked.gateway.router.get_route("pair"))  # type: ignore[union-attr]
    audit_before = httpx.get(f"{api}/audit", headers=auth).json()["entries"]
    _read_only(locked, True)
    try:
        reply = httpx.put(
            f"{api}/routes/pair/weights", json={"weights": {"1": 50, "2": 50}}, headers=auth
        )
        assert reply.status_code == 503, reply.text
        assert "not applied" in reply.json()["error"]
        start = {"model": "pair", "stable": "1", "candidate": "2"}
        reply = httpx.post(f"{api}/rollouts", json=start, headers=auth)
        assert reply.status_code == 503, reply.text
        assert locked.on_loop(lambda: locked.gateway.router.get_route("pair")) == live  # type: ignore[union-attr]
        assert httpx.get(f"{api}/rollouts", headers=auth).json()["rollouts"] == []
        reply = httpx.post(f"{api}/models/pair/unload", headers=auth)
        assert reply.status_code == 503, reply.text
        ready = httpx.get(f"http://{locked.http_url}/v2/models/pair/ready", headers=_bearer(INFER))
        assert ready.status_code == 200
        assert httpx.get(f"{api}/routes", headers=auth).json()["routes"]["pair"]["variants"] == [
            {"version": "1", "weight": 1.0}
        ]
    finally:
        _read_only(locked, False)
    assert httpx.get(f"{api}/audit", headers=auth).json()["entries"] == audit_before


def test_start_up_failures_are_one_line_naming_the_path(repository: Path, tmp_path: Path) -> None:
    root = tmp_path / "repo"
    shutil.copytree(repository / "mlp_small", root / "mlp_small")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    base = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    base.update(GATEWAY_ADMIN__PORT="0", GATEWAY_LOG_FORMAT="text")
    cases = [
        ({"GATEWAY_DATA_DIR": str(blocker / "data")}, str(blocker / "data")),
        (
            {
                "GATEWAY_DATA_DIR": str(tmp_path / "data"),
                "GATEWAY_HTTP__TLS__CERT": str(tmp_path / "missing.pem"),
                "GATEWAY_HTTP__TLS__KEY": str(tmp_path / "missing.key"),
            },
            str(tmp_path / "missing.pem"),
        ),
    ]
    for env, named in cases:
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--model-repository", str(root),
             "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0"],
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr[-2000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("gateway: ")
        assert named in last
        assert "Traceback" not in done.stderr
