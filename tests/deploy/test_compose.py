"""docker-compose.yml and deploy/nginx/nginx.conf: the compose file validates against the
Compose Specification's JSON schema, nginx accepts its configuration (``nginx -t``), and
the values that must agree with the gateway do.

The compose schema is the copy check-jsonschema ships (compose-spec, Apache-2.0), read
from the installed package and applied with jsonschema; nginx is Debian's, installed by
scripts/install-nginx (the nginx check skips when it is absent). Nothing is fetched here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from gateway.config import AdminSettings, GrpcSettings, HttpSettings, LimitsSettings
from tests.deploy.envcheck import PENDING, load_env

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"


def _compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def _schema_errors(doc: dict[str, Any]) -> list[str]:
    text = files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    schema = json.loads(text.read_text(encoding="utf-8"))
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    checker = validator(schema, format_checker=validator.FORMAT_CHECKER)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in checker.iter_errors(doc)]


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match is not None, f"use whole seconds: {duration}"
    return float(match.group(1))


def test_compose_file_validates_against_the_compose_spec() -> None:
    assert _schema_errors(_compose()) == []


def test_the_schema_rejects_a_misspelt_field() -> None:
    doc = _compose()
    doc["services"]["gateway"]["deploy"]["replica"] = 3
    assert any("replica" in e for e in _schema_errors(doc))


def test_three_gateways_share_one_redis_with_an_append_only_file() -> None:
    services = _compose()["services"]
    gateway = services["gateway"]
    assert gateway["deploy"]["replicas"] == 3
    assert gateway["build"] == "."
    url = urlsplit(gateway["environment"]["GATEWAY_STORE__URL"])
    assert (url.scheme, url.hostname, url.port) == ("redis", "redis", 6379)
    redis = services[url.hostname or ""]
    command = redis["command"]
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "always"
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["lb"]["depends_on"]["gateway"]["condition"] == "service_healthy"


def test_gateway_environment_parses_and_the_drain_fits_the_stop_grace() -> None:
    gateway = _compose()["services"]["gateway"]
    settings, pending = load_env(gateway["environment"])
    assert set(pending) <= {f"GATEWAY_{p.upper()}__URL" for p in PENDING}
    assert settings.admin.host == "0.0.0.0"
    assert [t.role for t in settings.admin.tokens] == ["operator"]
    assert settings.data_dir in gateway["tmpfs"]
    assert _seconds(gateway["stop_grace_period"]) >= settings.grace_period_s + 5
    assert gateway["read_only"] is True
    probe = " ".join(gateway["healthcheck"]["test"])
    assert f"127.0.0.1:{HttpSettings().port}/v2/health/ready" in probe


def _upstreams(conf: str) -> dict[str, list[str]]:
    blocks = re.findall(r"upstream\s+(\w+)\s*\{([^}]*)\}", conf)
    return {name: re.findall(r"^\s*server\s+(\S+)", body, re.M) for name, body in blocks}


def test_nginx_balances_over_the_compose_service_on_the_gateway_ports() -> None:
    conf = NGINX_CONF.read_text(encoding="utf-8")
    upstreams = _upstreams(conf)
    assert upstreams == {
        "gateway_http": [f"gateway:{HttpSettings().port}"],
        "gateway_grpc": [f"gateway:{GrpcSettings().port}"],
        "gateway_admin": [f"gateway:{AdminSettings().port}"],
    }
    assert "gateway" in _compose()["services"]
    assert "grpc_pass grpc://gateway_grpc;" in conf
    assert re.search(rf"listen {GrpcSettings().port} http2;", conf)
    assert re.search(r"upstream gateway_http \{[^}]*keepalive \d+;", conf)
    # Upstream keep-alive needs HTTP/1.1 and an empty Connection header.
    assert conf.count('proxy_set_header Connection "";') == 2
    lb = _compose()["services"]["lb"]
    mounted = {v.split(":")[0]: v.split(":")[1] for v in lb["volumes"]}
    assert mounted["./deploy/nginx/nginx.conf"] == "/etc/nginx/nginx.conf"
    published = {p.rsplit(":", 1)[-1] for p in lb["ports"]}
    assert published == {str(s().port) for s in (HttpSettings, GrpcSettings, AdminSettings)}
    assert "127.0.0.1:8002:8002" in lb["ports"]  # the admin API stays on the host's loopback


def test_nginx_closes_idle_upstream_connections_before_the_gateway_does() -> None:
    """A request sent on a connection the replica is closing fails, and nginx does not
    resend a POST; so nginx must give up idle connections first."""
    conf = NGINX_CONF.read_text(encoding="utf-8")
    timeouts = {
        name: re.findall(r"keepalive_timeout\s+(\d+)s;", body)
        for name, body in re.findall(r"upstream\s+(\w+)\s*\{([^}]*)\}", conf)
    }
    # The listeners' idle timeout: the default of ``limits.keep_alive_timeout``.
    gateway_idle_s = LimitsSettings().seconds("keep_alive_timeout")
    for name, values in timeouts.items():
        assert len(values) == 1, f"upstream {name}: set keepalive_timeout"
        assert int(values[0]) < gateway_idle_s, name


def _nginx() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.skip("nginx is not installed (scripts/install-nginx installs Debian's)")
    return found


def _nginx_test(conf: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on a copy whose upstream hosts are 127.0.0.1: the compose service
    name resolves only inside compose. -t parses and checks; it binds no port."""
    copy = tmp_path / "nginx.conf"
    copy.write_text(re.sub(r"(server\s+)gateway:", r"\g<1>127.0.0.1:", conf), encoding="utf-8")
    return subprocess.run(
        [_nginx(), "-t", "-q", "-c", str(copy), "-p", str(tmp_path), "-e", "stderr"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_nginx_accepts_the_configuration(tmp_path: Path) -> None:
    result = _nginx_test(NGINX_CONF.read_text(encoding="utf-8"), tmp_path)
    assert result.returncode == 0, result.stderr


def test_nginx_check_rejects_a_bad_directive(tmp_path: Path) -> None:
    conf = NGINX_CONF.read_text(encoding="utf-8").replace("grpc_pass", "grpc_passs", 1)
    result = _nginx_test(conf, tmp_path)
    assert result.returncode != 0
    assert "grpc_passs" in result.stderr
