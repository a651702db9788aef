"""``gateway admin`` as an operator types it: options anywhere, one-line writes, --watch,
human --since, every threshold settable, and rollouts applied from a spec file (idempotent).

The admin app runs on a real loopback socket (``Served``) over a real controller and store.
"""

from __future__ import annotations

import datetime
import io
import json
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway import admin_client
from tests.unit.test_admin import OPERATOR_SECRET, Rig, Served


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.store.close()


def _cli(port: int, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    env = {"GATEWAY_ADMIN_URL": f"http://127.0.0.1:{port}", "GATEWAY_ADMIN_TOKEN": OPERATOR_SECRET}
    code = admin_client.main(list(argv), env=env, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_since_takes_ages_iso_times_and_unix_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    now = 1_000_000.0
    assert admin_client.since("10m", now) == now - 600
    assert admin_client.since("2h", now) == now - 7200
    assert admin_client.since("1d", now) == now - 86400
    assert admin_client.since("123.5", now) == 123.5
    iso = datetime.datetime(2026, 12, 3, 4, 0, tzinfo=datetime.UTC).timestamp()
    assert admin_client.since("2026-12-03T04:00:00Z", now) == iso
    assert admin_client.since("2026-12-03T04:00:00", now) == iso
    assert admin_client.since("2026-12-03T05:00:00+01:00", now) == iso
    code, _, _ = _cli(9, "audit", "--since", "yesterday")
    assert code == 2
    assert "10m, 2h" in capsys.readouterr().err  # argparse's usage error


def test_options_anywhere_thresholds_watch_and_audit_since(rig: Rig) -> None:
    with Served(rig.app) as served:
        port = served.port
        code, out, err = _cli(
            port,
            "start",
            "m",
            "--stable=1",
            "--candidate=2",
            "--steps=10,50",
            "--max-input-drift-psi=0.25",
            "--max-prediction-drift-psi=0.2",
            "--max-error-rate=0.05",
            "--max-p99-ratio=none",
            "--worse-pvalue=0.01",
            "--promote-requires-not-worse",
            "--threshold",
            "max_shadow_disagreement=0.1",
            "--min-samples=50",
            "--consecutive-failures=2",
            "--json",  # after the command
        )
        assert code == 0, err
        policy = json.loads(out)["policy"]
        assert policy["min_samples"] == 50
        assert policy["consecutive_failures"] == 2
        assert policy["thresholds"] == policy["thresholds"] | {
            "max_input_drift_psi": 0.25,
            "max_prediction_drift_psi": 0.2,
            "max_error_rate": 0.05,
            "max_p99_latency_ratio": None,
            "candidate_worse_pvalue": 0.01,
            "promote_requires_not_worse": True,
            "max_shadow_disagreement": 0.1,
        }
        code, out, _ = _cli(port, "rollback", "m", "--reason", "again", "--json")
        assert code == 0
        # Thresholds not named keep the server's defaults.
        code, out, _ = _cli(port, "start", "m", "--stable=1", "--candidate=2", "--json")
        assert code == 0, out
        defaults = json.loads(out)["policy"]["thresholds"]
        assert defaults["max_p99_latency_ratio"] == 2.0
        assert defaults["max_error_rate_delta"] == 0.02
        code, out, _ = _cli(port, "status", "m", "--watch", "0.1", "--count", "2")
        assert code == 0
        assert out.count("-- ") == 2
        assert out.count("\nm ") == 2
        code, out, _ = _cli(port, "status", "--json", "--watch=0.1", "--count=2")
        assert [json.loads(line)["rollouts"][0]["model"] for line in out.splitlines()] == ["m"] * 2
        code, out, _ = _cli(port, "audit", "--since", "1970-01-01T00:00:00Z", "--json")
        assert code == 0
        assert [e["action"] for e in json.loads(out)["entries"]][-1] == "start"
        code, out, _ = _cli(port, "audit", "--since", "2099-01-01T00:00:00Z", "--json")
        assert json.loads(out)["entries"] == []


SPEC = """
[rollouts.m]
stable = "1"
candidate = "2"
reason = "kept in git"
[rollouts.m.policy]
steps = [5, 50]
step_duration_s = 600
[rollouts.m.policy.thresholds]
max_input_drift_psi = 0.25

[routes.n]
weights = { "1" = 30, "2" = 70 }
"""


def test_apply_and_diff_a_spec_file(rig: Rig, tmp_path: Path) -> None:
    spec = tmp_path / "rollout.toml"
    spec.write_text(SPEC)
    with Served(rig.app) as served:
        port = served.port
        code, out, err = _cli(port, "diff", "-f", str(spec))
        assert code == 1, err  # changes pending
        assert "+ rollout m: 1 -> 2, steps 5,50" in out
        assert "~ route n: - -> 1=30 2=70" in out
        assert rig.tables.get("m") is None  # diff changes nothing

        code, out, err = _cli(port, "apply", "-f", str(spec))
        assert code == 0, err
        assert out.splitlines()[-1] == "applied: 2 change(s)"
        assert rig.tables["m"] == {"1": 95.0, "2": 5.0}
        assert rig.tables["n"] == {"1": 30.0, "2": 70.0}

        # Applying again changes nothing; diff agrees.
        code, out, _ = _cli(port, "apply", "-f", str(spec), "--json")
        assert code == 0
        result = json.loads(out)
        assert {c["action"] for c in result["changes"]} == {"unchanged"}
        code, out, _ = _cli(port, "diff", "-f", str(spec))
        assert code == 0
        assert out.splitlines()[-1] == "0 change(s), 0 conflict(s)"

        # A different candidate while the rollout runs is a conflict; nothing is applied.
        spec.write_text(SPEC.replace('candidate = "2"', 'candidate = "3"'))
        code, out, _ = _cli(port, "apply", "-f", str(spec))
        assert code == 1
        assert "! rollout m: rollout 1 -> 2 is canary and differs" in out
        assert rig.tables["m"] == {"1": 95.0, "2": 5.0}

        spec.write_text("[rollouts.m]\nstable = 1\n")
        code, _, err = _cli(port, "diff", "-f", str(spec))
        assert code == 2
        assert "rollouts.m.candidate" in err


@pytest.mark.parametrize(
    "argv",
    [["--json", "models"], ["models", "--json"]],
)
def test_json_before_or_after_the_command(rig: Rig, argv: list[str]) -> None:
    with Served(rig.app) as served:
        code, out, _ = _cli(served.port, *argv)
        assert code == 0
        assert "models" in json.loads(out)


def test_the_admin_api_takes_the_same_spec(rig: Rig) -> None:
    spec = tomllib.loads(SPEC)
    with Served(rig.app) as served:
        url = f"http://127.0.0.1:{served.port}/admin/v1/apply"
        auth = {"Authorization": f"Bearer {OPERATOR_SECRET}"}
        dry = httpx.post(url, json={"spec": spec, "dry_run": True}, headers=auth)
        assert dry.status_code == 200, dry.text
        assert {c["action"] for c in dry.json()["changes"]} == {"start", "set"}
        assert dry.json()["applied"] is False
        assert "m" not in rig.tables
        done = httpx.post(url, json={"spec": spec, "reason": "ci"}, headers=auth)
        assert done.status_code == 200, done.text
        assert done.json()["applied"] is True
        assert rig.tables["m"] == {"1": 95.0, "2": 5.0}
        again = httpx.post(url, json={"spec": spec}, headers=auth)
        assert again.status_code == 200, again.text
        assert {c["action"] for c in again.json()["changes"]} == {"unchanged"}
        conflict = dict(spec, rollouts={"m": dict(spec["rollouts"]["m"], candidate="3")})
        refused = httpx.post(url, json={"spec": conflict}, headers=auth)
        assert refused.status_code == 409
        assert "m: rollout 1 -> 2 is canary" in refused.json()["error"]
        bad = httpx.post(url, json={"spec": {"rollout": {}}}, headers=auth)
        assert bad.status_code == 400
        assert "unknown section" in bad.json()["error"]


def test_fleet_of_one_process_says_it_is_not_shared(rig: Rig) -> None:
    with Served(rig.app) as served:
        code, out, _ = _cli(served.port, "fleet")
        assert (code, out) == (0, "not shared: this gateway is one process with its own store\n")
        code, out, _ = _cli(served.port, "fleet", "--json")
        assert (code, json.loads(out)) == (0, {"shared": False, "replicas": []})
