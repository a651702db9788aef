"""dashboard: the operator dashboard, static files served by the admin listener.

In: a URL prefix (and where the admin API and the Prometheus text live on the same origin).
Out: Starlette routes for ``<prefix>`` (the page), ``<prefix>/static/<asset>`` (its script
and style sheet) and ``<prefix>/history`` (the server's last hour of figures, so a reload
keeps the charts). The page itself asks for a bearer token, keeps it in the tab's
sessionStorage, and calls the admin API with it; loading the static files needs no token, so
these routes go in ``build_admin_app(extra_routes=...)``, outside the auth. Everything ships
in this package: no build step, no CDN, and a Content-Security-Policy that forbids any other
origin. It imports nothing from the gateway.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

__all__ = ["ASSETS", "dashboard_routes"]

_HERE: Final = Path(__file__).parent
ASSETS: Final[Mapping[str, str]] = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
"""Files under ``<prefix>/static/`` and their content types; nothing else is served."""

_HEADERS: Final[Mapping[str, str]] = {
    # Same origin only: the page may not load or call anything else, nor be framed
    # (clickjacking the Roll back button).
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate, so an upgraded gateway serves its own page
}


def _read(name: str) -> bytes:
    return (_HERE / name).read_bytes()


def dashboard_routes(
    prefix: str = "/dashboard",
    *,
    api_prefix: str = "/admin/v1",
    metrics_path: str = "/metrics",
    history: Callable[[], bytes] | None = None,
) -> list[BaseRoute]:
    """Routes serving the dashboard page at ``prefix`` (and ``prefix/``) and its assets at
    ``prefix/static/{name}``. ``api_prefix`` and ``metrics_path`` tell the page where the
    admin API and the Prometheus text are on the same origin; ``history`` (the server's
    last hour of figures, JSON) is served at ``prefix/history`` when given. Reads the files
    once, here; raises ``ValueError`` for a prefix that is not ``/`` followed by a path."""
    if not prefix.startswith("/") or prefix.endswith("/") or '"' in prefix:
        raise ValueError(f"dashboard prefix must look like /dashboard, not {prefix!r}")
    page = (
        _read("index.html")
        .decode("utf-8")
        .replace("__PREFIX__", prefix)
        .replace("__API__", api_prefix)
        .replace("__METRICS__", metrics_path)
        .encode("utf-8")
    )
    assets = {name: (_read(name), media_type) for name, media_type in ASSETS.items()}

    async def index(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=_HEADERS)

    async def static(request: Request) -> Response:
        found = assets.get(request.path_params["name"])
        if found is None:
            return Response(b"not found\n", 404, media_type="text/plain; charset=utf-8")
        content, media_type = found
        return Response(content, media_type=media_type, headers=_HEADERS)

    async def get_history(request: Request) -> Response:
        body = history() if history is not None else b'{"interval_s": 0, "samples": []}'
        return Response(body, media_type="application/json", headers=_HEADERS)

    methods = ["GET", "HEAD"]
    return [
        Route(prefix, index, methods=methods),
        Route(prefix + "/", index, methods=methods),
        Route(prefix + "/static/{name}", static, methods=methods),
        Route(prefix + "/history", get_history, methods=methods),
    ]
