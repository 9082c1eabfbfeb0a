"""A real headless Chromium for the console's tests (pytest plugin: fixture + failure screenshots).

Debian's `chromium` and `chromium-driver` packages, driven by Selenium with the packaged
chromedriver given explicitly (Selenium Manager would try to download one; there is no internet).
`make test` installs the packages when it can. A missing browser fails the tests with a clear
message: they never skip. A failing browser test saves a screenshot and says where.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

FAILURE_DIR = Path(os.environ.get("RECEIVER_TEST_SCREENSHOTS", "var/test-screenshots"))
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    "--mute-audio",
)


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def start_chromium(user_data_dir: str, width: int = 1280, height: int = 900) -> webdriver.Chrome:
    binary, driver = chromium_binary(), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.fail(
            "the console's browser tests need Debian's chromium and chromium-driver packages "
            f"(found chromium={binary}, chromedriver={driver}); `make test` installs them as "
            "root with apt-get, or run: apt-get install chromium chromium-driver",
            pytrace=False,
        )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    options.add_argument(f"--window-size={width},{height}")
    browser = webdriver.Chrome(service=Service(driver), options=options)
    browser.set_page_load_timeout(20)
    return browser


@pytest.fixture(scope="module")
def chromium() -> Iterator[webdriver.Chrome]:
    """One browser for a test module (a fresh profile each time)."""
    with tempfile.TemporaryDirectory(prefix="receiver-chromium-") as profile:
        browser = start_chromium(profile)
        try:
            yield browser
        finally:
            browser.quit()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[Any]:
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    browser = getattr(item, "funcargs", {}).get("chromium")
    if browser is None:
        return
    FAILURE_DIR.mkdir(parents=True, exist_ok=True)
    path = (FAILURE_DIR / f"{item.name}.png").resolve()
    try:
        browser.save_screenshot(str(path))
        url = browser.current_url
    except Exception as exc:  # the browser itself may be what failed
        report.sections.append(("browser screenshot", f"could not save one: {exc}"))
        return
    report.sections.append(("browser screenshot", f"saved to {path} (page: {url})"))
