"""python -m bench.routing: what traffic routing and shadows cost the primary path.

Cells (perf_analyzer, mlp_small-shaped models, gRPC and HTTP, same machine, same run):
direct (the request names the version) vs routed by weight (50/50 between two copies);
no shadow vs 100% shadow to a copy (concurrency 1: CPU not saturated); and overload: a
shadow thousands of times slower than the primary at 100% sampling, where the bounded
mirror drops what it cannot run, and the shadows' CPU budget (``shadow_cpu_share``, 0.5% of
a core by default) drops the copies it cannot pay for. Rounds alternate (the order of the
configurations rotates each round) and the ratios use the medians over rounds. Options:
--rounds, --window-ms, --configs direct,shadow_slow (a subset; ``direct`` is always run).
Results: bench/results/routing.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import GatewayProcess, environment, measured, run_perf_analyzer, table
from bench.common import write_results as write
from bench.models import mlp

BASE = "[runtime]\ninference_workers = 2\nintra_op_threads = 1\n"
CONFIGS: dict[str, str] = {
    "direct": BASE,
    "weighted": BASE + '[routes.m]\nvariants = {"1" = 50, "2" = 50}\n',
    "shadow_copy": BASE + '[routes.m]\nvariants = {"1" = 1}\n'
    '[[routes.m.shadows]]\nversion = "2"\nsample_rate = 1.0\n',
    "shadow_slow": "shadow_max_in_flight = 2\n" + BASE + '[routes.m]\nvariants = {"1" = 1}\n'
    '[[routes.m.shadows]]\nversion = "3"\nsample_rate = 1.0\n',
    # The same slow shadow without the CPU budget (only the in-flight bound holds it).
    "shadow_slow_unbudgeted": "shadow_max_in_flight = 2\nshadow_cpu_share = 0.0\n"
    + BASE
    + '[routes.m]\nvariants = {"1" = 1}\n'
    '[[routes.m.shadows]]\nversion = "3"\nsample_rate = 1.0\n',
}
SLOW = frozenset({"direct", "shadow_slow", "shadow_slow_unbudgeted"})  # measured at c=1 and 4


def _route(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/m/route") as reply:
        data: dict[str, Any] = json.load(reply)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__)
    parser.add_argument("--window-ms", type=int, default=2000)
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds; ratios use the medians"
    )
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset")
    args = parser.parse_args(argv)
    chosen = ["direct", *(c for c in args.configs.split(",") if c and c != "direct")]
    for name in chosen:
        if name not in CONFIGS:
            parser.error(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
    root = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    for version, sizes, seed in (
        ("1", [32, 64, 2], 0),
        ("2", [32, 64, 2], 0),
        ("3", [32, 2048, 2048, 2048, 2], 1),
    ):
        mlp(root / "m" / version / "model.onnx", sizes, seed=seed, name="m")
    (root / "m" / "config.toml").write_text('max_batch_size = 64\ndefault_version = "1"\n')
    meta = environment()
    meta["command"] = "python -m bench.routing " + " ".join(argv or sys.argv[1:])
    cells: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        order = chosen[rnd % len(chosen) :] + chosen[: rnd % len(chosen)]
        for name in order:
            settings = CONFIGS[name]
            with GatewayProcess(root, settings, name=name) as server:
                for protocol in ("grpc", "http"):
                    port = server.grpc_port if protocol == "grpc" else server.http_port
                    for c in (1, 4) if name in SLOW else (1,):
                        extra = ["-x", "1"] if name == "direct" else []
                        with measured(server, "m") as m:
                            pa = run_perf_analyzer(
                                "m",
                                protocol,
                                f"127.0.0.1:{port}",
                                c,
                                window_ms=args.window_ms,
                                extra=extra,
                            )
                        shadows = _route(server.http_port)["shadows"]
                        cell = {
                            "round": rnd,
                            "config": name,
                            "protocol": protocol,
                            "concurrency": c,
                            **pa,
                            "cpu_ms_per_request": m["cpu_ms_per_request"],
                            "shadow": shadows[0]["comparison"] if shadows else None,
                        }
                        cells.append(cell)
                        print(
                            f"{name:12} {protocol:4} c={c} {pa['throughput']:7.0f}/s p50 "
                            f"{pa['p50_ms']:.3f} p99 {pa['p99_ms']:.3f}",
                            flush=True,
                        )
    summary = summarize(cells)
    payload = {"meta": meta, "cells": cells, "summary": summary}
    lines = [
        "# Routing and shadow cost\n",
        f"`{meta['command'].strip()}` at {meta['git_sha']}, {meta['date']}, {meta['cpu']}.\n",
        table(
            [
                "config",
                "protocol",
                "conc.",
                "infer/s",
                "p50 ms",
                "p99 ms",
                "CPU ms/req",
                "rounds",
                "shadow sent",
                "dropped",
                "over budget",
                "agreement",
            ],
            [
                [
                    c["config"],
                    c["protocol"],
                    c["concurrency"],
                    c["throughput"],
                    c["p50_ms"],
                    c["p99_ms"],
                    c["cpu_ms_per_request"],
                    c["rounds"],
                    (c["shadow"] or {}).get("sent", "-"),
                    (c["shadow"] or {}).get("dropped", "-"),
                    (c["shadow"] or {}).get("over_budget", "-"),
                    (c["shadow"] or {}).get("agreement", "-"),
                ]
                for c in medians(cells)
            ],
        ),
        "Medians over rounds; shadow counters are the last round's (cumulative per gateway "
        "process). Target: a slow shadow at 100% sampling raises the primary's p99 by at most "
        "10% at concurrency 1 and 4 on both protocols.\n",
        "## Ratios\n",
        "```json\n" + json.dumps(summary, indent=2) + "\n```\n",
    ]
    json_path, md_path = write("routing", payload, "\n".join(lines))
    print(f"wrote {json_path} and {md_path}")
    return 0


def medians(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (config, protocol, concurrency): the medians over rounds."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault((cell["config"], cell["protocol"], cell["concurrency"]), []).append(cell)
    rows = []
    for (config, protocol, c), group in groups.items():
        row: dict[str, Any] = {"config": config, "protocol": protocol, "concurrency": c}
        for key in ("throughput", "p50_ms", "p99_ms", "cpu_ms_per_request"):
            row[key] = statistics.median(x[key] for x in group)
        row["rounds"] = len(group)
        row["shadow"] = group[-1]["shadow"]
        rows.append(row)
    return rows


def summarize(cells: list[dict[str, Any]]) -> dict[str, Any]:
    rows = medians(cells)

    def find(config: str, protocol: str, c: int) -> dict[str, Any] | None:
        return next(
            (
                x
                for x in rows
                if x["config"] == config and x["protocol"] == protocol and x["concurrency"] == c
            ),
            None,
        )

    def over(config: str, protocol: str, c: int, key: str) -> float | None:
        cell, base = find(config, protocol, c), find("direct", protocol, c)
        if cell is None or base is None or not base[key]:
            return None
        value: float = cell[key] / base[key] - 1
        return value

    out: dict[str, Any] = {}
    for protocol in ("grpc", "http"):
        out[protocol] = {
            "weighted_p50_over_direct": over("weighted", protocol, 1, "p50_ms"),
            "shadow_copy_p50_over_direct": over("shadow_copy", protocol, 1, "p50_ms"),
            "slow_shadow_p99_over_direct_c1": over("shadow_slow", protocol, 1, "p99_ms"),
            "slow_shadow_p99_over_direct_c4": over("shadow_slow", protocol, 4, "p99_ms"),
            "unbudgeted_slow_shadow_p99_over_direct_c1": over(
                "shadow_slow_unbudgeted", protocol, 1, "p99_ms"
            ),
            "unbudgeted_slow_shadow_p99_over_direct_c4": over(
                "shadow_slow_unbudgeted", protocol, 4, "p99_ms"
            ),
        }
    return out


if __name__ == "__main__":
    raise SystemExit(main())
