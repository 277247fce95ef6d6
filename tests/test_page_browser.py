"""The page in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by selenium
loads the page of ``python main.py --serve``, uploads an image on the Inpaint tab, paints a stroke over it with the
mouse, runs the inpainting and waits for the results to be shown. A screenshot of the page is saved in
``$DDPM_ARTIFACTS`` (default: the test's temporary folder). It runs apart from the suite,
``python -m pytest -q -m browser``. Without Chromium the test is skipped, unless
``DDPM_REQUIRE_BROWSER=1`` (``.ci/run`` sets it), which makes a missing browser a failure."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import start_page, tiny_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
REQUIRED = os.environ.get("DDPM_REQUIRE_BROWSER") == "1"
pytestmark = pytest.mark.browser  # not in the default run: python -m pytest -q -m browser (a CI step of its own)


def browser():
    if not (CHROMIUM and DRIVER):
        message = "needs Chromium and its driver: apt-get install chromium chromium-driver"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1500"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def test_inpainting_a_painted_stroke_in_a_real_browser(tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    _, _, run = tiny_run(tmp_path, 2)
    save = tmp_path / "out"
    process, url = start_page(run / "model.pt", save)
    upload = tmp_path / "upload.png"
    ramp = np.indices((64, 64)).sum(0).astype(np.uint8) * 2
    Image.fromarray(np.stack([ramp, 255 - ramp, ramp // 2], axis=-1)).save(upload)
    artifacts = Path(os.environ.get("DDPM_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 60)

        def tab(name):
            found = [t for t in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text == name]
            return found[0] if found else False

        wait.until(lambda d: tab("Inpaint")).click()
        wait.until(lambda d: [i for i in d.find_elements(By.CSS_SELECTOR, "input[type=file]")])[0].send_keys(
            str(upload))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "button[aria-label=Brush]"))
        canvas = wait.until(lambda d: [c for c in d.find_elements(By.CSS_SELECTOR, "canvas") if c.is_displayed()])[0]
        stroke = ActionChains(driver).move_to_element_with_offset(canvas, -40, -10).click_and_hold()
        for _ in range(10):
            stroke = stroke.move_by_offset(8, 2)
        stroke.release().perform()
        [b for b in driver.find_elements(By.TAG_NAME, "button") if b.text == "Run" and b.is_displayed()][0].click()
        shown = wait.until(lambda d: [i for i in d.find_elements(By.TAG_NAME, "img")
                                      if i.is_displayed() and "/inpaint-1-seed0-" in (i.get_attribute("src") or "")])
        driver.save_screenshot(str(artifacts / "page-inpaint.png"))
        assert len(shown) == 4  # the default four results, each in the gallery
        assert all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) == 16
                   for i in shown)
    finally:
        driver.quit()
        process.terminate()
        process.wait(timeout=30)
    grid = np.asarray(Image.open(save / "page" / "inpaint-1-seed0.png"))
    source, hole = grid[2:18, 2:18], grid[2:18, 20:36]  # the input at 16 px, then the input with its hole grey
    painted = (hole != source).any(axis=-1)
    assert 0 < painted.mean() < 0.5  # the stroke became a hole of part of the image
    for k in range(4):
        result = np.asarray(Image.open(save / "page" / f"inpaint-1-seed0-{k}.png"))
        assert np.array_equal(result[~painted], source[~painted]) and (result[painted] != source[painted]).any()
