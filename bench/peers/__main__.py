"""python -m bench.peers: the gateway side by side with serving peers, one command.

Installs the missing peers (each in its own venv under bench/.peers/, pinned), then for
each server (gateway, PyTriton, KServe, MLServer, Ray Serve, BentoML): starts it once with
both models (mlp_small 32->64->2, mlp_large 256->1024->1024->16, the same ONNX files for
everyone), waits until each model answers, and runs every cell: each model x each protocol
the server speaks x concurrency 1, 16, 64, driven by the same closed-loop client
(bench.loadgen, its own process); the gateway and PyTriton are also driven by Triton's
perf_analyzer (C++ client) over HTTP and gRPC. Then it stops the server and checks that no
process of it is left.

Per cell: throughput, p50/p90/p99 latency, errors, and the server's CPU time per request:
utime+stime of all the server's processes (from /proc, over the measurement window) divided
by the requests completed in the window. Results: bench/results/peers.{json,md}.

Options: --quick (mlp_small, c=1 and 16, short windows), --smoke (gateway plus one
installed peer, mlp_small, c=16, ~20 s, no installs, no network; results under
bench/results/tmp/), --peers a,b (gateway,pytriton,kserve,mlserver,ray,bentoml), --models,
--concurrency, --warmup-s, --measure-s, --no-install, --no-perf-analyzer.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

from bench.common import (
    RESULTS,
    environment,
    perf_analyzer,
    run_perf_analyzer,
    table,
    write_results,
)
from bench.models import MODELS, write_model
from bench.peers import install
from bench.peers.servers import (
    SPECS,
    ServerError,
    ServerProcess,
    ServerSpec,
    become_subreaper,
    gateway_settings,
)

logger = logging.getLogger("bench.peers")

ROOT: Final = Path(__file__).resolve().parents[2]
MODEL_CONFIG: Final = "max_batch_size = 64\n"
DEFAULT_MODELS: Final = ("mlp_small", "mlp_large")
DEFAULT_CONCURRENCY: Final = (1, 16, 64)
# 2 s warm-up + 6 s window: ~105 cells fit in under 20 minutes with installs and starts.
DEFAULT_WARMUP_S: Final = 2.0
DEFAULT_MEASURE_S: Final = 6.0
MAX_RESTARTS: Final = 2  # a server that keeps crashing is reported, not retried forever
_PEER_PACKAGES: Final = {
    "pytriton": ["nvidia-pytriton", "tritonclient", "onnxruntime", "numpy", "grpcio"],
    "kserve": ["kserve", "fastapi", "uvicorn", "onnxruntime", "numpy", "grpcio", "uvloop"],
    "mlserver": ["mlserver", "fastapi", "uvicorn", "onnxruntime", "numpy", "grpcio", "uvloop"],
    "ray": ["ray", "fastapi", "uvicorn", "onnxruntime", "numpy"],
    "bentoml": ["bentoml", "uvicorn", "starlette", "onnxruntime", "numpy"],
}


# ------------------------------------------------------------------------------- cells


def run_loadgen_cell(
    server: ServerProcess,
    model: str,
    mode: str,
    concurrency: int,
    warmup_s: float,
    measure_s: float,
) -> dict[str, Any]:
    """One bench.loadgen run in its own process, with the server's CPU read at the window's
    edges (the client prints START/END). Blocks for warm-up + window + a second or so."""
    port = server.grpc_port if mode.startswith("grpc") else server.http_port
    command = [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--announce",
        "--mode",
        mode,
        "--address",
        f"127.0.0.1:{port}",
        "--model",
        model,
        "--width",
        str(MODELS[model][0]),
        "--concurrency",
        str(concurrency),
        "--warmup-s",
        str(warmup_s),
        "--measure-s",
        str(measure_s),
    ]
    if mode == "plain-json":
        command += ["--path", server.spec.route.format(model=model)]
    cpu = {}
    result: dict[str, Any] = {}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    ) as client:
        assert client.stdout is not None
        for line in client.stdout:
            line = line.strip()
            if line in ("START", "END"):
                cpu[line] = server.cpu_seconds()
            elif line.startswith("{"):
                result = json.loads(line)
        stderr = client.stderr.read() if client.stderr is not None else ""
        client.wait(timeout=60)
    if not result or len(cpu) != 2:
        raise RuntimeError(f"loadgen failed ({client.returncode}): {stderr[-1500:]}")
    count = int(result["count"])
    result["server_cpu_s"] = cpu["END"] - cpu["START"]
    result["server_cpu_ms_per_request"] = (
        1000 * result["server_cpu_s"] / count if count else float("nan")
    )
    result["server_processes"] = len(server.process_tree())
    return result


def run_perf_analyzer_cell(
    server: ServerProcess,
    model: str,
    protocol: str,
    concurrency: int,
    measure_s: float,
) -> dict[str, Any]:
    """One perf_analyzer run (three windows of measure_s/3, --input-data zero). Server CPU
    per request over the whole run / the requests the server itself counted (V2 stats).
    ``protocol`` is ``http``, ``grpc`` or ``grpc-stream`` (gRPC with --streaming)."""
    streaming = protocol == "grpc-stream"
    port = server.grpc_port if protocol.startswith("grpc") else server.http_port
    window_ms = max(500, int(measure_s * 1000 / 3))
    before_requests = server.served_requests(model)
    cpu0 = server.cpu_seconds()
    start = time.perf_counter()
    # Three windows (its minimum) accepted whatever their spread (-s is the allowed spread
    # in percent; 100 still failed at c=64 here): a fixed-length run like the loadgen's,
    # not a hunt for stability on a noisy shared machine.
    pa = run_perf_analyzer(
        model,
        "grpc" if streaming else protocol,
        f"127.0.0.1:{port}",
        concurrency,
        window_ms=window_ms,
        streaming=streaming,
        stability_pct=1000,
        max_trials=4,
        attempts=1,
        timeout_s=120,
    )
    wall = time.perf_counter() - start
    cpu1 = server.cpu_seconds()
    after_requests = server.served_requests(model)
    served = (
        after_requests - before_requests
        if after_requests is not None and before_requests is not None
        else 0
    )
    return {
        "mode": f"pa-{protocol}",
        "concurrency": concurrency,
        "window_s": round(3 * window_ms / 1000, 3),
        "count": served,
        "errors": 0,
        "throughput": pa["throughput"],
        "p50_ms": pa["p50_ms"],
        "p90_ms": pa["p90_ms"],
        "p99_ms": pa["p99_ms"],
        "mean_ms": pa["mean_ms"],
        "client_cpu_ms_per_request": float("nan"),
        "server_cpu_s": cpu1 - cpu0,
        "server_cpu_ms_per_request": 1000 * (cpu1 - cpu0) / served if served else float("nan"),
        "server_cpu_note": f"whole perf_analyzer run ({wall:.1f} s) / server-counted requests",
        "server_processes": len(server.process_tree()),
        "first_error": "",
    }


# ------------------------------------------------------------------------------- server loop


def _run_cell(
    server: ServerProcess,
    model: str,
    mode: str,
    concurrency: int,
    warmup_s: float,
    measure_s: float,
) -> dict[str, Any]:
    cell: dict[str, Any] = {"server": server.spec.name, "model": model}
    try:
        if mode.startswith("pa-"):
            cell |= run_perf_analyzer_cell(server, model, mode[3:], concurrency, measure_s)
            cell["client"] = "perf_analyzer"
        else:
            cell |= run_loadgen_cell(server, model, mode, concurrency, warmup_s, measure_s)
            cell["client"] = "bench.loadgen"
        cell["status"] = "ok" if not cell["errors"] else "errors"
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
        cell |= {"mode": mode, "concurrency": concurrency, "status": f"failed: {exc}"[:1500]}
    return cell


def _health(server: ServerProcess, model: str) -> str:
    """ "" if the server still answers ``model``, else why not (a few tries, ~2 s)."""
    reason = ""
    for _ in range(3):
        try:
            server.check_alive()
            server.probe(model)
            return ""
        except (ServerError, OSError, ValueError, RuntimeError) as exc:
            reason = str(exc)[:500]
            time.sleep(0.5)
    return reason or "no answer"


def bench_server(
    spec: ServerSpec,
    model_paths: dict[str, str],
    repository: Path,
    settings: str,
    concurrencies: tuple[int, ...],
    warmup_s: float,
    measure_s: float,
    use_perf_analyzer: bool,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Start ``spec``'s server, run all its cells, stop it. Returns (server info, cells).

    A failure to start is reported in the info, a failing cell in that cell. After every
    cell the server must still answer; if it crashed (tritonserver did, once, as 64 gRPC
    streams closed), the crash and the server's log tail go into ``info["crashes"]``, the
    cell is flagged, and a fresh server runs the remaining cells (at most MAX_RESTARTS).
    """
    info: dict[str, Any] = {"name": spec.name, "label": spec.label, "batching": spec.batching}
    cells: list[dict[str, Any]] = []
    crashes: list[dict[str, str]] = []
    started = time.perf_counter()
    pending: list[tuple[str, str, int]] = [
        (model, mode, c) for model in model_paths for mode in spec.modes for c in concurrencies
    ]
    if use_perf_analyzer:
        pending += [
            (model, f"pa-{proto}", c)
            for model in model_paths
            for proto in spec.perf_analyzer
            for c in concurrencies
        ]
    try:
        while pending:
            with ServerProcess(
                spec, model_paths, repository=repository, gateway_settings=settings
            ) as server:
                info.setdefault("start_s", round(server.start_s, 1))
                info.setdefault("processes", len(server.process_tree()))
                logger.info(
                    "%s ready in %.1f s (%d processes)",
                    spec.label,
                    server.start_s,
                    len(server.process_tree()),
                )
                while pending:
                    model, mode, c = pending.pop(0)
                    cell = _run_cell(server, model, mode, c, warmup_s, measure_s)
                    cells.append(cell)
                    _log_cell(cell)
                    reason = _health(server, model)
                    if reason:
                        where = f"{model} {mode} c={c}"
                        cell["server_crashed_after"] = True
                        crashes.append({"after": where, "reason": reason, "log": server.log_tail()})
                        logger.error("%s stopped answering after %s: %s", spec.name, where, reason)
                        break
            if pending and len(crashes) > MAX_RESTARTS:
                for model, mode, c in pending:
                    cells.append(
                        {
                            "server": spec.name,
                            "model": model,
                            "mode": mode,
                            "concurrency": c,
                            "status": "failed: server crashed too often",
                        }
                    )
                pending = []
        info["status"] = "ok" if not crashes else f"ok after {len(crashes)} crash(es)"
    except (ServerError, OSError, subprocess.SubprocessError) as exc:
        info["status"] = f"failed: {exc}"[:3000]
        logger.error("%s failed: %s", spec.label, str(exc)[:2000])
    info["crashes"] = crashes
    info["total_s"] = round(time.perf_counter() - started, 1)
    return info, cells


def _log_cell(cell: dict[str, Any]) -> None:
    if cell["status"].startswith("failed"):
        logger.info(
            "%-8s %-9s %-11s c=%-3d %s",
            cell["server"],
            cell["model"],
            cell["mode"],
            cell["concurrency"],
            cell["status"][:300],
        )
        return
    logger.info(
        "%-8s %-9s %-11s c=%-3d %8.0f/s p50 %7.2f ms p99 %7.2f ms cpu %6.3f ms/req err %d",
        cell["server"],
        cell["model"],
        cell["mode"],
        cell["concurrency"],
        cell["throughput"],
        cell["p50_ms"],
        cell["p99_ms"],
        cell["server_cpu_ms_per_request"],
        cell["errors"],
    )


# ------------------------------------------------------------------------------- report


def peer_versions(peer: str) -> dict[str, str]:
    """Installed versions of the packages that matter, read from the peer's own venv."""
    if not install.is_installed(peer):
        return {}
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for name in sys.argv[1:]:\n"
        "    try: out[name] = m.version(name)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [str(install.python(peer)), "-c", code, *_PEER_PACKAGES[peer]],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        versions: dict[str, str] = json.loads(done.stdout)
    except ValueError:
        return {}
    return versions


def _machine() -> dict[str, Any]:
    memory = ""
    try:
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        memory = f"{int(first.split()[1]) / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"kernel": platform.release(), "memory": memory, "machine": platform.machine()}


_PROTOCOL_NAMES: Final = {
    "http-binary": "HTTP binary",
    "http-json": "HTTP JSON",
    "grpc": "gRPC unary",
    "grpc-stream": "gRPC stream",
    "plain-json": "HTTP plain JSON",
    "pa-http": "HTTP binary (perf_analyzer)",
    "pa-grpc": "gRPC unary (perf_analyzer)",
    "pa-grpc-stream": "gRPC stream (perf_analyzer)",
}


def _ok(cells: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    """Measured cells (clean or with some errors) matching every ``key=value``."""
    return [
        c
        for c in cells
        if c.get("status") in ("ok", "errors")
        and c.get("throughput")
        and all(c.get(k) == v for k, v in match.items())
    ]


def _cpu(cell: dict[str, Any]) -> float:
    value = cell.get("server_cpu_ms_per_request")
    return float(value) if isinstance(value, float) and value == value else float("inf")


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        return f"{value:,.{digits}f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def headline(cells: list[dict[str, Any]], model: str = "mlp_small") -> dict[str, Any]:
    """Gateway vs best peer: CPU/request and throughput at c=16 (HTTP binary, gRPC unary;
    same protocol, and any HTTP encoding), p99 at c=1 per protocol."""
    out: dict[str, Any] = {"model": model, "c16": {}, "p99_c1": {}}
    peers_http = ("http-binary", "http-json", "plain-json")
    comparisons = {
        "HTTP binary, c=16 (peers: same protocol)": ("http-binary", ("http-binary",)),
        "HTTP binary, c=16 (peers: any HTTP encoding)": ("http-binary", peers_http),
        "gRPC unary, c=16": ("grpc", ("grpc",)),
        "perf_analyzer HTTP, c=16": ("pa-http", ("pa-http",)),
        "perf_analyzer gRPC, c=16": ("pa-grpc", ("pa-grpc",)),
    }
    for title, (ours_mode, peer_modes) in comparisons.items():
        ours = _ok(cells, server="gateway", model=model, mode=ours_mode, concurrency=16)
        theirs = [
            c
            for mode in peer_modes
            for c in _ok(cells, model=model, mode=mode, concurrency=16)
            if c["server"] != "gateway"
        ]
        if not ours or not theirs:
            continue
        g = ours[0]
        cheapest = min(theirs, key=_cpu)
        fastest = max(theirs, key=lambda c: c["throughput"])
        out["c16"][title] = {
            "gateway_cpu_ms": g["server_cpu_ms_per_request"],
            "best_peer_cpu": f"{cheapest['server']} {cheapest['mode']}",
            "best_peer_cpu_ms": cheapest["server_cpu_ms_per_request"],
            "cpu_ratio_peer_over_gateway": cheapest["server_cpu_ms_per_request"]
            / g["server_cpu_ms_per_request"],
            "gateway_throughput": g["throughput"],
            "best_peer_throughput": f"{fastest['server']} {fastest['mode']}",
            "best_peer_throughput_value": fastest["throughput"],
            "throughput_ratio_gateway_over_peer": g["throughput"] / fastest["throughput"],
        }
    for mode in ("http-binary", "http-json", "grpc", "grpc-stream", "pa-http", "pa-grpc"):
        ours = _ok(cells, server="gateway", model=model, mode=mode, concurrency=1)
        theirs = [
            c for c in _ok(cells, model=model, mode=mode, concurrency=1) if c["server"] != "gateway"
        ]
        if not ours:
            continue
        entry: dict[str, Any] = {"gateway_p99_ms": ours[0]["p99_ms"]}
        if theirs:
            best = min(theirs, key=lambda c: c["p99_ms"])
            entry |= {
                "best_peer": best["server"],
                "best_peer_p99_ms": best["p99_ms"],
                "ratio_peer_over_gateway": best["p99_ms"] / ours[0]["p99_ms"],
            }
        out["p99_c1"][mode] = entry
    return out


def markdown(payload: dict[str, Any]) -> str:
    cells: list[dict[str, Any]] = payload["cells"]
    env = payload["environment"]
    lines = [
        "# Gateway vs serving peers (`python -m bench.peers`)\n",
        f"Command: `{payload['command']}`; {env['date']}; git {env['git_sha']}; "
        f"{env['cpu']} x{env['cores']}, {payload['machine']['memory']}; Python {env['python']}; "
        f"total {payload['total_s'] / 60:.1f} min. Warm-up {payload['settings']['warmup_s']} s, "
        f"window {payload['settings']['measure_s']} s per cell; one row per request "
        "(batch 1); every server on the same 2 cores as its client.\n",
        "Server CPU ms/req = CPU time of all the server's processes over the window (from "
        "/proc) / requests completed in it: the figure that does not depend on what else "
        "the shared machine runs. Latencies in ms. Client: bench.loadgen (closed loop, "
        "one process) unless the protocol says perf_analyzer.\n",
    ]
    head = payload.get("headline", {})
    small = [c for c in _ok(cells, model="mlp_small", concurrency=16)]
    if small:
        lines.append("## Headline: mlp_small, concurrency 16\n")
        rows = []
        order = list(_PROTOCOL_NAMES)
        for c in sorted(small, key=lambda c: (order.index(c["mode"]), c["server"] != "gateway")):
            c1 = _ok(cells, server=c["server"], model="mlp_small", mode=c["mode"], concurrency=1)
            rows.append(
                [
                    c["server"],
                    _PROTOCOL_NAMES.get(c["mode"], c["mode"]),
                    _fmt(c["throughput"], 0),
                    _fmt(c["p50_ms"]),
                    _fmt(c["p99_ms"]),
                    _fmt(c["server_cpu_ms_per_request"], 3),
                    _fmt(c1[0]["p99_ms"]) if c1 else "n/a",
                ]
            )
        lines.append(
            table(
                [
                    "server",
                    "protocol",
                    "infer/s",
                    "p50 ms",
                    "p99 ms",
                    "server CPU ms/req",
                    "p99 ms at c=1",
                ],
                rows,
            )
        )
    if head.get("c16"):
        lines.append("### Gateway vs best peer (mlp_small, c=16)\n")
        rows = [
            [
                title,
                _fmt(h["gateway_cpu_ms"], 3),
                f"{h['best_peer_cpu']}: {_fmt(h['best_peer_cpu_ms'], 3)}",
                f"{h['cpu_ratio_peer_over_gateway']:.1f}x",
                _fmt(h["gateway_throughput"], 0),
                f"{h['best_peer_throughput']}: {_fmt(h['best_peer_throughput_value'], 0)}",
                f"{h['throughput_ratio_gateway_over_peer']:.2f}x",
            ]
            for title, h in head["c16"].items()
        ]
        lines.append(
            table(
                [
                    "comparison",
                    "gateway CPU ms/req",
                    "lowest peer CPU ms/req",
                    "peer/gateway CPU",
                    "gateway infer/s",
                    "best peer infer/s",
                    "gateway/peer infer/s",
                ],
                rows,
            )
        )
    if head.get("p99_c1"):
        lines.append("### p99 latency at concurrency 1 (mlp_small)\n")
        rows = [
            [
                _PROTOCOL_NAMES.get(mode, mode),
                _fmt(h["gateway_p99_ms"]),
                f"{h['best_peer']}: {_fmt(h['best_peer_p99_ms'])}" if "best_peer" in h else "-",
                f"{h['ratio_peer_over_gateway']:.1f}x" if "best_peer" in h else "-",
            ]
            for mode, h in head["p99_c1"].items()
        ]
        lines.append(
            table(["protocol", "gateway p99 ms", "best peer p99 ms", "peer/gateway"], rows)
        )
    for model in payload["settings"]["models"]:
        model_cells = [c for c in cells if c["model"] == model]
        if not model_cells:
            continue
        lines.append(f"## {model} ({' -> '.join(map(str, MODELS[model]))}): all cells\n")
        rows = []
        for c in model_cells:
            if c["status"].startswith("failed"):
                rows.append(
                    [c["server"], _PROTOCOL_NAMES.get(c["mode"], c["mode"]), c["concurrency"]]
                    + ["-"] * 6
                    + [c["status"][:120].replace("|", "/").replace("\n", " ")]
                )
                continue
            rows.append(
                [
                    c["server"],
                    _PROTOCOL_NAMES.get(c["mode"], c["mode"]),
                    c["concurrency"],
                    _fmt(c["throughput"], 0),
                    _fmt(c["p50_ms"]),
                    _fmt(c["p90_ms"]),
                    _fmt(c["p99_ms"]),
                    _fmt(c["server_cpu_ms_per_request"], 3),
                    _fmt(c["client_cpu_ms_per_request"], 3) if c["count"] else "n/a",
                    _errors(c),
                ]
            )
        lines.append(
            table(
                [
                    "server",
                    "protocol",
                    "c",
                    "infer/s",
                    "p50",
                    "p90",
                    "p99",
                    "server CPU ms/req",
                    "client CPU ms/req",
                    "errors",
                ],
                rows,
            )
        )
    lines.append("## Servers\n")
    rows = []
    for info in payload["servers"]:
        versions = payload["versions"].get(info["name"], {})
        rows.append(
            [
                info["label"],
                ", ".join(f"{k} {v}" for k, v in versions.items()),
                info["batching"],
                str(info.get("start_s", "-")),
                str(info.get("processes", "-")),
                info["status"][:300].replace("|", "/").replace("\n", " "),
            ]
        )
    lines.append(table(["server", "versions", "batching", "start s", "processes", "status"], rows))
    for info in payload["servers"]:
        for crash in info.get("crashes", []):
            lines.append(
                f"- {info['label']} stopped answering during/after {crash['after']}: "
                f"{_crash_summary(crash['log'])}; a fresh server ran the remaining cells "
                "(server log tail in peers.json).\n"
            )
    return "\n".join(lines)


def _errors(cell: dict[str, Any]) -> str:
    text = str(cell["errors"])
    if cell.get("first_error"):
        text += f" ({cell['first_error'][:60]})"
    if cell.get("server_crashed_after"):
        text += " - server crashed"
    return text


def _crash_summary(log: str) -> str:
    """The telling line of a crashed server's log tail (a signal, a fatal error)."""
    for line in log.splitlines():
        if "Signal (" in line or "Segmentation" in line or "Fatal" in line:
            return line.strip()[:200]
    return "see its log"


# ------------------------------------------------------------------------------- main


def _json_safe(value: Any) -> Any:
    """NaN (a cell without a CPU figure) becomes null: strict JSON has no NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _install_perf_analyzer() -> str:
    """bench/install_perf_analyzer.sh with its pip chatter in a log file; the wrapper path."""
    wrapper = install.PEER_DIR / "perf_analyzer" / "run"
    if not wrapper.exists():
        install.PEER_DIR.mkdir(parents=True, exist_ok=True)
        log = install.PEER_DIR / "perf_analyzer.install.log"
        with log.open("w") as out:
            subprocess.run(
                ["bash", str(ROOT / "bench" / "install_perf_analyzer.sh")],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=True,
            )
    return perf_analyzer()


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="mlp_small, c=1,16, short windows")
    parser.add_argument("--smoke", action="store_true", help="~20 s: gateway + 1 installed peer")
    parser.add_argument("--peers", default=",".join(SPECS), help="servers, comma-separated")
    parser.add_argument("--models", help=f"default {','.join(DEFAULT_MODELS)}")
    parser.add_argument("--concurrency", help="default 1,16,64")
    parser.add_argument("--warmup-s", type=float, default=None)
    parser.add_argument("--measure-s", type=float, default=None)
    parser.add_argument("--no-install", action="store_true", help="skip peers not installed")
    parser.add_argument("--no-perf-analyzer", action="store_true")
    parser.add_argument("--output", default="", help="results name (default peers)")
    parser.add_argument(
        "--render", metavar="JSON", help="only rewrite the .md beside an existing results JSON"
    )
    args = parser.parse_args(argv)
    if args.render:
        results = Path(args.render)
        results.with_suffix(".md").write_text(markdown(json.loads(results.read_text())))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()
    become_subreaper()

    servers = _csv(args.peers)
    unknown = [s for s in servers if s not in SPECS]
    if unknown:
        parser.error(f"unknown peers {unknown}; choose from {list(SPECS)}")
    models = list(DEFAULT_MODELS)
    concurrencies: tuple[int, ...] = DEFAULT_CONCURRENCY
    warmup_s, measure_s = DEFAULT_WARMUP_S, DEFAULT_MEASURE_S
    use_pa = not args.no_perf_analyzer
    output = args.output or "peers"
    results_dir = RESULTS
    install_failures: dict[str, str] = {}
    if args.smoke:
        # No installs, no network: the gateway plus the first peer already installed.
        # KServe first: it starts in ~3 s (PyTriton ~10 s, Ray ~20 s).
        order = ("kserve", "mlserver", "bentoml", "pytriton", "ray")
        installed = [p for p in order if install.is_installed(p) and p in servers]
        servers = ["gateway", *installed[:1]]
        models, concurrencies, warmup_s, measure_s, use_pa = ["mlp_small"], (16,), 0.5, 1.5, False
        output = args.output or "peers_smoke"
        results_dir = RESULTS / "tmp"
    elif args.quick:
        models, concurrencies, warmup_s, measure_s = ["mlp_small"], (1, 16), 1.0, 3.0
        output = args.output or "peers_quick"
    # Explicit options win over the --quick / --smoke presets.
    if args.models:
        models = _csv(args.models)
        unknown = [m for m in models if m not in MODELS]
        if unknown:
            parser.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    if args.concurrency:
        concurrencies = tuple(int(c) for c in _csv(args.concurrency))
    warmup_s = args.warmup_s if args.warmup_s is not None else warmup_s
    measure_s = args.measure_s if args.measure_s is not None else measure_s

    peers = [s for s in servers if s != "gateway"]
    use_pa = use_pa and any(SPECS[s].perf_analyzer for s in servers)
    with ThreadPoolExecutor(1) as pool:
        # perf_analyzer's install (its own venv) runs beside the peers' pip runs.
        pa_ready = pool.submit(_install_perf_analyzer) if use_pa else None
        if args.no_install:
            servers = [s for s in servers if s == "gateway" or install.is_installed(s)]
        elif not args.smoke:
            install_failures = install.ensure_all(peers)
        if pa_ready is not None:
            try:
                pa_ready.result()
            except (subprocess.CalledProcessError, OSError) as exc:
                logger.error("perf_analyzer unavailable, its cells are skipped: %s", exc)
                use_pa = False

    root = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    model_paths = {m: str(write_model(root / "models", m, MODEL_CONFIG)) for m in models}
    settings = gateway_settings(root / "gateway-data")
    meta = environment()
    infos: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []
    for name in servers:
        spec = SPECS[name]
        if name in install_failures:
            infos.append(
                {
                    "name": name,
                    "label": spec.label,
                    "batching": spec.batching,
                    "status": f"failed to install: {install_failures[name]}"[:3000],
                }
            )
            continue
        info, server_cells = bench_server(
            spec, model_paths, root / "models", settings, concurrencies, warmup_s, measure_s, use_pa
        )
        infos.append(info)
        cells += server_cells

    shutil.rmtree(root, ignore_errors=True)
    payload: dict[str, Any] = {
        "command": shlex.join(
            ["python", "-m", "bench.peers", *(argv if argv is not None else sys.argv[1:])]
        ),
        "total_s": round(time.perf_counter() - started, 1),
        "environment": meta,
        "machine": _machine(),
        "settings": {
            "models": models,
            "concurrency": list(concurrencies),
            "warmup_s": warmup_s,
            "measure_s": measure_s,
            "rows_per_request": 1,
            "gateway_settings": settings,
            "model_config": MODEL_CONFIG,
            "onnxruntime_session": "intra_op_num_threads=1, inter_op_num_threads=1",
            "perf_analyzer": use_pa,
        },
        "versions": {name: peer_versions(name) for name in servers if name != "gateway"},
        "servers": infos,
        "cells": cells,
    }
    payload["versions"]["gateway"] = meta["versions"]
    payload["headline"] = headline(cells)
    payload = _json_safe(payload)
    results_dir.mkdir(parents=True, exist_ok=True)
    if results_dir == RESULTS:
        json_path, md_path = write_results(output, payload, markdown(payload))
    else:
        json_path = results_dir / f"{output}.json"
        md_path = results_dir / f"{output}.md"
        json_path.write_text(json.dumps(payload, indent=2) + "\n")
        md_path.write_text(markdown(payload))
    failed_cells = sum(1 for c in cells if c["status"] != "ok")
    logger.info(
        "done in %.1f min: %d cells (%d not clean); %s, %s",
        payload["total_s"] / 60,
        len(cells),
        failed_cells,
        json_path.relative_to(ROOT),
        md_path.relative_to(ROOT),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
