"""python -m bench.scaleout: what the shared control plane and worker processes cost and buy.

(a) Request-path cost of the Redis control plane: the gateway with the embedded SQLite store
against the same gateway with ``store.url`` pointing at a real redis-server (AOF, fsync
always, loopback), serving mlp_small over gRPC unary at concurrency 16 (bench.loadgen in its
own process). Per cell: throughput and server CPU per request (utime+stime of the server
process over the run / requests it completed). The request path never touches Redis, so
the ratio should be 1 within noise; the Redis mode's background work (heartbeat and traffic
snapshot every 0.5 s, lease renewal, change-log XREAD) is included in its CPU.

(b) ``gateway serve --workers 2`` against ``--workers 1`` (the supervisor starts a private
redis-server for the workers' control plane): mlp_small, gRPC unary, concurrency 64, the
throughput ratio. On a 2-core machine the load generator shares the cores with the
workers, so the ratio is below what a many-core host gives.

Rounds alternate the modes (``--rounds``, default 2); the report holds the median of each.
Results: bench/results/scaleout.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Final

from bench.common import ROOT, GatewayProcess, environment, measured, table, write_results
from bench.models import write_model
from tests.redis_server import RedisServer

MODEL: Final = "mlp_small"
MODEL_CONFIG: Final = "max_batch_size = 64\n"


def _loadgen(address: str, concurrency: int, warmup_s: float, measure_s: float) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable, "-m", "bench.loadgen", "--mode", "grpc", "--address", address,
            "--model", MODEL, "--concurrency", str(concurrency),
            "--warmup-s", str(warmup_s), "--measure-s", str(measure_s),
        ],
        capture_output=True, text=True, check=True, cwd=ROOT, timeout=warmup_s + measure_s + 60,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _store_cell(repo: Path, settings: str, args: argparse.Namespace) -> dict[str, Any]:
    with GatewayProcess(repo, settings) as server, measured(server, MODEL) as cost:
        load = _loadgen(f"127.0.0.1:{server.grpc_port}", 16, args.warmup_s, args.measure_s)
    return {
        "throughput": load["throughput"],
        "p99_ms": load["p99_ms"],
        "errors": load["errors"],
        "cpu_ms_per_request": cost["cpu_ms_per_request"],
    }


def _workers_cell(repo: Path, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    with GatewayProcess(repo, name=f"--workers {workers}", workers=workers) as server:
        load = _loadgen(f"127.0.0.1:{server.grpc_port}", 64, args.warmup_s, args.measure_s)
    return {"throughput": load["throughput"], "p99_ms": load["p99_ms"], "errors": load["errors"]}


def _median(cells: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(c[key] for c in cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--measure-s", type=float, default=8.0)
    parser.add_argument("--note", default="", help="a line appended to the report")
    args = parser.parse_args(argv)
    cells: dict[str, list[dict[str, Any]]] = {
        "embedded": [],
        "redis": [],
        "workers_1": [],
        "workers_2": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        write_model(repo, MODEL, MODEL_CONFIG)
        with RedisServer(Path(tmp) / "redis") as redis_server:
            redis_settings = f'[store]\nurl = "{redis_server.url}"\ncluster = "bench"\n'
            for n in range(args.rounds):
                order = [("embedded", ""), ("redis", redis_settings)]
                for mode, settings in order if n % 2 == 0 else order[::-1]:
                    cells[mode].append(_store_cell(repo, settings, args))
                    print(mode, cells[mode][-1], flush=True)
        for n in range(args.rounds):
            for workers in (1, 2) if n % 2 == 0 else (2, 1):
                cells[f"workers_{workers}"].append(_workers_cell(repo, workers, args))
                print(workers, cells[f"workers_{workers}"][-1], flush=True)
    summary = {mode: {k: _median(c, k) for k in c[0]} for mode, c in cells.items()}
    ratios = {
        "redis_vs_embedded_throughput": summary["redis"]["throughput"]
        / summary["embedded"]["throughput"],
        "redis_vs_embedded_cpu_per_request": summary["redis"]["cpu_ms_per_request"]
        / summary["embedded"]["cpu_ms_per_request"],
        "workers_2_vs_1_throughput": summary["workers_2"]["throughput"]
        / summary["workers_1"]["throughput"],
    }
    env: dict[str, Any] = environment()
    payload = {
        "environment": env,
        "command": f"python -m bench.scaleout --rounds {args.rounds}"
        f" --warmup-s {args.warmup_s:g} --measure-s {args.measure_s:g}",
        "note": args.note,
        "model": MODEL,
        "cells": cells,
        "summary": summary,
        "ratios": ratios,
    }
    md = "# Scale-out: Redis control plane and worker processes\n\n"
    md += f"`{payload['command']}`, git {env.get('git_sha', '')}, {os.cpu_count()} CPUs, "
    md += f"load average at start {env.get('load_average_at_start')}, "
    md += f"medians of {args.rounds} alternating rounds, {args.measure_s:g} s windows, "
    md += "bench.loadgen gRPC unary (client on the same cores).\n\n"
    md += table(
        ["mode", "concurrency", "infer/s", "p99 ms", "server CPU ms/request", "errors"],
        [
            ["embedded SQLite", 16, summary["embedded"]["throughput"],
             summary["embedded"]["p99_ms"], summary["embedded"]["cpu_ms_per_request"],
             int(summary["embedded"]["errors"])],
            ["Redis control plane", 16, summary["redis"]["throughput"],
             summary["redis"]["p99_ms"], summary["redis"]["cpu_ms_per_request"],
             int(summary["redis"]["errors"])],
            ["--workers 1", 64, summary["workers_1"]["throughput"],
             summary["workers_1"]["p99_ms"], "", int(summary["workers_1"]["errors"])],
            ["--workers 2", 64, summary["workers_2"]["throughput"],
             summary["workers_2"]["p99_ms"], "", int(summary["workers_2"]["errors"])],
        ],
    )  # fmt: skip
    md += "\n" + table(["ratio", "value"], [[k, v] for k, v in ratios.items()])
    md += (
        "\nThroughput on a shared machine follows what else runs (see the load average): "
        "compare the request-path cost by server CPU per request, which counts only the "
        "gateway's own work. Every cell: `cells` in scaleout.json.\n"
    )
    if args.note:
        md += f"\n{args.note}\n"
    json_path, md_path = write_results("scaleout", payload, md)
    print(md)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
