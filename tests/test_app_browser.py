"""The Gradio demo in a real browser: the app launched as a user would (python -m densediff.app backbone=tiny) on
127.0.0.1, driven by headless Chromium through selenium and the system's chromedriver (Debian: apt-get install
chromium chromium-driver; nothing is downloaded at run time): upload an image, run, wait for the prediction and
the two download links, fetch what they link to, and save a screenshot of the page."""

from __future__ import annotations

import io
import shutil
import time

import numpy as np
import pytest
from PIL import Image
from test_app import Server

webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium: pip install -e "
                                                             "'.[test]'")
from selenium.common.exceptions import TimeoutException, WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((found for name in BROWSERS if (found := shutil.which(name))), None)
DRIVER = shutil.which("chromedriver")
MISSING = [name for name, found in (("chromium", BROWSER), ("chromedriver", DRIVER)) if found is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"no headless browser: {' and '.join(MISSING)} not on PATH "
                                "(Debian: apt-get install chromium chromium-driver; .ci/run installs them)")
RESULT_TIMEOUT = 120  # s: the first prediction on a busy 2-core machine


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1100", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=DRIVER, log_output=str(tmp_path / "chromedriver.log"))
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except WebDriverException as error:  # installed but broken is a failure, not a skip (missing: the skipif above)
        pytest.fail(f"{BROWSER} with {DRIVER} is installed but does not start: {error.msg}")
    yield driver
    driver.quit()


def test_a_browser_uploads_an_image_runs_and_gets_the_prediction_and_downloads(browser, tmp_path):
    import httpx

    height, width = 37, 50
    image = tmp_path / "room.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(image)
    screenshot = tmp_path / "app.png"
    app = Server(tmp_path / "app")
    try:
        app.wait()
        browser.get(app.url)
        wait = WebDriverWait(browser, RESULT_TIMEOUT)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#input-image input[type=file]"))
        upload.send_keys(str(image))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image img"))  # the upload is shown
        browser.find_element(By.CSS_SELECTOR, "#run-button").click()

        def done(driver):
            shown = driver.execute_script(
                "const i = document.querySelector('#prediction img');"
                "return i && i.complete && i.naturalWidth > 0 ? [i.naturalWidth, i.naturalHeight] : null;")
            links = {n: driver.find_elements(By.CSS_SELECTOR, f"#{n} a[href]")
                     for n in ("prediction-npy", "prediction-png16")}
            return (shown, {n: a[0].get_attribute("href") for n, a in links.items()}) if shown and all(
                links.values()) else None

        try:
            (shown_width, shown_height), links = wait.until(done)
        except TimeoutException:
            browser.save_screenshot(str(screenshot))
            raise AssertionError(f"no prediction and download links within {RESULT_TIMEOUT} s; screenshot: "
                                 f"{screenshot}; app log:\n{app.log.read_text()[-3000:]}") from None
        time.sleep(0.5)  # let the page settle for the picture
        browser.save_screenshot(str(screenshot))
        seen = f"(screenshot: {screenshot})"
        assert screenshot.is_file() and screenshot.stat().st_size > 0, seen
        assert (shown_width, shown_height) == (width, height), f"the prediction is {shown_width}x{shown_height} {seen}"
        assert links["prediction-npy"].split("?")[0].endswith("room.npy"), f"{links} {seen}"
        assert links["prediction-png16"].split("?")[0].endswith("room_16bit.png"), f"{links} {seen}"
        # what the links serve: the float prediction and its 16-bit PNG, as the browser would download them
        no_proxy = httpx.Client(trust_env=False, timeout=30)
        depth = np.load(io.BytesIO(no_proxy.get(links["prediction-npy"]).raise_for_status().content))
        assert depth.shape == (height, width) and np.isfinite(depth).all(), seen
        with Image.open(io.BytesIO(no_proxy.get(links["prediction-png16"]).raise_for_status().content)) as png:
            sixteen = np.asarray(png)
        assert sixteen.dtype == np.uint16, seen
        np.testing.assert_allclose(sixteen / 65535.0, depth, rtol=0, atol=1 / 65535, err_msg=seen)
    finally:
        app.stop()
