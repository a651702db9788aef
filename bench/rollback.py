"""python -m bench.rollback: time from a canary's first failing request to its rollback.

A real gateway process serves a stable version and a candidate that fails every request; a
rollout with the default policy sends the candidate 50% (steps [50, 100]) or 5% (the default
steps) of the traffic; a paced client sends 100 requests per second (one thread per in-flight
request, at most a few) and notes the wall-clock time of the first failing request. The
rollback time is the controller's own record of the transition to weight 0 (the rollout's
history), on the same clock: no polling error. Five fresh servers per case; the median is
the figure. A second, pure part simulates ground truth for a classifier that is worse
(30% wrong against 10%) and reports the truths the sequential outcome test took to roll back
against the number it needs on the expected path (``proportion_samples_needed``).

Results: bench/results/rollback.{json,md}. ``--quick`` runs one trial per case.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import GatewayProcess, environment, table
from bench.common import write_results as write
from bench.models import failing, mlp
from gateway.rollout import RolloutPolicy, RolloutState, RolloutThresholds, Signals, decide
from gateway.rollout.decide import sequential_alpha
from gateway.rollout.sequential import ProportionTest, proportion_samples_needed

TOKEN = "bench-operator-token"
REPEATS = 5
RATE = 100.0  # requests per second, the load
# Before this change (issue 13, default settings, median of 5, same load): min_samples 200
# and 3 consecutive failing 1 s evaluations.
BEFORE_S = {"50": 7.5, "5": 43.0}


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


def _trial(server: GatewayProcess, steps: list[float] | None) -> tuple[float, int]:
    """Seconds from the first failing request to the rollback, and failed requests."""
    admin = f"http://127.0.0.1:{server.admin_port}/admin/v1"
    policy: dict[str, Any] = {} if steps is None else {"steps": steps}
    body = {"model": "m", "stable": "1", "candidate": "2", "reason": "bench", "policy": policy}
    infer = f"http://127.0.0.1:{server.http_port}/v2/models/m/infer"
    payload = {
        "inputs": [{"name": "INPUT0", "shape": [1, 32], "datatype": "FP32", "data": [0.5] * 32}]
    }
    first_failure: list[float] = []
    failures = [0]
    done = threading.Event()
    lock = threading.Lock()

    def one() -> None:
        status, _ = _call(infer, "POST", payload)
        if status != 200:
            with lock:
                failures[0] += 1
                if not first_failure:
                    first_failure.append(time.time())

    status, started = _call(f"{admin}/rollouts", "POST", body)
    assert status == 201, started
    t0 = time.monotonic()
    sent = 0
    workers: list[threading.Thread] = []
    while not done.is_set():
        due = t0 + sent / RATE
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        worker = threading.Thread(target=one, daemon=True)
        worker.start()
        workers.append(worker)
        sent += 1
        if sent % 10 == 0:
            _, state = _call(f"{admin}/rollouts/m")
            if state["status"] == "rolled_back":
                done.set()
        assert time.monotonic() - t0 < 300, "no rollback within 300 s"
    for worker in workers:
        worker.join(30)
    _, state = _call(f"{admin}/rollouts/m")
    rolled = next(t for t in reversed(state["history"]) if t["to"] == "rolled_back")
    assert first_failure, "the candidate never failed"
    return rolled["time"] - first_failure[0], failures[0]


def _outcome_truths(runs: int = 200) -> dict[str, Any]:
    """Truths (both arms) until the default sequential outcome test rolls back a classifier
    30% wrong against a stable one 10% wrong, at a 50% step."""
    policy = RolloutPolicy(
        steps=(50.0, 100.0), thresholds=RolloutThresholds(candidate_worse_pvalue=0.01)
    )
    state = RolloutState(
        model="m",
        stable_version="1",
        candidate_version="2",
        rollout_id="sim",
        status="canary",
        policy=policy,
        step_index=0,
        candidate_weight=50.0,
        step_started_at=0.0,
        created_at=0.0,
        updated_at=0.0,
        actor="bench",
        reason="",
    )
    rng = np.random.default_rng(2026)
    taken = []
    for _ in range(runs):
        counts = [0, 0, 0, 0]
        truths = 0
        while True:
            truths += 1
            arm = 0 if rng.random() < 0.5 else 2
            counts[arm] += 1
            counts[arm + 1] += int(rng.random() < (0.3 if arm == 0 else 0.1))
            s = Signals(
                candidate_samples=10**4,
                stable_samples=10**4,
                outcome_counts=(counts[0], counts[1], counts[2], counts[3]),
            )
            if decide(state, s, policy, 1.0).action == "rollback":
                taken.append(truths)
                break
    test = ProportionTest("outcome", alpha=sequential_alpha(policy))
    needed = proportion_samples_needed(test, candidate_rate=0.3, stable_rate=0.1, share=0.5)
    assert needed is not None
    expected_truths = 2 * needed  # both arms, equal shares
    median = statistics.median(taken)
    return {
        "runs": runs,
        "median_truths": median,
        "p90_truths": float(np.percentile(taken, 90)),
        "expected_path_truths": expected_truths,
        "ratio_to_expected": median / expected_truths,
    }


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    repeats = 1 if "--quick" in args else REPEATS
    root = Path(tempfile.mkdtemp(prefix="bench-rollback-"))
    mlp(root / "m" / "1" / "model.onnx", [32, 64, 2])
    failing(root / "m" / "2" / "model.onnx")
    (root / "m" / "config.toml").write_text('default_version = "1"\n')
    settings = f'[[admin.tokens]]\nname = "bench"\nrole = "operator"\ntoken = "{TOKEN}"\n'
    meta = environment()
    meta["command"] = "python -m bench.rollback " + " ".join(args)
    rows = []
    results: dict[str, Any] = {}
    for label, steps in (("50", [50.0, 100.0]), ("5", None)):
        times, failed = [], []
        for _ in range(repeats):
            with GatewayProcess(root, settings, name="rollback") as server:
                seconds, failures = _trial(server, steps)
            times.append(seconds)
            failed.append(failures)
        median = statistics.median(times)
        results[label] = {
            "seconds": times,
            "failed_requests": failed,
            "median_s": median,
            "max_s": max(times),
            "before_median_s": BEFORE_S[label],
        }
        rows.append(
            [
                f"{label}%",
                median,
                min(times),
                max(times),
                statistics.median(failed),
                BEFORE_S[label],
            ]
        )
        print(f"{label}% step: median {median:.3f} s, max {max(times):.3f} s", flush=True)
    outcome = _outcome_truths()
    results["outcome"] = outcome
    print(f"outcome: {outcome}", flush=True)
    md = "\n".join(
        [
            "# Time from the first failing canary request to rollback\n",
            f"`{meta['command'].strip()}` at {meta['git_sha']}, {meta['date']}. Default policy "
            "(sequential error-rate test, event-driven evaluation); the candidate fails every "
            f"request; {RATE:g} requests/s; {repeats} trial(s) per case, a fresh server each. "
            "Time: the controller's recorded rollback minus the client's first failure. "
            "Before: the same load on the previous controller (min_samples 200, 3 failing "
            "1 s evaluations), as measured in issue 13 (7.5 s at 50%, 40-46 s at 5%).\n",
            table(
                ["step", "median s", "min s", "max s", "failed requests", "before median s"],
                rows,
            ),
            "\n## Outcome-worse candidate (simulated truths, pure decide)\n",
            f"Candidate 30% wrong vs stable 10%, 50% step, default sequential outcome test: "
            f"median {outcome['median_truths']:g} truths to rollback (p90 "
            f"{outcome['p90_truths']:g}) over {outcome['runs']} runs; the expected path needs "
            f"{outcome['expected_path_truths']}: ratio {outcome['ratio_to_expected']:.2f}.\n",
        ]
    )
    json_path, md_path = write("rollback", {"meta": meta, "results": results}, md)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
