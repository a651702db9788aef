"""Settings: file, environment and overrides, with errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import ConfigError, load_model_policy, load_settings


def test_defaults_and_environment_overrides(tmp_path: Path) -> None:
    file = tmp_path / "gateway.toml"
    file.write_text("grace_period_s = 5\n[http]\nport = 9000\n[models.m]\ninstances = 2\n")
    settings = load_settings(
        file,
        env={"GATEWAY_HTTP__PORT": "9100", "GATEWAY_RUNTIME__INFERENCE_WORKERS": "3", "OTHER": "x"},
    )
    assert settings.http.port == 9100
    assert settings.runtime.inference_workers == 3
    assert settings.grace_period_s == 5
    assert settings.grpc.port == 8001
    assert settings.models == {"m": {"instances": 2}}
    over = load_settings(file, env={}, overrides={"http.port": 0})
    assert over.http.port == 0


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[http]\nport = 'abc'\n", "http.port"),
        ("[http]\nbogus = 1\n", "bogus"),
        ("[models.m]\nmax_batch_size = -1\n", "max_batch_size"),
        ("[models.m]\ninstances = 0\n", "instances"),
        ("not toml ===", "not valid TOML"),
    ],
)
def test_invalid_settings_name_the_field(tmp_path: Path, text: str, words: str) -> None:
    file = tmp_path / "bad.toml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_settings(file, env={})


def test_model_policy_layers(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("max_batch_size = 16\ninstances = 2\n")
    policy = load_model_policy(tmp_path, {"instances": 3}, {"max_queue_delay_us": 100})
    assert (policy.max_batch_size, policy.instances, policy.max_queue_delay_us) == (16, 3, 100)


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[grpc]\nport = 9001\n")
    assert main(["check-config", str(good)]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[grpc]\nport = 'x'\n")
    assert main(["check-config", str(bad)]) == 2
    assert "grpc.port" in capsys.readouterr().err


def test_store_settings_default_to_embedded_and_validate_the_url() -> None:
    assert load_settings(env={}).store.url == ""
    store = load_settings(
        env={"GATEWAY_STORE__URL": "redis://127.0.0.1:6379/0", "GATEWAY_STORE__LEASE_TTL_S": "1.5"}
    ).store
    assert (store.url, store.cluster, store.lease_ttl_s) == (
        "redis://127.0.0.1:6379/0",
        "gateway",
        1.5,
    )
    with pytest.raises(ConfigError, match=r"store\.url"):
        load_settings(env={"GATEWAY_STORE__URL": "postgres://db/gateway"})
    with pytest.raises(ConfigError, match="lease_ttl_s"):
        load_settings(env={"GATEWAY_STORE__LEASE_TTL_S": "0"})


def test_limits_section_with_durations(tmp_path: Path) -> None:
    file = tmp_path / "gateway.toml"
    file.write_text(
        '[limits]\nheader_timeout = "250ms"\nkeep_alive_timeout = 5\nmax_headers = 50\n'
    )
    settings = load_settings(file, env={"GATEWAY_LIMITS__GRPC_MAX_CONNECTION_AGE": "10m"})
    limits = settings.limits
    assert limits.seconds("header_timeout") == 0.25
    assert limits.seconds("keep_alive_timeout") == 5.0
    assert limits.seconds("grpc_max_connection_age") == 600.0
    assert limits.max_headers == 50
    assert load_settings(None, env={}).limits.max_header_bytes == 64 * 1024
    for env in (
        {"GATEWAY_LIMITS__HEADER_TIMEOUT": "soon"},
        {"GATEWAY_LIMITS__HEADER_TIMEOUT": "nan"},
        {"GATEWAY_LIMITS__MAX_HEADERS": "0"},
        {"GATEWAY_LIMITS__MAX_CONNECTIONS": "-2"},
    ):
        with pytest.raises(ConfigError, match="limits"):
            load_settings(None, env=env)


LONG_OP = "operator-secret-0123456789"
LONG_VIEW = "viewer-secret-0123456789"


def test_admin_client_variables_are_not_settings() -> None:
    env = {
        "GATEWAY_ADMIN_TOKEN": "anything",
        "GATEWAY_ADMIN_URL": "http://127.0.0.1:8002",
        "GATEWAY_ADMIN_TOKEN_FILE": "/tmp/t",
        "GATEWAY_HTTP__PORT": "9005",
    }
    assert load_settings(None, env=env).http.port == 9005


@pytest.mark.parametrize(
    "value",
    [
        f'[{{name = "ops", role = "operator", token = "{LONG_OP}"}},'
        f' {{name = "mon", role = "viewer", token = "{LONG_VIEW}"}}]',
        f'[{{"name": "ops", "role": "operator", "token": "{LONG_OP}"}},'
        f' {{"name": "mon", "role": "viewer", "token": "{LONG_VIEW}"}}]',
    ],
    ids=["toml", "json"],
)
def test_tokens_from_the_environment_as_toml_or_json(value: str) -> None:
    settings = load_settings(None, env={"GATEWAY_ADMIN__TOKENS": value})
    assert [(t.name, t.role, t.token) for t in settings.admin.tokens] == [
        ("ops", "operator", LONG_OP),
        ("mon", "viewer", LONG_VIEW),
    ]


@pytest.mark.parametrize(
    ("tokens", "words"),
    [
        ('[{name = "a", role = "operator", token = "short"}]', "at least 20"),
        (
            f'[{{name = "a", role = "operator", token = "{LONG_OP}"}},'
            f' {{name = "b", role = "viewer", token = "{LONG_OP}"}}]',
            "share one secret",
        ),
        ('[{"name": "a", "role": ', "neither a TOML nor a JSON"),
    ],
)
def test_weak_or_shared_tokens_are_refused(tokens: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_settings(None, env={"GATEWAY_ADMIN__TOKENS": tokens})


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("[drift]\nalpha = 5\n", "drift.alpha = 5.0 is outside the allowed range (0, 0.5]"),
        ("[predictions]\nsample_rate = 1.5\n", "sample_rate must be within 0..1"),
        ("[http]\nport = 70000\n", "http.port = 70000 is outside the allowed range [0, 65535]"),
        ("[admin]\nport = -1\n", "admin.port = -1 is outside the allowed range [0, 65535]"),
        ("access_log_sample_rate = 2\n", "access_log_sample_rate = 2.0 is outside"),
        ("[alerts]\nslack_webhooks = ['ftp://x/secret']\n", "alerts.slack_webhooks: a URL"),
    ],
)
def test_check_config_and_serve_refuse_ranges_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, line: str
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    for argv in (["check-config", str(bad)], ["serve", "--config", str(bad)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert line in err
        assert err.count("\n") == 1
        assert "Traceback" not in err
