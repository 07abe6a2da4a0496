"""The live cluster page: ``GET /dashboard``, its static files, and ``GET /v1/fabric/cluster``.

Owns the routes ``add_dashboard`` adds to the frontend's app (``api.build_app``):

* ``/dashboard``: the page (``static/dashboard.html``), and ``/dashboard/static/<file>`` its
  script and style sheet. They are package data of ``fabric`` (no build step, nothing from a
  CDN), read once when the app is built, and served from an allow-list of names (no path from
  the URL ever reaches the file system), with a Content-Security-Policy allowing only this
  origin's own scripts, styles and requests.
* ``/v1/fabric/cluster``: the cluster as JSON (``dashboard_cluster.ClusterView``), which the
  page polls every two seconds.

With an API key (``api_key``), the JSON is protected like every ``/v1/*`` path (401 without the
key); the page itself holds no data and stays open, like ``/docs``. On a 401 the page asks for
the key and keeps it in the tab's ``sessionStorage`` only (no cookie: nothing is sent that the
page's own script did not add; never in the URL, which logs keep), sending it as
``Authorization: Bearer <key>``.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from fabric.frontend.dashboard_cluster import ClusterView
from fabric.frontend.errors import ApiError
from fabric.frontend.generation import Frontend

CLUSTER_PATH = "/v1/fabric/cluster"
PAGE_PATH = "/dashboard"
_STATIC_FILES = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _read_static(name: str) -> bytes:
    return (resources.files("fabric.frontend") / "static" / name).read_bytes()


def add_dashboard(app: FastAPI, frontend: Frontend) -> None:
    """Add the page, its static files and the cluster JSON to ``app`` (module docstring)."""
    view = ClusterView(frontend)
    page = _read_static("dashboard.html")
    static = {name: _read_static(name) for name in _STATIC_FILES}

    @app.get(PAGE_PATH, response_class=Response, include_in_schema=False)
    async def dashboard() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=_HEADERS)

    @app.get(PAGE_PATH + "/static/{name}", response_class=Response, include_in_schema=False)
    async def dashboard_static(name: str) -> Response:
        if name not in static:
            raise ApiError(404, f"{PAGE_PATH}/static/{name}: no such file", code="not_found")
        return Response(static[name], media_type=_STATIC_FILES[name], headers=_HEADERS)

    @app.get(CLUSTER_PATH)
    async def cluster() -> JSONResponse:
        """The cluster as the dashboard shows it: workers (role, state, load, tiers, hit rates,
        KV transfers), this frontend's requests, latencies and routes taken over time."""
        return JSONResponse(await view.snapshot(), headers={"Cache-Control": "no-store"})
