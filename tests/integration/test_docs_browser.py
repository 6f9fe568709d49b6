"""/docs renders in a real browser with no Internet: headless Chromium (tests/support/browser.py,
which resolves no host name) opens the page of a running ``coap-bridge api`` and must show one
operation block per operation of the OpenAPI document. Before api/docs_assets.py the page
loaded Swagger UI from a CDN and stayed blank here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from selenium.common.exceptions import TimeoutException
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.support import browser as browser_support
from tests.support.browser import screenshot
from tests.support.processes import Processes
from tests.support.services import MosquittoServer

pytestmark = pytest.mark.integration

RENDER_WAIT = 30.0
"""Seconds Swagger UI gets to fetch /openapi.json and draw it; a bound, not a measurement: on
two busy cores it usually takes under two."""
_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture
async def api_url(tmp_path: Path, mosquitto: MosquittoServer) -> AsyncIterator[str]:
    procs = Processes(tmp_path)
    try:
        api = await procs.api(mqtt_url=mosquitto.url)
        yield f"http://127.0.0.1:{api.port}"
    finally:
        procs.stop_all()


async def _operations(api_url: str) -> int:
    async with httpx.AsyncClient() as http:
        schema = (await http.get(f"{api_url}/openapi.json")).json()
    return sum(1 for item in schema["paths"].values() for method in item if method in _METHODS)


async def test_docs_render_every_operation_offline(browser: Chrome, api_url: str) -> None:
    expected = await _operations(api_url)
    assert expected > 10  # the API's document, not an empty one
    browser.get(f"{api_url}/docs")
    try:
        WebDriverWait(browser, RENDER_WAIT).until(
            lambda driver: len(driver.find_elements(By.CSS_SELECTOR, ".opblock")) >= expected
        )
    except TimeoutException:
        screenshot(browser, "docs-not-rendered")
        errors = browser.find_elements(By.CSS_SELECTOR, ".errors-wrapper, .loading-container")
        pytest.fail(
            f"Swagger UI drew {len(browser.find_elements(By.CSS_SELECTOR, '.opblock'))} of "
            f"{expected} operations in {RENDER_WAIT:g} s; page says: "
            f"{[element.text for element in errors]!r}"
        )
    screenshot(browser, "docs")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".opblock")) == expected
    assert "coap-bridge API" in browser.find_element(By.CSS_SELECTOR, ".info .title").text
    # Everything the page loaded came from the API itself.
    loaded: list[str] = browser.execute_script(
        "return performance.getEntriesByType('resource').map(entry => entry.name)"
    )
    assert loaded, "the page loaded no resource: not Swagger UI"
    assert [url for url in loaded if not url.startswith(f"{api_url}/")] == []


def test_missing_browser_fails_naming_the_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(browser_support, "CHROMEDRIVER", Path("/nonexistent/chromedriver"))
    with pytest.raises(pytest.fail.Exception, match="chromium chromium-driver"):
        browser_support.start_browser()
