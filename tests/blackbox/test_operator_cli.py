"""The operator's first hour, through the installed ``gateway`` command as a user runs it.

A real ``gateway serve`` subprocess on loopback with the admin client's variables exported
(they must not stop it), the numba cache in the user cache folder, a token created with
``gateway admin token create`` reaching the admin API and refused once revoked; and
``gateway profile build`` matching CSV columns by header.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.common import free_port
from gateway.cli import main
from gateway.config import EXAMPLE_REPOSITORY
from gateway.drift.profile import load_profile

GATEWAY = [sys.executable, "-m", "gateway"]


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GATEWAY, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], str]]:
    tmp = tmp_path_factory.mktemp("operator")
    http, grpc, admin = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "NUMBA_"))}
    env.update(
        XDG_CACHE_HOME=str(tmp / "cache"),
        GATEWAY_DATA_DIR=str(tmp / "data"),
        GATEWAY_ADMIN__PORT=str(admin),
        GATEWAY_LOG_FORMAT="text",
        # What the README tells an operator to export for `gateway admin`:
        GATEWAY_ADMIN_URL=f"http://127.0.0.1:{admin}",
        GATEWAY_ADMIN_TOKEN="not-yet-a-valid-token-000",
    )
    proc = subprocess.Popen(
        [
            *GATEWAY,
            "serve",
            "--host",
            "127.0.0.1",
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{http}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                tail = proc.stderr.read()[-2000:]  # type: ignore[union-attr]
                pytest.fail(f"gateway serve exited {proc.returncode}: {tail}")
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("gateway serve did not become ready in 120 s")
            time.sleep(0.3)
        yield env, url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()  # type: ignore[union-attr]


def test_serve_starts_with_the_admin_client_variables_and_caches_in_the_user_cache(
    served: tuple[dict[str, str], str],
) -> None:
    env, url = served
    x = np.zeros((1, 30), np.float32).ravel().tolist()
    body = {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": x}]}
    assert httpx.post(f"{url}/v2/models/breast_cancer/infer", json=body).status_code == 200
    cache = Path(env["XDG_CACHE_HOME"]) / "onnx-v2-gateway" / "numba"
    deadline = time.monotonic() + 60
    while not any(cache.rglob("*.nbi")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert any(cache.rglob("*.nbi")), f"no numba cache files under {cache}"


def test_a_created_token_works_until_revoked(served: tuple[dict[str, str], str]) -> None:
    env, _ = served
    denied = _run(["admin", "models"], env)
    assert denied.returncode == 1
    assert "401" in denied.stderr
    created = _run(["admin", "token", "create", "--name", "first-operator", "--json"], env)
    assert created.returncode == 0, created.stderr
    secret = json.loads(created.stdout)["token"]
    assert len(secret) >= 20
    token_file = Path(env["GATEWAY_DATA_DIR"]) / "admin_tokens.json"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert secret not in token_file.read_text()
    env_ok = dict(env, GATEWAY_ADMIN_TOKEN=secret)
    models = _run(["admin", "models"], env_ok)
    assert models.returncode == 0, models.stderr
    assert "breast_cancer" in models.stdout
    listed = _run(["admin", "token", "list"], env)
    assert "first-operator\toperator" in listed.stdout
    assert _run(["admin", "token", "revoke", "first-operator"], env).returncode == 0
    after = _run(["admin", "models"], env_ok)
    assert after.returncode == 1
    assert "401" in after.stderr


def _write_csv(path: Path, names: list[str], data: np.ndarray) -> None:
    lines = [",".join(names)] + [",".join(repr(float(v)) for v in row) for row in data]
    path.write_text("\n".join(lines) + "\n")


def test_profile_build_matches_csv_columns_by_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = EXAMPLE_REPOSITORY / "breast_cancer"
    names = json.loads((model_dir / "feature_names.json").read_text())
    data = np.load(model_dir / "reference.npy")[:400]
    _write_csv(tmp_path / "ordered.csv", names, data)
    _write_csv(tmp_path / "reversed.csv", names[::-1], data[:, ::-1])
    _write_csv(tmp_path / "missing.csv", names[1:], data[:, 1:])
    monkeypatch.chdir(tmp_path)
    before = (model_dir / "profile.npz").stat().st_mtime_ns
    assert main(["profile", "build", "--model", "breast_cancer", "--data", "ordered.csv"]) == 0
    ordered = load_profile(tmp_path / "breast_cancer.profile.npz")  # cwd, not the package
    assert (model_dir / "profile.npz").stat().st_mtime_ns == before
    repo = tmp_path / "repo"
    shutil.copytree(model_dir, repo / "breast_cancer")
    argv = ["profile", "build", "--model", "breast_cancer", "--model-repository", str(repo)]
    assert main([*argv, "--data", "reversed.csv"]) == 0
    reversed_ = load_profile(repo / "breast_cancer" / "profile.npz")  # beside the model
    assert reversed_.hash == ordered.hash
    capsys.readouterr()
    assert main([*argv, "--data", "missing.csv"]) == 2
    err = capsys.readouterr().err
    assert f"missing {names[0]}" in err
    assert err.count("\n") == 1
