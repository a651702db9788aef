"""Each gateway module imports only from the layers below it (STYLE.md section 3)."""

from __future__ import annotations

import ast
from pathlib import Path

import gateway

ROOT = Path(gateway.__file__).parent

# module -> gateway modules it may import (prefix match; "codecs" covers codecs.*).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "types": set(),
    "metrics": set(),
    "config": {"errors"},
    "codecs": {"types", "errors", "_proto", "codecs"},
    "status": {"types", "errors"},
    # The datatype table is shared knowledge: the repository maps ONNX types through it.
    "repository": {"config", "types", "errors", "metrics", "codecs.datatypes"},
    "batcher": {"config", "types", "errors", "metrics"},
    "router": {"batcher", "config", "types", "errors", "metrics", "shadow", "traffic"},
    # Helpers of the router layer: mirroring and per-variant statistics.
    "shadow": {"types", "errors", "traffic"},
    "traffic": set(),
    "drift": {"config", "types", "metrics", "drift"},
    "rollout": {"router", "drift", "store", "config", "errors", "metrics", "types"},
    "store": {"config", "errors", "types", "store"},
    # Webhook delivery, part of the rollout layer; the admin CLI talks HTTP only.
    "alerts": {"config", "errors", "types"},
    "admin_client": set(),
    # Gathers rollout signals from the router and the drift monitor (read-only).
    "signals": {"router", "drift", "rollout", "traffic", "types"},
    # Ground truth: remembered predictions and outcome statistics (pure numerics).
    "outcomes": set(),
    "feedback": {"config", "types", "errors", "outcomes"},
    # Operability: structured logs, the prediction log writer, dashboard assets.
    "logs": set(),
    "predlog": {"config", "types", "errors"},
    "dashboard": set(),
    "http_api": {
        "codecs",
        "status",
        "router",
        "config",
        "types",
        "errors",
        "metrics",
        "traffic",
        "logs",
        "feedback",
    },
    "grpc_api": {
        "codecs",
        "status",
        "router",
        "config",
        "types",
        "errors",
        "metrics",
        "_proto",
        "logs",
        "feedback",
    },
    "admin": {
        "rollout",
        "router",
        "repository",
        "store",
        "status",
        "config",
        "metrics",
        "types",
        "errors",
        "codecs",
        "drift",
    },
}
ANYTHING = {"app", "cli", "__main__", "__init__", "_proto"}


def _layer(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return rel.parts[0]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gateway."):
            found.add(node.module.removeprefix("gateway."))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("gateway."):
                    found.add(alias.name.removeprefix("gateway."))
    return found


def test_imports_follow_the_layer_table() -> None:
    problems = []
    for path in ROOT.rglob("*.py"):
        layer = _layer(path)
        if layer in ANYTHING:
            continue
        allowed = ALLOWED.get(layer)
        assert allowed is not None, f"{path} is in no layer; add it to the table"
        for module in _imports(path):
            if not any(module == a or module.startswith(a + ".") for a in allowed):
                problems.append(f"{path.relative_to(ROOT)} imports gateway.{module}")
    assert not problems, "\n".join(problems)
