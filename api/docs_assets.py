"""``/docs`` served without the network: Swagger UI's files from the installed package.

FastAPI's default ``/docs`` page loads Swagger UI's script and stylesheet from a public CDN,
so on a site without Internet access (the usual place for a bridge in front of devices) the
page stays blank. Here the page points at copies served by the API itself, taken from the
``swagger-ui-bundle-v2`` package (a runtime dependency, pyproject.toml; it carries Swagger
UI's release files unchanged, Apache-2.0). Swagger UI 5 is needed: FastAPI writes OpenAPI 3.1,
which Swagger UI 4 does not render.

Only the files the page uses are served (:data:`ASSETS`, an allow-list: the package also
carries a demo page that fetches a public example document). The paths are open like
``/docs`` itself (api/guard.py's default rule: anyone, no body); they hold no data.

ReDoc is off (``/redoc`` is 404): no package on the index we use ships its standalone script
alone, and one offline UI is enough; ``/openapi.json`` serves any other viewer.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from api.errors import ApiError, clip

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"
ASSETS: dict[str, str] = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    # Named by the stylesheet's sourceMappingURL: a browser's developer tools ask for it.
    "swagger-ui.css.map": "application/json",
    "favicon-32x32.png": "image/png",
}
"""File name → Content-Type of what ``/docs`` loads."""
CACHE_CONTROL = "public, max-age=86400"
"""The files change only with the installed package (a new release of the API): a day of
caching spares a browser the 1.5 MB script on every visit."""

PACKAGE = "swagger-ui-bundle-v2"
_MODULE = "swagger_ui_bundle"


class DocsAssetsMissing(RuntimeError):
    """Swagger UI's files are not where the package puts them."""


class DocsAssetNotFound(ApiError):
    status_code = 404
    default_message = "no such docs asset"


def swagger_ui_dir() -> Path:
    """The directory of Swagger UI's release files inside the installed package."""
    try:
        module = importlib.import_module(_MODULE)
    except ImportError as exc:
        raise DocsAssetsMissing(
            f"Swagger UI for /docs is not installed: pip install {PACKAGE} "
            "(a dependency of coap-bridge)"
        ) from exc
    directory = Path(str(module.swagger_ui_path))
    # swagger-ui-bundle (without -v2) installs the same module with Swagger UI 4.
    if not directory.name.startswith("swagger-ui-5."):
        raise DocsAssetsMissing(
            f"{directory.name} found, Swagger UI 5 needed for OpenAPI 3.1: install {PACKAGE} "
            "(and uninstall swagger-ui-bundle, which holds the same module)"
        )
    absent = sorted(name for name in ASSETS if not (directory / name).is_file())
    if absent:
        raise DocsAssetsMissing(
            f"Swagger UI files {', '.join(absent)} missing from {directory}: reinstall {PACKAGE}"
        )
    return directory


def install(app: FastAPI) -> None:
    """Serve ``/docs`` and its assets. The app is built with ``docs_url=None`` and
    ``redoc_url=None`` (FastAPI's own pages use the CDN)."""
    directory = swagger_ui_dir()
    # Swagger UI's online validator badge would call a public service; null turns it off.
    parameters: dict[str, Any] = {"validatorUrl": None, **(app.swagger_ui_parameters or {})}

    @app.get(DOCS_PATH, include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        # Behind a path prefix (uvicorn --root-path) the page's URLs carry it too.
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon-32x32.png",
            oauth2_redirect_url=None,  # the API's schemes are bearer keys and tokens, no OAuth2
            swagger_ui_parameters=parameters,
        )

    @app.get(f"{ASSETS_PATH}/{{name}}", include_in_schema=False)
    async def docs_asset(name: str) -> FileResponse:
        media_type = ASSETS.get(name)
        if media_type is None:
            raise DocsAssetNotFound(f"no docs asset {clip(name)!r}")
        return FileResponse(
            directory / name, media_type=media_type, headers={"Cache-Control": CACHE_CONTROL}
        )
