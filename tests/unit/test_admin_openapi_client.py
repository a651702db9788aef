"""A client generated from the committed admin OpenAPI document drives a real admin app.

``openapi-python-client`` (a test dependency) turns ``gateway/openapi_admin.json`` into a
Python package; its method names come from the operationIds and its modules from the tags.
The package then lists models, starts a rollout, reads it back and rolls it back over a
real loopback socket, so a document that no longer matches the API fails here.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.admin import OPENAPI_PATH
from tests.unit.test_admin import OPERATOR_SECRET, Rig, Served


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.store.close()


def _generate(tmp_path: Path) -> Path:
    bin_dir = Path(sys.executable).parent
    tool = shutil.which("openapi-python-client", path=str(bin_dir)) or shutil.which(
        "openapi-python-client"
    )
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs openapi-python-client (the test extra)")
        pytest.skip("openapi-python-client is not installed (pip install -e '.[test]')")
    out = tmp_path / "client"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    done = subprocess.run(
        [
            tool,
            "generate",
            "--path",
            str(OPENAPI_PATH),
            "--meta",
            "none",
            "--output-path",
            str(out / "admin_api"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_generated_client_drives_the_admin_api(rig: Rig, tmp_path: Path) -> None:
    root = _generate(tmp_path)
    sys.path.insert(0, str(root))
    try:
        api: Any = importlib.import_module("admin_api")
        client_mod: Any = importlib.import_module("admin_api.client")
        models: Any = importlib.import_module("admin_api.models")
        list_models: Any = importlib.import_module("admin_api.api.models.list_models")
        rollouts: Any = importlib.import_module("admin_api.api.rollouts")
        start: Any = importlib.import_module("admin_api.api.rollouts.start_rollout")
        get: Any = importlib.import_module("admin_api.api.rollouts.get_rollout")
        rollback: Any = importlib.import_module("admin_api.api.rollouts.rollback_rollout")
        assert api is not None
        assert rollouts is not None
        with (
            Served(rig.app) as served,
            client_mod.AuthenticatedClient(
                base_url=f"http://127.0.0.1:{served.port}", token=OPERATOR_SECRET
            ) as client,
        ):
            listed = list_models.sync(client=client)
            assert [m.name for m in listed.models][:1] == ["m"]
            body = models.StartRolloutBody(model="m", stable="1", candidate="2", reason="gen")
            state = start.sync(client=client, body=body)
            assert (state.status.value, state.candidate_weight) == ("canary", 5.0)
            assert get.sync("m", client=client).status.value == "canary"
            done = rollback.sync("m", client=client, body=models.ReasonBody(reason="test"))
            assert done.status.value == "rolled_back"
            assert rig.tables["m"] == {"1": 100.0, "2": 0.0}
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n == "admin_api" or n.startswith("admin_api.")]:
            del sys.modules[name]
