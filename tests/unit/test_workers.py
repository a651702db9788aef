"""``serve --workers N`` refuses what cannot work, before starting anything: shared ports
must be fixed, and N > 1 without a store URL needs the redis-server binary."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_settings
from gateway.workers import serve_workers


def test_workers_need_fixed_ports(tmp_path: Path) -> None:
    settings = load_settings(env={"GATEWAY_HTTP__PORT": "0", "GATEWAY_DATA_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match="fixed ports"):
        serve_workers(settings, 2)


def test_workers_without_a_store_url_need_redis_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on it
    settings = load_settings(env={"GATEWAY_DATA_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match="GATEWAY_STORE__URL"):
        serve_workers(settings, 2)
    assert not (tmp_path / "redis").exists()
