"""app.py: the composition root. Builds every component from ``Settings``, starts them in
dependency order, serves, and on SIGTERM drains and stops them in reverse.

``serve(settings)`` is an async context manager yielding a running ``Gateway`` with its
bound ports (tests use port 0); ``run(settings)`` is the blocking entry used by the CLI and
owns the process signals (uvicorn and grpc install none of their own here).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Generator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import msgspec
import uvicorn
from starlette.routing import Route as Route_

from gateway import __version__
from gateway.admin import Token, build_admin_app
from gateway.alerts import AlertSender
from gateway.batcher import Batcher
from gateway.config import Settings
from gateway.dataplane import DataPlane
from gateway.drift.buffer import BufferedObserver
from gateway.drift.build import find_profile, load_checked
from gateway.drift.monitor import DriftMonitor, DriftReport
from gateway.errors import InvalidInputError, ModelNotFoundError
from gateway.feedback import PredictionMemory
from gateway.grpc_api import FeedbackServicer, HealthServicer, InferenceServicer, build_server
from gateway.http_api import HttpFrontEnd
from gateway.logs import AccessLog
from gateway.metrics import (
    CONTENT_TYPE,
    BatcherSample,
    DriftSample,
    OutcomeSample,
    Snapshot,
    VariantSample,
    render,
)
from gateway.outcomes import OutcomeKindError, OutcomeSnapshot
from gateway.outcomes import compare as compare_outcomes
from gateway.predlog import PredictionLogger
from gateway.repository import ModelRepository, ModelVersion
from gateway.rollout.controller import RolloutController
from gateway.rollout.signals import SignalGatherer
from gateway.router import Endpoint, Router
from gateway.store import SqliteStore
from gateway.traffic import LATENCY_BUCKETS_MS
from gateway.types import (
    ModelIndexEntry,
    ParamValue,
    Route,
    ShadowTarget,
    Variant,
)

__all__ = ["Gateway", "serve", "run"]

logger = logging.getLogger(__name__)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: ``app.py`` owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only when the
    # listening socket says TCP; without it a response written in two parts (headers,
    # body) waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


# Load-request "config" fields (the model configuration's JSON form) we honour.
def _policy_from_config(raw: ParamValue) -> dict[str, Any]:
    if not isinstance(raw, str):
        raise InvalidInputError("load parameter 'config' must be a JSON string")
    try:
        config = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise InvalidInputError(f"load parameter 'config' is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidInputError("load parameter 'config' must be a JSON object")
    policy: dict[str, Any] = {}
    if "max_batch_size" in config:
        policy["max_batch_size"] = config["max_batch_size"]
    dynamic = config.get("dynamic_batching")
    if isinstance(dynamic, dict):
        if "max_queue_delay_microseconds" in dynamic:
            policy["max_queue_delay_us"] = dynamic["max_queue_delay_microseconds"]
        if "preferred_batch_size" in dynamic:
            policy["preferred_batch_sizes"] = dynamic["preferred_batch_size"]
    groups = config.get("instance_group")
    if isinstance(groups, list) and groups and isinstance(groups[0], dict) and "count" in groups[0]:
        policy["instances"] = groups[0]["count"]
    return policy


class Gateway:
    """All components of one gateway process, wired together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.repository = ModelRepository(
            settings.repository_path(), settings.runtime, settings.models
        )
        # Shadow model calls that need a worker thread run on one low-priority thread of
        # their own: a slow shadow then yields the cores to the primary path.
        self._shadow_pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="shadow", initializer=_lower_priority
        )
        self.router = Router(
            shadow_max_in_flight=settings.shadow_max_in_flight,
            shadow_executor=self._shadow_pool,
        )
        self.monitor = DriftMonitor(settings.drift)
        # One observe call per ~128 rows instead of per batch: the same counts, a third of
        # the cost for one-row requests (bench: 13 -> 4.7 µs per request).
        self.observer = BufferedObserver(self.monitor.observe)
        self._observer_flush: asyncio.Task[None] | None = None
        self.drift_refused: dict[tuple[str, str], str] = {}
        self._started = False
        self._draining = False
        self.access_log = AccessLog(settings.access_log_sample_rate)
        predictions = settings.predictions
        if predictions.enabled and not predictions.directory:
            predictions = msgspec.structs.replace(
                predictions, directory=str(Path(settings.data_dir) / "predictions")
            )
        self.predictions = PredictionLogger(predictions) if predictions.enabled else None
        self.memory = PredictionMemory(settings.feedback)
        self._outcome_baselines: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self.plane = DataPlane(
            self.router,
            server_name=settings.server_name,
            server_version=__version__,
            is_ready=self.is_ready,
            memory=self.memory,
            predictions=self.predictions,
        )
        self.http = HttpFrontEnd(
            self.plane,
            self,
            settings.http,
            metrics=self.metrics,
            access_log=self.access_log,
        )
        self.inference = InferenceServicer(self.plane, self, access_log=self.access_log)
        self.health = HealthServicer(self.plane)
        self.feedback_servicer = FeedbackServicer(self.plane)
        self._http_server: _Uvicorn | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._admin_server: _Uvicorn | None = None
        self._admin_task: asyncio.Task[None] | None = None
        self.admin_port = 0
        self.store: SqliteStore | None = None
        self.alerts: AlertSender | None = None
        self.controller: RolloutController | None = None
        self.admin_app: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._grpc: grpc.aio.Server | None = None
        self.http_port = 0
        self.grpc_port = 0
        self._lock = asyncio.Lock()

    # -- readiness and metrics ------------------------------------------------------------

    def is_ready(self) -> bool:
        return self._started and not self._draining

    def metrics(self) -> bytes:
        """Prometheus exposition of the live counters (built at scrape time)."""
        return render(self.metrics_snapshot)

    def metrics_snapshot(self) -> Snapshot:
        batchers = []
        for endpoint in self.router.endpoints():
            st = endpoint.batcher.stats
            batchers.append(
                BatcherSample(
                    endpoint.model.name,
                    endpoint.model.version,
                    endpoint.batcher.queue_depth,
                    st.success.count,
                    st.fail.count,
                    st.inference_count,
                    st.execution_count,
                    st.rejected,
                    st.expired,
                    st.queue.ns,
                    st.compute_input.ns,
                    st.compute_infer.ns,
                    st.compute_output.ns,
                    {size: b.compute_infer.count for size, b in st.batches.items()},
                    dict(getattr(endpoint.model, "schema_violations", {})),
                )
            )
        routes = self.router.routes()
        variants = []
        for t in self.router.traffic():
            route = routes.get(t.model)
            weight = None
            if route is not None:
                total = sum(v.weight for v in route.variants) or 1.0
                weight = route.weights().get(t.version, 0.0) / total
            variants.append(
                VariantSample(
                    t.model,
                    t.version,
                    t.requests,
                    t.errors,
                    LATENCY_BUCKETS_MS,
                    t.latency_counts,
                    t.latency_total_ms,
                    weight,
                    int(t.shadow.get("sent") or 0),
                    int(t.shadow.get("dropped") or 0),
                    int(t.shadow.get("errors") or 0),
                    t.shadow.get("agreement"),
                )
            )
        drift = []
        for endpoint in self.router.endpoints():
            ref = endpoint.model.ref
            try:
                report = self.monitor.report(ref)
            except KeyError:
                continue
            features = report.inputs + report.outputs
            drift.append(
                DriftSample(
                    ref.name,
                    ref.version,
                    report.inputs[0].n if report.inputs else 0,
                    report.verdict,
                    sum(1 for f in features if f.verdict == "drift"),
                    max((f.psi for f in features), default=0.0),
                    [(f.name, f.psi, f.ks) for f in features],
                )
            )
        responses = {("http", code): n for code, n in self.http.responses.items()}
        responses.update({("grpc", code): n for code, n in self.inference.responses.items()})
        outcomes = []
        for model, version in self.memory.variants():
            snap = self.memory.snapshot(model, version)
            outcomes.append(OutcomeSample(model, version, snap.n, snap.accuracy, snap.mae))
        counters = self.memory.counters()
        feedback = {
            "matched": counters.matched,
            "unknown": counters.unknown_ids,
            "expired": counters.expired_ids,
            "duplicate": counters.duplicate,
            "invalid": counters.invalid,
        }
        rollouts: dict[str, str] = {}
        if self.controller is not None:
            rollouts = {state.model: str(state.status) for state in self.controller.rollouts()}
        return Snapshot(
            batchers, variants, drift, responses, rollouts, self.is_ready(), outcomes, feedback
        )

    # -- ModelControl (the V2 repository extension) ---------------------------------------

    def index(self) -> list[ModelIndexEntry]:
        return self.repository.index()

    async def load(self, name: str, parameters: Mapping[str, ParamValue]) -> None:
        """(Re)load every version of ``name``; requests in flight finish on the old ones."""
        extra: dict[str, Any] = {}
        for key, value in parameters.items():
            if key == "config":
                extra.update(_policy_from_config(value))
            elif key.startswith("file:"):
                raise InvalidInputError(
                    "uploading model files is not supported; place them in the repository"
                )
        async with self._lock:
            loaded = await self.repository.load(name, extra)
            if not loaded:
                reasons = "; ".join(
                    f"version {e.version}: {e.reason}"
                    for e in self.repository.index()
                    if e.name == name and e.reason
                )
                raise InvalidInputError(f"failed to load model '{name}': {reasons}")
            stale = set(self.router.versions(name)) - {m.version for m in loaded}
            for version in stale:
                for old in self.router.remove(name, version):
                    await self._retire(old)
            for model in loaded:
                await self._install(model)

    async def unload(self, name: str) -> None:
        async with self._lock:
            removed = self.router.remove(name)
            if not removed:
                raise ModelNotFoundError(f"Request for unknown model: '{name}' is not loaded")
            for endpoint in removed:
                self.repository.set_state(name, endpoint.model.version, "UNLOADING")
            for endpoint in removed:
                await self._retire(endpoint)
                self.repository.set_state(name, endpoint.model.version, "UNAVAILABLE", "unloaded")

    async def _watch_drift(self, model: ModelVersion) -> bool:
        """Register the version's drift profile, if it has one; False when it has none or
        it does not fit the model (refused: logged and reported, the model still serves)."""
        key = (model.name, model.version)
        self.drift_refused.pop(key, None)
        path = find_profile(model.path.parent.parent, model.version)
        if path is None or not self.settings.drift.enabled:
            self.monitor.unregister(model.ref)
            return False
        loop = asyncio.get_running_loop()
        try:
            profile, input_name = await loop.run_in_executor(
                self.repository.executor, load_checked, path, model.session
            )
            # Compiles or loads the kernels: before the version reports ready.
            await loop.run_in_executor(
                self.repository.executor, self.monitor.register, model.ref, profile, input_name
            )
        except (ValueError, OSError) as exc:
            reason = f"drift profile {path} refused: {exc}"
            logger.error("model %s version %s: %s", model.name, model.version, reason)
            self.drift_refused[key] = reason
            self.monitor.unregister(model.ref)
            return False
        return True

    def drift_report(self, model: str, version: str = "", against: str = "") -> DriftReport:
        """Drift of a served version against its reference profile, or (``against``)
        against another version's window. Raises ``ModelNotFoundError`` or
        ``InvalidInputError`` with the reason when there is nothing to report."""
        endpoint = self.router.resolve(model, version)
        ref = endpoint.model.ref
        refused = self.drift_refused.get((ref.name, ref.version))
        if refused:
            raise InvalidInputError(refused)
        try:
            if against:
                other = self.router.resolve(model, against).model.ref
                return self.monitor.compare(ref, other)
            return self.monitor.report(ref)
        except KeyError:
            raise InvalidInputError(
                f"model '{ref.name}' version {ref.version} has no drift profile"
            ) from None
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None

    async def _install(self, model: ModelVersion) -> None:
        policy = model.policy
        watched = await self._watch_drift(model)
        batcher = Batcher(
            model,
            max_queue_size=policy.max_queue_size,
            instances=policy.instances,
            max_queue_delay_us=policy.max_queue_delay_us,
            preferred_batch_sizes=tuple(policy.preferred_batch_sizes),
            batching=policy.dynamic_batching,
            executor=self.repository.executor,
            observer=self.observer if watched else None,
        )
        batcher.start()
        timeout = policy.default_timeout_ms / 1000 if policy.default_timeout_ms else None
        old = self.router.install(
            Endpoint(model, batcher, timeout), default_version=policy.default_version
        )
        self.repository.set_state(model.name, model.version, "READY")
        if old is not None:
            await self._retire(old)

    async def _retire(self, endpoint: Endpoint) -> None:
        await endpoint.batcher.drain()
        model = endpoint.model
        if model.version not in self.router.versions(model.name):
            self.monitor.unregister(model.ref)  # not replaced by a reload of itself
        model.close()  # type: ignore[attr-defined]  # ModelVersion.close

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the repository, then open the listeners. Ready once both are up."""
        settings = self.settings
        self._loop = asyncio.get_running_loop()
        self.repository.start()
        names = self.repository.model_names()
        if not names:
            logger.warning("model repository %s holds no models", self.repository.root)
        for name in names:
            try:
                await self.load(name, {})
            except Exception as exc:  # one bad model must not stop the others
                logger.error("model %s is not served: %s", name, exc)
        for name, spec in settings.routes.items():
            self.router.set_route(
                Route(
                    name,
                    tuple(Variant(v, w) for v, w in spec.variants.items()),
                    tuple(ShadowTarget(s.version, s.sample_rate) for s in spec.shadows),
                )
            )
        self.monitor.start()
        self._observer_flush = asyncio.create_task(self._flush_observations())
        if self.predictions is not None:
            self.predictions.start()
        self._start_control_plane()
        self._http_server, self._http_task, self.http_port = await self._listen(
            self.http.app, settings.http.host, settings.http.port, settings.http.access_log
        )
        self._grpc = build_server(
            self.inference, self.health, settings.grpc.max_message_bytes, self.feedback_servicer
        )
        self.grpc_port = self._grpc.add_insecure_port(f"{settings.grpc.host}:{settings.grpc.port}")
        await self._grpc.start()
        self._admin_server, self._admin_task, self.admin_port = await self._listen(
            self.admin_app, settings.admin.host, settings.admin.port, False
        )
        self._started = True
        logger.info(
            "serving %s on HTTP %s:%d and gRPC %s:%d (admin %s:%d)",
            ", ".join(f"{e.name}/{e.version}" for e in self.index() if e.state == "READY")
            or "no models",
            settings.http.host,
            self.http_port,
            settings.grpc.host,
            self.grpc_port,
            settings.admin.host,
            self.admin_port,
        )

    async def _flush_observations(self) -> None:
        """Counts drift observations buffered by quiet threads (at most 0.1 s late)."""
        while True:
            await asyncio.sleep(0.1)
            try:
                self.observer.flush_all(older_than_s=0.1)
            except Exception:  # the drift path must never stop serving
                logger.exception("drift observation flush failed")

    async def _listen(
        self, app: Any, host: str, port: int, access_log: bool
    ) -> tuple[_Uvicorn, asyncio.Task[None], int]:
        """Serve an ASGI app with uvicorn on a socket we bind (port 0 works)."""
        sock = _bind(host, port)
        bound = int(sock.getsockname()[1])
        config = uvicorn.Config(
            app,
            lifespan="off",
            interface="asgi3",
            http="httptools",
            access_log=access_log,
            proxy_headers=False,
            server_header=False,
            date_header=False,
            log_level="warning",
            timeout_graceful_shutdown=int(self.settings.grace_period_s),
            timeout_keep_alive=30,
        )
        server = _Uvicorn(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError(f"HTTP listener {host}:{port} stopped during start-up")
            await asyncio.sleep(0.01)
        return server, task, bound

    def _start_control_plane(self) -> None:
        """Durable routes and rollouts (restored over the config's routes), the rollout
        controller's evaluation loop, alert webhooks and the admin app."""
        settings = self.settings
        data_dir = Path(settings.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        self.store = SqliteStore(data_dir / "control.sqlite3")
        if settings.alerts.webhooks:
            self.alerts = AlertSender(
                settings.alerts.webhooks,
                timeout_s=settings.alerts.timeout_s,
                retries=settings.alerts.retries,
                backoff_s=settings.alerts.backoff_s,
            )
            self.alerts.start()
        self.controller = RolloutController(
            self.store,
            apply_weights=self._apply_weights,
            gather=SignalGatherer(self.router, self.monitor, self._outcome),
            alerts=self.alerts,
        )
        self.controller.start()
        tokens = {t.token: Token(t.name, t.role) for t in settings.admin.tokens}
        self.admin_app = build_admin_app(
            self.controller,
            self.store,
            tokens,
            self.index,
            self._drift_json,
            extra_routes=[
                Route_("/metrics", self._metrics_endpoint, methods=["GET"]),
                *self._dashboard_routes(),
            ],
        )

    def _apply_weights(self, model: str, weights: dict[str, float]) -> None:
        """The controller's door into the router: weights change on the loop thread, where
        requests read the routing table (the controller calls from its worker thread)."""
        loop = self._loop
        if loop is None or loop is _running_loop():
            self.router.set_weights(model, weights)
            return

        async def apply() -> None:
            self.router.set_weights(model, weights)

        asyncio.run_coroutine_threadsafe(apply(), loop).result(timeout=10)

    @staticmethod
    def _dashboard_routes() -> list[Any]:
        try:
            module = importlib.import_module("gateway.dashboard")
        except ImportError:  # pragma: no cover - the dashboard ships with the package
            return []
        build = getattr(module, "dashboard_routes", None)
        routes: list[Any] = build() if build is not None else []
        return routes

    async def _metrics_endpoint(self, request: Any) -> Any:
        from starlette.responses import Response

        return Response(self.metrics(), media_type=CONTENT_TYPE)

    def _drift_json(self, model: str, version: str | None) -> dict[str, Any]:
        report = self.drift_report(model, version or "")
        data: dict[str, Any] = msgspec.to_builtins(report)
        return data

    def _outcome(self, model: str, stable: str, candidate: str) -> tuple[float, bool] | None:
        """Ground truth for a rollout: (one-sided p-value of "candidate worse", whether the
        observed difference points that way), once both arms have enough joined samples."""
        loop = self._loop
        if loop is None:
            return None

        async def snapshots() -> tuple[OutcomeSnapshot, OutcomeSnapshot]:
            return self.memory.snapshot(model, candidate), self.memory.snapshot(model, stable)

        # The memory lives on the loop thread; the controller asks from its worker.
        cand, stab = asyncio.run_coroutine_threadsafe(snapshots(), loop).result(timeout=10)
        # The window starts when this rollout was first judged (earlier rollouts of the
        # same versions must not count).
        start = self._outcome_baselines.setdefault((model, stable, candidate), (cand, stab))
        cand, stab = cand.minus(start[0]), stab.minus(start[1])
        try:
            result = compare_outcomes(cand, stab)
        except OutcomeKindError:
            return None
        if not result.enough_samples or result.p_value is None or result.statistic is None:
            return None
        worse = result.statistic < 0 if result.test == "two_proportion_z" else result.statistic > 0
        return result.p_value, worse

    async def stop(self) -> None:
        """Readiness goes false at once; in-flight requests finish (up to the grace
        period); then listeners close, batchers drain and sessions are released."""
        self._draining = True
        grace = self.settings.grace_period_s
        if self.controller is not None:
            await self.controller.stop()
        stops: list[Any] = []
        if self._grpc is not None:
            stops.append(self._grpc.stop(grace))
        for server, task in (
            (self._http_server, self._http_task),
            (self._admin_server, self._admin_task),
        ):
            if server is not None and task is not None:
                server.should_exit = True
                stops.append(task)
        await asyncio.gather(*stops, return_exceptions=True)
        await self.router.shadows.stop()
        for endpoint in list(self.router.endpoints()):
            self.router.remove(endpoint.model.name, endpoint.model.version)
            await self._retire(endpoint)
        if self._observer_flush is not None:
            self._observer_flush.cancel()
        self.observer.flush_all()
        self.monitor.stop()
        self._shadow_pool.shutdown(wait=True, cancel_futures=True)
        if self.predictions is not None:
            await asyncio.to_thread(self.predictions.stop)
        if self.alerts is not None:
            await asyncio.to_thread(self.alerts.close)
        if self.store is not None:
            self.store.close()
        self.repository.stop()
        logger.info("stopped")


@contextlib.asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[Gateway]:
    """Start a gateway, yield it (ports bound, ready), stop it on exit."""
    gateway = Gateway(settings)
    try:
        await gateway.start()
        yield gateway
    finally:
        await gateway.stop()


async def _main(settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(settings) as gateway:
        del gateway
        await stop.wait()
        logger.info("signal received: draining (grace %.0f s)", settings.grace_period_s)


def run(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then drain and exit (blocking).

    The event loop is uvloop's when installed (it is, with uvicorn[standard]): it halves the
    per-request cost of the loop and socket writes against asyncio's selector loop.
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        asyncio.run(_main(settings))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_main(settings))


def _lower_priority() -> None:
    """Initializer of the shadow thread: the lowest CPU priority (Linux nice 19 for this
    thread only); elsewhere it is left as is."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # pragma: no cover - not Linux, or not permitted
        logger.debug("shadow thread priority left unchanged")


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
