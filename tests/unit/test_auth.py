"""auth.py, files.py and the model-control bounds: the checks themselves, without servers
(the blackbox tests run them through real listeners)."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.auth import CONTROL_DISABLED, DataPlaneGuard, RateLimiter
from gateway.config import (
    AdminToken,
    ClientToken,
    ConfigError,
    DataAuthSettings,
    ModelControlSettings,
    PredictionLogSettings,
    TlsSettings,
    load_settings,
)
from gateway.errors import (
    InvalidInputError,
    PermissionDeniedError,
    RateLimitedError,
    UnauthenticatedError,
    UnsupportedMediaTypeError,
)
from gateway.files import DataDirError, open_new, private_dir, private_file
from gateway.predlog import PredictionLogger
from gateway.tls import is_loopback, peer_identities, plaintext_warning

ADMIN = [
    AdminToken(name="ops", role="operator", token="op"),
    AdminToken(name="eve", role="viewer", token="view"),
]
CLIENTS = DataAuthSettings(
    clients=[
        ClientToken(name="app", token="inf", scope="infer"),
        ClientToken(name="lab", token="fb", scope="feedback"),
    ],
    feedback_rate=1.0,
    feedback_burst=2,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _guard(enabled: bool, auth: DataAuthSettings = CLIENTS, clock: Any = None) -> DataPlaneGuard:
    return DataPlaneGuard(
        auth,
        ModelControlSettings(enabled=enabled),
        ADMIN,
        internal_endpoints="admin",
        clock=clock or Clock(),
    )


def _scope(path: str, **headers: str) -> dict[str, Any]:
    return {
        "type": "http",
        "path": path,
        "client": ("10.0.0.1", 5000),
        "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
    }


def test_model_control_off_refuses_even_operators() -> None:
    guard = _guard(False)
    with pytest.raises(PermissionDeniedError, match=r"model_control\.enabled"):
        guard.check_control("Bearer op")
    with pytest.raises(PermissionDeniedError) as caught:
        guard.check_grpc("RepositoryModelUnload", [("authorization", "Bearer op")])
    assert caught.value.message == CONTROL_DISABLED


def test_model_control_on_needs_an_operator() -> None:
    guard = _guard(True)
    assert guard.check_control("Bearer op") == "ops"
    with pytest.raises(UnauthenticatedError):
        guard.check_control(None)
    with pytest.raises(UnauthenticatedError):
        guard.check_control("Bearer inf")  # a data-plane token is no admin token
    with pytest.raises(PermissionDeniedError, match="viewer"):
        guard.check_control("Bearer view")


def test_cross_site_control_requests_are_refused() -> None:
    guard = _guard(True)
    base = {"authorization": "Bearer op", "host": "gw:8000"}
    guard.check_http(_scope("/v2/repository/index", **base, origin="http://gw:8000"))
    with pytest.raises(PermissionDeniedError, match="cross-site"):
        guard.check_http(_scope("/v2/repository/index", **base, origin="https://evil.example"))
    with pytest.raises(PermissionDeniedError, match="cross-site"):
        guard.check_http(_scope("/v2/repository/index", **base, origin="null"))
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=1"):
        with pytest.raises(UnsupportedMediaTypeError):
            guard.check_http(_scope("/v2/repository/index", **base, content_type=kind))
    guard.check_http(_scope("/v2/repository/index", **base, content_type="application/json"))


def test_scopes_are_separate() -> None:
    guard = _guard(True)
    guard.check_infer("Bearer inf")
    with pytest.raises(PermissionDeniedError, match="scope 'feedback'"):
        guard.check_infer("Bearer fb")
    with pytest.raises(UnauthenticatedError):
        guard.check_infer("Basic inf")
    guard.check_feedback("Bearer fb", "1.2.3.4")
    with pytest.raises(PermissionDeniedError, match="scope 'infer'"):
        guard.check_feedback("Bearer inf", "1.2.3.4")
    # gRPC: health and server metadata stay open; everything else needs the token.
    guard.check_grpc("Check", None)
    guard.check_grpc("ServerReady", None)
    with pytest.raises(UnauthenticatedError):
        guard.check_grpc("ModelMetadata", None)
    guard.check_grpc("ModelInfer", [("authorization", "Bearer inf")])


def test_no_tokens_means_open_data_plane_and_hidden_internal_pages() -> None:
    guard = _guard(False, DataAuthSettings())
    guard.check_infer(None)
    guard.check_http(_scope("/v2/models/m/infer"))
    guard.check_http(_scope("/v2/models/m/ready"))
    for path in ("/metrics", "/v2/models/m/route", "/v2/models/m/outcomes"):
        with pytest.raises(Exception, match="Not Found"):
            guard.check_http(_scope(path))


def test_feedback_rate_per_client() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=2, clock=clock)
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]
    assert limiter.allow("b")  # another client has its own bucket
    clock.now += 1.0
    assert limiter.allow("a")
    assert not limiter.allow("a")
    guard = _guard(False, DataAuthSettings(feedback_rate=1.0, feedback_burst=1), clock)
    guard.check_feedback(None, "1.2.3.4")
    with pytest.raises(RateLimitedError):
        guard.check_feedback(None, "1.2.3.4")
    guard.check_feedback(None, None)  # gRPC without a token: limited in the servicer
    guard.check_grpc_feedback_peer("ipv4:10.0.0.9")
    with pytest.raises(RateLimitedError):
        guard.check_grpc_feedback_peer("ipv4:10.0.0.9")
    assert RateLimiter(rate=0, burst=1).allow("x")


def test_load_bounds_name_the_field() -> None:
    bounds = ModelControlSettings()
    bounds.check_load({"max_batch_size": 64, "instances": 2})
    cases: list[tuple[dict[str, Any], str]] = [
        ({"max_batch_size": 1_500_000}, "max_batch_size"),
        ({"max_queue_delay_us": 1e10}, "max_queue_delay_us"),
        ({"instances": 100}, "instances"),
        ({"max_batch_size": -1}, "max_batch_size"),
        ({"instances": "8"}, "instances"),
    ]
    for fields, name in cases:
        with pytest.raises(InvalidInputError, match=name):
            bounds.check_load(fields)


def test_tokens_are_distinct_across_scopes() -> None:
    clients = [
        {"name": "a", "token": "same", "scope": "infer"},
        {"name": "b", "token": "same", "scope": "feedback"},
    ]
    with pytest.raises(ConfigError, match="distinct"):
        load_settings(None, env={}, overrides={"auth.clients": clients})
    admin = [{"name": "ops", "role": "operator", "token": "same"}]
    with pytest.raises(ConfigError, match="distinct"):
        load_settings(None, env={}, overrides={"auth.clients": clients[:1], "admin.tokens": admin})


def test_tls_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="cert and key"):
        load_settings(None, env={}, overrides={"http.tls": {"cert": "a.pem"}})
    with pytest.raises(ConfigError, match="client_ca"):
        load_settings(None, env={}, overrides={"grpc.tls": {"client_ca": "ca.pem"}})
    assert not TlsSettings().enabled
    assert is_loopback("127.0.0.1")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("10.1.2.3")
    with_tls = TlsSettings(cert="c.pem", key="k.pem")
    warning = plaintext_warning("admin", "0.0.0.0", TlsSettings())
    assert warning is not None
    assert "clear text" in warning
    assert plaintext_warning("admin", "0.0.0.0", with_tls) is None
    assert plaintext_warning("admin", "127.0.0.1", TlsSettings()) is None


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_files_and_folders(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        folder = private_dir(tmp_path / "a" / "b")
        assert _mode(tmp_path / "a") == 0o700
        assert _mode(folder) == 0o700
        file = private_file(folder / "db")
        assert _mode(file) == 0o600
        loose = folder / "loose"
        loose.write_text("x")
        os.chmod(loose, 0o644)
        assert _mode(private_file(loose)) == 0o600
        with open_new(folder / "log") as out:
            out.write(b"x")
        assert _mode(folder / "log") == 0o600
        with pytest.raises(FileExistsError):
            open_new(folder / "log")
    finally:
        os.umask(old)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataDirError, match=str(blocker / "sub")):
        private_dir(blocker / "sub")


def test_prediction_log_retention(tmp_path: Path) -> None:
    folder = tmp_path / "m" / "1"
    folder.mkdir(parents=True)
    names = [f"predictions-2026010{i}T000000Z-00000{i}.jsonl" for i in range(1, 7)]
    for age, name in enumerate(reversed(names)):
        path = folder / name
        path.write_text("{}\n")
        stamp = time.time() - age * 3600
        os.utime(path, (stamp, stamp))
    (folder / "notes.txt").write_text("kept")
    settings = PredictionLogSettings(enabled=True, directory=str(tmp_path), keep_files=3)
    logger = PredictionLogger(settings)
    logger._retain(folder)
    left = sorted(p.name for p in folder.iterdir())
    assert left == ["notes.txt", *names[-3:]]
    assert logger.deleted == 3
    by_age = PredictionLogger(
        PredictionLogSettings(
            enabled=True, directory=str(tmp_path), keep_files=0, keep_age_s=2.5 * 3600
        )
    )
    by_age._retain(folder)  # the newest three are 0, 1 and 2 hours old
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", *names[-3:]]
    by_age = PredictionLogger(
        PredictionLogSettings(enabled=True, directory=str(tmp_path), keep_files=0, keep_age_s=1800)
    )
    by_age._retain(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", names[-1]]


def test_identities_are_credentials_with_one_scope() -> None:
    auth = DataAuthSettings(
        clients=[
            ClientToken(name="app", token="inf", scope="infer"),
            ClientToken(name="runner", identity="CN=inferer", scope="infer"),
            ClientToken(name="lab", identity="URI:spiffe://lab/grader", scope="feedback"),
        ],
        feedback_rate=1.0,
        feedback_burst=1,
    )
    guard = _guard(False, auth)
    assert guard.identity_rules
    guard.check_infer(None, {"CN=inferer"})
    guard.check_infer("Bearer inf", {"CN=nobody"})  # either credential may hold the scope
    with pytest.raises(UnauthenticatedError, match="client certificate"):
        guard.check_infer(None, {"CN=nobody"})
    with pytest.raises(PermissionDeniedError, match="identity 'lab' has scope 'feedback'"):
        guard.check_infer(None, {"URI=spiffe://lab/grader"})
    with pytest.raises(PermissionDeniedError, match="identity 'runner'"):
        guard.check_feedback(None, "1.2.3.4", {"CN=inferer"})
    # HTTP: the identities come from the scope's TLS extension (servers.py puts them there).
    scope = _scope("/v2/models/m/feedback")
    scope["extensions"] = {"tls": {"client_identities": frozenset({"URI=spiffe://lab/grader"})}}
    guard.check_http(scope)
    with pytest.raises(RateLimitedError):  # the rate is kept per identity, burst 1
        guard.check_http(scope)
    with pytest.raises(UnauthenticatedError):
        guard.check_http(_scope("/v2/models/m/infer"))  # no certificate, no token
    # gRPC: the interceptor checks the metadata; the identities are checked in the handler.
    with pytest.raises(UnauthenticatedError):
        guard.check_grpc("ModelInfer", None)
    guard.check_grpc("ModelInfer", None, {"CN=inferer"})


def test_client_entries_take_a_token_or_an_identity() -> None:
    def load(*clients: dict[str, str]) -> None:
        load_settings(None, env={}, overrides={"auth.clients": list(clients)})

    load({"name": "a", "scope": "infer", "identity": "dns:lab.example"})
    with pytest.raises(ConfigError, match="exactly one of token and identity"):
        load({"name": "a", "scope": "infer", "identity": "CN=x", "token": "t"})
    with pytest.raises(ConfigError, match="exactly one of token and identity"):
        load({"name": "a", "scope": "infer"})
    with pytest.raises(ConfigError, match="expected CN="):
        load({"name": "a", "scope": "infer", "identity": "O=acme"})
    with pytest.raises(ConfigError, match="listed twice"):
        load(
            {"name": "a", "scope": "infer", "identity": "CN=x"},
            {"name": "b", "scope": "feedback", "identity": "CN=x"},
        )
    cert = {
        "subject": ((("organizationName", "acme"),), (("commonName", "labeler"),)),
        "subjectAltName": (("URI", "spiffe://lab/x"), ("DNS", "lab.example"), ("IP", "::1")),
    }
    assert peer_identities(cert) == {"CN=labeler", "URI=spiffe://lab/x", "DNS=lab.example"}
    assert peer_identities(None) == frozenset()
