"""End to end: a real uvicorn server, headless Chromium, a real radiograph, a number on the page.

Runs whenever Chromium and its driver are present; under CI (env ``CI`` set) a missing browser is a failure,
not a skip, so a broken image cannot turn the browser test off silently.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("BONEAGE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("BONEAGE_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--window-size=1366,1000",
]

pytestmark = pytest.mark.e2e


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required under CI: apt-get install -y chromium chromium-driver)")
    pytest.skip(reason)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed")
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not os.access(binary, os.X_OK):
            _unavailable(f"{binary} not found")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def server(tiny_bundle: Path) -> Iterator[str]:
    from boneage.web import background_server, create_app

    with background_server(create_app(tiny_bundle)) as url:
        yield url


def _first_radiograph(shared_sample: Path) -> tuple[Path, str]:
    with open(shared_sample / "labels.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    sex = "male" if row["male"].strip().lower() in ("true", "1") else "female"
    return shared_sample / "images" / f"{row['id']}.png", sex


def test_upload_and_see_bone_age(browser, server: str, shared_sample: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    image, sex = _first_radiograph(shared_sample)
    browser.get(server + "/")
    assert "Research use only" in browser.find_element(By.ID, "disclaimer").text
    # the footer fills in from /api/v1/model once the page script has run
    facts = browser.find_element(By.ID, "model-facts")
    WebDriverWait(browser, 30).until(lambda d: "test_efficientnet" in facts.text)

    browser.find_element(By.ID, "image").send_keys(str(image))
    WebDriverWait(browser, 10).until(ec.visibility_of_element_located((By.ID, "preview-img")))
    Select(browser.find_element(By.ID, "sex")).select_by_value(sex)
    browser.find_element(By.ID, "age").send_keys("10y")
    browser.find_element(By.ID, "submit").click()

    bone_age = WebDriverWait(browser, 120).until(ec.visibility_of_element_located((By.ID, "bone-age")))
    WebDriverWait(browser, 120).until(lambda d: d.find_element(By.ID, "bone-age").text.strip() != "")
    assert not browser.find_element(By.ID, "error").is_displayed(), browser.find_element(By.ID, "error").text
    months = float(bone_age.text)
    assert 0 <= months < 1000
    assert browser.find_element(By.ID, "sd-score").text.endswith(")")
    WebDriverWait(browser, 30).until(
        lambda d: (
            d.execute_script("return document.getElementById('sd-chart').naturalWidth") > 0
            and d.execute_script("return document.getElementById('heatmap').naturalWidth") > 0
        )
    )

    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1366, max(800, int(height) + 160))
    shot = tmp_path / "boneage-web.png"
    assert browser.save_screenshot(str(shot))
    if os.environ.get("BONEAGE_SCREENSHOT_DIR"):
        target = Path(os.environ["BONEAGE_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target / shot.name)


def test_error_detail_is_shown(browser, server: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bogus = tmp_path / "notes.png"
    bogus.write_text("this is not a radiograph\n" * 10)
    browser.get(server + "/")
    browser.find_element(By.ID, "image").send_keys(str(bogus))
    browser.find_element(By.ID, "submit").click()
    error = WebDriverWait(browser, 60).until(
        lambda d: d.find_element(By.ID, "error") if d.find_element(By.ID, "error").is_displayed() else None
    )
    assert "415" in error.text and "not an image" in error.text
    assert not browser.find_element(By.ID, "result").is_displayed()
