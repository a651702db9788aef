"""python -m bench.features_cost: what the always-on features cost served throughput.

One gateway process per configuration, the same model (the bundled breast_cancer, which
ships a drift profile) and the same load (perf_analyzer, gRPC and HTTP, concurrency 8,
every request a typical row: each feature at its reference profile's most common bin, so
drift counts in-range values as real traffic mostly brings), in one run: everything off;
drift on; feedback memory on; logging and metrics on (1% access log, 1% prediction log, a
/metrics scrape per second); all on. Reports throughput and server CPU per request, each
as a ratio to the all-off run, and each configuration's extra CPU per request over all-off
in µs, for the whole process and for its event-loop thread alone (where the features run),
with the parts' sum beside all-on: whether they add up. Results:
bench/results/features_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import GatewayProcess, environment, measured, run_perf_analyzer, table
from bench.common import write_results as write
from gateway.config import EXAMPLE_REPOSITORY

MODEL = "breast_cancer"
OFF = "[drift]\nenabled = false\n[feedback]\nenabled = false\n[predictions]\nenabled = false\n"
CONFIGS: dict[str, tuple[str, bool]] = {
    # name: (settings, scrape /metrics every second)
    "all_off": ("access_log_sample_rate = 0.0\n" + OFF, False),
    "drift": ("access_log_sample_rate = 0.0\n[feedback]\nenabled = false\n", False),
    "feedback": ("access_log_sample_rate = 0.0\n[drift]\nenabled = false\n", False),
    "logs_metrics": (
        "access_log_sample_rate = 0.01\n[drift]\nenabled = false\n"
        "[feedback]\nenabled = false\n[predictions]\nenabled = true\n"
        "sample_rate = 0.01\n",
        True,
    ),
    "all_on": (
        "access_log_sample_rate = 0.01\n[predictions]\nenabled = true\nsample_rate = 0.01\n",
        True,
    ),
}


def typical_row(model_dir: Path) -> list[float]:
    """Each input feature at the midpoint of its most common reference bin (profile.npz)."""
    with np.load(model_dir / "profile.npz", allow_pickle=False) as profile:
        mids, counts = profile["in.num.mids"], profile["in.num.ref_counts"]
    return [float(mids[f, int(np.argmax(counts[f]))]) for f in range(mids.shape[0])]


def _input_data(root: Path) -> Path:
    """perf_analyzer's --input-data file: the typical row of the model's one input."""
    path = root / "input-data.json"
    row = typical_row(root / MODEL)
    data = {"data": [{"features": {"content": row, "shape": [len(row)]}}]}
    path.write_text(json.dumps(data))
    return path


def _scraper(port: int, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            r.read()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.features_cost", description=__doc__)
    parser.add_argument("--window-ms", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-features-"))
    shutil.copytree(EXAMPLE_REPOSITORY / MODEL, root / MODEL)
    input_data = str(_input_data(root))
    meta = environment()
    meta["command"] = "python -m bench.features_cost " + " ".join(argv or sys.argv[1:])
    cells: list[dict[str, Any]] = []
    names = list(CONFIGS)
    for rnd in range(args.rounds):
        # Alternating rounds: the order rotates, so no configuration always runs first.
        for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
            settings, scrape = CONFIGS[name]
            with GatewayProcess(root, settings, name=name) as server:
                stop = threading.Event()
                scraper = threading.Thread(target=_scraper, args=(server.http_port, stop))
                if scrape:
                    scraper.start()
                try:
                    for protocol in ("grpc", "http"):
                        port = server.grpc_port if protocol == "grpc" else server.http_port
                        with measured(server, MODEL) as m:
                            pa = run_perf_analyzer(
                                MODEL,
                                protocol,
                                f"127.0.0.1:{port}",
                                8,
                                window_ms=args.window_ms,
                                input_data=input_data,
                            )
                        cells.append(
                            {
                                "round": rnd,
                                "config": name,
                                "protocol": protocol,
                                **pa,
                                "cpu_ms_per_request": m["cpu_ms_per_request"],
                                "loop_cpu_ms_per_request": m["loop_cpu_ms_per_request"],
                            }
                        )
                        print(
                            f"round {rnd} {name:13} {protocol:4} {pa['throughput']:7.0f}/s "
                            f"cpu {m['cpu_ms_per_request']:.3f} ms/req",
                            flush=True,
                        )
                finally:
                    stop.set()
                    if scrape:
                        scraper.join()
    summary: dict[str, Any] = {}
    for protocol in ("grpc", "http"):

        def mean(config: str, key: str, proto: str = protocol) -> float:
            """The median over rounds (the name is kept from when it was a mean)."""
            vals = [
                float(c[key]) for c in cells if c["config"] == config and c["protocol"] == proto
            ]
            return statistics.median(vals)

        base_tp, base_cpu = mean("all_off", "throughput"), mean("all_off", "cpu_ms_per_request")
        base_loop = mean("all_off", "loop_cpu_ms_per_request")
        summary[protocol] = {
            name: {
                "throughput_ratio": mean(name, "throughput") / base_tp,
                "cpu_ratio": mean(name, "cpu_ms_per_request") / base_cpu,
                "extra_cpu_us": 1000 * (mean(name, "cpu_ms_per_request") - base_cpu),
                "extra_loop_cpu_us": 1000 * (mean(name, "loop_cpu_ms_per_request") - base_loop),
            }
            for name in CONFIGS
        }
        parts = [n for n in CONFIGS if n not in ("all_off", "all_on")]
        summary[protocol]["sum_of_parts"] = {
            key: sum(summary[protocol][n][key] for n in parts)
            for key in ("extra_cpu_us", "extra_loop_cpu_us")
        }
    rows = [
        [
            p,
            name,
            v.get("throughput_ratio", "-"),
            v.get("cpu_ratio", "-"),
            f"{v['extra_cpu_us']:+.1f}",
            f"{v['extra_loop_cpu_us']:+.1f}",
        ]
        for p, per in summary.items()
        for name, v in per.items()
    ]
    md = "\n".join(
        [
            "# Cost of drift, feedback, logging and metrics on served throughput\n",
            f"`{meta['command'].strip()}` at {meta['git_sha']}, {meta['date']}, {meta['cpu']}; "
            f"breast_cancer v1, perf_analyzer concurrency 8, {args.rounds} alternating rounds "
            "(the order rotates each round; medians). Ratios to the all-off configuration in "
            "the same run.\n",
            table(
                [
                    "protocol",
                    "config",
                    "throughput / all-off",
                    "CPU per request / all-off",
                    "extra CPU µs/req",
                    "extra loop-thread CPU µs/req",
                ],
                rows,
            ),
            "\n## Cells\n",
            table(
                [
                    "round",
                    "config",
                    "protocol",
                    "infer/s",
                    "p50 ms",
                    "p99 ms",
                    "CPU ms/req",
                    "loop CPU ms/req",
                ],
                [
                    [
                        c["round"],
                        c["config"],
                        c["protocol"],
                        c["throughput"],
                        c["p50_ms"],
                        c["p99_ms"],
                        c["cpu_ms_per_request"],
                        c["loop_cpu_ms_per_request"],
                    ]
                    for c in cells
                ],
            ),
        ]
    )
    json_path, md_path = write(
        "features_cost", {"meta": meta, "cells": cells, "summary": summary}, md
    )
    print(json.dumps(summary, indent=2))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
