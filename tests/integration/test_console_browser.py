"""The console in a real browser (headless Chromium, tests/support/browser.py): sign in,
register a device, generate its PSK (shown once), send a message as the device, and see it
arrive in the live view, which gets it from the real broker. Screenshots of the device page
and the live view go to build/test-artifacts/ (docs/OPERATIONS.md shows two of them).

The selenium calls block, so they run in a thread while uvicorn serves the app in the test's
event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as seen
from selenium.webdriver.support.ui import Select, WebDriverWait

from api.app import create_app
from api.publisher import MqttPublisher
from api.store.memory import MemoryDeviceStore
from tests.api.conftest import API_KEY, make_settings
from tests.support.browser import screenshot
from tests.support.http import serve_app
from tests.support.services import MosquittoServer

pytestmark = pytest.mark.integration

ICCID = "8988280666000000042"
PAYLOAD = '{"temperature": 21.5, "battery": 87}'
WAIT = 10.0  # seconds a step may take before the test fails (a missing message included)
STOP_GRACE = 2  # seconds uvicorn waits for open requests (a live view's stream) at the end

T = TypeVar("T")


async def _in_thread(step: Callable[[], T]) -> T:
    return await asyncio.to_thread(step)


def _sign_in_and_register(driver: webdriver.Chrome, url: str) -> None:
    wait = WebDriverWait(driver, WAIT)
    driver.get(f"{url}/console")
    wait.until(seen.presence_of_element_located((By.ID, "key"))).send_keys(API_KEY)
    driver.find_element(By.ID, "sign-in").click()
    wait.until(seen.presence_of_element_located((By.ID, "register")))
    driver.find_element(By.ID, "reg-iccid").send_keys(ICCID)
    driver.find_element(By.ID, "reg-ip").send_keys("10.64.0.42")
    driver.find_element(By.ID, "reg-submit").click()
    wait.until(seen.text_to_be_present_in_element((By.ID, "notice"), "Device registered."))


def _generate_psk(driver: webdriver.Chrome) -> str:
    wait = WebDriverWait(driver, WAIT)
    driver.find_element(By.ID, "generate").click()
    key = wait.until(seen.presence_of_element_located((By.ID, "issued-key"))).text
    screenshot(driver, "console-device")
    return key


def _open_live_view(driver: webdriver.Chrome, url: str) -> tuple[str, str]:
    device_tab = driver.current_window_handle
    driver.switch_to.new_window("tab")
    driver.get(f"{url}/console/live")
    WebDriverWait(driver, WAIT).until(
        seen.text_to_be_present_in_element((By.ID, "live-state"), "connected")
    )
    live_tab = driver.current_window_handle
    driver.switch_to.window(device_tab)
    return device_tab, live_tab


def _send_as_device(driver: webdriver.Chrome) -> None:
    driver.find_element(By.ID, "payload").send_keys(PAYLOAD)
    Select(driver.find_element(By.NAME, "content_type")).select_by_visible_text("application/json")
    driver.find_element(By.ID, "send-submit").click()
    WebDriverWait(driver, WAIT).until(
        seen.text_to_be_present_in_element((By.ID, "notice"), "Message published")
    )


def _message_in_live_view(driver: webdriver.Chrome, live_tab: str) -> str:
    driver.switch_to.window(live_tab)
    row = WebDriverWait(driver, WAIT).until(
        seen.presence_of_element_located((By.CSS_SELECTOR, "#live tr.message"))
    )
    text: str = row.text
    screenshot(driver, "console-live")
    return text


def _leave(driver: webdriver.Chrome) -> None:
    """Every tab to a blank page: the live view's event stream ends, the server stops at once."""
    for handle in driver.window_handles:
        driver.switch_to.window(handle)
        driver.get("about:blank")


async def test_register_psk_send_and_see_it_live(
    browser: webdriver.Chrome, mosquitto: MosquittoServer
) -> None:
    settings = make_settings(mosquitto)
    store = MemoryDeviceStore()
    publisher = MqttPublisher.from_settings(settings)
    await publisher.start()
    try:
        app = create_app(settings, store=store, publisher=publisher)
        # proxy_headers off as in tests/api (real_server); a bounded graceful stop, so a
        # failing step that leaves a stream open cannot hang the test.
        served = serve_app(app, proxy_headers=False, timeout_graceful_shutdown=STOP_GRACE)
        async with served as url:
            try:
                await _in_thread(lambda: _sign_in_and_register(browser, url))
                key = await _in_thread(lambda: _generate_psk(browser))
                device = await store.get(ICCID)
                assert device is not None
                assert device.psk == key
                assert len(key) == 16
                # Shown once: the device page never shows it again.
                await _in_thread(lambda: browser.get(f"{url}/console/devices/{ICCID}"))
                assert key not in await _in_thread(lambda: browser.page_source)
                _, live_tab = await _in_thread(lambda: _open_live_view(browser, url))
                await _in_thread(lambda: _send_as_device(browser))
                row = await _in_thread(lambda: _message_in_live_view(browser, live_tab))
            finally:
                await _in_thread(lambda: _leave(browser))
    finally:
        await publisher.close()
    assert ICCID in row
    assert f"devices/{ICCID}/messages" in row
    assert PAYLOAD in row
