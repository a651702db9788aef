"""tls.py: TLS and mTLS material for the listeners, and its reload without a restart.

In: a listener's ``TlsSettings`` (PEM cert chain, key, optional client CA). Out: a
``ServerTls`` that gives ``servers.py`` what each server takes: an ``ssl.SSLContext`` for
uvicorn (HTTP, admin) and ``grpc.ServerCredentials`` for grpc.aio, and ``peer_identities``
(the names a verified client certificate proves, for mTLS client identities). ``reload()``
re-reads the files into a fresh SSL context that the listener's context hands each new
handshake (its server-name callback swaps it in, so a removed client CA is gone, not only
added to), and the gRPC credentials' fetcher hands the new material to the next handshake;
established connections are never dropped. A
``TlsReloader`` calls it when a file's modification time changes (polled) and on demand
(SIGHUP, wired in ``app.py``). A bad file on reload is logged and the old material kept.
It knows nothing of what is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from gateway.config import ConfigError, TlsSettings

__all__ = ["ServerTls", "TlsReloader", "is_loopback", "peer_identities", "plaintext_warning"]

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for loopback addresses and ``localhost``; 0.0.0.0 and names are not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def plaintext_warning(listener: str, host: str, tls: TlsSettings) -> str | None:
    """The start-up warning for a listener that carries bearer tokens in clear text
    beyond this machine (a non-loopback address without TLS); None when there is none."""
    if tls.enabled or is_loopback(host):
        return None
    return (
        f"{listener} listener on {host} without TLS: bearer tokens cross the network in "
        f"clear text; set {listener}.tls.cert and {listener}.tls.key"
    )


def peer_identities(cert: Mapping[str, Any] | None) -> frozenset[str]:
    """``CN=...``, ``URI=...`` and ``DNS=...`` of a verified peer certificate (the dict
    ``ssl.SSLObject.getpeercert()`` returns); empty without one."""
    if not cert:
        return frozenset()
    found = [
        f"CN={value}"
        for rdn in cert.get("subject", ())
        for key, value in rdn
        if key == "commonName"
    ]
    found += [f"{kind}={value}" for kind, value in cert.get("subjectAltName", ()) if kind in _SAN]
    return frozenset(found)


_SAN = ("URI", "DNS")


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


class ServerTls:
    """One listener's certificate, key and client CA; reloadable."""

    def __init__(self, settings: TlsSettings, listener: str) -> None:
        self.settings = settings
        self.listener = listener
        self._lock = threading.Lock()
        self._generation = 0
        self._served_generation = -1
        self._stamp = self._mtimes()
        self._cert, self._key, self._ca = self._load_files()
        self._context = self._new_context()
        self._current = self._context
        """The context new handshakes use; a fresh one after each reload."""
        self._context.sni_callback = self._select
        self.reloads = 0
        """Successful reloads since start (tests, logs)."""

    @property
    def mutual(self) -> bool:
        return bool(self.settings.client_ca)

    def _paths(self) -> list[str]:
        s = self.settings
        return [p for p in (s.cert, s.key, s.client_ca) if p]

    def _mtimes(self) -> tuple[float, ...]:
        stamps: list[float] = []
        for path in self._paths():
            try:
                stamps.append(Path(path).stat().st_mtime_ns)
            except OSError:
                stamps.append(-1)
        return tuple(stamps)

    def _load_files(self) -> tuple[bytes, bytes, bytes | None]:
        s = self.settings
        try:
            return _read(s.cert), _read(s.key), _read(s.client_ca) if s.client_ca else None
        except OSError as exc:
            raise ConfigError(
                f"{self.listener} TLS: cannot read {exc.filename}: {exc.strerror}"
            ) from None

    def _new_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        s = self.settings
        try:
            context.load_cert_chain(s.cert, s.key)
            if s.client_ca:
                context.load_verify_locations(cafile=s.client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
                # No session tickets: a resumed session would skip the client certificate
                # check against a client CA that a reload has since removed.
                context.num_tickets = 0
                context.options |= ssl.OP_NO_TICKET
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{self.listener} TLS: {exc}") from None
        return context

    def _select(self, conn: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        # Called in every handshake (with or without SNI), before the certificate is sent
        # and the client's is verified: both come from the context set here.
        current = self._current
        if current is not self._context:
            conn.context = current

    # -- what the servers take ----------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """For uvicorn: one context for the listener's life; it hands each handshake the
        current material."""
        return self._context

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """For grpc.aio: credentials whose fetcher serves the current certificate."""
        initial = self._grpc_config()
        return grpc.dynamic_ssl_server_credentials(
            initial, self._fetch, require_client_authentication=self.mutual
        )

    def _grpc_config(self) -> grpc.ServerCertificateConfiguration:
        with self._lock:
            self._served_generation = self._generation
            return grpc.ssl_server_certificate_configuration(
                [(self._key, self._cert)], root_certificates=self._ca
            )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC core before handshakes; None keeps the current certificate.
        if self._served_generation == self._generation:
            return None
        return self._grpc_config()

    # -- reload ---------------------------------------------------------------------------

    def changed(self) -> bool:
        return self._mtimes() != self._stamp

    def reload(self) -> bool:
        """Re-read the files; True when the new material is in use. A file that does not
        load is logged and the old material stays."""
        stamp = self._mtimes()
        try:
            cert, key, ca = self._load_files()
            fresh = self._new_context()
        except (OSError, ValueError, ssl.SSLError) as exc:
            logger.error(
                "%s TLS reload failed, keeping the old certificate: %s", self.listener, exc
            )
            self._stamp = stamp  # retried when the files change again
            return False
        with self._lock:
            self._cert, self._key, self._ca = cert, key, ca
            self._generation += 1
        self._current = fresh  # new handshakes only; one reference swap
        self._stamp = stamp
        self.reloads += 1
        logger.info("%s TLS certificate reloaded", self.listener)
        return True


class TlsReloader:
    """Polls the files of several listeners and reloads those that changed."""

    def __init__(self, listeners: Sequence[ServerTls]) -> None:
        self._listeners = list(listeners)
        self._task: asyncio.Task[None] | None = None

    def reload_all(self) -> None:
        """Reload every listener's material (SIGHUP)."""
        for tls in self._listeners:
            tls.reload()

    def start(self) -> None:
        intervals = [t.settings.reload_interval_s for t in self._listeners]
        intervals = [i for i in intervals if i > 0]
        if intervals:
            self._task = asyncio.create_task(self._poll(min(intervals)))

    async def _poll(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            for tls in self._listeners:
                if tls.settings.reload_interval_s > 0 and tls.changed():
                    tls.reload()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
