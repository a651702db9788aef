"""control.py: the model lifecycle: index, load, unload, install, retire; and the door through
which route weights change.

In: the repository (sessions per version), the router (the live table), the drift monitor and
its buffered observer. A load builds a batcher per version, registers the version's drift
profile (a refused profile is reported, the model still serves), installs it in the router
and retires what it replaces after draining. Loads and unloads are serialised by one lock;
requests in flight finish on the old versions. It knows nothing of HTTP, gRPC or rollouts:
the rollout controller reaches the router only through ``apply_weights``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from gateway.batcher import Batcher
from gateway.config import ModelControlSettings
from gateway.drift.buffer import BufferedObserver
from gateway.drift.build import find_profile, load_checked
from gateway.drift.monitor import DriftMonitor
from gateway.drift.report import DriftReport, DriftSource
from gateway.errors import InvalidInputError, ModelNotFoundError
from gateway.repository import ModelRepository, ModelVersion
from gateway.router import Endpoint, Router
from gateway.types import ModelIndexEntry, ParamValue

__all__ = ["ModelLifecycle", "policy_from_config"]

logger = logging.getLogger(__name__)


def policy_from_config(raw: ParamValue) -> dict[str, Any]:
    """The batching policy fields we honour from a load request's ``config`` parameter (the
    model configuration's JSON form, as Triton takes it)."""
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


class ModelLifecycle:
    """The V2 repository extension (``types.ModelControl``) over the repository and router,
    with drift registration per version. Methods run on the event-loop thread."""

    def __init__(
        self,
        repository: ModelRepository,
        router: Router,
        monitor: DriftMonitor,
        observer: BufferedObserver,
        *,
        drift_enabled: bool,
        load_bounds: ModelControlSettings | None = None,
    ) -> None:
        self.repository = repository
        self.router = router
        self.monitor = monitor
        self.drift: DriftSource = monitor
        """Where reports come from: the monitor, or a fleet's pooled windows."""
        self.observer = observer
        self._drift_enabled = drift_enabled
        self._load_bounds = load_bounds
        self.drift_refused: dict[tuple[str, str], str] = {}
        """(model, version) -> why its drift profile was refused."""
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def load_all(self) -> None:
        """Load every model in the repository; one bad model does not stop the others."""
        self._loop = asyncio.get_running_loop()
        names = self.repository.model_names()
        if not names:
            logger.warning("model repository %s holds no models", self.repository.root)
        for name in names:
            try:
                await self.load(name, {})
            except Exception as exc:  # one bad model must not stop the others
                logger.error("model %s is not served: %s", name, exc)

    def index(self) -> list[ModelIndexEntry]:
        return self.repository.index()

    async def load(self, name: str, parameters: Mapping[str, ParamValue]) -> None:
        """(Re)load every version of ``name``; requests in flight finish on the old ones."""
        extra: dict[str, Any] = {}
        for key, value in parameters.items():
            if key == "config":
                extra.update(policy_from_config(value))
            elif key.startswith("file:"):
                raise InvalidInputError(
                    "uploading model files is not supported; place them in the repository"
                )
        if self._load_bounds is not None:
            self._load_bounds.check_load(extra)
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
        if path is None or not self._drift_enabled:
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
                return self.drift.compare(ref, other)
            return self.drift.report(ref)
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
            observer=(
                self.observer.channel(model.ref, model.input_names, model.output_names)
                if watched
                else None
            ),
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
        self.observer.flush_all()  # its last calls' drift counts, before any unregister
        model = endpoint.model
        if model.version not in self.router.versions(model.name):
            self.monitor.unregister(model.ref)  # not replaced by a reload of itself
        model.close()  # type: ignore[attr-defined]  # ModelVersion.close

    async def retire_all(self) -> None:
        """Remove every endpoint from the router, drain it and release its session."""
        for endpoint in list(self.router.endpoints()):
            self.router.remove(endpoint.model.name, endpoint.model.version)
            await self._retire(endpoint)

    def drift_json(self, model: str, version: str | None) -> dict[str, Any]:
        report = self.drift_report(model, version or "")
        data: dict[str, Any] = msgspec.to_builtins(report)
        return data

    def check_ready(self, model: str, versions: Sequence[str]) -> None:
        """Raise ``InvalidInputError`` naming each of ``versions`` that is not loaded and
        READY (with its repository state and reason), or the model when none of it is
        served: the check every route, weight, rollout and promote passes (any thread)."""
        served = self.router.versions(model)
        if not served:
            raise InvalidInputError(f"model '{model}' is not loaded; nothing to route to")
        bad = [v for v in dict.fromkeys(versions) if not self.router.is_ready(model, v)]
        if not bad:
            return
        states = {e.version: e for e in self.repository.index() if e.name == model}
        named = []
        for v in bad:
            entry = states.get(v)
            if entry is None:
                named.append(f"{v} (unknown)")
            else:
                why = f": {entry.reason}" if entry.reason else ""
                named.append(f"{v} ({entry.state or 'not loaded'}{why})")
        raise InvalidInputError(
            f"model '{model}': version {', '.join(named)} is not loaded and READY; "
            f"ready versions: {', '.join(v for v in served if self.router.is_ready(model, v))}"
        )

    def apply_weights(self, model: str, weights: dict[str, float]) -> None:
        """The controller's door into the router: weights change on the loop thread, where
        requests read the routing table (the controller calls from its worker thread)."""
        loop = self._loop
        if loop is None or loop is _running_loop():
            self.router.set_weights(model, weights)
            return

        async def apply() -> None:
            self.router.set_weights(model, weights)

        asyncio.run_coroutine_threadsafe(apply(), loop).result(timeout=10)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
