"""A real headless Chromium for page tests: Debian's ``chromium`` through ``chromium-driver``.

Imported by bare name (pytest puts ``tests/`` on ``sys.path``); the name is unique across the
test tree. ``chromium()`` skips the calling test, naming what is missing, where Selenium or the
browser is not installed (``launch/setup.sh`` installs both); every browser it starts is quit
when its ``with`` block ends, also on failure. Selenium finds nothing on the network: the
driver's path is given, so Selenium Manager never downloads one.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

PAGE_S = 20.0


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (a Selenium ``webdriver.Chrome``) that logs the page's console."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing (dev extra)")
    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip("chromium and chromium-driver are not installed (launch/setup.sh does it)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container: Chromium's sandbox needs user namespaces
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=driver_path)
    )
    try:
        driver.set_page_load_timeout(PAGE_S)
        yield driver
    finally:
        driver.quit()


def text_of(driver: Any, selector: str) -> str:
    """The text of the element ``selector`` ("" while it is not on the page)."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    try:
        return str(driver.find_element(By.CSS_SELECTOR, selector).text)
    except WebDriverException:
        return ""


def console_errors(driver: Any, *expected: str) -> list[dict[str, Any]]:
    """The page's console errors since the last call, but those containing an ``expected``
    text."""
    return [
        entry
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and not any(text in entry["message"] for text in expected)
    ]
