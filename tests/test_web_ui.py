"""The web UI in a real browser: Debian's headless Chromium driven by Selenium through
chromium-driver, against a real ``retrieval serve``. Skipped, with the reason, where the browser
is not installed (``make browser`` installs it; CI does)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from served import Served
from test_service import build

from retrieval import Retriever

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(DRIVER).exists()),
    reason="needs Debian's chromium and chromium-driver (make browser)",
)

LOADED = "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth)"


@pytest.fixture
def browser(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, seconds: float = 30.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds).until(lambda d: condition(d))


def test_search_upload_more_like_this_and_errors_in_chromium(
    tmp_path: Path, checkpoint: Path, towers: tuple[Path, Path], browser
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    config = build(tmp_path, checkpoint, towers)
    with Served(config.out, "--api-key", "ui-key", log=tmp_path / "serve.log") as served:
        served.wait_ready()
        browser.get(served.url + "/")
        error = browser.find_element(By.ID, "error")
        status = browser.find_element(By.ID, "status")
        cards = lambda d: d.find_elements(By.CSS_SELECTOR, "#results .hit")  # noqa: E731

        # Without the key: the error state, and the page asks for the key.
        query = browser.find_element(By.ID, "query")
        query.send_keys("a dog", Keys.ENTER)
        wait_for(browser, lambda d: error.is_displayed() and "API key" in error.text)
        key = browser.find_element(By.ID, "key")
        assert key.is_displayed() and not cards(browser)
        key.send_keys("ui-key", Keys.TAB)

        # A text query: a grid of thumbnails with scores.
        k = browser.find_element(By.ID, "k")
        k.clear()
        k.send_keys("6")
        query.clear()
        query.send_keys("a dog", Keys.ENTER)
        wait_for(browser, lambda d: len(cards(d)) == 6)
        assert not error.is_displayed() and "6 images" in status.text
        first = cards(browser)[0]
        assert first.find_element(By.CSS_SELECTOR, ".score").text.startswith("#1 ·")
        wait_for(
            browser,
            lambda d: d.execute_script(LOADED),
        )

        # More like this: the first result's neighbours, itself left out.
        first_label = first.find_element(By.CSS_SELECTOR, ".label").text
        first_id = first.get_attribute("data-id")
        first.find_element(By.CSS_SELECTOR, "button.more").click()
        wait_for(browser, lambda d: "images for more like" in status.text and len(cards(d)) == 6)
        assert first_id not in [c.get_attribute("data-id") for c in cards(browser)]
        assert first_label in status.text

        # An image upload: the query image is shown and the results come back.
        upload = browser.find_element(By.ID, "upload")
        upload.send_keys(str(config.images / "photos" / "rotated.jpg"))
        wait_for(browser, lambda d: "images for the image rotated.jpg" in status.text)
        assert browser.find_element(By.ID, "query-image").is_displayed() and len(cards(browser)) == 6

        # Captions: text cards.
        browser.find_element(By.CSS_SELECTOR, "input[name=target][value=captions]").click()
        query.clear()
        query.send_keys("a red car", Keys.ENTER)
        wait_for(browser, lambda d: "captions for" in status.text)
        captions = cards(browser)
        assert captions and all("caption" in c.get_attribute("class") for c in captions)
        assert not browser.find_elements(By.CSS_SELECTOR, "#results img")

        # A server-side refusal (a file that is no image) shows as the error state, the grid cleared.
        broken = tmp_path / "not-a-picture.jpg"
        broken.write_bytes(b"<html>this is no JPEG</html>")
        upload.send_keys(str(broken))
        wait_for(browser, lambda d: error.is_displayed() and "cannot decode image" in error.text)
        assert not cards(browser)

        # A composed query with near-duplicates folded: the library's answer, confidence shown.
        browser.find_element(By.CSS_SELECTOR, "input[name=target][value=images]").click()
        browser.find_element(By.ID, "plus").send_keys("2:a cat")
        browser.find_element(By.ID, "minus").send_keys("a red car")
        browser.find_element(By.ID, "dedup").click()
        query.clear()
        query.send_keys("a dog", Keys.ENTER)
        wait_for(browser, lambda d: "+ 2:a cat − a red car" in status.text and cards(d))
        with Retriever.open(config.out, device="cpu") as retriever:
            expected = retriever.search_composed(["a dog", "2:a cat"], ["a red car"], k=6, dedup=0.95)
        assert [int(c.get_attribute("data-id")) for c in cards(browser)] == [h.id for h in expected]
        assert len(expected) < 6  # the tiny tower's pictures are near one another: some were folded
        assert "%" in cards(browser)[0].find_element(By.CSS_SELECTOR, ".score").text
        # A confidence no result reaches: "no good match", an empty grid.
        browser.find_element(By.ID, "confidence").send_keys("1")
        query.send_keys(Keys.ENTER)
        wait_for(browser, lambda d: "No good match" in status.text)
        assert not cards(browser) and not error.is_displayed()

        # Keyboard: "/" focuses the search box from anywhere.
        browser.find_element(By.TAG_NAME, "body").click()
        browser.find_element(By.TAG_NAME, "body").send_keys("/")
        assert browser.switch_to.active_element == query
