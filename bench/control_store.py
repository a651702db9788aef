"""python -m bench.control_store: commit latency and change propagation of the control store.

A real redis-server (AOF, appendfsync always, on loopback) and 3 follower processes, each a
``ChangeFollower`` on its own event loop (uvloop, as the gateway runs); one writer commits
``--changes`` route changes with an audit entry each (what an admin ``set_weights`` does),
``--interval-ms`` apart. Commit latency: the writer's ``save`` call. Propagation: from the
writer starting the commit to a follower's callback having the new version (wall clock, one
host). SQLite commits (``synchronous=FULL``, one fsync each) run the same loop for reference.
Results: bench/results/control_store.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

from bench.common import environment, table
from bench.common import write_results as write
from gateway.store import AuditEvent, ChangeFollower, ModelState, RedisStore, SqliteStore, Store
from gateway.types import Route, Variant
from tests.redis_server import RedisServer

FOLLOWERS = 3


def _route(i: int) -> Route:
    w = float(i % 100)
    return Route("m", (Variant("1", 100.0 - w), Variant("2", w)))


def _commits(store: Store, changes: int, interval_s: float) -> tuple[list[float], dict[int, float]]:
    """Commit latencies (ms) and the wall time each version's commit started."""
    latencies: list[float] = []
    started: dict[int, float] = {}
    for i in range(1, changes + 1):
        started[i] = time.time()
        t0 = time.perf_counter()
        store.save(
            "m",
            route=_route(i),
            event=AuditEvent(actor="bench", action="set_weights", model="m", after={"i": i}),
        )
        latencies.append((time.perf_counter() - t0) * 1000)
        time.sleep(interval_s)
    return latencies, started


def _follow(url: str, cluster: str, changes: int) -> None:
    """Follower process: print {version: arrival wall time} once ``changes`` arrived."""
    import uvloop

    arrived: dict[int, float] = {}

    async def main() -> None:
        done = asyncio.Event()

        def on_change(state: ModelState) -> None:
            arrived[state.version] = time.time()
            if state.version >= changes:
                done.set()

        follower = ChangeFollower(url, on_change, cluster=cluster)
        await follower.start()
        await follower.wait_synced(10)
        print("ready", flush=True)
        await asyncio.wait_for(done.wait(), 120)
        await follower.stop()

    uvloop.run(main())
    print(json.dumps(arrived), flush=True)


def _pct(values: list[float]) -> dict[str, float]:
    a = np.array(values)
    return {
        "p50": float(np.percentile(a, 50)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
        "mean": statistics.fmean(values),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--interval-ms", type=float, default=10.0)
    parser.add_argument("--follow", nargs=2, metavar=("URL", "CLUSTER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.follow:
        _follow(args.follow[0], args.follow[1], args.changes)
        return
    interval_s = args.interval_ms / 1000
    result: dict[str, Any] = {
        "environment": environment(),
        "command": " ".join(["python -m bench.control_store", *sys.argv[1:]]),
        "changes": args.changes,
        "interval_ms": args.interval_ms,
        "followers": FOLLOWERS,
    }
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as server:
        cluster = "bench"
        followers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.control_store",
                    "--changes",
                    str(args.changes),
                    "--follow",
                    server.url,
                    cluster,
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(FOLLOWERS)
        ]
        for proc in followers:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        store = RedisStore(server.url, cluster=cluster)
        admin = redis.Redis(port=server.port)
        admin.config_resetstat()
        redis_ms, started = _commits(store, args.changes, interval_s)
        # Server-side time per commit script run (includes the Lua SHA-256 of the entry and
        # the AOF write; not the fsync, which Redis does before replying, nor client time).
        stats = admin.info("commandstats").get("cmdstat_evalsha", {})
        result["redis_server_us_per_commit"] = float(stats.get("usec_per_call", 0.0))
        admin.close()
        lags: list[float] = []
        for proc in followers:
            out, _ = proc.communicate(timeout=120)
            arrived = {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}
            lags += [(arrived[v] - started[v]) * 1000 for v in started]
        verified = store.verify_audit()
        store.close()
        sqlite = SqliteStore(Path(tmp) / "control.db")
        sqlite_ms, _ = _commits(sqlite, min(args.changes, 300), interval_s)
        sqlite.close()
    result["redis_commit_ms"] = _pct(redis_ms)
    result["propagation_ms"] = _pct(lags)
    result["sqlite_commit_ms"] = _pct(sqlite_ms)
    result["audit_verified"] = verified.ok and verified.head_seq == args.changes
    rows = [
        [
            "Redis commit (Lua: version, state, audit, change log)",
            *result["redis_commit_ms"].values(),
        ],
        [f"propagation to {FOLLOWERS} followers", *result["propagation_ms"].values()],
        ["SQLite commit (synchronous=FULL)", *result["sqlite_commit_ms"].values()],
    ]
    env = result["environment"]
    markdown = (
        "# Control store: commit and propagation (ms)\n\n"
        f"`{result['command']}`: {args.changes} changes {args.interval_ms} ms apart, "
        f"git {env['git_sha']}, load average at start {env['load_average_at_start']}\n\n"
        + table(["what", "p50", "p99", "max", "mean"], rows)
        + f"\nRedis server time per commit script: {result['redis_server_us_per_commit']:.0f} us\n"
    )
    json_path, _ = write("control_store", result, markdown)
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "redis_commit_ms",
                    "redis_server_us_per_commit",
                    "propagation_ms",
                    "sqlite_commit_ms",
                    "audit_verified",
                )
            }
        )
    )
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
