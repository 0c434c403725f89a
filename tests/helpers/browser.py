"""A real headless Chromium for page tests: Debian's `chromium` driven through `chromium-driver` by Selenium.

`headless_chromium()` returns a Selenium `webdriver.Chrome`, or fails the test with what to
install (scripts/setup installs both packages): a missing browser is a failure, never a skip.
"""

from __future__ import annotations

import shutil

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)


def find(names: tuple[str, ...]) -> str | None:
    return next((path for path in map(shutil.which, names) if path), None)


def headless_chromium(*, width: int = 1280, height: int = 1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = find(BROWSERS), find(DRIVERS)
    if browser is None or driver is None:
        pytest.fail("the dashboard's browser tests need Chromium and its driver: run ./scripts/setup "
                    "(Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--metrics-recording-only",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))
