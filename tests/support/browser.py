"""A real headless Chromium for the browser tests, driven by selenium through Debian's
chromedriver.

Registered as a pytest plugin in tests/conftest.py, so any test may ask for:

``browser`` (function scope) -> ``selenium.webdriver.Chrome``
    headless (``--headless=new``), a fixed 1280×900 window, ``--no-sandbox`` when running as
    root (Chromium refuses to start its sandbox as root), and no host but 127.0.0.1 reachable:
    serve the page under test there (not on localhost). Quit after the test.

and import :func:`screenshot` to save what the page looks like as a test artefact
(``build/test-artifacts/<name>.png``; build/ is gitignored).

Nothing is downloaded: the driver is ``/usr/bin/chromedriver`` from the ``chromium-driver``
package, passed to selenium's Service, which makes selenium skip its driver manager; the
manager is also told to stay offline (SE_OFFLINE) in case a future selenium consults it anyway.
When the packages are missing the fixture FAILS (not skips) and names them: ``make test``
installs them (Makefile TEST_DEBS), so their absence is a broken environment, not an optional
feature.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DEBIAN_PACKAGES = "chromium chromium-driver"
WINDOW_SIZE = (1280, 900)
ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"
"""Where screenshots go: the repository's build/ (gitignored), kept after the run for CI to
collect."""

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def missing_browser() -> str | None:
    """Why no browser can be started here, or None when both binaries are present."""
    absent = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if not absent:
        return None
    return (
        f"{' and '.join(absent)} not found: install the Debian packages {DEBIAN_PACKAGES} "
        f"(apt-get install {DEBIAN_PACKAGES}; `make test` does it)"
    )


def chromium_options() -> webdriver.ChromeOptions:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    options.add_argument("--headless=new")
    options.add_argument(f"--window-size={WINDOW_SIZE[0]},{WINDOW_SIZE[1]}")
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")
    # Containers often give /dev/shm 64 MiB, too little for a renderer: use /tmp instead.
    options.add_argument("--disable-dev-shm-usage")
    # No first-run, sync, update or component traffic: the tests must work offline.
    options.add_argument("--no-first-run")
    options.add_argument("--disable-background-networking")
    options.add_argument("--disable-component-update")
    options.add_argument("--disable-sync")
    options.add_argument("--disable-default-apps")
    options.add_argument("--disable-extensions")
    # Nothing but the loopback resolves: a page that loads anything from the Internet (a CDN)
    # fails here as it would on an isolated site, instead of passing by luck.
    options.add_argument("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")
    return options


def start_browser() -> webdriver.Chrome:
    """A new headless Chromium; the caller quits it. Fails (pytest.fail) when not installed."""
    why = missing_browser()
    if why is not None:
        pytest.fail(why, pytrace=False)
    # Selenium Manager is never asked (the Service has the driver's path); offline regardless.
    os.environ["SE_OFFLINE"] = "true"
    os.environ["SE_AVOID_STATS"] = "true"
    service = Service(executable_path=str(CHROMEDRIVER))
    driver = webdriver.Chrome(service=service, options=chromium_options())
    driver.set_window_size(*WINDOW_SIZE)
    return driver


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    driver = start_browser()
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: webdriver.Chrome, name: str) -> Path:
    """Save the current viewport as ``build/test-artifacts/<name>.png`` and return its path.
    ``name`` is reduced to letters, digits, ``_ . -`` so a test id can be passed as is."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    safe = _SAFE_NAME.sub("_", name).strip("._") or "screenshot"
    path = ARTIFACTS / f"{safe}.png"
    if not driver.save_screenshot(str(path)):
        raise AssertionError(f"the browser could not write the screenshot {path}")
    return path
