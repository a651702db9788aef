"""python -m bench.floor: the gateway next to the bare floor of each stack, in one run.

The yardstick for per-request cost. Five bare servers (bench.bare: grpc.aio unary, grpcio's
synchronous server on 4 threads, a grpc.aio bidirectional stream, a raw ASGI app on
uvicorn, a Starlette route with msgspec), each a minimal V2 ModelInfer around the same
onnxruntime session of mlp_small (32 -> 64 -> 2, written by bench.models; 1 intra-op and
1 inter-op thread), each in its own process, and the gateway (bench.common's
GatewayProcess, the settings bench.peers uses) are all started once. Then, in alternating
rounds (the order rotated each round), every server is driven by the same clients
(bench.loadgen in its own process; perf_analyzer where installed) on the protocols it
speaks. Per cell: throughput, p50/p99, and server CPU per request = utime+stime of the
server's process tree over the measured window / requests completed in it. The report
holds medians over rounds and the gateway/bare ratios per protocol: gRPC unary against the
cheapest bare grpcio server, gRPC stream against the bare stream, HTTP binary against the
bare Starlette+msgspec route (and the raw ASGI app for reference). Besides the floors
(skipped by ``--smoke``): grpc.aio on uvloop, grpcio's sync server handing each call to an
asyncio loop, and a probe, the gateway's own process with the bare handler as its
ModelInfer (bench.bare's ``gateway-handler``): it costs what the bare servers do when the
gateway's process adds nothing, and the gateway's ratio to it is its request path's cost.

Results: bench/results/floor.{json,md}; ``--smoke`` (one short round, bench.loadgen only,
about 20-30 s) writes bench/results/tmp/floor_smoke.*. Options: --rounds, --concurrency
1,16,64, --warmup-s, --measure-s, --no-perf-analyzer, --note, --results-dir, --render
bench/results/floor.json (rewrite the markdown only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from bench.common import RESULTS, environment, perf_analyzer, table, write_results
from bench.models import write_model
from bench.peers.__main__ import _json_safe, run_loadgen_cell, run_perf_analyzer_cell
from bench.peers.servers import (
    SPECS,
    ServerError,
    ServerProcess,
    ServerSpec,
    become_subreaper,
    gateway_settings,
)

logger = logging.getLogger("bench.floor")

MODEL: Final = "mlp_small"
MODEL_CONFIG: Final = "max_batch_size = 64\n"
TMP_RESULTS: Final = RESULTS / "tmp"


def _bare(name: str, label: str, kind: str, modes: tuple[str, ...], *args: str) -> ServerSpec:
    grpc = kind.startswith("grpc")
    return ServerSpec(
        name,
        label,
        modes,
        # perf_analyzer's HTTP client does not finish against the raw ASGI app (it is a
        # reference, not a target's floor): bench.loadgen only there.
        perf_analyzer=()
        if kind == "asgi"
        else tuple("pa-" + m.replace("http-binary", "http") for m in modes),
        batching="none",
        uses_grpc=grpc,
        uses_http=not grpc,
        module="bench.bare",
        args=("--kind", kind, *args),
    )


GATEWAY: Final = ServerSpec(
    "gateway",
    SPECS["gateway"].label,
    ("grpc", "grpc-stream", "http-binary"),
    perf_analyzer=("pa-grpc", "pa-grpc-stream", "pa-http"),
    batching=SPECS["gateway"].batching,
)
BARE: Final = (
    _bare("grpc_aio", "grpc.aio unary, inference inline", "grpc-aio", ("grpc",)),
    _bare("grpc_sync", "grpcio sync server, 4 threads", "grpc-sync", ("grpc",), "--threads", "4"),
    _bare("grpc_stream", "grpc.aio bidi stream (ModelStreamInfer)", "grpc-aio", ("grpc-stream",)),
    _bare("asgi", "raw ASGI on uvicorn (uvloop, httptools)", "asgi", ("http-binary",)),
    _bare("starlette", "Starlette route + msgspec on uvicorn", "starlette", ("http-binary",)),
)
# Variants for reference (skipped by --smoke): the event loop the gateway runs grpc.aio on,
# what a sync front end with an asyncio core behind it pays for the hand-off, and the
# gateway's process around the bare handler.
BARE_EXTRA: Final = (
    _bare("grpc_aio_uvloop", "grpc.aio unary on uvloop", "grpc-aio", ("grpc",), "--uvloop"),
    _bare(
        "grpc_sync_loop",
        "grpcio sync server, 4 threads, handler on an asyncio loop",
        "grpc-sync",
        ("grpc",),
        "--threads",
        "4",
        "--handoff",
        "loop",
    ),
    # Not a floor: the gateway's own process with the bare grpc.aio handler as its
    # ModelInfer. Beside grpc_aio_uvloop: what the process (listeners, threads, options)
    # costs; the gateway beside it: what the gateway's request path costs, served.
    dataclasses.replace(
        _bare("gateway_handler", "gateway process, bare ModelInfer", "gateway-handler", ("grpc",)),
        perf_analyzer=(),  # its statistics count the gateway's path, not this handler's
        uses_grpc=True,
        uses_http=False,  # the gateway's HTTP listener is there, on a port of its own
    ),
)
# Which bare servers each gateway protocol is held against; the first is the target's.
COMPARE: Final = {
    # The target's reference is the cheapest of the plain grpcio servers, chosen per run;
    # the sync server with a loop hand-off is there for reference (what a sync front end
    # keeping an asyncio core would cost), not as a floor.
    "grpc": ("grpc_sync", "grpc_aio", "grpc_aio_uvloop", "grpc_sync_loop", "gateway_handler"),
    "grpc-stream": ("grpc_stream",),
    "http-binary": ("starlette", "asgi"),
}
REFERENCE_ONLY: Final = frozenset({"grpc_sync_loop", "gateway_handler"})
TARGETS: Final = {"grpc": 1.15, "grpc-stream": 1.15, "http-binary": 1.25}
_NAMES: Final = {
    "grpc": "gRPC unary",
    "grpc-stream": "gRPC stream",
    "http-binary": "HTTP binary",
}


def _protocol(mode: str) -> str:
    """The protocol a cell's mode measures: pa-http -> http-binary, pa-grpc -> grpc."""
    if not mode.startswith("pa-"):
        return mode
    return "http-binary" if mode == "pa-http" else mode[3:]


def run_round(
    servers: dict[str, ServerProcess],
    order: list[tuple[str, str]],
    concurrency: int,
    warmup_s: float,
    measure_s: float,
) -> list[dict[str, Any]]:
    """One cell per (server, mode) in ``order`` at one concurrency."""
    cells = []
    for name, mode in order:
        server = servers[name]
        cell: dict[str, Any] = {"server": name, "mode": mode, "concurrency": concurrency}
        try:
            server.check_alive()
            if mode.startswith("pa-"):
                cell |= run_perf_analyzer_cell(server, MODEL, mode[3:], concurrency, measure_s)
                cell["mode"] = mode
                cell["client"] = "perf_analyzer"
            else:
                cell |= run_loadgen_cell(server, MODEL, mode, concurrency, warmup_s, measure_s)
                cell["client"] = "bench.loadgen"
            cell["status"] = "ok" if not cell["errors"] else "errors"
            logger.info(
                "%-11s %-14s c=%-3d %8.0f/s p50 %6.2f ms p99 %6.2f ms cpu %6.3f ms/req err %d",
                name,
                mode,
                concurrency,
                cell["throughput"],
                cell["p50_ms"],
                cell["p99_ms"],
                cell["server_cpu_ms_per_request"],
                cell["errors"],
            )
        except (RuntimeError, OSError, ValueError, ServerError, subprocess.SubprocessError) as exc:
            cell["status"] = f"failed: {exc}"[:1500]
            logger.error("%s %s c=%d failed: %s", name, mode, concurrency, str(exc)[:500])
        cells.append(cell)
    return cells


def summarize(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over rounds per (server, mode, concurrency), with the CPU's min and max."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for cell in cells:
        if cell.get("status") == "ok":
            key = (cell["server"], cell["mode"], cell["concurrency"])
            groups.setdefault(key, []).append(cell)
    rows = []
    for (server, mode, c), group in groups.items():
        cpu = [float(g["server_cpu_ms_per_request"]) for g in group]
        rows.append(
            {
                "server": server,
                "mode": mode,
                "protocol": _protocol(mode),
                "client": group[0]["client"],
                "concurrency": c,
                "rounds": len(group),
                "throughput": statistics.median(g["throughput"] for g in group),
                "p50_ms": statistics.median(g["p50_ms"] for g in group),
                "p99_ms": statistics.median(g["p99_ms"] for g in group),
                "cpu_ms_per_request": statistics.median(cpu),
                "cpu_min": min(cpu),
                "cpu_max": max(cpu),
            }
        )
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gateway / bare CPU per request (and throughput) per protocol, client, concurrency."""
    index = {(r["server"], r["mode"], r["concurrency"]): r for r in rows}
    out = []
    for row in rows:
        if row["server"] != "gateway":
            continue
        protocol = row["protocol"]
        bare_rows = [
            index[(name, row["mode"], row["concurrency"])]
            for name in COMPARE[protocol]
            if (name, row["mode"], row["concurrency"]) in index
        ]
        if protocol == "grpc":
            # The cheapest plain bare grpcio server of this run is the target's reference.
            bare_rows.sort(key=lambda r: (r["server"] in REFERENCE_ONLY, r["cpu_ms_per_request"]))
        for position, bare in enumerate(bare_rows):
            ratio = row["cpu_ms_per_request"] / bare["cpu_ms_per_request"]
            is_target = position == 0
            out.append(
                {
                    "protocol": protocol,
                    "client": row["client"],
                    "concurrency": row["concurrency"],
                    "bare": bare["server"],
                    "gateway_cpu_ms": row["cpu_ms_per_request"],
                    "bare_cpu_ms": bare["cpu_ms_per_request"],
                    "cpu_ratio": ratio,
                    "throughput_ratio": row["throughput"] / bare["throughput"],
                    "target": TARGETS[protocol] if is_target else None,
                    "meets_target": (ratio <= TARGETS[protocol]) if is_target else None,
                }
            )
    return out


def markdown(payload: dict[str, Any]) -> str:
    meta = payload["meta"]
    labels = payload["labels"]
    command = meta["command"].split(" --note ")[0]
    if payload.get("note"):
        command += ' --note "..."'
    lines = [
        "# Stack floor: the gateway next to bare servers (mlp_small)\n",
        f"`{command}` at {meta['git_sha'] or 'unknown commit'}, {meta['date']}; "
        f"{meta['cpu']}, {meta['cores']} cores, Python {meta['python']}; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + f". {payload['rounds']} alternating round(s), medians; "
        f"{payload['warmup_s']} s warm-up + {payload['measure_s']} s window per bench.loadgen "
        "cell, three windows per perf_analyzer cell. Load average at start: "
        + ", ".join(f"{v:.2f}" for v in meta["load_average_at_start"])
        + ".\n",
        "Server CPU per request = utime+stime of the server's process tree (from /proc) over "
        "the measured window / requests completed in it (perf_analyzer: over its whole run / "
        "requests the server counted). Client and server share the machine's cores.\n",
    ]
    if payload.get("note"):
        lines.append(payload["note"] + "\n")
    lines.append("## Gateway / bare, server CPU per request\n")
    ratio_rows = [
        [
            _NAMES[r["protocol"]],
            r["client"],
            r["concurrency"],
            labels[r["bare"]],
            r["gateway_cpu_ms"],
            r["bare_cpu_ms"],
            f"{r['cpu_ratio']:.2f}x",
            f"{r['throughput_ratio']:.2f}x",
            ""
            if r["target"] is None
            else f"<= {r['target']:.2f}x: " + ("met" if r["meets_target"] else "not met"),
        ]
        for r in payload["ratios"]
    ]
    lines.append(
        table(
            [
                "protocol",
                "client",
                "c",
                "bare server",
                "gateway CPU ms/req",
                "bare CPU ms/req",
                "CPU ratio",
                "throughput ratio",
                "target",
            ],
            ratio_rows,
        )
    )
    lines.append("\n## Every server (medians over rounds)\n")
    rows = sorted(
        payload["summary"],
        key=lambda r: (r["concurrency"], r["protocol"], r["client"], r["cpu_ms_per_request"]),
    )
    lines.append(
        table(
            [
                "server",
                "protocol",
                "client",
                "c",
                "infer/s",
                "p50 ms",
                "p99 ms",
                "CPU ms/req",
                "CPU min-max",
                "rounds",
            ],
            [
                [
                    labels[r["server"]],
                    _NAMES[r["protocol"]],
                    r["client"],
                    r["concurrency"],
                    r["throughput"],
                    f"{r['p50_ms']:.2f}",
                    f"{r['p99_ms']:.2f}",
                    r["cpu_ms_per_request"],
                    f"{r['cpu_min']:.3f}-{r['cpu_max']:.3f}",
                    r["rounds"],
                ]
                for r in rows
            ],
        )
    )
    failed = [c for c in payload["cells"] if c.get("status", "").startswith("failed")]
    if failed:
        lines.append("\n## Failed cells\n")
        lines += [
            f"- {c['server']} {c['mode']} c={c['concurrency']}: {c['status'][:300]}\n"
            for c in failed
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="one short round, no perf_analyzer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="16", help="comma-separated, e.g. 1,16,64")
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--measure-s", type=float, default=6.0)
    parser.add_argument("--no-perf-analyzer", action="store_true")
    parser.add_argument("--note", default="", help="a line for the report (e.g. machine state)")
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="where floor.{json,md} go (default bench/results; --smoke: bench/results/tmp)",
    )
    parser.add_argument("--render", type=Path, help="rewrite the markdown from a floor JSON")
    args = parser.parse_args(argv)
    if args.render is not None:
        payload = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(payload))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.smoke:
        args.rounds, args.warmup_s, args.measure_s = 1, 0.3, 1.0
        args.no_perf_analyzer = True
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    use_pa = not args.no_perf_analyzer
    if use_pa:
        perf_analyzer()  # installs it on first use (~2 min)
    become_subreaper()
    started = time.perf_counter()
    meta = environment()
    meta["command"] = "python -m bench.floor " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    root = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    path = write_model(root / "models", MODEL, MODEL_CONFIG)
    specs = (GATEWAY, *BARE) if args.smoke else (GATEWAY, *BARE, *BARE_EXTRA)
    servers: dict[str, ServerProcess] = {}
    cells: list[dict[str, Any]] = []
    try:
        for spec in specs:
            server = ServerProcess(
                spec,
                {MODEL: str(path)},
                repository=root / "models",
                gateway_settings=gateway_settings(root / "data"),
            )
            servers[spec.name] = server.__enter__()
            logger.info("%s ready in %.1f s", spec.label, server.start_s)
        order = [(s.name, m) for s in specs for m in s.modes]
        if use_pa:
            order += [(s.name, m) for s in specs for m in s.perf_analyzer]
        for number in range(args.rounds):
            # Rotate so that no server always runs first (or right after the same one).
            shift = (number * len(order)) // max(args.rounds, 1)
            this_round = order[shift:] + order[:shift]
            for c in concurrencies:
                logger.info("round %d/%d, concurrency %d", number + 1, args.rounds, c)
                for cell in run_round(servers, this_round, c, args.warmup_s, args.measure_s):
                    cell["round"] = number + 1
                    cells.append(cell)
    finally:
        for server in servers.values():
            try:
                server.stop()
            except ServerError as exc:
                logger.error("%s", exc)
    summary = summarize(cells)
    payload = {
        "meta": meta,
        "note": args.note,
        "model": MODEL,
        "rounds": args.rounds,
        "warmup_s": args.warmup_s,
        "measure_s": args.measure_s,
        "concurrency": concurrencies,
        "labels": {s.name: s.label for s in specs},
        "gateway_batching": GATEWAY.batching,
        "total_s": round(time.perf_counter() - started, 1),
        "summary": summary,
        "ratios": ratios(summary),
        "cells": cells,
    }
    payload = _json_safe(payload)
    text = markdown(payload)
    name = "floor_smoke" if args.smoke else "floor"
    folder = args.results_dir or (TMP_RESULTS if args.smoke else None)
    if folder is None:
        write_results(name, payload, text)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
        (folder / f"{name}.md").write_text(text)
    print(text)
    logger.info("done in %.1f s", payload["total_s"])
    failed = [c for c in cells if c.get("status") != "ok"]
    return 1 if failed or not cells else 0


if __name__ == "__main__":
    sys.exit(main())
