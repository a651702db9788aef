"""python -m bench.readme_table: rewrite README's issue-18 performance table from the results.

Reads bench/results/{floor,batching,routing,features_cost}.json (whichever exist) and
replaces the block between ``<!-- perf-table:begin -->`` and ``<!-- perf-table:end -->``
in README.md with one row per target: the measured figure, the target, and the run it
came from. Nothing is measured here; rerun the benchmarks, then this.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Final

from bench.common import RESULTS

ROOT: Final = Path(__file__).resolve().parent.parent
README: Final = ROOT / "README.md"
BEGIN: Final = "<!-- perf-table:begin -->"
END: Final = "<!-- perf-table:end -->"
_NAMES: Final = {"grpc": "gRPC unary", "grpc-stream": "gRPC stream", "http-binary": "HTTP binary"}


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _run(data: dict[str, Any], name: str) -> str:
    meta = data.get("meta", {})
    return f"`{name}` {str(meta.get('date', '?'))[:10]} @ {meta.get('git_sha', '?')}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.0f}%"


def rows() -> list[list[str]]:
    out: list[list[str]] = []
    floor = _load("floor")
    if floor:
        for r in floor.get("ratios", []):
            if r.get("client") != "bench.loadgen" or r.get("target") is None:
                continue
            out.append(
                [
                    f"{_NAMES.get(r['protocol'], r['protocol'])}: server CPU/request vs "
                    f"bare `{r['bare']}` (c={r['concurrency']})",
                    f"{r['gateway_cpu_ms']:.3f} / {r['bare_cpu_ms']:.3f} ms = "
                    f"{r['cpu_ratio']:.2f}x",
                    f"<= {r['target']:.2f}x",
                    _run(floor, "bench.floor"),
                ]
            )
    batching = _load("batching")
    if batching:
        s = batching.get("summary", {}).get("compute_heavy_grpc_c64_vs_ort_batch64_2threads")
        if s:
            nofill = s.get("without_fill") or {}
            notes = ""
            if nofill:
                notes = (
                    f" (fill off: {nofill['fraction_of_ort']:.2f}, "
                    f"batch {nofill['avg_batch_rows']:.0f})"
                )
            bound = s.get("machine_bound")
            if bound:
                notes += (
                    f"; a server costing nothing could reach "
                    f"{bound['zero_overhead_fraction_of_ort']:.2f} beside the client"
                )
            out.append(
                [
                    "compute_heavy, gRPC c=64: served rows/s vs onnxruntime batch 64, 2 threads",
                    f"{s['served_rows_per_s']:,.0f} / {s['ort_rows_per_s']:,.0f} = "
                    f"{s['fraction_of_ort']:.2f} (avg batch {s['avg_batch_rows']:.0f}){notes}",
                    ">= 0.80",
                    _run(batching, "bench.batching"),
                ]
            )
    routing = _load("routing")
    if routing:
        for protocol, s in routing.get("summary", {}).items():
            out.append(
                [
                    f"slow shadow at 100%, {protocol}: primary p99 added, c=1 / c=4",
                    f"{_pct(s.get('slow_shadow_p99_over_direct_c1'))} / "
                    f"{_pct(s.get('slow_shadow_p99_over_direct_c4'))} (no CPU budget: "
                    f"{_pct(s.get('unbudgeted_slow_shadow_p99_over_direct_c1'))} / "
                    f"{_pct(s.get('unbudgeted_slow_shadow_p99_over_direct_c4'))})",
                    "<= +10%",
                    _run(routing, "bench.routing"),
                ]
            )
    features = _load("features_cost")
    if features:
        for protocol, per in features.get("summary", {}).items():
            if "all_on" in per:
                out.append(
                    [
                        f"every always-on feature, {protocol}: server CPU/request vs all off",
                        f"{per['all_on']['cpu_ratio']:.2f}x",
                        "<= 1.05x",
                        _run(features, "bench.features_cost"),
                    ]
                )
    return out


def render() -> str:
    lines = ["| figure | measured | target | run |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    del argv
    text = README.read_text()
    if BEGIN not in text or END not in text:
        print(f"README.md has no {BEGIN} ... {END} block", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{render()}\n{END}{tail}")
    print("rewrote the performance table in README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
