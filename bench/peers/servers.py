"""Start one server (the gateway or a peer adapter), read its CPU time, and stop it cleanly.

A server is a process tree: Ray starts about a dozen processes, tritonserver runs beside
PyTriton's Python process and its backend stubs, BentoML's worker calls setsid. So the
tree is found afresh from /proc at every sample: the launched process's descendants, its
process group and session, and every process seen before that still lives (matched by
start time, so a reused PID is not counted). The harness makes itself a child subreaper,
so processes orphaned by a dying parent are re-parented to it rather than to init and stay
findable. Stopping signals the process group, then every recorded PID, then SIGKILLs what
is left, and checks that nothing survived.

Server CPU = utime + stime (+ cutime + cstime, so that children reaped inside the tree stay
counted) summed over the tree, in seconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

from bench.common import GatewayProcess, free_port
from bench.models import MODELS
from bench.peers import install

__all__ = [
    "SPECS",
    "ServerError",
    "ServerProcess",
    "ServerSpec",
    "become_subreaper",
    "free_port",
    "gateway_settings",
    "process_tree",
]

logger = logging.getLogger(__name__)

ROOT: Final = Path(__file__).resolve().parents[2]
_TICKS: Final = os.sysconf("SC_CLK_TCK")
_PR_SET_CHILD_SUBREAPER: Final = 36
READY_TIMEOUT_S: Final = 240.0  # Ray needs ~10-20 s on 2 busy cores; tritonserver ~10 s
ROOT_GRACE_S: Final = 15.0  # Ray's driver needs a few seconds to shut its cluster down
STOP_GRACE_S: Final = 5.0
GATEWAY_RUNTIME: Final = "[runtime]\ninference_workers = 2\nintra_op_threads = 1\n"


class ServerError(RuntimeError):
    """A server did not start, did not become ready, or left processes behind."""


@dataclass(frozen=True)
class ServerSpec:
    """How to run and drive one server.

    ``modes`` are bench.loadgen modes; ``perf_analyzer`` the perf_analyzer protocols
    (``http``/``grpc``) it can also be measured with; ``route`` the plain-JSON path, with
    ``{model}`` replaced. ``module`` (with ``args``) runs a module of this repository with
    the gateway's own interpreter instead of an adapter in a peer's venv (the bare floor
    servers); ``uses_http`` False means it has no HTTP listener.
    """

    name: str
    label: str
    modes: tuple[str, ...]
    adapter: str = ""
    perf_analyzer: tuple[str, ...] = ()
    route: str = "/{model}"
    batching: str = ""
    uses_grpc: bool = True
    module: str = ""
    args: tuple[str, ...] = ()
    uses_http: bool = True

    @property
    def is_v2(self) -> bool:
        return "plain-json" not in self.modes


SPECS: Final[dict[str, ServerSpec]] = {
    spec.name: spec
    for spec in (
        ServerSpec(
            "gateway",
            "gateway (this repo)",
            ("http-binary", "http-json", "grpc", "grpc-stream"),
            perf_analyzer=("http", "grpc"),
            batching="dynamic batching, max_batch_size 64, max_queue_delay 0 µs "
            "(work-conserving); inference_workers=2, intra_op_threads=1",
        ),
        ServerSpec(
            "pytriton",
            "PyTriton 0.7.0 (tritonserver 2.51)",
            ("http-binary", "http-json", "grpc", "grpc-stream"),
            adapter="pytriton_server",
            perf_analyzer=("http", "grpc"),
            batching="Triton dynamic batcher, max_batch_size 64, max_queue_delay 0 µs",
        ),
        ServerSpec(
            "kserve",
            "KServe ModelServer 0.21.0",
            ("http-json", "http-binary", "grpc"),
            adapter="kserve_server",
            batching="none (the Python ModelServer has no batcher)",
        ),
        ServerSpec(
            "mlserver",
            "MLServer 1.7.1",
            ("http-json", "grpc"),
            adapter="mlserver_server",
            batching="adaptive batching, max_batch_size 64, max_batch_time 1 ms "
            "(0 turns it off); 1 parallel inference worker (default)",
        ),
        ServerSpec(
            "ray",
            "Ray Serve 2.60.0",
            ("plain-json",),
            adapter="ray_server",
            route="/{model}",
            batching="@serve.batch max_batch_size 64, batch_wait_timeout_s 0; "
            "max_ongoing_requests 128; 1 replica",
            uses_grpc=False,
        ),
        ServerSpec(
            "bentoml",
            "BentoML 1.4.40",
            ("plain-json",),
            adapter="bentoml_server",
            route="/{model}",
            batching="batchable API, max_batch_size 64, adaptive dispatcher (no wait knob); "
            "1 worker",
            uses_grpc=False,
        ),
    )
}


def gateway_settings(data_dir: Path) -> str:
    """The run's gateway settings: [runtime] inference_workers=2, intra_op_threads=1.

    Where this gateway version has them, its admin listener gets a free port and its data
    folder a temporary one, so a run never clashes with another gateway on the machine.
    """
    from gateway.config import Settings

    fields = set(Settings.__struct_fields__)
    text = f"data_dir = {json.dumps(str(data_dir))}\n" if "data_dir" in fields else ""
    text += GATEWAY_RUNTIME
    if "admin" in fields:
        text += "[admin]\nport = 0\n"
    return text


def become_subreaper() -> None:
    """Make this process inherit orphaned descendants (Linux prctl), so none escape."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    pgrp: int
    session: int
    start_ticks: int
    cpu_ticks: int
    state: str


def _read_proc(pid: int) -> _Proc | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): ppid 4, pgrp 5, session 6, utime..cstime 14-17, start 22
    return _Proc(
        pid,
        int(fields[1]),
        int(fields[2]),
        int(fields[3]),
        int(fields[19]),
        sum(int(v) for v in fields[11:15]),
        fields[0],
    )


def _all_procs() -> dict[int, _Proc]:
    procs: dict[int, _Proc] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            proc = _read_proc(int(entry))
            if proc is not None:
                procs[proc.pid] = proc
    return procs


def process_tree(root: int, known: dict[int, int] | None = None) -> dict[int, _Proc]:
    """The live processes of the server started as ``root``.

    Members: ``root``, its descendants, processes in its group or session, and the
    processes in ``known`` (pid -> start ticks) that still run with the same start time.
    ``known`` is updated in place with every member found.
    """
    procs = _all_procs()
    known = {} if known is None else known
    members: dict[int, _Proc] = {}
    for proc in procs.values():
        same_group = proc.pgrp == root or proc.session == root
        seen = known.get(proc.pid) == proc.start_ticks
        if proc.pid == root or same_group or seen:
            members[proc.pid] = proc
    children: dict[int, list[int]] = {}
    for proc in procs.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    stack = list(members)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in members:
                members[child] = procs[child]
                stack.append(child)
    for proc in members.values():
        known[proc.pid] = proc.start_ticks
    return members


@dataclass
class ServerProcess:
    """One running server; a context manager that starts it and always stops it.

    ``models`` maps model name -> ONNX path (peers) or is served from ``repository``
    (gateway). Blocks in ``__enter__`` until every model answers an inference.
    """

    spec: ServerSpec
    models: dict[str, str]
    repository: Path | None = None
    gateway_settings: str = ""
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    log_path: Path = field(default_factory=Path)
    _proc: subprocess.Popen[bytes] | None = None
    _gateway: GatewayProcess | None = None
    _known: dict[int, int] = field(default_factory=dict)
    _log: IO[bytes] | None = None
    start_s: float = 0.0

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> ServerProcess:
        started = time.perf_counter()
        try:
            if self.spec.name == "gateway":
                self._start_gateway()
            else:
                self._start_peer()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.start_s = time.perf_counter() - started
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _start_gateway(self) -> None:
        assert self.repository is not None
        self._gateway = GatewayProcess(self.repository, self.gateway_settings).__enter__()
        self.http_port = self._gateway.http_port
        self.grpc_port = self._gateway.grpc_port

    def _start_peer(self) -> None:
        if self.spec.module:
            python = Path(sys.executable)
            command = [str(python), "-m", self.spec.module, *self.spec.args]
        elif not install.is_installed(self.spec.name):
            raise ServerError(f"{self.spec.name} is not installed (bench/.peers/)")
        else:
            python = install.python(self.spec.name)
            command = [str(python), "-m", f"bench.peers.adapters.{self.spec.adapter}"]
        self.http_port = free_port() if self.spec.uses_http else 0
        self.grpc_port = free_port() if self.spec.uses_grpc else 0
        self.metrics_port = free_port()
        for name, path in self.models.items():
            command += ["--model", f"{name}={path}"]
        command += [
            "--http-port",
            str(self.http_port),
            "--grpc-port",
            str(self.grpc_port),
            "--metrics-port",
            str(self.metrics_port),
            "--max-batch-size",
            "64",
        ]
        env = dict(os.environ)
        env.pop("VIRTUAL_ENV", None)
        env["PYTHONPATH"] = str(ROOT)
        env["PATH"] = f"{python.parent}:{env.get('PATH', '')}"
        env.update(
            {
                "RAY_USAGE_STATS_ENABLED": "0",
                "BENTOML_DO_NOT_TRACK": "True",
                "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.spec.name == "pytriton":
            # The python backend stub links libpython3.11: the venv interpreter's LIBDIR
            # must come first or it loads another copy and crashes (PEERS.md).
            libdir = subprocess.run(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            env["LD_LIBRARY_PATH"] = libdir + (
                ":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else ""
            )
        fd, log = tempfile.mkstemp(prefix=f"bench-{self.spec.name}-", suffix=".log")
        self.log_path = Path(log)
        self._log = os.fdopen(fd, "wb")
        self._proc = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        if self._gateway is not None:
            return self._gateway.pid
        assert self._proc is not None
        return self._proc.pid

    def _alive(self) -> bool:
        if self._gateway is not None:
            return self._gateway.proc is not None and self._gateway.proc.poll() is None
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        path = self._gateway._log_path if self._gateway is not None else self.log_path
        with contextlib.suppress(OSError):
            return path.read_text(errors="replace")[-chars:]
        return ""

    def check_alive(self) -> None:
        """Raise ServerError with the log's tail if the server's main process has exited."""
        if not self._alive():
            raise ServerError(f"{self.spec.name} exited while being measured:\n{self.log_tail()}")

    # ------------------------------------------------------------------ readiness
    def _wait_ready(self) -> None:
        """Until one inference per model succeeds over HTTP (and gRPC where spoken)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        pending = list(self.models)
        last_error = ""
        while pending:
            if not self._alive():
                raise ServerError(f"{self.spec.name} exited during start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerError(
                    f"{self.spec.name} not ready after {READY_TIMEOUT_S:.0f} s "
                    f"({last_error}):\n{self.log_tail()}"
                )
            self.process_tree()  # record processes while they are still linked to the root
            try:
                self.probe(pending[0])
                pending.pop(0)
            except (OSError, ValueError, RuntimeError) as exc:
                last_error = str(exc)[:300]
                time.sleep(0.5)

    def probe(self, model: str) -> None:
        """One JSON inference of one row (HTTP), and one gRPC ModelInfer where spoken."""
        width = _input_width(self.models[model])
        row = [0.5] * width
        body: dict[str, Any]
        if not self.spec.uses_http:
            self._probe_grpc(model, width)
            return
        if self.spec.is_v2:
            url = f"http://127.0.0.1:{self.http_port}/v2/models/{model}/infer"
            body = {"inputs": [{"name": "INPUT0", "shape": [1, width], "datatype": "FP32",
                                "data": row}]}  # fmt: skip
        else:
            url = f"http://127.0.0.1:{self.http_port}" + self.spec.route.format(model=model)
            body = {"instances": [row]}
        request = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                reply.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"HTTP {exc.code}: {exc.read()[:200]!r}") from exc
        if self.spec.is_v2 and self.spec.uses_grpc:
            self._probe_grpc(model, width)

    def _probe_grpc(self, model: str, width: int) -> None:
        import grpc

        from bench.loadgen import Target, grpc_request

        payload = grpc_request(Target("grpc", f"127.0.0.1:{self.grpc_port}", model, width))
        with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
            try:
                channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(
                    payload, timeout=10
                )
            except grpc.RpcError as exc:
                raise RuntimeError(f"gRPC: {exc}") from exc

    # ------------------------------------------------------------------ measurement
    def process_tree(self) -> dict[int, _Proc]:
        return process_tree(self.pid, self._known)

    def cpu_seconds(self) -> float:
        """CPU seconds of every process in the server's tree (see the module docstring)."""
        return sum(p.cpu_ticks for p in self.process_tree().values()) / _TICKS

    def served_requests(self, model: str) -> int | None:
        """Successful inferences the server itself counted (V2 statistics), if it reports."""
        if not self.spec.uses_http:
            return self._grpc_served_requests(model)
        url = f"http://127.0.0.1:{self.http_port}/v2/models/{model}/stats"
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                stats = json.load(reply)["model_stats"]
        except (OSError, ValueError, KeyError):
            return None
        return sum(int(s["inference_stats"]["success"]["count"]) for s in stats)

    def _grpc_served_requests(self, model: str) -> int | None:
        import grpc

        from gateway._proto import grpc_service_pb2 as pb

        request = pb.ModelStatisticsRequest(name=model).SerializeToString()
        with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
            try:
                reply = channel.unary_unary("/inference.GRPCInferenceService/ModelStatistics")(
                    request, timeout=10
                )
            except grpc.RpcError:
                return None
        stats = pb.ModelStatisticsResponse.FromString(reply).model_stats
        return sum(int(s.inference_stats.success.count) for s in stats)

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Stop the whole tree; raise ServerError if anything survives.

        The launched process gets SIGTERM first and up to ``ROOT_GRACE_S`` to shut its own
        children down (Ray's driver tears down its cluster; signalling everything at once
        leaves it waiting on a dead GCS). Then the group and every recorded PID get
        SIGTERM, ``STOP_GRACE_S`` later SIGKILL.
        """
        if self._proc is None and self._gateway is None:
            return
        tree = self.process_tree() if self._alive() else {}
        tree_pids = {p: self._known.get(p, 0) for p in tree} | dict(self._known)
        if self._gateway is not None:
            self._gateway.__exit__()
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(ROOT_GRACE_S)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGTERM)
        _signal_all(tree_pids, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and _survivors(tree_pids):
            _reap(tree_pids)
            time.sleep(0.1)
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        _signal_all(tree_pids, signal.SIGKILL)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _survivors(tree_pids):
            _reap(tree_pids)
            time.sleep(0.1)
        _reap(tree_pids)
        left = _survivors(tree_pids)
        self._proc = None
        self._gateway = None
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None
            # Its tail is in any error raised or crash recorded; KServe's can reach MBs.
            self.log_path.unlink(missing_ok=True)
        if left:
            raise ServerError(f"{self.spec.name} left processes running: {sorted(left)}")


def _signal_all(pids: dict[int, int], sig: signal.Signals) -> None:
    for pid, start in pids.items():
        proc = _read_proc(pid)
        if proc is not None and (start == 0 or proc.start_ticks == start) and pid != os.getpid():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def _survivors(pids: dict[int, int]) -> set[int]:
    left = set()
    for pid, start in pids.items():
        proc = _read_proc(pid)
        if proc is not None and proc.state != "Z" and (start == 0 or proc.start_ticks == start):
            left.add(pid)
    return left


def _reap(pids: dict[int, int]) -> None:
    """Collect zombies re-parented to this (subreaper) process; never waits on others."""
    for pid in pids:
        proc = _read_proc(pid)
        if proc is not None and proc.state == "Z" and proc.ppid == os.getpid():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def _input_width(path: str) -> int:
    """Rows' width for a bench model file (from bench.models.MODELS by the folder name)."""
    name = Path(path).parent.parent.name
    return MODELS[name][0]
