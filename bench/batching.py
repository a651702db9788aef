"""python -m bench.batching: dynamic batching against the in-process ceiling.

(a) in-process onnxruntime rows/s at batch 1, 8, 32, 64, 128 (one session, one intra-op
thread) for mlp_small, mlp_large and compute_heavy; (b) the gateway over HTTP and gRPC
under perf_analyzer at concurrency 1, 8 and 64 with batching on and off, plus a fixed
queue delay policy (2 ms, Triton style) against the work-conserving default: throughput,
p50, p99, average batch size and server CPU per request. Every configuration runs in a
fresh server process. Results: bench/results/batching.{json,md}.

Options: --quick (mlp_small only, concurrency 1 and 8: a smoke run), --models a,b.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.common import GatewayProcess, environment, measured, run_perf_analyzer, table
from bench.common import write_results as write
from bench.models import MODELS, write_model

BATCHES = (1, 8, 32, 64, 128)


def ort_ceiling(path: Path, width: int, batch: int, min_time_s: float = 0.3) -> float:
    """Best-of-3 rows/s of session.run at one batch size (1 intra-op thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, width)).astype(np.float32)
    feeds = {"INPUT0": x}
    session.run(None, feeds)
    best = 0.0
    for _ in range(3):
        calls = 0
        start = time.perf_counter()
        while True:
            session.run(None, feeds)
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time_s:
                break
        best = max(best, calls * batch / elapsed)
    return best


def settings(model: str, batching: bool, delay_us: int) -> str:
    heavy = model != "mlp_small"
    return (
        "[runtime]\ninference_workers = 2\nintra_op_threads = 1\n"
        f"[models.{model}]\nmax_batch_size = 64\ndynamic_batching = {str(batching).lower()}\n"
        f"max_queue_delay_us = {delay_us}\ninstances = {2 if heavy else 1}\n"
        f"max_queue_size = 4096\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batching", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: mlp_small, c=1,8")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--window-ms", type=int, default=1500)
    args = parser.parse_args(argv)
    models = ["mlp_small"] if args.quick else args.models.split(",")
    concurrencies = (1, 8) if args.quick else (1, 8, 64)
    root = Path(tempfile.mkdtemp(prefix="bench-models-"))
    meta = environment()
    meta["command"] = (
        "python -m bench." + Path(__file__).stem + " " + " ".join(argv or sys.argv[1:])
    )
    ceiling: dict[str, dict[int, float]] = {}
    cells: list[dict[str, Any]] = []
    for model in models:
        path = write_model(root, model)
        width = MODELS[model][0]
        ceiling[model] = {b: ort_ceiling(path, width, b) for b in BATCHES}
        print(f"{model}: in-process rows/s {ceiling[model]}", flush=True)
        policies = [("on", True, 0), ("off", False, 0)]
        if not args.quick:
            policies.append(("delay_2ms", True, 2000))
        for policy, batching, delay in policies:
            with GatewayProcess(root, settings(model, batching, delay), name=model) as server:
                for protocol in ("grpc", "http") if policy != "delay_2ms" else ("grpc",):
                    url = (
                        f"127.0.0.1:{server.grpc_port if protocol == 'grpc' else server.http_port}"
                    )
                    for c in concurrencies:
                        with measured(server, model) as m:
                            pa = run_perf_analyzer(
                                model, protocol, url, c, window_ms=args.window_ms
                            )
                        cell = {
                            "model": model,
                            "policy": policy,
                            "protocol": protocol,
                            "concurrency": c,
                            **pa,
                            **m,
                        }
                        cells.append(cell)
                        print(
                            f"  {policy:9} {protocol:4} c={c:<3} {pa['throughput']:9.0f}/s "
                            f"p50 {pa['p50_ms']:.2f} ms p99 {pa['p99_ms']:.2f} ms "
                            f"batch {m['avg_batch_rows']:.1f} "
                            f"cpu {m['cpu_ms_per_request']:.3f} ms/req",
                            flush=True,
                        )
    payload = {
        "meta": meta,
        "ort_ceiling_rows_per_s": ceiling,
        "cells": cells,
        "summary": summarize(ceiling, cells, root),
    }
    name = "batching_quick" if args.quick else "batching"
    json_path, md_path = write(name, payload, markdown(payload))
    print(f"wrote {json_path} and {md_path}")
    return 0


def _cell(cells: list[dict[str, Any]], **key: Any) -> dict[str, Any] | None:
    for cell in cells:
        if all(cell.get(k) == v for k, v in key.items()):
            return cell
    return None


def summarize(
    ceiling: dict[str, dict[int, float]], cells: list[dict[str, Any]], root: Path
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    heavy_on = _cell(cells, model="compute_heavy", policy="on", protocol="grpc", concurrency=64)
    heavy_off = _cell(cells, model="compute_heavy", policy="off", protocol="grpc", concurrency=64)
    if heavy_on and heavy_off:
        batch = max(1, round(heavy_on["avg_batch_rows"]))
        path = root / "compute_heavy" / "1" / "model.onnx"
        at_batch = ort_ceiling(path, MODELS["compute_heavy"][0], batch)
        out["compute_heavy_grpc_c64"] = {
            "on_over_off": heavy_on["throughput"] / heavy_off["throughput"],
            "avg_batch_rows": heavy_on["avg_batch_rows"],
            "ort_rows_per_s_at_that_batch": at_batch,
            "fraction_of_ort": heavy_on["throughput"] / at_batch,
        }
    p50 = {}
    for cell in cells:
        if cell["policy"] == "on" and cell["concurrency"] == 1:
            off = _cell(
                cells, model=cell["model"], policy="off", protocol=cell["protocol"], concurrency=1
            )
            if off:
                p50[f"{cell['model']}/{cell['protocol']}"] = cell["p50_ms"] / off["p50_ms"] - 1
    out["c1_p50_added_by_batching"] = p50
    small = {}
    for protocol in ("http", "grpc"):
        c1 = _cell(cells, model="mlp_small", policy="on", protocol=protocol, concurrency=1)
        c8 = _cell(cells, model="mlp_small", policy="on", protocol=protocol, concurrency=8)
        if c1:
            small[protocol] = {
                "cpu_ms_per_request_c1": c1["cpu_ms_per_request"],
                "cpu_ms_per_request_c8": c8["cpu_ms_per_request"] if c8 else None,
                "p50_ms_c1": c1["p50_ms"],
                "p50_minus_ort_ms": c1["p50_ms"] - 1000 / ceiling["mlp_small"][1],
            }
    out["mlp_small_overhead"] = small
    return out


def markdown(payload: dict[str, Any]) -> str:
    meta = payload["meta"]
    lines = [
        "# Dynamic batching\n",
        f"`{meta['command'].strip()}` at {meta['git_sha']} on {meta['cpu']} "
        f"({meta['cores']} cores), {meta['date']}; onnxruntime "
        f"{meta['versions']['onnxruntime']}. perf_analyzer 2.51, `-b 1`, zero inputs; the "
        "server and perf_analyzer share the machine.\n",
        "## In-process onnxruntime ceiling (rows/s, 1 intra-op thread)\n",
        table(
            ["model", *[f"batch {b}" for b in BATCHES]],
            [
                [m, *[v for _, v in sorted(c.items())]]
                for m, c in payload["ort_ceiling_rows_per_s"].items()
            ],
        ),
        "## Gateway under perf_analyzer\n",
        table(
            [
                "model",
                "policy",
                "protocol",
                "conc.",
                "infer/s",
                "p50 ms",
                "p99 ms",
                "avg batch",
                "server CPU ms/req",
            ],
            [
                [
                    c["model"],
                    c["policy"],
                    c["protocol"],
                    c["concurrency"],
                    c["throughput"],
                    c["p50_ms"],
                    c["p99_ms"],
                    round(c["avg_batch_rows"], 1),
                    c["cpu_ms_per_request"],
                ]
                for c in payload["cells"]
            ],
        ),
        "## Summary\n",
        "```json\n" + __import__("json").dumps(payload["summary"], indent=2) + "\n```\n",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
