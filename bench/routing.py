"""python -m bench.routing: what traffic routing and shadows cost the primary path.

Cells (perf_analyzer, mlp_small-shaped models, gRPC and HTTP, same machine, same run):
direct (the request names the version) vs routed by weight (50/50 between two copies);
no shadow vs 100% shadow to a copy (concurrency 1: CPU not saturated); and overload: a
shadow thousands of times slower than the primary at 100% sampling, where the bounded
mirror drops what it cannot run. Results: bench/results/routing.{json,md}.
"""

from __future__ import annotations

import argparse
import json
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
}


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
    args = parser.parse_args(argv)
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
    for _rnd in range(args.rounds):
        for name, settings in CONFIGS.items():
            with GatewayProcess(root, settings, name=name) as server:
                for protocol in ("grpc", "http"):
                    port = server.grpc_port if protocol == "grpc" else server.http_port
                    for c in (1, 4) if name == "shadow_slow" or name == "direct" else (1,):
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
                "shadow sent",
                "dropped",
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
                    (c["shadow"] or {}).get("sent", "-"),
                    (c["shadow"] or {}).get("dropped", "-"),
                    (c["shadow"] or {}).get("agreement", "-"),
                ]
                for c in cells
            ],
        ),
        "## Ratios\n",
        "```json\n" + json.dumps(summary, indent=2) + "\n```\n",
    ]
    json_path, md_path = write("routing", payload, "\n".join(lines))
    print(f"wrote {json_path} and {md_path}")
    return 0


def summarize(cells: list[dict[str, Any]]) -> dict[str, Any]:
    def find(config: str, protocol: str, c: int) -> dict[str, Any]:
        return next(
            x
            for x in cells
            if x["config"] == config and x["protocol"] == protocol and x["concurrency"] == c
        )

    out: dict[str, Any] = {}
    for protocol in ("grpc", "http"):
        direct = find("direct", protocol, 1)
        out[protocol] = {
            "weighted_p50_over_direct": find("weighted", protocol, 1)["p50_ms"] / direct["p50_ms"]
            - 1,
            "shadow_copy_p50_over_direct": find("shadow_copy", protocol, 1)["p50_ms"]
            / direct["p50_ms"]
            - 1,
            "slow_shadow_p99_over_direct_c1": find("shadow_slow", protocol, 1)["p99_ms"]
            / direct["p99_ms"]
            - 1,
            "slow_shadow_p99_over_direct_c4": find("shadow_slow", protocol, 4)["p99_ms"]
            / find("direct", protocol, 4)["p99_ms"]
            - 1,
        }
    return out


if __name__ == "__main__":
    raise SystemExit(main())
