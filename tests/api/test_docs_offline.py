"""/docs works without the Internet: the page names only the API's own URLs, and each of them
answers (api/docs_assets.py). What a browser makes of it: tests/integration/test_docs_browser.py.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest

from api import docs_assets
from api.app import create_app
from api.docs_assets import DocsAssetsMissing, swagger_ui_dir
from api.settings import ApiSettings
from api.store.memory import MemoryDeviceStore

API_KEY = "docs-test-key"


class _NoPublisher:
    connected = False

    async def publish(self, topic: str, payload: bytes, properties: Any) -> None:
        raise AssertionError("the docs must not publish")

    async def close(self) -> None:
        return None


class _References(HTMLParser):
    """The URLs a page makes a browser load: script src, link href, img src."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for name in ("src", "href"):
            value = values.get(name)
            if value is not None:
                self.urls.append((tag, value))
        self._in_script = tag == "script" and "src" not in values

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts.append(data)


def _client(root_path: str = "") -> httpx.AsyncClient:
    app = create_app(
        ApiSettings(api_key=API_KEY), store=MemoryDeviceStore(), publisher=_NoPublisher()
    )
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    return httpx.AsyncClient(transport=transport, base_url="http://api")


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with _client() as client:
        yield client


async def _page(http: httpx.AsyncClient, path: str = "/docs") -> _References:
    response = await http.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    page = _References()
    page.feed(response.text)
    return page


# The Content-Type each kind of file must come with.
_TYPES_BY_SUFFIX = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


async def test_docs_page_names_no_external_url(http: httpx.AsyncClient) -> None:
    page = await _page(http)
    urls = [url for _, url in page.urls]
    assert urls, "the page loads nothing: not the Swagger UI page"
    external = [url for url in urls if re.match(r"(?i)(https?:)?//", url)]
    assert external == []
    # The inline script names the document to render, on the API too; nothing else absolute.
    script = "".join(page.scripts)
    assert "url: '/openapi.json'" in script or 'url: "/openapi.json"' in script, script
    assert re.findall(r"(?i)https?://", script) == []
    assert {url for _, url in page.urls} == {
        "/docs/assets/swagger-ui-bundle.js",
        "/docs/assets/swagger-ui.css",
        "/docs/assets/favicon-32x32.png",
    }


async def test_every_asset_of_the_page_answers_with_its_type_and_no_key(
    http: httpx.AsyncClient,
) -> None:
    page = await _page(http)
    for tag, url in page.urls:
        response = await http.get(url)  # no Authorization: the guard's open default
        assert response.status_code == 200, (url, response.text[:200])
        suffix = url[url.rindex(".") :]
        assert response.headers["content-type"].startswith(_TYPES_BY_SUFFIX[suffix]), url
        assert response.content, url
        if tag == "script":
            assert b"SwaggerUIBundle" in response.content
    schema = await http.get("/openapi.json")
    assert schema.status_code == 200
    assert schema.json()["openapi"].startswith("3.")


async def test_assets_are_the_installed_package_files(http: httpx.AsyncClient) -> None:
    directory = swagger_ui_dir()
    for name, media_type in docs_assets.ASSETS.items():
        response = await http.get(f"/docs/assets/{name}")
        assert response.status_code == 200, name
        assert response.headers["content-type"] == media_type
        assert response.content == (directory / name).read_bytes()
        assert response.headers["cache-control"] == docs_assets.CACHE_CONTROL


@pytest.mark.parametrize(
    "path",
    [
        "/docs/assets/index.html",  # in the package, but a demo page loading a public document
        "/docs/assets/swagger-initializer.js",
        "/docs/assets/nothing.js",
    ],
)
async def test_only_the_listed_files_are_served(http: httpx.AsyncClient, path: str) -> None:
    response = await http.get(path)
    assert response.status_code == 404
    assert response.json()["detail"].startswith("no docs asset")


async def test_no_file_outside_the_list_through_an_encoded_path(http: httpx.AsyncClient) -> None:
    # %2F decodes to "/": no route takes a name with a slash, so the router answers 404.
    response = await http.get("/docs/assets/..%2F..%2F__init__.py")
    assert response.status_code == 404
    assert b"swagger_ui_path" not in response.content


async def test_redoc_is_off(http: httpx.AsyncClient) -> None:
    assert (await http.get("/redoc")).status_code == 404


async def test_docs_behind_a_path_prefix_name_prefixed_urls() -> None:
    async with _client(root_path="/bridge") as http:
        page = await _page(http, "/bridge/docs")
    assert {url for _, url in page.urls} == {
        "/bridge/docs/assets/swagger-ui-bundle.js",
        "/bridge/docs/assets/swagger-ui.css",
        "/bridge/docs/assets/favicon-32x32.png",
    }
    assert "/bridge/openapi.json" in "".join(page.scripts)


def test_missing_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(docs_assets, "_MODULE", "no_such_swagger_module")
    with pytest.raises(DocsAssetsMissing, match="pip install swagger-ui-bundle-v2"):
        swagger_ui_dir()
