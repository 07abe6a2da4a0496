"""The cluster page's API key flow in a real headless Chromium (``browser_page``).

A frontend with an API key (uvicorn on an ephemeral port, in-memory registry) and a fake decode
worker: the page loads, its JSON answers 401, so the page shows the key form and no data; a
wrong key is refused (the form stays); the right key, typed into the form, makes the page show
the worker, and a reload keeps it (the tab's ``sessionStorage``) without asking again. The only
console errors are the browser's own notes of the 401 answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from browser_page import PAGE_S, chromium, console_errors, text_of
from frontend_fakes import FakeWorker, RunningFrontend, wait_until

from fabric.frontend.api_key import ApiKey

KEY = "sesame-7f3a"
REFUSED = "/v1/fabric/cluster - Failed to load resource: the server responded with a status of 401"


@pytest.fixture
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver


def shown(driver: Any, selector: str, text: str) -> bool:
    return wait_until(lambda: text_of(driver, selector) == text, PAGE_S)


def submit_key(driver: Any, key: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "key-input")
    field.clear()
    field.send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#key-form button").click()


def test_the_page_asks_for_the_key_and_keeps_it_in_the_tab(
    start_frontend: Callable[..., RunningFrontend],
    make_worker: Callable[..., FakeWorker],
    browser: Any,
) -> None:
    running = start_frontend(api_key=ApiKey(KEY))
    make_worker("decode-0")
    browser.get(f"{running.url}/dashboard")
    assert shown(browser, "#status", "API key required"), text_of(browser, "#status")
    assert browser.find_element("id", "key-form").is_displayed()
    assert text_of(browser, 'tr[data-worker="decode-0"]') == ""  # no data without the key

    submit_key(browser, "wrong")
    assert shown(browser, "#status", "the API key was refused"), text_of(browser, "#status")
    assert browser.find_element("id", "key-form").is_displayed()

    submit_key(browser, KEY)
    row = 'tr[data-worker="decode-0"] [data-field=role]'
    assert shown(browser, row, "decode"), text_of(browser, "#status")
    assert not browser.find_element("id", "key-form").is_displayed()
    assert browser.execute_script("return document.cookie") == ""  # the key is in no cookie

    browser.refresh()
    assert shown(browser, row, "decode"), text_of(browser, "#status")
    assert not browser.find_element("id", "key-form").is_displayed()
    assert console_errors(browser, REFUSED) == []
