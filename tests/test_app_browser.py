"""The app in a real browser: `python app.py --model tiny` as a subprocess on 127.0.0.1, driven by
Playwright with Debian's Chromium, the way a user clicks through it.

Set SCREENSHOT_TO=assets/screenshot.png to also refresh the README's screenshot.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CAPTION = re.compile(r"CLIP to prompt \d+\.\d · to target \d+\.\d")
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")

# Skipped on a developer machine without Chromium; CI (which installs it) must run it, never skip it.
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists() and os.environ.get("CI") != "true",
                                reason="needs Chromium (apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "app.py", "--model", "tiny"], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180  # imports (torch, diffusers, gradio, open_clip) dominate start-up
        while True:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not answer on {url}:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        # Not "networkidle": the session heartbeat keeps a connection open for as long as the page lives.
        page.goto(app_url)
        page.wait_for_selector("#targets textarea")
        yield page
        browser.close()


def test_user_erases_generates_and_sees_a_scored_two_by_two_comparison(page, tmp_path):
    page.fill("#targets textarea", "Snoopy")
    page.fill("#retain textarea", "Mickey, Garfield")
    page.click("#erase")
    page.wait_for_selector("#edit-report :text('modules changed')")
    assert page.is_checked("#compared input[type=checkbox]")  # the new edit is a column to compare

    page.fill("#erase-prompts textarea", "a photo of Snoopy")
    page.fill("#keep-prompts textarea", "a photo of Mickey")
    page.fill("#seeds textarea", "0, 1")
    steps = page.locator("#steps input[type=number]")
    steps.fill("2")
    steps.press("Enter")
    page.click("#generate")
    page.wait_for_selector("#status :text('rows x')")

    # 2 prompts x 2 seeds x (original | edited) = 8 images, each captioned with its two CLIP scores.
    images = page.locator("#erase-gallery img, #keep-gallery img")
    assert images.count() == 8
    captions = page.locator("#erase-gallery .caption-label, #keep-gallery .caption-label").all_inner_texts()
    assert len(captions) == 8 and all(CAPTION.search(c) for c in captions), captions
    assert sum("Snoopy · seed" in c for c in captions) == 4 and sum("seed 1" in c for c in captions) == 4

    summary = page.locator("#summary [role=row]:has([role=gridcell])")
    assert summary.count() == 4  # (should be erased | should be kept) x (original | edited)
    for row in summary.all():
        cells = [c.strip() for c in row.locator("[role=gridcell]").all_inner_texts()]
        assert cells[0] in ("should be erased", "should be kept")
        assert all(NUMBER.match(cells[i]) for i in (2, 3, 5, 6)), cells

    page.wait_for_timeout(500)  # let the bar plot finish drawing before the screenshot
    shot = tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000
    if os.environ.get("SCREENSHOT_TO"):
        shutil.copyfile(shot, ROOT / os.environ["SCREENSHOT_TO"])
