"""alerts.py: delivers rollout events to webhooks, off every caller's path.

In: events (``send(event, model, reason, values, extra)``) from the rollout controller. Out:
one JSON POST per event to each configured URL, in that URL's format: ``generic``
(``{"event", "model", "reason", "values", "time", ...extra}``), ``slack`` (an incoming
webhook's ``text`` plus a section block) or ``teams`` (a message with an Adaptive Card, which
Teams workflows and incoming webhooks accept). Each URL has its own bounded queue and
worker thread, so a dead webhook delays only itself; a failed or non-2xx delivery is retried
with exponential backoff. ``send`` never blocks and never raises: a full queue drops the
event and counts it. Uses only the standard library (``urllib.request``). Knows nothing of
rollouts beyond the event's fields.

URLs of chat webhooks carry secrets in their path, so logs name only the scheme and host.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import msgspec

from gateway.errors import InvalidInputError

__all__ = ["AlertSender", "FORMATS", "render_body"]

logger = logging.getLogger(__name__)

USER_AGENT: Final = "gateway-alerts/1"
CLOSE_TIMEOUT_S: Final = 5.0  # enough for one in-flight POST at the default 2 s timeout

_encode = msgspec.json.Encoder().encode
_STOP: Final = object()
FORMATS: Final = ("generic", "slack", "teams")
_MAX_FACTS: Final = 12  # chat cards show the first values; the generic body has them all


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_body(fmt: str, body: Mapping[str, object]) -> dict[str, object]:
    """The JSON object posted for ``body`` (the generic event) in format ``fmt``."""
    if fmt == "generic":
        return dict(body)
    values = body.get("values")
    facts = list(values.items())[:_MAX_FACTS] if isinstance(values, Mapping) else []
    title = f"gateway: {body.get('event')} of {body.get('model')}"
    reason = str(body.get("reason") or "")
    if fmt == "slack":
        lines = [f"*{title}*", reason] + [f"• {k}: `{_fmt(v)}`" for k, v in facts]
        text = "\n".join(line for line in lines if line)
        return {
            "text": f"{title}: {reason}" if reason else title,
            "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}],
        }
    card_body: list[dict[str, object]] = [
        {"type": "TextBlock", "text": title, "weight": "Bolder", "size": "Medium", "wrap": True}
    ]
    if reason:
        card_body.append({"type": "TextBlock", "text": reason, "wrap": True})
    if facts:
        card_body.append(
            {"type": "FactSet", "facts": [{"title": str(k), "value": _fmt(v)} for k, v in facts]}
        )
    return {
        "type": "message",
        "attachments": [
            {
                "contentType": "application/vnd.microsoft.card.adaptive",
                "content": {
                    "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                    "type": "AdaptiveCard",
                    "version": "1.4",
                    "body": card_body,
                },
            }
        ],
    }


def _where(url: str) -> str:
    """Scheme and host of ``url``: safe to log (webhook paths and queries hold secrets)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"


class _Worker:
    """One URL: a bounded queue of encoded bodies and the thread that posts them."""

    def __init__(self, sender: AlertSender, url: str, queue_size: int, fmt: str) -> None:
        self.url = url
        self.format = fmt
        self.where = _where(url)
        self.queue: queue.Queue[object] = queue.Queue(queue_size)
        self.thread = threading.Thread(
            target=sender._deliver_all, args=(self,), name=f"alerts {self.where}", daemon=True
        )


class AlertSender:
    """Posts alert events to webhooks from background threads (one per URL).

    ``retries`` is the number of attempts after the first; the n-th retry waits
    ``backoff_s * 2**(n-1)`` seconds. Counters (per URL delivery): ``sent`` (a 2xx answer),
    ``failed`` (every attempt failed), ``dropped`` (the queue was full or the sender closed).
    Threads start with the first ``send`` (or ``start()``); ``close()`` delivers what is
    queued within its timeout, then stops.
    """

    def __init__(
        self,
        urls: Sequence[str],
        timeout_s: float = 2.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        queue_size: int = 1000,
        headers: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        formats: Mapping[str, str] | None = None,
    ) -> None:
        """``formats`` maps a URL to "slack" or "teams"; the others get "generic"."""
        formats = formats or {}
        for fmt in formats.values():
            if fmt not in FORMATS:
                raise InvalidInputError(f"alert format must be one of {', '.join(FORMATS)}")
        for url in urls:
            if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                raise InvalidInputError(f"alert URL {_where(url)!r} must be http or https")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0 or queue_size < 1:
            raise InvalidInputError(
                "alerts: timeout_s must be > 0, retries and backoff_s >= 0, queue_size >= 1"
            )
        self._timeout_s = timeout_s
        self._retries = retries
        self._backoff_s = backoff_s
        self._headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        self._headers.update(headers or {})
        self._clock = clock
        self._workers = [
            _Worker(self, url, queue_size, formats.get(url, "generic")) for url in urls
        ]
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        self._abort = threading.Event()
        self.sent = 0
        self.failed = 0
        self.dropped = 0

    def counts(self) -> dict[str, int]:
        """Deliveries so far by result: sent, failed, dropped."""
        with self._lock:
            return {"sent": self.sent, "failed": self.failed, "dropped": self.dropped}

    def start(self) -> None:
        with self._lock:
            if self._started or self._closed:
                return
            self._started = True
        for worker in self._workers:
            worker.thread.start()

    def send(
        self,
        event: str,
        model: str,
        reason: str,
        values: Mapping[str, object],
        extra: Mapping[str, object] | None = None,
    ) -> bool:
        """Queue ``event`` for every URL; True when every queue took it. Never blocks."""
        if not self._workers:
            return True
        if self._closed:
            with self._lock:
                self.dropped += len(self._workers)
            return False
        self.start()
        body: dict[str, object] = dict(extra or {})
        body.update(event=event, model=model, reason=reason, values=dict(values))
        body["time"] = self._clock()
        try:
            encoded = {
                fmt: _encode(render_body(fmt, body)) for fmt in {w.format for w in self._workers}
            }
        except (TypeError, msgspec.EncodeError) as exc:
            logger.error("alert %s for model %s is not JSON-encodable: %s", event, model, exc)
            with self._lock:
                self.dropped += len(self._workers)
            return False
        queued = True
        for worker in self._workers:
            try:
                worker.queue.put_nowait(encoded[worker.format])
            except queue.Full:
                queued = False
                with self._lock:
                    self.dropped += 1
                logger.warning("alert queue for %s is full: %s dropped", worker.where, event)
        return queued

    def _deliver_all(self, worker: _Worker) -> None:
        while True:
            item = worker.queue.get()
            if item is _STOP:
                return
            assert isinstance(item, bytes)
            if self._abort.is_set():
                with self._lock:
                    self.dropped += 1
                continue
            ok = self._deliver(worker, item)
            with self._lock:
                if ok:
                    self.sent += 1
                else:
                    self.failed += 1

    def _deliver(self, worker: _Worker, data: bytes) -> bool:
        for attempt in range(self._retries + 1):
            if attempt and self._abort.wait(self._backoff_s * 2 ** (attempt - 1)):
                return False
            request = urllib.request.Request(
                worker.url, data=data, headers=self._headers, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                    status = int(response.status)
            except urllib.error.HTTPError as exc:
                status = exc.code
            except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections
                logger.warning(
                    "alert to %s failed (attempt %d/%d): %s",
                    worker.where,
                    attempt + 1,
                    self._retries + 1,
                    type(exc).__name__,
                )
                continue
            if 200 <= status < 300:
                return True
            logger.warning(
                "alert to %s answered %d (attempt %d/%d)",
                worker.where,
                status,
                attempt + 1,
                self._retries + 1,
            )
        logger.error("alert to %s given up after %d attempts", worker.where, self._retries + 1)
        return False

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Deliver what is queued (waiting at most ``timeout_s`` in all), then stop.

        Events still queued after that are dropped and counted.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            started = self._started
        if started:
            deadline = time.monotonic() + timeout_s
            for worker in self._workers:
                with contextlib.suppress(queue.Full):  # full: the abort below stops it
                    worker.queue.put(_STOP, timeout=max(0.0, deadline - time.monotonic()))
            for worker in self._workers:
                worker.thread.join(max(0.0, deadline - time.monotonic()))
            self._abort.set()  # any worker still busy stops at its next backoff or event
            for worker in self._workers:
                worker.thread.join(max(0.0, deadline - time.monotonic()))
        lost = 0
        for worker in self._workers:
            while True:
                try:
                    item = worker.queue.get_nowait()
                except queue.Empty:
                    break
                lost += item is not _STOP
        with self._lock:
            self.dropped += lost
