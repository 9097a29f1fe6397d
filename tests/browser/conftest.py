"""Headless Debian Chromium driven by Selenium through the system chromedriver (no browser
download), one browser for the session; each test gets a fresh cookie jar."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.webconsole import PASSWORD

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
WAIT_SECONDS = 15


@pytest.fixture(scope="session")
def browser() -> Iterator[WebDriver]:
    for exe in (CHROMEDRIVER, CHROMIUM):
        if not shutil.which(exe):
            pytest.fail(
                f"{exe} is missing: install Debian's chromium and chromium-driver "
                "(scripts/test-tools.sh does, as root)",
                pytrace=False,
            )
    profile = tempfile.mkdtemp(prefix="outbox-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser: WebDriver) -> Iterator[WebDriver]:
    browser.delete_all_cookies()
    yield browser
    browser.delete_all_cookies()


def wait(browser: WebDriver, condition: Callable[[WebDriver], object], what: str = "the page") -> object:
    """Until `condition` holds. An element that went stale (the page was replaced while the
    condition read it, e.g. after a filter's submit) means "not yet", as a person would look
    again."""
    return WebDriverWait(browser, WAIT_SECONDS, ignored_exceptions=(StaleElementReferenceException,)).until(
        condition, message=f"timed out waiting for {what}"
    )


def login(
    browser: WebDriver, url: str, name: str, password: str = PASSWORD, *, expect_ok: bool = True
) -> None:
    """Log in through the form, as a person would."""
    browser.get(url + "/login")
    browser.find_element(By.NAME, "username").send_keys(name)
    browser.find_element(By.NAME, "password").send_keys(password)
    browser.find_element(By.XPATH, "//button[text()='Log in']").click()
    if expect_ok:
        wait(browser, ec.presence_of_element_located((By.ID, "who")), "the logged-in page")


def button(browser: WebDriver, label: str):  # type: ignore[no-untyped-def]
    return browser.find_element(By.XPATH, f"//button[normalize-space()='{label}']")


def text(browser: WebDriver, element_id: str) -> str:
    return str(wait(browser, ec.visibility_of_element_located((By.ID, element_id)), f"#{element_id}").text)  # type: ignore[union-attr]
