"""python -m bench.rollback: time from a canary's first failing request to its rollback.

A real gateway process serves a stable version and a candidate that fails every request;
a rollout sends the candidate 50% of the traffic; a client at concurrency 1 sends requests
and notes when the first one fails and when the admin API reports the rollout rolled back.
Repeated per evaluation interval (the default 1 s, and 0.2 s). Results:
bench/results/rollback.{json,md}.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import GatewayProcess, environment, table
from bench.common import write_results as write
from bench.models import failing, mlp

TOKEN = "bench-operator-token"
REPEATS = 5


def _call(url: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def _trial(server: GatewayProcess, interval_s: float) -> float:
    admin = f"http://127.0.0.1:{server.admin_port}/admin/v1"
    status, body = _call(
        f"{admin}/rollouts",
        "POST",
        {
            "model": "m",
            "stable": "1",
            "candidate": "2",
            "reason": "bench",
            "policy": {
                "steps": [50, 100],
                "evaluation_interval_s": interval_s,
                "min_samples": 20,
                "consecutive_failures": 3,
            },
        },
    )
    assert status == 201, body
    infer = f"http://127.0.0.1:{server.http_port}/v2/models/m/infer"
    payload = {
        "inputs": [{"name": "INPUT0", "shape": [1, 32], "datatype": "FP32", "data": [0.5] * 32}]
    }
    first_failure = None
    while True:
        status, _ = _call(infer, "POST", payload)
        if status != 200 and first_failure is None:
            first_failure = time.monotonic()
        _, state = _call(f"{admin}/rollouts/m")
        if state["status"] == "rolled_back":
            assert first_failure is not None
            return time.monotonic() - first_failure


def main(argv: list[str] | None = None) -> int:
    root = Path(tempfile.mkdtemp(prefix="bench-rollback-"))
    mlp(root / "m" / "1" / "model.onnx", [32, 64, 2])
    failing(root / "m" / "2" / "model.onnx")
    (root / "m" / "config.toml").write_text('default_version = "1"\n')
    settings = f'[[admin.tokens]]\nname = "bench"\nrole = "operator"\ntoken = "{TOKEN}"\n'
    meta = environment()
    meta["command"] = "python -m bench.rollback " + " ".join(argv or sys.argv[1:])
    rows = []
    results: dict[str, Any] = {}
    for interval in (1.0, 0.2):
        times = []
        for _ in range(REPEATS):
            with GatewayProcess(root, settings, name="rollback") as server:
                times.append(_trial(server, interval))
        results[str(interval)] = {
            "seconds": times,
            "median_s": statistics.median(times),
            "max_s": max(times),
        }
        rows.append([interval, statistics.median(times), min(times), max(times)])
        print(
            f"interval {interval} s: median {statistics.median(times):.2f} s, "
            f"max {max(times):.2f} s",
            flush=True,
        )
    md = "\n".join(
        [
            "# Time from the first failing canary request to rollback\n",
            f"`{meta['command'].strip()}` at {meta['git_sha']}, {meta['date']}. Policy: 3 "
            "consecutive failing evaluations, 20 samples minimum; the candidate fails every "
            f"request; {REPEATS} trials each, a fresh server per trial.\n",
            table(["evaluation interval s", "median s", "min s", "max s"], rows),
        ]
    )
    json_path, md_path = write("rollback", {"meta": meta, "results": results}, md)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
