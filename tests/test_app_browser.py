"""The app in a real browser: `python app.py --model toy` (the toy world) as a subprocess on 127.0.0.1,
driven by Playwright with Debian's Chromium at 1400 px wide, the way a user clicks through it.

Each test saves its screenshots under a pytest tmp folder (the path is printed; `pytest -s` shows it).
Set SCREENSHOT_TO=assets/screenshot.png to also refresh the README's screenshot.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CAPTION = re.compile(r"CLIP to prompt \d+\.\d · to target \d+\.\d")
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
SUMMARY_HEADERS = ["prompts", "column", "n", "CLIP to prompt", "95% CI", "Δ vs original", "CLIP to target"]
LAYER_HEADERS = ["layer", "relative change", "target residual", "retain drift"]

# Skipped on a developer machine without Chromium; CI (which installs it) must run it, never skip it.
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists() and os.environ.get("CI") != "true",
                                reason="needs Chromium (apt-get install chromium)")

# Words of the text under an element that the layout split over two lines ("CLIP→targ|et").
BROKEN_WORDS = """root => {
  const broken = [], range = document.createRange();
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const node = walker.currentNode;
    for (const m of node.data.matchAll(/\\S+/g)) {
      range.setStart(node, m.index);
      range.setEnd(node, m.index + m[0].length);
      const lines = new Set([...range.getClientRects()].filter(r => r.width > 0).map(r => Math.round(r.bottom)));
      if (lines.size > 1) broken.push(m[0]);
    }
  }
  return broken;
}"""
# Elements whose text is wider than their box, i.e. cut off ("50" shown as "5").
CLIPPED = """root => [root, ...root.querySelectorAll('*')]
  .filter(e => e.childElementCount === 0 && e.textContent.trim() && e.scrollWidth > e.clientWidth + 1
               && e.checkVisibility({visibilityProperty: true, opacityProperty: true}))
  .map(e => e.textContent.trim())"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, process: subprocess.Popen | None, log: Path | None) -> None:
    deadline = time.monotonic() + 180  # imports (torch, diffusers, gradio, open_clip) dominate start-up
    while True:
        if process is not None and process.poll() is not None:
            pytest.fail(f"app.py exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"app did not answer on {url}:\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """`python app.py --model toy`, with Gradio's cache (where the app also keeps its downloads) in a tmp folder."""
    yield from serve("toy", tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory):
    """`python app.py --model tiny`: the random-weight model, where training jobs take seconds."""
    yield from serve("tiny", tmp_path_factory)


@pytest.fixture(scope="module")
def sdxl_app(tmp_path_factory):
    """`python app.py --model tiny-sdxl`: a random-weight SDXL (two text encoders, text-time embedding)."""
    yield from serve("tiny-sdxl", tmp_path_factory)


def serve(model: str, tmp_path_factory):
    port = free_port()
    folder = tmp_path_factory.mktemp("app")
    log, cache = folder / "app.log", folder / "gradio-cache"
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "GRADIO_TEMP_DIR": str(cache),
           "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "app.py", "--model", model], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, process, log)
        yield SimpleNamespace(url=url, log=log, cache=cache)
    finally:
        process.send_signal(signal.SIGTERM)  # what a service manager sends
        process.wait(timeout=60)
    # The app keeps its downloads in a folder of its own inside Gradio's cache, and removes it when it stops.
    assert list(cache.glob("erasure-studio-*")) == [], log.read_text()[-2000:]


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("screenshots")
    print(f"\nscreenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(120_000)
    # Not "networkidle": the session heartbeat keeps a connection open for as long as the page lives.
    page.goto(url)
    page.wait_for_selector("#targets textarea")
    return page


@pytest.fixture
def page(app, browser):
    page = open_page(browser, app.url)
    yield page
    page.close()


def erase_circle(page):
    page.fill("#targets textarea", "circle")
    page.fill("#anchors textarea", "")
    page.fill("#retain textarea", "ring, square, triangle, star, heart, cross, diamond")
    page.click("#erase")
    page.wait_for_selector("#edit-report :text('modules changed')")


def gallery_images(page, app, gallery: str) -> dict[str, "Image.Image"]:
    """The images a gallery shows, by caption, fetched from the app the way the browser got them."""
    import io

    from PIL import Image

    found = {}
    for item in page.locator(f"#{gallery} button:has(img)").all():
        source = item.locator("img").get_attribute("src")
        caption = item.locator(".caption-label").inner_text()
        url = source if source.startswith("http") else app.url.rstrip("/") + source
        with urllib.request.urlopen(url, timeout=30) as response:
            found[caption] = Image.open(io.BytesIO(response.read())).convert("RGB")
    return found


def set_target(page, target: str):
    """Type a target, and wait for the prompts it suggests (they would overwrite prompts typed before)."""
    page.fill("#targets textarea", target)
    page.wait_for_function("t => document.querySelector('#erase-prompts textarea').value.includes(t)", arg=target)


def set_number(page, elem_id: str, value: str):
    field = page.locator(f"#{elem_id} input[type=number]")
    field.fill(value)
    field.press("Tab")


def header_texts(page, elem_id: str) -> list[str]:
    headers = page.locator(f"#{elem_id} thead [role=columnheader]")
    headers.first.wait_for()  # tables render after the page's first paint
    return [t.strip() for t in headers.all_inner_texts()]


def test_user_erases_circle_and_sees_circles_only_in_the_original_column(app, page, shots):
    # Before any result, the tables name their columns (Gradio's default headers read "1 2 3").
    assert header_texts(page, "summary")[:7] == SUMMARY_HEADERS
    assert not page.is_enabled("#cancel")  # nothing runs yet
    assert page.locator("input[type=range]").count() == 0  # number fields: a slider clamps what is typed
    for field in ("seeds", "steps", "guidance", "size", "scheduler"):
        assert page.locator(f"#{field}").evaluate(CLIPPED) == [], field
    page.screenshot(path=str(shots / "empty.png"), full_page=True)

    erase_circle(page)
    assert page.is_checked("#compared input[type=checkbox]")  # the new edit is a column to compare
    page.click("#layers-accordion >> text=Per-layer statistics")
    layer_cells = page.locator("#layers [role=gridcell][data-col='0']")
    layer_cells.first.wait_for()
    names = [t.strip() for t in layer_cells.all_inner_texts()]
    assert names and len(set(names)) == len(names) and all(" · attn2.to_v" in n for n in names), names
    assert header_texts(page, "layers")[:4] == LAYER_HEADERS
    assert page.locator("#layers").evaluate(CLIPPED) == []  # names and numbers fit: no scrolling to read them
    assert page.locator("#layers").evaluate(BROKEN_WORDS) == []

    page.fill("#erase-prompts textarea", "a red circle\na blue circle on a white background")
    page.fill("#keep-prompts textarea", "a yellow ring\na green square")
    page.fill("#seeds textarea", "0, 1")
    page.click("#generate")
    page.wait_for_selector("#status :text('rows x')")

    # 4 prompts x 2 seeds x (original | edited) = 16 images, each captioned with its two CLIP scores.
    images = page.locator("#erase-gallery img, #keep-gallery img")
    assert images.count() == 16
    captions = page.locator("#erase-gallery .caption-label, #keep-gallery .caption-label").all_inner_texts()
    assert len(captions) == 16 and all(CAPTION.search(c) for c in captions), captions
    assert sum("circle · seed" in c for c in captions) == 4 and sum("seed 1" in c for c in captions) == 8
    # 32-px images: drawn crisp at 8x (256 px), not smoothed up to whatever width the cell has.
    for image in images.all():
        image.scroll_into_view_if_needed()  # the gallery loads images lazily
        size = image.evaluate("async e => { await e.decode(); return [e.naturalWidth, "
                              "e.getBoundingClientRect().width, getComputedStyle(e).imageRendering] }")
        assert size[0] == 32 and abs(size[1] - 256) < 1 and size[2] == "pixelated", size

    # What the page shows, read by the toy world's judge: circles in the original column only, and the
    # kept shapes in both.
    from erasure.worlds.toy import load_judge

    judge = load_judge()
    for gallery, concept, erased in (("erase-gallery", "circle", True), ("keep-gallery", None, False)):
        shown = gallery_images(page, app, gallery)
        assert len(shown) == 8, list(shown)
        for caption, image in shown.items():
            column, prompt = caption.split(" · ")[:2]
            seen = judge([image]).finds(concept or prompt.split()[-1])[0]
            assert seen == (column == "original" or not erased), caption

    summary = page.locator("#summary [role=row]:has([role=gridcell])")
    assert summary.count() == 4  # (should be erased | should be kept) x (original | edited)
    for row in summary.all():
        cells = [c.strip() for c in row.locator("[role=gridcell]").all_inner_texts()]
        assert cells[0] in ("should be erased", "should be kept")
        assert all(NUMBER.match(cells[i]) for i in (2, 3, 5, 6)), cells
    assert header_texts(page, "summary")[:7] == SUMMARY_HEADERS
    assert page.locator("#summary").evaluate(BROKEN_WORDS) == []  # "CLIP→targ|et" was split

    # The bar plot's category labels: level, whole and apart (they were rotated and cut).
    page.wait_for_selector("#plot .role-axis-label text")
    page.wait_for_timeout(500)  # let the bar plot finish drawing
    labels = page.locator("#plot .role-axis-label").first.locator("text")
    assert labels.all_text_contents() == ["erase: original", "erase: #1", "keep: original", "keep: #1"]
    boxes = [label.bounding_box() for label in labels.all()]
    assert all(abs(b["y"] - boxes[0]["y"]) < 1 for b in boxes)  # one level line, not rotated
    assert all(a["x"] + a["width"] < b["x"] for a, b in zip(boxes, boxes[1:]))  # none overlaps the next
    legend = page.locator("#plot .role-legend-label text").all_text_contents()
    assert legend == ["original", "#1 SPEED: circle"]
    plot_box = page.locator("#plot").bounding_box()
    for item in page.locator("#plot .role-legend-label text").all():  # the legend is inside the plot's frame
        assert item.bounding_box()["y"] + item.bounding_box()["height"] <= plot_box["y"] + plot_box["height"]
    assert not page.is_enabled("#cancel")  # greyed out again once the generation ended

    shot = shots / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000
    if os.environ.get("SCREENSHOT_TO"):
        shutil.copyfile(shot, ROOT / os.environ["SCREENSHOT_TO"])


def test_a_failed_request_names_its_reason_and_leaves_no_stale_result(app, page, shots):
    set_target(page, "Snoopy")
    page.fill("#erase-prompts textarea", "a photo of Snoopy")
    page.fill("#keep-prompts textarea", "")
    page.fill("#seeds textarea", "0")
    set_number(page, "steps", "2")
    page.click("#generate")
    page.wait_for_selector("#status :text('rows x')")
    assert page.locator("#erase-gallery img").count() == 1

    for typed, message in (("0", "steps must be between 1 and 1000, got 0"),
                           ("10000", "10000 steps exceed this app's cap of 50")):
        set_number(page, "steps", typed)
        assert page.locator("#steps input[type=number]").input_value() == typed  # not clamped
        page.click("#generate")
        page.wait_for_selector(f"[data-testid=toast-text]:has-text({message!r})")
        page.wait_for_selector("#status :text('Generation failed')")
    # The old result is gone, and no "Error" badge sits over any text.
    assert page.locator("#erase-gallery img").count() == 0
    assert page.locator("#status [data-testid=status-tracker] .error:visible").count() == 0
    assert page.locator("#erase-gallery [data-testid=status-tracker] .error:visible").count() == 0
    page.wait_for_selector("#cancel:disabled", timeout=10_000)  # its own event; under load it may trail the status
    page.screenshot(path=str(shots / "failed-generation.png"), full_page=True)

    page.fill("#targets textarea", "")
    page.click("#erase")
    page.wait_for_selector("[data-testid=toast-text]:has-text('no target concept given')")
    page.wait_for_selector("#edit-report :text('Failed')")
    assert page.locator("#edit-report [data-testid=status-tracker] .error:visible").count() == 0
    page.screenshot(path=str(shots / "failed-erase.png"), full_page=True)
    # Users' mistakes leave the server's console quiet.
    assert "Traceback" not in app.log.read_text()


def test_cancel_is_live_only_while_a_generation_runs(page, shots):
    set_target(page, "clock")
    page.fill("#erase-prompts textarea", "a photo of a slow clock\na photo of a slower clock")
    page.fill("#keep-prompts textarea", "")
    page.fill("#seeds textarea", "0, 1, 2, 3")
    set_number(page, "steps", "50")
    set_number(page, "size", "128")  # the toy world's native 32 px would be done before the click
    assert not page.is_enabled("#cancel")
    page.click("#generate")
    page.wait_for_selector("#cancel:enabled", timeout=30_000)
    page.wait_for_selector(":text('original: denoising')")  # the generation is running, not only queued
    page.screenshot(path=str(shots / "generating.png"))
    page.click("#cancel")
    page.wait_for_selector("#status :text('cancelled')")
    page.wait_for_selector("#cancel:disabled")


def test_fallback_banner_shows_the_loaders_reason_in_whole_words(monkeypatch, browser, shots):
    """A model that cannot load: the app starts on the tiny model and says why (in-process, on a fake reason)."""
    import diffusers

    import app as studio_app
    from erasure.engine.limits import Limits

    reason = "Cannot find an appropriate cached snapshot folder and outgoing traffic has been disabled. " * 5

    def unreachable(*args, **kwargs):
        raise OSError(reason)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "load_config", unreachable)  # the loader's first hub read
    pipe, scorer, notice = studio_app.load_models("nobody/not-a-cached-model", device="cpu")
    demo = studio_app.build_demo(studio_app.Studio(pipe, scorer, Limits(), notice))
    _, url, _ = studio_app.launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=None)
    try:
        page = open_page(browser, url)
        banner = page.locator("#banner")
        shown = banner.inner_text()
        assert "could not load model 'nobody/not-a-cached-model'" in shown and " …)" in shown
        kept = shown[shown.index("(Cannot") + 1: shown.index(" …)")]
        assert reason.startswith(kept) and reason[len(kept)] == " "  # up to a whole word, then " …"
        assert banner.evaluate(BROKEN_WORDS) == [] and banner.evaluate(CLIPPED) == []
        banner.screenshot(path=str(shots / "fallback-banner.png"))
        page.close()
    finally:
        demo.close()


def compare_cat_and_dog(page, *galleries: str) -> list[str]:
    """Generate "a photo of a cat" (to erase) and "a photo of a dog" (to keep) on seed 0; the captions of the
    galleries with these elem_ids, in order."""
    page.fill("#erase-prompts textarea", "a photo of a cat")
    page.fill("#keep-prompts textarea", "a photo of a dog")
    page.fill("#seeds textarea", "0")
    page.click("#generate")
    page.wait_for_selector("#status :text('rows x')")
    return page.locator(", ".join(f"#{gallery} .caption-label" for gallery in galleries)).all_inner_texts()


def choose(page, elem_id: str, option: str):
    page.click(f"#{elem_id} input")
    page.locator(f"[role=option][aria-label={option!r}]").click()
    page.wait_for_function("([id, v]) => document.querySelector(`#${id} input`).value === v", arg=[elem_id, option])


def job_step(page) -> int:
    found = re.search(r"step (\d+) of", page.locator("#job-status").inner_text())
    return int(found[1]) if found else -1


def test_a_training_job_shows_progress_cancels_finishes_and_compares_while_another_session_generates(
        tiny_app, browser, shots):
    page, other = open_page(browser, tiny_app.url), open_page(browser, tiny_app.url)
    page.fill("#targets textarea", "cat")
    page.fill("#retain textarea", "dog")
    page.click("#erase")  # SPEED, the default method: the column to compare the trained edit with
    page.wait_for_selector("#edit-report :text('modules changed')")

    choose(page, "method", "esd-x")
    page.click("text=Advanced: method parameters")
    for name, value in (("iterations", "1000"), ("trajectories", "2"), ("sample_steps", "3"),
                        ("train_size", "32")):
        set_number(page, f"esd-x-{name}", value)
    assert not page.is_enabled("#cancel-training")
    page.click("#erase")
    page.wait_for_selector("#job-status :text('step')")
    page.wait_for_selector("#cancel-training:enabled")
    first = job_step(page)
    page.wait_for_function(f"() => /step (\\d+) of/.test(document.querySelector('#job-status').innerText) && "
                           f"+document.querySelector('#job-status').innerText.match(/step (\\d+) of/)[1] > {first}")
    page.screenshot(path=str(shots / "training.png"), full_page=True)

    # Another session generates while the job trains.
    set_target(other, "dog")
    other.fill("#erase-prompts textarea", "a photo of a dog")
    other.fill("#keep-prompts textarea", "")
    other.fill("#seeds textarea", "0")
    other.click("#generate")
    other.wait_for_selector("#status :text('rows x')")
    assert other.locator("#erase-gallery img").count() == 1
    assert "step" in page.locator("#job-status").inner_text()  # still training
    other.close()

    page.click("#cancel-training")
    page.wait_for_selector("#job-status :text('cancelled; nothing was kept')")
    page.wait_for_selector("#cancel-training:disabled")
    assert page.locator("#compared input[type=checkbox]").count() == 1  # only the SPEED edit

    set_number(page, "esd-x-iterations", "10")
    page.click("#erase")
    page.wait_for_selector("#job-status :text('done in')")
    labels = page.locator("#compared label").all_inner_texts()
    assert [label.strip() for label in labels] == ["#1 SPEED: cat", "#2 ESD-X: cat"]
    assert "Trained in" in page.locator("#edit-report").inner_text()

    captions = compare_cat_and_dog(page, "erase-gallery")
    assert [c.split(" · ")[0] for c in captions] == ["original", "#1 SPEED: cat", "#2 ESD-X: cat"], captions
    page.screenshot(path=str(shots / "trained-compared.png"), full_page=True)
    page.close()


def test_user_probes_an_erased_circle_and_reads_the_recovery_table_and_sheet(app, page, shots):
    """The Probe tab on the toy world: every probe on a UCE edit of 'circle', the way a user runs them."""
    from erasure.evaluation.probes import PROBE_TITLES, PROBES

    choose(page, "preset", "toy-circle")
    page.wait_for_function("() => document.querySelector('#targets textarea').value === 'circle'")
    choose(page, "method", "uce")
    page.click("#erase")
    page.wait_for_selector("#edit-report :text('modules changed')")

    page.get_by_role("tab", name="Probe").click()
    edit = page.locator("#probe-edits label:has-text('#1 UCE: circle') input[type=checkbox]")
    edit.check()
    names = page.locator("#probe-names input[type=checkbox]")
    assert names.count() == len(PROBES) and all(box.is_checked() for box in names.all())  # all, by default
    # An empty box would mean the same: the kind's templates with the edit's target.
    page.wait_for_function("() => document.querySelector('#probe-prompts textarea').value.includes('circle')")
    page.fill("#probe-seeds textarea", "0")
    assert not page.is_enabled("#cancel-probes")
    page.click("#run-probes")
    page.wait_for_selector("#cancel-probes:enabled", timeout=30_000)
    page.wait_for_selector("#probe-status :text('probe 1 of')")
    page.screenshot(path=str(shots / "probing.png"), full_page=True)
    page.wait_for_selector("#probe-status :text('done in')", timeout=600_000)
    page.wait_for_selector("#cancel-probes:disabled")

    titles = header_texts(page, "probe-table")
    assert titles == ["edit", *(PROBE_TITLES[name] for name in PROBES)]
    rows = page.locator("#probe-table [role=row]:has([role=gridcell])")
    assert rows.count() == 1
    cells = [c.strip() for c in rows.first.locator("[role=gridcell]").all_inner_texts()]
    assert cells[0] == "#1 UCE: circle" and all(cells), cells
    # The downloadable report holds what the table shows: each recovery rate, as a percentage of its images.
    link = page.locator("#probe-file a").get_attribute("href")
    with urllib.request.urlopen(link if link.startswith("http") else app.url.rstrip("/") + link, timeout=30) as file:
        report = json.loads(file.read())["edits"][0]
    assert report["label"] == "#1 UCE: circle" and report["judge"] == "toy judge" and report["seeds"] == [0]
    shown = dict(zip(titles[1:], cells[1:]))
    rated = {PROBE_TITLES[name]: result for name, result in report["probes"].items() if "recovery_rate" in result}
    unprobed = {title: f" (unprobed: {result['baseline_rate']:.0%})" if "baseline_rate" in result else ""
                for title, result in rated.items()}  # the adversarial prompt's own yardstick
    assert rated and all(shown[title].startswith(f"{result['recovery_rate']:.0%} ") and
                         shown[title].endswith(f"of {result['images']}{unprobed[title]}")
                         for title, result in rated.items()), shown
    assert shown[PROBE_TITLES["diagnostic"]] in ("avoidance", "destruction")
    assert page.locator("#probe-table").evaluate(BROKEN_WORDS) == []
    note = page.locator("#probe-note").inner_text()
    assert "Judge: toy judge" in note and "1 seed(s) (0)" in note and "Avoidance vs destruction" in note

    sheets = page.locator("#probe-sheets button:has(img)")
    captions = sheets.locator(".caption-label").all_inner_texts()
    assert captions[:2] == ["#1 UCE: circle · standard", "#1 UCE: circle · inpainting"], captions
    for sheet in sheets.all():  # each drawn whole, at its own size up to the page's width
        sheet.scroll_into_view_if_needed()
        natural, shown = sheet.locator("img").evaluate(
            "async e => { await e.decode(); return [e.naturalWidth, e.getBoundingClientRect().width] }")
        assert abs(shown - min(natural, page.locator("#probe-sheets").bounding_box()["width"])) < 40, (natural, shown)

    shot = shots / "probe.png"
    page.screenshot(path=str(shot), full_page=True)
    shutil.copyfile(shot, "/tmp/probe_tab.png")
    if os.environ.get("SCREENSHOT_TO"):  # beside the README's screenshot: screenshot-probe.png
        target = ROOT / os.environ["SCREENSHOT_TO"]
        shutil.copyfile(shot, target.with_name(f"{target.stem}-probe{target.suffix}"))


def test_user_erases_with_uce_on_sdxl_and_sees_the_comparison_grid(sdxl_app, browser, shots):
    """The same app, no SDXL-specific code in it: UCE on both encoders' rows, then original | edited."""
    page = open_page(browser, sdxl_app.url)
    choose(page, "method", "uce")
    page.wait_for_selector("#method-summary :text('Unified Concept Editing')")
    page.fill("#targets textarea", "cat")
    page.fill("#anchors textarea", "")
    page.fill("#retain textarea", "dog")
    page.click("#erase")
    page.wait_for_selector("#edit-report :text('modules changed')")
    page.click("#layers-accordion >> text=Per-layer statistics")
    layer_cells = page.locator("#layers [role=gridcell][data-col='0']")
    layer_cells.first.wait_for()
    names = [t.strip() for t in layer_cells.all_inner_texts()]
    assert any(n.endswith("attn2.to_k") for n in names) and any(n.endswith("attn2.to_v") for n in names), names

    captions = compare_cat_and_dog(page, "erase-gallery", "keep-gallery")
    assert [c.split(" · ")[0] for c in captions] == ["original", "#1 UCE: cat"] * 2, captions
    assert all(CAPTION.search(c) for c in captions), captions
    shown = gallery_images(page, sdxl_app, "erase-gallery")
    assert [image.size for image in shown.values()] == [(64, 64)] * 2  # tiny-sdxl's native size
    assert "Unified Concept Editing" in page.locator("#method-summary").inner_text()  # the method chosen, described
    page.screenshot(path=str(shots / "sdxl.png"), full_page=True)
    page.close()
