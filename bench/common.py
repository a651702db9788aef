"""Shared benchmark plumbing: start a gateway process, read its CPU time from /proc, run
perf_analyzer, record machine and library versions, write JSON and markdown results.

Server CPU per request = (utime + stime of the server process over the measurement) /
(requests it completed in that time, from its own statistics): the fairest figure on a
shared 2-core machine, where wall-clock throughput depends on what else runs.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

__all__ = [
    "RESULTS",
    "GatewayProcess",
    "cpu_seconds",
    "free_port",
    "tree_cpu_seconds",
    "environment",
    "git_sha",
    "cpu_name",
    "perf_analyzer",
    "run_perf_analyzer",
    "write_results",
]

ROOT: Final = Path(__file__).resolve().parent.parent
RESULTS: Final = ROOT / "bench" / "results"
_TICKS: Final = os.sysconf("SC_CLK_TCK")


def _stat_ticks(path: str, first: int, last: int) -> float:
    """Seconds in fields ``first``..``last`` (1-based, as proc(5) numbers them) of a
    /proc stat file, whose second field (the command, in parentheses) may hold spaces."""
    fields = Path(path).read_text().rsplit(")", 1)[1].split()  # fields[0] is field 3
    return sum(int(v) for v in fields[first - 3 : last - 2]) / _TICKS


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) and its reaped children
    (utime, stime, cutime, cstime: fields 14-17)."""
    return _stat_ticks(f"/proc/{pid}/stat", 14, 17)


def tree_cpu_seconds(pid: int) -> float:
    """``cpu_seconds`` summed over a process and its live descendants (``--workers N``:
    the supervisor, its workers and their private redis-server)."""
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError):  # a process that ended in between
            total += cpu_seconds(current)
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
    return total


def main_thread_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process's main thread: the gateway's event loop."""
    return _stat_ticks(f"/proc/{pid}/task/{pid}/stat", 14, 15)


def git_sha() -> str:
    """The short commit of the checkout, or "" outside a git checkout."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or what platform knows)."""
    with contextlib.suppress(OSError):
        match = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        if match:
            return match.group(1)
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """What a reader needs to compare runs: commit, machine, library versions."""
    import grpc
    import msgspec
    import numpy
    import onnxruntime
    import starlette
    import uvicorn

    return {
        "git_sha": git_sha(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "versions": {
            "onnxruntime": onnxruntime.__version__,
            "numpy": numpy.__version__,
            "grpcio": grpc.__version__,
            "uvicorn": uvicorn.__version__,
            "starlette": starlette.__version__,
            "msgspec": msgspec.__version__,
        },
    }


@dataclass
class ServerCounters:
    requests: int
    rows: int
    executions: int


class GatewayProcess:
    """``gateway serve`` in a subprocess on free ports, with a settings file; ``workers``
    > 1 runs ``--workers N`` on ports picked here (the workers share them)."""

    def __init__(
        self, repository: Path, settings: str = "", name: str = "gateway", workers: int = 1
    ) -> None:
        self.repository = repository
        self.settings = settings
        self.name = name
        self.workers = workers
        self.proc: subprocess.Popen[str] | None = None
        self.http_port = 0
        self.grpc_port = 0
        self.admin_port = 0
        self._log: Any = None
        self._log_path = Path()
        self._config: Path | None = None

    def __enter__(self) -> GatewayProcess:
        fd, config = tempfile.mkstemp(suffix=".toml")
        os.close(fd)
        self._config = Path(config)
        self._config.write_text(self.settings)
        fd, log = tempfile.mkstemp(suffix=".log")
        os.close(fd)
        self._log_path = Path(log)
        self._log = self._log_path.open("w")
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        self._data = tempfile.mkdtemp(prefix="gateway-data-")
        env["GATEWAY_DATA_DIR"] = self._data
        ports = ["0", "0", "0"]
        if self.workers > 1:
            ports = [str(free_port()) for _ in ports]
        env["GATEWAY_ADMIN__PORT"] = ports[2]
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--config",
                config,
                "--model-repository",
                str(self.repository),
                "--host",
                "127.0.0.1",
                "--http-port",
                ports[0],
                "--grpc-port",
                ports[1],
                "--workers",
                str(self.workers),
                "--log-level",
                "INFO",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
        )
        try:
            self._wait_for_ports()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_for_ports(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            found = re.findall(
                r"on HTTP [\d.]+:(\d+) and gRPC [\d.]+:(\d+) \(admin [\d.]+:(\d+)\)",
                self._log_path.read_text(),
            )
            if len(found) >= self.workers:  # every worker serves
                self.http_port, self.grpc_port, self.admin_port = map(int, found[0])
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start:\n{self._log_path.read_text()[-3000:]}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._config is not None:
            self._config.unlink(missing_ok=True)
        if self._log is not None:
            self._log.close()
            self._log_path.unlink(missing_ok=True)

    def log_text(self) -> str:
        """What the server has logged so far."""
        return self._log_path.read_text()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def counters(self, model: str) -> ServerCounters:
        url = f"http://127.0.0.1:{self.http_port}/v2/models/{model}/versions/1/stats"
        with urllib.request.urlopen(url, timeout=10) as reply:
            stats = json.load(reply)["model_stats"][0]
        return ServerCounters(
            stats["inference_stats"]["success"]["count"],
            stats["inference_count"],
            stats["execution_count"],
        )


def perf_analyzer() -> str:
    """The perf_analyzer wrapper, installed on first use."""
    wrapper = ROOT / "bench" / ".peers" / "perf_analyzer" / "run"
    if not wrapper.exists():
        subprocess.run(["bash", str(ROOT / "bench" / "install_perf_analyzer.sh")], check=True)
    return str(wrapper)


def run_perf_analyzer(
    model: str,
    protocol: str,
    url: str,
    concurrency: int,
    *,
    window_ms: int = 2000,
    streaming: bool = False,
    extra: list[str] | None = None,
    stability_pct: int = 60,
    max_trials: int = 8,
    attempts: int = 3,
    timeout_s: float = 300,
    input_data: str = "zero",
) -> dict[str, float]:
    """One perf_analyzer measurement; returns throughput and latency percentiles (ms).

    ``stability_pct`` / ``max_trials`` are its -s / -r; a run that fails its stability
    check is tried again, ``attempts`` times in all (a noisy shared machine)."""
    fd, csv_path = tempfile.mkstemp(suffix=".csv")
    os.close(fd)
    cmd = [
        perf_analyzer(),
        "-m",
        model,
        "-i",
        protocol,
        "-u",
        url,
        "--input-data",
        input_data,
        "--concurrency-range",
        str(concurrency),
        "-p",
        str(window_ms),
        "-s",
        str(stability_pct),
        "-r",
        str(max_trials),
        "-f",
        csv_path,
        *(extra or []),
    ]
    if streaming:
        cmd.append("--streaming")
    rows: list[dict[str, str]] = []
    try:
        for _attempt in range(attempts):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            with open(csv_path) as f:
                rows = list(csv.DictReader(f))
            if done.returncode == 0 and rows:
                break
    finally:
        os.unlink(csv_path)
    if done.returncode != 0 or not rows:
        raise RuntimeError(
            f"perf_analyzer failed ({done.returncode}): {done.stdout[-1500:]}{done.stderr[-1500:]}"
        )
    row = rows[0]
    return {
        "throughput": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1000,
        "p90_ms": float(row["p90 latency"]) / 1000,
        "p99_ms": float(row["p99 latency"]) / 1000,
        "mean_ms": float(row.get("Avg latency", 0) or 0) / 1000,
    }


def write_results(name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """bench/results/<name>.json and .md"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"{name}.json"
    md_path = RESULTS / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def measured(server: GatewayProcess, model: str) -> Iterator[dict[str, float]]:
    """CPU seconds and completed requests/rows/executions of ``server`` over the block."""
    out: dict[str, float] = {}
    before = server.counters(model)
    cpu0, loop0 = cpu_seconds(server.pid), main_thread_cpu_seconds(server.pid)
    start = time.perf_counter()
    yield out
    out["wall_s"] = time.perf_counter() - start
    out["cpu_s"] = cpu_seconds(server.pid) - cpu0
    out["loop_cpu_s"] = main_thread_cpu_seconds(server.pid) - loop0
    after = server.counters(model)
    out["requests"] = after.requests - before.requests
    out["rows"] = after.rows - before.rows
    out["executions"] = after.executions - before.executions
    out["cpu_ms_per_request"] = 1000 * out["cpu_s"] / max(out["requests"], 1)
    out["loop_cpu_ms_per_request"] = 1000 * out["loop_cpu_s"] / max(out["requests"], 1)
    out["avg_batch_rows"] = out["rows"] / max(out["executions"], 1)
