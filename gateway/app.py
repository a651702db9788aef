"""app.py: the composition root. Builds every component from ``Settings``, starts them in
dependency order, serves, and on SIGTERM drains and stops them in reverse.

``serve(settings)`` is an async context manager yielding a running ``Gateway`` with its
bound ports (tests use port 0); ``run(settings)`` is the blocking entry used by the CLI and
owns the process signals (uvicorn and grpc install none of their own here). Nothing here is
on the request path and nothing imports this module but the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import secrets
import signal
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
from starlette.routing import Route as Route_

from gateway import __version__
from gateway.admin import Token, build_admin_app
from gateway.admin_tokens import TOKEN_FILE, TokenFile
from gateway.alerts import AlertSender
from gateway.auth import DataPlaneGuard
from gateway.config import Settings
from gateway.control import ModelLifecycle
from gateway.dataplane import DataPlane
from gateway.drift.buffer import BufferedObserver
from gateway.drift.monitor import DriftMonitor
from gateway.drift.report import DriftReport
from gateway.feedback import PredictionMemory
from gateway.files import private_dir, private_file
from gateway.fleet import Fleet
from gateway.grpc_api import FeedbackServicer, HealthServicer, InferenceServicer
from gateway.history import MetricsHistory
from gateway.http_api import HttpFrontEnd, limit_body
from gateway.logs import AccessLog
from gateway.metrics import FleetGauges
from gateway.predlog import PredictionLogger
from gateway.repository import ModelRepository
from gateway.rollout.controller import RolloutController
from gateway.rollout.signals import OutcomeWindows, SignalGatherer
from gateway.router import Router
from gateway.servers import GrpcListener, HttpListener
from gateway.store import RedisStore, SqliteStore
from gateway.telemetry import Telemetry
from gateway.tls import ServerTls, TlsReloader, plaintext_warning
from gateway.types import Route, ShadowTarget, Variant

__all__ = ["Gateway", "serve", "run"]

logger = logging.getLogger(__name__)


class Gateway:
    """All components of one gateway process, wired together."""

    def __init__(self, settings: Settings, *, reuse_port: bool = False) -> None:
        self.settings = settings
        self.reuse_port = reuse_port
        """Listeners share their ports with sibling worker processes (SO_REUSEPORT)."""
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
            shadow_cpu_share=settings.shadow_cpu_share,
            shadow_executor=self._shadow_pool,
        )
        self.monitor = DriftMonitor(settings.drift)
        # One observe call per ~128 rows instead of per batch: the same counts, a third of
        # the cost for one-row requests (bench: 13 -> 4.7 µs per request).
        self.observer = BufferedObserver(self.monitor.observe)
        self._observer_flush: asyncio.Task[None] | None = None
        self.control = ModelLifecycle(
            self.repository,
            self.router,
            self.monitor,
            self.observer,
            drift_enabled=settings.drift.enabled,
            load_bounds=settings.model_control,
        )
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
        self.outcomes = OutcomeWindows(self.memory)
        self.plane = DataPlane(
            self.router,
            server_name=settings.server_name,
            server_version=__version__,
            is_ready=self.is_ready,
            memory=self.memory,
            predictions=self.predictions,
        )
        self.telemetry = Telemetry(self.router, self.monitor, self.memory, self.is_ready)
        self.history = MetricsHistory(
            self.telemetry.snapshot,
            settings.admin.history_interval_s,
            settings.admin.history_span_s,
        )
        self._history_task: asyncio.Task[None] | None = None
        http, grpc = settings.http, settings.grpc
        self.guard = DataPlaneGuard(
            settings.auth,
            settings.model_control,
            settings.admin.tokens,
            internal_endpoints=http.internal_endpoints,
        )
        self.http = HttpFrontEnd(
            self.plane,
            self.control,
            settings.http,
            metrics=self.telemetry.metrics,
            access_log=self.access_log,
            limits=settings.limits,
            check=self.guard.check_http,
        )
        self.inference = InferenceServicer(
            self.plane,
            self.control,
            access_log=self.access_log,
            control_check=self.guard.check_control_metadata,
            stream_max_unanswered=settings.limits.stream_max_unanswered,
        )
        self.telemetry.responses.update(http=self.http.responses, grpc=self.inference.responses)
        self.tls = {
            name: ServerTls(tls, name)
            for name, tls in (("http", http.tls), ("grpc", grpc.tls), ("admin", settings.admin.tls))
            if tls.enabled
        }
        self._tls_reloader = TlsReloader(list(self.tls.values()))
        for name, tls in (("http", http.tls), ("grpc", grpc.tls)):
            if self.guard.identity_rules and not tls.client_ca:
                logger.warning("%s listener has no client_ca: auth identities never match", name)
        self._http = HttpListener(
            self.http.app,
            http.host,
            http.port,
            access_log=http.access_log,
            grace_period_s=settings.grace_period_s,
            reuse_port=reuse_port,
            limits=settings.limits,
            ssl_context=self.tls["http"].ssl_context() if "http" in self.tls else None,
        )
        self._grpc = GrpcListener(
            self.inference,
            HealthServicer(self.plane),
            FeedbackServicer(self.plane, self.guard.check_grpc_feedback_peer),
            grpc.host,
            grpc.port,
            max_message_bytes=grpc.max_message_bytes,
            reuse_port=reuse_port,
            limits=settings.limits,
            credentials=self.tls["grpc"].grpc_credentials() if "grpc" in self.tls else None,
            interceptors=self.guard.interceptors(),
        )
        self._admin: HttpListener | None = None
        self.store: SqliteStore | RedisStore | None = None
        self.fleet: Fleet | None = None
        """Set when ``store.url`` names a Redis: the control plane shared with other
        replicas and worker processes."""
        self.incarnation = secrets.token_hex(8)
        self.alerts: AlertSender | None = None
        self.controller: RolloutController | None = None
        self.admin_app: Any = None

    @property
    def http_port(self) -> int:
        return self._http.port

    @property
    def grpc_port(self) -> int:
        return self._grpc.port

    @property
    def admin_port(self) -> int:
        return self._admin.port if self._admin is not None else 0

    def is_ready(self) -> bool:
        return self._started and not self._draining

    def reload_tls(self) -> None:
        """Re-read every listener's certificate, key and client CA (SIGHUP)."""
        self._tls_reloader.reload_all()

    def drift_report(self, model: str, version: str = "", against: str = "") -> DriftReport:
        return self.control.drift_report(model, version, against)

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the repository, then open the listeners. Ready once all are up."""
        settings = self.settings
        self.repository.start()
        await self.control.load_all()
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
        self._history_task = asyncio.create_task(self.history.run())
        if self.predictions is not None:
            self.predictions.start()
        self.outcomes.start(asyncio.get_running_loop())
        self._start_control_plane()
        await self._http.start()
        await self._grpc.start()
        if self.fleet is not None and self.controller is not None:
            address = f"{settings.http.host}:{self.http_port}"
            memory = self.memory
            await self.fleet.start(
                self.controller.observe,
                address,
                lambda model, items: memory.join(items, model=model),
                memory,
            )
            if self.fleet.relay is not None:
                self.plane.relay = self.fleet.relay.forward
        admin = settings.admin
        warning = plaintext_warning("admin", admin.host, admin.tls)
        if warning:
            logger.warning(warning)
        self._admin = HttpListener(
            limit_body(self.admin_app, settings.limits.control_body_bytes),
            admin.host,
            admin.port,
            access_log=False,
            grace_period_s=settings.grace_period_s,
            reuse_port=self.reuse_port,
            limits=settings.limits,
            ssl_context=self.tls["admin"].ssl_context() if "admin" in self.tls else None,
        )
        await self._admin.start()
        self._tls_reloader.start()
        self._started = True
        logger.info(
            "serving %s on HTTP %s:%d and gRPC %s:%d (admin %s:%d)",
            ", ".join(f"{e.name}/{e.version}" for e in self.control.index() if e.state == "READY")
            or "no models",
            settings.http.host,
            self.http_port,
            settings.grpc.host,
            self.grpc_port,
            admin.host,
            self.admin_port,
        )

    async def _flush_observations(self) -> None:
        """Counts the drift observations of quiet models (at most about 0.2 s late)."""
        while True:
            await asyncio.sleep(0.1)
            try:
                self.observer.flush_all(older_than_s=0.1)
            except Exception:  # the drift path must never stop serving
                logger.exception("drift observation flush failed")

    def _start_control_plane(self) -> None:
        """Durable routes and rollouts (restored over the config's routes), the rollout
        controller's evaluation loop, alert webhooks and the admin app."""
        settings = self.settings
        data_dir = Path(settings.data_dir)
        private_dir(data_dir)
        gather = SignalGatherer(self.router, self.monitor, self.outcomes)
        if settings.store.url:
            self.fleet = Fleet(settings.store, self.router, self.incarnation, self.monitor)
            self.store = self.fleet.store
            self.control.drift = self.fleet.drift or self.monitor
            self.telemetry.fleet = _fleet_gauges(self.fleet)
            self.outcomes = OutcomeWindows(self.memory, snapshot=self.fleet.outcome)
            self.outcomes.start(asyncio.get_running_loop())
            gather = SignalGatherer(
                self.router,
                self.fleet.drift or self.monitor,
                self.outcomes,
                traffic=self.fleet.traffic,
            )
        else:
            self.store = SqliteStore(private_file(data_dir / "control.sqlite3"))
        hooks = settings.alerts
        if hooks.webhooks or hooks.slack_webhooks or hooks.teams_webhooks:
            self.alerts = AlertSender(
                [*hooks.webhooks, *hooks.slack_webhooks, *hooks.teams_webhooks],
                formats={
                    **{url: "slack" for url in hooks.slack_webhooks},
                    **{url: "teams" for url in hooks.teams_webhooks},
                },
                timeout_s=settings.alerts.timeout_s,
                retries=settings.alerts.retries,
                backoff_s=settings.alerts.backoff_s,
            )
            self.alerts.start()
            self.telemetry.alert_counts = self.alerts.counts
        self.controller = RolloutController(
            self.store,
            apply_weights=self.control.apply_weights,
            gather=gather,
            alerts=self.alerts,
            check_versions=self.control.check_ready,
            begin_window=gather.begin_window,
            activity=gather.candidate_failures,
            config_routes=self.router.routes(),  # the config file's, installed at start
            lease=self.fleet.lease if self.fleet is not None else None,
        )
        self.controller.start()
        self.telemetry.controller = self.controller
        tokens = {t.token: Token(t.name, t.role) for t in settings.admin.tokens}
        token_file = TokenFile(data_dir / TOKEN_FILE)

        def stored_tokens() -> list[tuple[bytes, Token]]:
            return [
                (
                    bytes.fromhex(t.sha256),
                    Token(t.name, "operator" if t.role == "operator" else "viewer"),
                )
                for t in token_file.digests()
            ]

        self.admin_app = build_admin_app(
            self.controller,
            self.store,
            tokens,
            self.control.index,
            self.control.drift_json,
            extra_routes=[
                Route_("/metrics", self.telemetry.endpoint, methods=["GET"]),
                *self.http.internal_routes(),
                *_dashboard_routes(self.history.json),
            ],
            control=self.control,
            stored_tokens=stored_tokens,
            fleet=self.fleet.view if self.fleet is not None else None,
        )

    async def stop(self) -> None:
        """Readiness goes false at once; in-flight requests finish (up to the grace
        period); then listeners close, batchers drain and sessions are released."""
        self._draining = True
        self.inference.drain()
        for endpoint in self.router.endpoints():
            endpoint.batcher.hurry()  # in-flight requests do not wait for company
        await self._tls_reloader.stop()
        if self.controller is not None:
            await self.controller.stop()
        if self.fleet is not None:
            await self.fleet.stop()
        stops: list[Any] = [self._grpc.stop(self.settings.grace_period_s), self._http.stop()]
        if self._admin is not None:
            stops.append(self._admin.stop())
        await asyncio.gather(*stops, return_exceptions=True)
        await self.router.shadows.stop()
        await self.control.retire_all()
        if self._observer_flush is not None:
            self._observer_flush.cancel()
        if self._history_task is not None:
            self._history_task.cancel()
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
async def serve(settings: Settings, *, reuse_port: bool = False) -> AsyncIterator[Gateway]:
    """Start a gateway, yield it (ports bound, ready), stop it on exit."""
    gateway = Gateway(settings, reuse_port=reuse_port)
    try:
        await gateway.start()
        yield gateway
    finally:
        await gateway.stop()


async def _main(settings: Settings, reuse_port: bool = False) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(settings, reuse_port=reuse_port) as gateway:
        loop.add_signal_handler(signal.SIGHUP, gateway.reload_tls)
        await stop.wait()
        logger.info("signal received: draining (grace %.0f s)", settings.grace_period_s)


def run(settings: Settings, *, reuse_port: bool = False) -> None:
    """Serve until SIGTERM or SIGINT, then drain and exit (blocking). ``reuse_port``: one
    of several worker processes on the same ports (``gateway.workers``).

    The event loop is uvloop's when installed (it is, with uvicorn[standard]): it halves the
    per-request cost of the loop and socket writes against asyncio's selector loop.
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        asyncio.run(_main(settings, reuse_port))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_main(settings, reuse_port))


def _dashboard_routes(history: Any) -> list[Any]:
    try:
        module = importlib.import_module("gateway.dashboard")
    except ImportError:  # pragma: no cover - the dashboard ships with the package
        return []
    build = getattr(module, "dashboard_routes", None)
    routes: list[Any] = build(history=history) if build is not None else []
    return routes


def _lower_priority() -> None:
    """Initializer of the shadow thread: the lowest CPU priority (Linux nice 19 for this
    thread only); elsewhere it is left as is."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # pragma: no cover - not Linux, or not permitted
        logger.debug("shadow thread priority left unchanged")


def _fleet_gauges(fleet: Fleet) -> Callable[[], FleetGauges | None]:
    def gauges() -> FleetGauges | None:
        s = fleet.sample()
        return None if s is None else FleetGauges(s.replicas, s.is_leader, s.lag_s)

    return gauges
