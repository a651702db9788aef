"""Each gateway module imports only from the layers below it (STYLE.md section 3).

The table below is STYLE.md's: every module of ``gateway/`` sits in exactly one layer, and an
import of another gateway module must point to a lower layer. Imports inside one layer are
allowed only where ``SIBLINGS`` lists them (a package's modules among themselves, the
router's two helpers). A module that is in no layer fails, and so does a table entry that
matches no module. The checker works on source text (``ast``): nothing is imported.
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Sequence
from pathlib import Path

import gateway

ROOT = Path(gateway.__file__).parent

# Patterns: "x" is the module x (or the package x's __init__), "x.*" is x and everything in it.
LAYERS: tuple[tuple[str, ...], ...] = (
    # 0: values and pure functions; the package's own __init__ (the version string).
    ("__init__", "errors", "types", "distributions", "_proto.*"),
    # 1: settings, the error table and renderer, wire codecs, logs.
    ("config", "listener_settings", "status", "codecs.*", "logs", "files", "admin_tokens"),
    # 2: serving parts that know no routing.
    # Also the data listeners' access checks and TLS material.
    ("repository", "batcher", "drift.*", "outcomes", "predlog", "store.*", "alerts", "auth", "tls"),
    # 3: routing and what hangs off it.
    ("router", "shadow", "traffic", "feedback"),
    # 4: the data plane and the control plane.
    ("dataplane", "rollout.*", "control", "telemetry", "metrics", "fleet"),
    # 5: protocol adapters and listeners; the admin page and the admin API's client.
    (
        "http_api",
        "grpc_api",
        "admin",
        "servers",
        "listener_limits",
        "dashboard.*",
        "admin_client",
        "admin_apply",
        "history",
    ),
    # 6: composition root and entry points.
    ("app", "cli", "__main__", "workers"),
)

# Same-layer imports that are allowed: (importer pattern, imported pattern).
SIBLINGS: tuple[tuple[str, str], ...] = (
    ("_proto.*", "_proto.*"),
    ("codecs.*", "codecs.*"),
    ("drift.*", "drift.*"),
    ("store.*", "store.*"),
    ("rollout.*", "rollout.*"),
    # The router owns its shadow runner and per-variant counters; the shadow runner counts.
    ("router", "shadow"),
    ("router", "traffic"),
    ("shadow", "traffic"),
    # Telemetry gathers the snapshot that the metric families render.
    ("telemetry", "metrics"),
    # The listeners take their connection limits from listener_limits.
    ("servers", "listener_limits"),
    # The REST adapter sends an answer's head and body through the listener's writer.
    ("http_api", "listener_limits"),
    # An unwritable data folder is a settings error (one line, naming the path).
    ("files", "config"),
    # Settings are built from their parts; the listeners' parts live beside them.
    ("config", "listener_settings"),
    # The entry points: ``python -m gateway`` runs the CLI, which runs the app.
    ("__main__", "cli"),
    ("cli", "app"),
    # ``serve --workers N``: the CLI starts the supervisor, each worker runs the app.
    ("cli", "workers"),
    ("workers", "app"),
    # The admin client and the admin API plan spec files with the same code.
    ("admin_client", "admin_apply"),
    ("admin", "admin_apply"),
)


def _matches(module: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        base = pattern[:-2]
        return module == base or module.startswith(base + ".")
    return module == pattern


def _module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    if len(parts) > 1 and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, package: str, root: Path = ROOT) -> set[str]:
    """Gateway modules ``path`` imports, as dotted names below the package."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == package:
                # ``from gateway import x``: x is a module, or a name in __init__.
                names = [
                    a.name
                    if (root / f"{a.name}.py").exists() or (root / a.name).is_dir()
                    else "__init__"
                    for a in node.names
                ]
            elif node.module.startswith(package + "."):
                names = [node.module.removeprefix(package + ".")]
        elif isinstance(node, ast.Import):
            names = [
                a.name.removeprefix(package + ".")
                for a in node.names
                if a.name.startswith(package + ".")
            ]
        found.update(names)
    return found


def check_layers(
    root: Path,
    layers: Sequence[Sequence[str]] = LAYERS,
    siblings: Sequence[tuple[str, str]] = SIBLINGS,
    package: str = "gateway",
) -> list[str]:
    """Every problem with the package at ``root``: modules in no layer or in several, table
    entries that match nothing, and imports that are not downward."""
    problems: list[str] = []
    modules = {_module_name(root, p): p for p in sorted(root.rglob("*.py"))}

    def layer_of(module: str) -> int | None:
        hits = [i for i, layer in enumerate(layers) for pat in layer if _matches(module, pat)]
        if len(set(hits)) > 1:
            problems.append(f"{module} is in layers {sorted(set(hits))}; list it once")
        return hits[0] if hits else None

    for layer in layers:
        for pattern in layer:
            if not any(_matches(m, pattern) for m in modules):
                problems.append(f"table entry {pattern!r} matches no module")
    for module, path in modules.items():
        own = layer_of(module)
        if own is None:
            problems.append(f"{module} is in no layer; add it to the table")
            continue
        for imported in sorted(_imports(path, package, root)):
            if imported == module:
                continue
            target = layer_of(imported)
            if target is None:
                problems.append(f"{module} imports {imported}, which is in no layer")
            elif target > own:
                problems.append(f"{module} (layer {own}) imports {imported} (layer {target})")
            elif target == own and not any(
                _matches(module, a) and _matches(imported, b) for a, b in siblings
            ):
                problems.append(f"{module} imports {imported} from its own layer {own}")
    return problems


def test_imports_follow_the_layer_table() -> None:
    problems = check_layers(ROOT)
    assert not problems, "\n".join(problems)


def test_nothing_on_the_request_path_imports_app() -> None:
    for module in ("dataplane", "router", "batcher", "repository", "http_api", "grpc_api"):
        assert not {"app"} & _imports(ROOT / f"{module}.py", "gateway"), module


def _copy(tmp_path: Path) -> Path:
    copy = tmp_path / "gateway"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _plant(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_an_upward_import_fails(tmp_path: Path) -> None:
    copy = _copy(tmp_path)
    assert check_layers(copy) == []
    _plant(copy / "router.py", "from gateway.dataplane import DataPlane")
    assert check_layers(copy) == ["router (layer 3) imports dataplane (layer 4)"]


def test_an_import_of_app_fails_anywhere_below_it(tmp_path: Path) -> None:
    copy = _copy(tmp_path)
    _plant(copy / "drift" / "stats.py", "def _late() -> None:\n    import gateway.app")
    assert check_layers(copy) == ["drift.stats (layer 2) imports app (layer 6)"]


def test_a_sideways_import_needs_a_sibling_entry(tmp_path: Path) -> None:
    copy = _copy(tmp_path)
    _plant(copy / "traffic.py", "from gateway.feedback import PredictionMemory")
    assert check_layers(copy) == ["traffic imports feedback from its own layer 3"]


def test_a_module_in_no_layer_fails(tmp_path: Path) -> None:
    copy = _copy(tmp_path)
    (copy / "helpers.py").write_text('"""helpers.py: nobody\'s job."""\n')
    assert check_layers(copy) == ["helpers is in no layer; add it to the table"]


def test_a_stale_or_doubled_entry_fails(tmp_path: Path) -> None:
    layers = list(LAYERS)
    layers[1] = (*layers[1], "router", "gone")
    problems = check_layers(ROOT, layers)
    assert "table entry 'gone' matches no module" in problems
    assert "router is in layers [1, 3]; list it once" in problems


MAX_MODULE_LINES = 600  # STYLE.md: a module that grows past this is split by concept


def test_no_module_is_over_the_size_limit() -> None:
    """Hand-written modules stay under ``MAX_MODULE_LINES`` (generated protobuf code aside)."""
    long = {
        _module_name(ROOT, p): n
        for p in sorted(ROOT.rglob("*.py"))
        if "_proto" not in p.parts and (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}
