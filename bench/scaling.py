"""python -m bench.scaling: served rows/s as serving processes are added (``--workers N``).

One gateway process does a request's Python work (decode, admit, route, batch, encode) on
one event loop, so with one-row requests it serves at most about one core's worth of
requests however many cores the model could use (``bench.batching``: the loop, not the
model, bounds a 16-core machine). ``gateway serve --workers N`` runs N such processes on the
same ports. This bench serves one model through 1, 2, 4, ... workers with perf_analyzer
(gRPC, one row per request unless ``--batch`` says more) and reports, per cell: served
rows/s, p50 and p99, and the server's cores in use (CPU seconds of the supervisor, its
workers and their private redis-server over the run, per wall second); against in-process
onnxruntime at batch 64 on 2 intra-op threads (``bench.batching``'s yardstick) and on every
core, measured in the same run. Each worker's loaded model line (execution inline or in the
pool, fill size) is kept.

The kernel spreads connections over the workers (SO_REUSEPORT); perf_analyzer's concurrent
requests travel over several connections, so the load spreads (mlp_small served 3.3x the
requests with four workers on 16 cores). Server CPU per row divides the tree's CPU by
served rows (perf_analyzer's throughput times the run's wall time, an estimate: each worker
keeps its own statistics).

Options: --models compute_heavy, --workers 1,2,4, --protocols grpc,grpc-stream,
--concurrency 64, --execution auto,pool (each worker's ``execution`` setting), --instances
1,2 (model instances per worker), --batch 1,16 (rows per request: perf_analyzer's -b, whose
throughput then counts rows), --providers CUDAExecutionProvider,CPUExecutionProvider (then
results go to scaling_cuda.*). Results: bench/results/scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.batching import CPU, check_served, ort_run, settings
from bench.common import (
    GatewayProcess,
    environment,
    run_perf_analyzer,
    table,
    tree_cpu_seconds,
    write_results,
)
from bench.models import MODELS, write_model

_LOADED = re.compile(
    r"loaded model \S+ version \S+ \((\w+), batch \w+, fill (\w+), .*?(inline|pool)\)"
)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def cell(
    server: GatewayProcess,
    model: str,
    protocol: str,
    concurrency: int,
    rows: int,
    window_ms: int,
) -> dict[str, Any]:
    """One perf_analyzer run against ``server`` (``rows`` rows per request): its figures
    (throughput in rows/s) and the server tree's CPU."""
    cpu0, start = tree_cpu_seconds(server.pid), time.perf_counter()
    pa = run_perf_analyzer(
        model,
        "grpc",
        f"127.0.0.1:{server.grpc_port}",
        concurrency,
        window_ms=window_ms,
        streaming=protocol == "grpc-stream",
        extra=["-b", str(rows)],
    )
    wall = time.perf_counter() - start
    cpu = tree_cpu_seconds(server.pid) - cpu0
    return {
        **pa,
        "wall_s": wall,
        "server_cores": cpu / wall,
        "server_cpu_ms_per_row": 1000 * cpu / max(pa["throughput"] * wall, 1.0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__)
    parser.add_argument("--models", default="compute_heavy")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--protocols", default="grpc")
    parser.add_argument("--concurrency", default="64")
    parser.add_argument("--execution", default="auto", help="auto, inline, pool: comma list")
    parser.add_argument("--instances", default="2", help="model instances per worker: list")
    parser.add_argument("--batch", default="1", help="rows per request (perf_analyzer -b): list")
    parser.add_argument("--window-ms", type=int, default=1500)
    parser.add_argument("--providers", default=",".join(CPU))
    args = parser.parse_args(argv)
    providers = tuple(args.providers.split(","))
    root = Path(tempfile.mkdtemp(prefix="bench-models-"))
    meta = environment()
    meta["command"] = "python -m bench.scaling " + " ".join(argv or sys.argv[1:])
    meta["providers"] = list(providers)
    cores = os.cpu_count() or 1
    references: dict[str, dict[str, float]] = {}
    cells: list[dict[str, Any]] = []
    for model in args.models.split(","):
        path = write_model(root, model)
        width = MODELS[model][0]
        references[model] = {
            f"batch64_{threads}threads": ort_run(path, width, 64, 0.3, threads, providers)[0]
            for threads in (2, cores)
        }
        print(f"{model}: onnxruntime batch 64 rows/s {references[model]}", flush=True)
        servers = itertools.product(
            args.execution.split(","), _ints(args.instances), _ints(args.workers)
        )
        for execution, instances, workers in servers:
            config = settings(model, True, 0, -1, providers, instances, execution)
            with GatewayProcess(root, config, name=model, workers=workers) as server:
                if providers != CPU:
                    check_served(server, model, path, width, providers)
                loaded = sorted({" ".join(e) for e in _LOADED.findall(server.log_text())})
                loads = itertools.product(
                    args.protocols.split(","), _ints(args.concurrency), _ints(args.batch)
                )
                for protocol, c, rows in loads:
                    row = {
                        "model": model,
                        "execution": execution,
                        "instances": instances,
                        "workers": workers,
                        "protocol": protocol,
                        "concurrency": c,
                        "rows_per_request": rows,
                        "loaded": loaded,
                        **cell(server, model, protocol, c, rows, args.window_ms),
                    }
                    row["fraction_of_batch64_2threads"] = (
                        row["throughput"] / references[model]["batch64_2threads"]
                    )
                    cells.append(row)
                    print(
                        f"  {execution:6} instances={instances} workers={workers:<2} "
                        f"{protocol:11} c={c:<3} b={rows:<3} {row['throughput']:9.0f} rows/s "
                        f"p50 {row['p50_ms']:.2f} ms cores {row['server_cores']:.1f} "
                        f"({row['fraction_of_batch64_2threads']:.2f} of batch 64, 2 threads) "
                        f"{loaded}",
                        flush=True,
                    )
    payload = {"meta": meta, "onnxruntime_rows_per_s": references, "cells": cells}
    name = "scaling_cuda" if providers[0] == "CUDAExecutionProvider" else "scaling"
    json_path, md_path = write_results(name, payload, markdown(payload, cores))
    print(f"wrote {json_path} and {md_path}")
    return 0


def markdown(payload: dict[str, Any], cores: int) -> str:
    meta = payload["meta"]
    lines = [
        "# Served rows/s by worker processes\n",
        f"`{meta['command'].strip()}` at {meta['git_sha']} on {meta['cpu']} ({cores} cores), "
        f"{meta['date']}; providers {', '.join(meta['providers'])}. perf_analyzer on the same "
        "machine; rows/s counts rows (a request carries `rows/request` of them). Server "
        "cores: CPU seconds of the gateway's process tree over the run per wall second.\n",
        "## In-process onnxruntime, batch 64\n",
        table(
            ["model", "setting", "rows/s"],
            [
                [model, setting, rows]
                for model, refs in payload["onnxruntime_rows_per_s"].items()
                for setting, rows in refs.items()
            ],
        ),
        "\n## Gateway\n",
        table(
            [
                "model",
                "execution",
                "instances",
                "workers",
                "protocol",
                "c",
                "rows/request",
                "rows/s",
                "of batch 64, 2 threads",
                "p50 ms",
                "p99 ms",
                "server cores",
                "server CPU ms/row",
                "loaded as",
            ],
            [
                [
                    c["model"],
                    c["execution"],
                    c["instances"],
                    c["workers"],
                    c["protocol"],
                    c["concurrency"],
                    c["rows_per_request"],
                    c["throughput"],
                    f"{c['fraction_of_batch64_2threads']:.2f}",
                    c["p50_ms"],
                    c["p99_ms"],
                    f"{c['server_cores']:.2f}",
                    c["server_cpu_ms_per_row"],
                    "; ".join(c["loaded"]),
                ]
                for c in payload["cells"]
            ],
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
