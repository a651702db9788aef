"""python -m bench.batching: dynamic batching against the in-process ceiling.

(a) in-process onnxruntime rows/s at batch 1, 8, 32, 64, 128 (one session, one intra-op
thread) for mlp_small, mlp_large and compute_heavy; (b) the gateway over HTTP and gRPC
under perf_analyzer at concurrency 1, 8 and 64 with batching on and off, plus a fixed
queue delay policy (2 ms, Triton style) against the work-conserving default: throughput,
p50, p99, average batch size and server CPU per request. Every configuration runs in a
fresh server process. Results: bench/results/batching.{json,md}.

Policies: ``on`` (the default: work-conserving, filling to the warm-up's fill_batch_size
under load), ``on_nofill`` (fill_batch_size = 0, the earlier scheduler), ``off``,
``delay_2ms``. The compute-heavy target is held against in-process onnxruntime at batch 64
with 2 intra-op threads (both cores), measured in the same run, and against what the
cores allow with the client beside the server: perf_analyzer's CPU per request is measured
too (its process's rusage over the cell).

Options: --quick (mlp_small only, concurrency 1 and 8: a smoke run), --models a,b,
--policies on,on_nofill, --protocols grpc,grpc-stream,http (grpc-stream: perf_analyzer's
--streaming over ModelStreamInfer), --concurrency 1,64, --providers
CUDAExecutionProvider,CPUExecutionProvider (onnxruntime-gpu: the in-process references and
the gateway's sessions on the GPU; the gateway must report the model on KIND_GPU and answer
as the CPU session does, else the run stops; results then go to batching_cuda.*).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnxruntime as ort

from bench.common import GatewayProcess, environment, measured, run_perf_analyzer, table
from bench.common import write_results as write
from bench.models import MODELS, write_model

BATCHES = (1, 8, 32, 64, 128)


CPU: Final = ("CPUExecutionProvider",)


def ort_session(
    path: Path, threads: int = 1, providers: tuple[str, ...] = CPU
) -> ort.InferenceSession:
    """A session as the references use it; fails when the first provider asked for is not
    installed or not the one onnxruntime gave (CUDA libraries missing: onnxruntime falls
    back to the CPU), so that a GPU run never quietly measures the CPU."""
    available = ort.get_available_providers()
    if providers[0] not in available:
        raise RuntimeError(f"asked for {providers[0]}; this onnxruntime offers {available}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(path), options, providers=[p for p in providers if p in available]
    )
    if session.get_providers()[0] != providers[0]:
        raise RuntimeError(f"asked for {providers[0]}, onnxruntime gave {session.get_providers()}")
    return session


def ort_ceiling(
    path: Path,
    width: int,
    batch: int,
    min_time_s: float = 0.3,
    threads: int = 1,
    providers: tuple[str, ...] = CPU,
) -> float:
    """Best-of-3 rows/s of session.run at one batch size (``threads`` intra-op threads)."""
    return ort_run(path, width, batch, min_time_s, threads, providers)[0]


def ort_run(
    path: Path,
    width: int,
    batch: int,
    min_time_s: float = 0.3,
    threads: int = 1,
    providers: tuple[str, ...] = CPU,
) -> tuple[float, float]:
    """Best-of-3 rows/s of session.run at one batch size, and the CPU seconds per row
    (this process, all its threads) of that best trial."""
    session = ort_session(path, threads, providers)
    x = np.random.default_rng(0).standard_normal((batch, width)).astype(np.float32)
    feeds = {"INPUT0": x}
    session.run(None, feeds)
    best, cpu_per_row = 0.0, 0.0
    for _ in range(3):
        calls = 0
        start, cpu = time.perf_counter(), time.process_time()
        while True:
            session.run(None, feeds)
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time_s:
                break
        if calls * batch / elapsed > best:
            best = calls * batch / elapsed
            cpu_per_row = (time.process_time() - cpu) / (calls * batch)
    return best, cpu_per_row


def settings(
    model: str,
    batching: bool,
    delay_us: int,
    fill: int = -1,
    providers: tuple[str, ...] = CPU,
    instances: int = 0,
    execution: str = "",
) -> str:
    """The gateway's settings file for one cell: ``instances`` 0 means 2 for the heavier
    models and 1 for mlp_small; ``execution`` "" leaves the model's default (auto)."""
    instances = instances or (1 if model == "mlp_small" else 2)
    return (
        "[runtime]\ninference_workers = 2\nintra_op_threads = 1\n"
        f"execution_providers = {json.dumps(list(providers))}\n"
        f"[models.{model}]\nmax_batch_size = 64\ndynamic_batching = {str(batching).lower()}\n"
        f"max_queue_delay_us = {delay_us}\ninstances = {instances}\n"
        f"max_queue_size = 4096\nfill_batch_size = {fill}\n"
        + (f'execution = "{execution}"\n' if execution else "")
    )


POLICIES: dict[str, tuple[bool, int, int]] = {
    # name: (dynamic batching, max_queue_delay_us, fill_batch_size)
    "on": (True, 0, -1),
    "on_nofill": (True, 0, 0),
    "off": (False, 0, 0),
    "delay_2ms": (True, 2000, 0),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batching", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: mlp_small, c=1,8")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--window-ms", type=int, default=1500)
    parser.add_argument(
        "--policies", default="", help="comma-separated subset of " + ",".join(POLICIES)
    )
    parser.add_argument("--protocols", default="grpc,http")
    parser.add_argument("--concurrency", default="", help="e.g. 1,64")
    parser.add_argument(
        "--providers",
        default=",".join(CPU),
        help="onnxruntime execution providers in preference order, for the in-process "
        "references and the gateway (e.g. CUDAExecutionProvider,CPUExecutionProvider)",
    )
    args = parser.parse_args(argv)
    providers = tuple(args.providers.split(","))
    models = ["mlp_small"] if args.quick else args.models.split(",")
    concurrencies: tuple[int, ...] = (1, 8) if args.quick else (1, 8, 64)
    if args.concurrency:
        concurrencies = tuple(int(c) for c in args.concurrency.split(","))
    chosen = args.policies.split(",") if args.policies else list(POLICIES)
    if args.quick and not args.policies:
        chosen = ["on", "off"]
    root = Path(tempfile.mkdtemp(prefix="bench-models-"))
    meta = environment()
    meta["command"] = (
        "python -m bench." + Path(__file__).stem + " " + " ".join(argv or sys.argv[1:])
    )
    meta["providers"] = list(providers)
    ceiling: dict[str, dict[int, float]] = {}
    ceiling_2threads: dict[str, float] = {}
    cpu_per_row_2threads: dict[str, float] = {}
    cells: list[dict[str, Any]] = []
    for model in models:
        path = write_model(root, model)
        width = MODELS[model][0]
        ceiling[model] = {b: ort_ceiling(path, width, b, providers=providers) for b in BATCHES}
        ceiling_2threads[model], cpu_per_row_2threads[model] = ort_run(
            path, width, 64, threads=2, providers=providers
        )
        print(
            f"{model}: in-process rows/s {ceiling[model]}, batch 64 on 2 threads "
            f"{ceiling_2threads[model]:.0f}",
            flush=True,
        )
        for policy in chosen:
            batching, delay, fill = POLICIES[policy]
            config = settings(model, batching, delay, fill, providers)
            with GatewayProcess(root, config, name=model) as server:
                if providers != CPU:
                    meta.setdefault("served_check", {})[model] = check_served(
                        server, model, path, width, providers
                    )
                protocols = args.protocols.split(",")
                for protocol in protocols if policy != "delay_2ms" else ("grpc",):
                    grpc = protocol.startswith("grpc")
                    url = f"127.0.0.1:{server.grpc_port if grpc else server.http_port}"
                    for c in concurrencies:
                        client = _children_cpu_s()
                        with measured(server, model) as m:
                            pa = run_perf_analyzer(
                                model,
                                "grpc" if grpc else protocol,
                                url,
                                c,
                                window_ms=args.window_ms,
                                streaming=protocol == "grpc-stream",
                            )
                        # perf_analyzer is the only child that ends inside the block.
                        m["client_cpu_ms_per_request"] = (
                            1000 * (_children_cpu_s() - client) / max(m["requests"], 1)
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
                            f"  {policy:9} {protocol:11} c={c:<3} {pa['throughput']:9.0f}/s "
                            f"p50 {pa['p50_ms']:.2f} ms p99 {pa['p99_ms']:.2f} ms "
                            f"batch {m['avg_batch_rows']:.1f} "
                            f"cpu {m['cpu_ms_per_request']:.3f} ms/req",
                            flush=True,
                        )
    # The reference again after the gateway cells: on a shared machine one reading can
    # land in a busy moment, so the target is held against the better of the two.
    for model in models:
        path = root / model / "1" / "model.onnx"
        again, cpu_per_row = ort_run(path, MODELS[model][0], 64, threads=2, providers=providers)
        print(f"{model}: batch 64 on 2 threads again {again:.0f} rows/s", flush=True)
        if again > ceiling_2threads[model]:
            ceiling_2threads[model], cpu_per_row_2threads[model] = again, cpu_per_row
    payload = {
        "meta": meta,
        "ort_ceiling_rows_per_s": ceiling,
        "ort_batch64_2threads_rows_per_s": ceiling_2threads,
        "cells": cells,
        "ort_batch64_2threads_cpu_ms_per_row": {
            m: 1000 * v for m, v in cpu_per_row_2threads.items()
        },
        "summary": summarize(
            ceiling, cells, root, ceiling_2threads, cpu_per_row_2threads, providers
        ),
    }
    name = "batching_quick" if args.quick else "batching"
    if providers[0] == "CUDAExecutionProvider":
        name += "_cuda"
    json_path, md_path = write(name, payload, markdown(payload))
    print(f"wrote {json_path} and {md_path}")
    return 0


def check_served(
    server: GatewayProcess, model: str, path: Path, width: int, providers: tuple[str, ...]
) -> dict[str, Any]:
    """Before a run on another provider: the gateway must report the model on that device
    (model config's instance kind) and answer 8 random rows as the CPU session does (within
    a relative 1e-2: GPU matrix products may round through TF32). Raises otherwise."""
    base = f"http://127.0.0.1:{server.http_port}/v2/models/{model}"
    with urllib.request.urlopen(f"{base}/config", timeout=30) as reply:
        kind = json.load(reply)["instance_group"][0]["kind"]
    expected = "KIND_GPU" if providers[0] == "CUDAExecutionProvider" else "KIND_CPU"
    if kind != expected:
        raise RuntimeError(f"the gateway runs {model} on {kind}, expected {expected}")
    x = np.random.default_rng(1).standard_normal((8, width)).astype(np.float32)
    cpu = ort_session(path).run(None, {"INPUT0": x})[0]
    body = {
        "inputs": [
            {
                "name": "INPUT0",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    request = urllib.request.Request(
        f"{base}/infer", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        output = json.load(reply)["outputs"][0]
    served = np.asarray(output["data"], np.float32).reshape(output["shape"])
    scale = float(np.abs(cpu).max()) or 1.0
    error = float(np.abs(served - cpu).max()) / scale
    if error > 1e-2:
        raise RuntimeError(f"{model} on {providers[0]} answers {error:.3g} (relative) off the CPU")
    return {"instance_kind": kind, "max_relative_error_vs_cpu": error}


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's children that have ended."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cell(cells: list[dict[str, Any]], **key: Any) -> dict[str, Any] | None:
    for cell in cells:
        if all(cell.get(k) == v for k, v in key.items()):
            return cell
    return None


def summarize(
    ceiling: dict[str, dict[int, float]],
    cells: list[dict[str, Any]],
    root: Path,
    ceiling_2threads: dict[str, float] | None = None,
    cpu_per_row_2threads: dict[str, float] | None = None,
    providers: tuple[str, ...] = CPU,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    heavy_on = _cell(cells, model="compute_heavy", policy="on", protocol="grpc", concurrency=64)
    heavy_off = _cell(cells, model="compute_heavy", policy="off", protocol="grpc", concurrency=64)
    nofill = _cell(
        cells, model="compute_heavy", policy="on_nofill", protocol="grpc", concurrency=64
    )
    two = (ceiling_2threads or {}).get("compute_heavy")
    if heavy_on and two:
        out["compute_heavy_grpc_c64_vs_ort_batch64_2threads"] = {
            "served_rows_per_s": heavy_on["throughput"],
            "avg_batch_rows": heavy_on["avg_batch_rows"],
            "ort_rows_per_s": two,
            "fraction_of_ort": heavy_on["throughput"] / two,
            "target": 0.8,
            "without_fill": (
                {
                    "served_rows_per_s": nofill["throughput"],
                    "avg_batch_rows": nofill["avg_batch_rows"],
                    "fraction_of_ort": nofill["throughput"] / two,
                    "cpu_ms_per_request": nofill["cpu_ms_per_request"],
                }
                if nofill
                else None
            ),
            "cpu_ms_per_request": heavy_on["cpu_ms_per_request"],
            "machine_bound": _machine_bound(
                heavy_on, two, (cpu_per_row_2threads or {}).get("compute_heavy")
            ),
        }
    stream = _cell(
        cells, model="compute_heavy", policy="on", protocol="grpc-stream", concurrency=64
    )
    if stream and two:
        out["compute_heavy_grpc_stream_c64_vs_ort_batch64_2threads"] = {
            "served_rows_per_s": stream["throughput"],
            "avg_batch_rows": stream["avg_batch_rows"],
            "fraction_of_ort": stream["throughput"] / two,
            "cpu_ms_per_request": stream["cpu_ms_per_request"],
            "machine_bound": _machine_bound(
                stream, two, (cpu_per_row_2threads or {}).get("compute_heavy")
            ),
        }
    if heavy_on and heavy_off:
        batch = max(1, round(heavy_on["avg_batch_rows"]))
        path = root / "compute_heavy" / "1" / "model.onnx"
        at_batch = ort_ceiling(path, MODELS["compute_heavy"][0], batch, providers=providers)
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
                cells,
                model=cell["model"],
                policy="on_nofill",
                protocol=cell["protocol"],
                concurrency=1,
            ) or _cell(
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


def _machine_bound(
    cell: dict[str, Any], ort_rows_per_s: float, ort_cpu_s_per_row: float | None
) -> dict[str, Any] | None:
    """What these cores allow a server that costs nothing itself, with the client on the
    same machine: every served row takes onnxruntime's CPU at batch 64 plus the client's
    CPU for its request (one row each, ``-b 1``), and the cores give ``cores`` CPU seconds
    per second. The gateway's own cost is its CPU per request beyond the model's."""
    client_ms = cell.get("client_cpu_ms_per_request")
    cores = os.cpu_count() or 1
    if not client_ms or not ort_cpu_s_per_row:
        return None
    ort_ms = 1000 * ort_cpu_s_per_row
    zero_overhead = cores * 1000 / (ort_ms + client_ms)
    return {
        "cores": cores,
        "client_cpu_ms_per_request": client_ms,
        "ort_cpu_ms_per_row_batch64": ort_ms,
        "zero_overhead_server_rows_per_s": zero_overhead,
        "zero_overhead_fraction_of_ort": zero_overhead / ort_rows_per_s,
        "served_fraction_of_zero_overhead": cell["throughput"] / zero_overhead,
    }


def markdown(payload: dict[str, Any]) -> str:
    meta = payload["meta"]
    lines = [
        "# Dynamic batching\n",
        f"`{meta['command'].strip()}` at {meta['git_sha']} on {meta['cpu']} "
        f"({meta['cores']} cores), {meta['date']}; onnxruntime "
        f"{meta['versions']['onnxruntime']} on {meta.get('providers', CPU)[0]}. perf_analyzer "
        "2.51, `-b 1`, zero inputs; the server and perf_analyzer share the machine.\n",
        *(
            [f"Served checks (the gateway's device and answers): `{meta['served_check']}`\n"]
            if meta.get("served_check")
            else []
        ),
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
                "client CPU ms/req",
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
                    c.get("client_cpu_ms_per_request", "-"),
                ]
                for c in payload["cells"]
            ],
        ),
        "Client CPU is perf_analyzer's (user + system) over the cell divided by the requests "
        "the server completed in it. `machine_bound` below: the rows/s these cores allow a "
        "server that costs nothing itself while the client shares the machine "
        "(cores / (onnxruntime CPU per row at batch 64 + client CPU per request)), and the "
        "served rows/s as a share of it.\n",
        "## Summary\n",
        "```json\n" + __import__("json").dumps(payload["summary"], indent=2) + "\n```\n",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
