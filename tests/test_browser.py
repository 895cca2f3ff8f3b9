"""Opt-in: the LoRAtorio accordion driven in a real WebUI page by headless Chromium (pytest -m browser).

Needs a running A1111 or Forge with this extension (LORATORIO_WEBUI_URL), two LoRAs (LORATORIO_LORAS, default
"lora_a,lora_b"), Selenium (`pip install -r requirements-webui-test.txt`) and Debian's `chromium` and
`chromium-driver` (apt-get install chromium chromium-driver; LORATORIO_CHROMIUM / LORATORIO_CHROMEDRIVER override the
paths). Nothing downloads a browser. Skips cleanly when any of these is missing. With LORATORIO_SCREENSHOTS set to a
folder, the accordion (closed and open) and a result with weight maps are saved there (docs/ holds copies).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

URL = os.environ.get("LORATORIO_WEBUI_URL", "").rstrip("/")
LORAS = os.environ.get("LORATORIO_LORAS", "lora_a,lora_b").split(",")
CHROMIUM = os.environ.get("LORATORIO_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("LORATORIO_CHROMEDRIVER", "/usr/bin/chromedriver")
SHOTS = os.environ.get("LORATORIO_SCREENSHOTS", "")
# The flags keep Chromium off the network (this machine's closed network otherwise floods refused connections).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1600", "--hide-scrollbars")
GENERATE_TIMEOUT = 900

webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -r requirements-webui-test.txt")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not URL, reason="set LORATORIO_WEBUI_URL to a running WebUI"),
    pytest.mark.skipif(not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
                       reason="apt-get install chromium chromium-driver"),
]

PROMPT = f"a cat in a garden <lora:{LORAS[0]}:1> <lora:{LORAS[1]}:1>"


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="loratorio-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def downloads():
    folder = Path(tempfile.mkdtemp(prefix="loratorio-browser-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def css(driver, selector, timeout=120, visible=True):
    """The first element matching `selector`, waiting for it (and for it to be displayed)."""
    def found(d):
        for element in d.find_elements(By.CSS_SELECTOR, selector):
            if not visible or element.is_displayed():
                return element
        return False
    try:
        return WebDriverWait(driver, timeout).until(found)
    except TimeoutException:
        pytest.fail(f"no {'visible ' if visible else ''}element {selector!r} within {timeout}s")


def open_ui(driver):
    driver.get(URL + "/")
    css(driver, "#txt2img_prompt textarea", timeout=300)
    # Extensions' JavaScript (the InputAccordion's checkbox among it) runs on Gradio's "UI loaded" signal.
    WebDriverWait(driver, 120).until(lambda d: d.find_elements(By.ID, "loratorio_txt2img-visible-checkbox"))


def open_tab(driver, name):
    """Click a top-level tab button by its text ("txt2img", "img2img", "PNG Info")."""
    for button in driver.find_elements(By.CSS_SELECTOR, "#tabs > .tab-nav button, #tabs > div > .tab-nav button"):
        if button.text.strip() == name:
            button.click()
            return
    pytest.fail(f"no tab named {name!r}")


def set_number(driver, selector, value):
    """Type into a slider's or number field's number box, as a user does, and leave it."""
    box = css(driver, f"{selector} input[type=number]")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value))
    box.send_keys(Keys.TAB)
    WebDriverWait(driver, 10).until(lambda d: float(box.get_attribute("value")) == float(value))


def number(driver, selector):
    return float(css(driver, f"{selector} input[type=number]", visible=False).get_attribute("value"))


def ticked(driver, tab):
    return css(driver, f"#loratorio_{tab}-visible-checkbox", visible=False).is_selected()


def accordion_open(driver, tab):
    return "open" in css(driver, f"#loratorio_{tab} .label-wrap").get_attribute("class").split()


def expand_and_tick(driver, tab):
    """Open the accordion by its header; the InputAccordion ticks itself when opened (A1111's inputAccordion.js)."""
    header = css(driver, f"#loratorio_{tab} .label-wrap")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", header)
    header.click()
    WebDriverWait(driver, 10).until(lambda d: accordion_open(d, tab))
    if not ticked(driver, tab):
        css(driver, f"#loratorio_{tab}-visible-checkbox").click()
    WebDriverWait(driver, 10).until(lambda d: ticked(d, tab))


def set_prompt(driver, tab, text):
    box = css(driver, f"#{tab}_prompt textarea")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(text)


def generate(driver, tab):
    """Click Generate and wait for a new infotext under the gallery; returns (infotext, first image's URL)."""
    info = css(driver, f"#html_info_{tab}", visible=False)
    before = info.text
    css(driver, f"#{tab}_generate").click()
    try:
        WebDriverWait(driver, GENERATE_TIMEOUT, poll_frequency=2).until(
            lambda d: "Steps:" in info.text and info.text != before)
    except TimeoutException:
        pytest.fail(f"{tab}: no result within {GENERATE_TIMEOUT}s; log: {css(driver, f'#html_log_{tab}').text!r}")
    image = css(driver, f"#{tab}_gallery img")
    return info.text, image.get_attribute("src")


def params(infotext):
    """The 'Key: value' pairs of an infotext's last line (values may be quoted)."""
    last = infotext.strip().splitlines()[-1]
    return {k.strip(): v.strip().strip('"') for k, v in re.findall(r'\s*([\w \-/()]+): ("[^"]*"|[^,]*)(?:,|$)', last)}


def fetch(src, folder, name):
    """Download a gallery image as the page shows it (a /file= URL on the server, or a data: URL)."""
    path = folder / name
    if src.startswith("data:"):
        import base64

        path.write_bytes(base64.b64decode(src.split(",", 1)[1]))
        return path
    if not src.startswith("http"):
        src = urllib.parse.urljoin(URL + "/", src)
    with urllib.request.urlopen(src, timeout=60) as resp:
        path.write_bytes(resp.read())
    return path


def shot(element, name):
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        element.screenshot(str(Path(SHOTS) / name))


def png_info_send(driver, image_path, target):
    """PNG Info: load the image, wait for its parameters, then "Send to <target>"."""
    open_tab(driver, "PNG Info")
    upload = css(driver, "#pnginfo_image input[type=file]", visible=False)
    upload.send_keys(str(image_path))
    WebDriverWait(driver, 60).until(lambda d: "LoRAtorio" in css(d, "#tab_pnginfo").text)
    buttons = [b for b in driver.find_elements(By.CSS_SELECTOR, "#tab_pnginfo button")
               if b.is_displayed() and b.text.strip().lower() == f"send to {target}"]
    assert buttons, f"no 'Send to {target}' button in PNG Info"
    buttons[0].click()
    WebDriverWait(driver, 30).until(lambda d: ticked(d, target))


def small_run(driver, tab):
    """A fast, fixed generation: 64×64, 4 steps, fixed seed (img2img keeps the pasted size)."""
    if tab == "txt2img":
        set_number(driver, "#txt2img_width", 64)
        set_number(driver, "#txt2img_height", 64)
    set_number(driver, f"#{tab}_steps", 4)
    seed = css(driver, f"#{tab}_seed input")
    seed.send_keys(Keys.CONTROL, "a")
    seed.send_keys("1234")


def test_accordion_generate_and_restore_from_png_info(browser, downloads):
    driver = browser
    open_ui(driver)
    assert not ticked(driver, "txt2img") and not accordion_open(driver, "txt2img")
    shot(css(driver, "#loratorio_txt2img"), "accordion_closed.png")
    small_run(driver, "txt2img")
    expand_and_tick(driver, "txt2img")
    set_number(driver, "#loratorio_txt2img_patch_size", 4)
    set_number(driver, "#loratorio_txt2img_temperature", 0.2)
    shot(css(driver, "#loratorio_txt2img"), "accordion_open.png")
    set_prompt(driver, "txt2img", PROMPT)
    infotext, src = generate(driver, "txt2img")
    got = params(infotext)
    assert "LoRAtorio warning" not in got, got["LoRAtorio warning"]
    assert got["LoRAtorio patch size"] == "4" and got["LoRAtorio temperature"] == "0.2", got
    assert got["LoRAtorio mode"] == "loratorio" and got["Size"] == "64x64"
    image = fetch(src, downloads, "txt2img.png")

    # A fresh page holds the defaults (unticked, 8, 0.05): PNG Info must bring the run's values back.
    open_ui(driver)
    assert not ticked(driver, "txt2img") and number(driver, "#loratorio_txt2img_patch_size") == 8
    png_info_send(driver, image, "txt2img")
    assert ticked(driver, "txt2img")
    assert number(driver, "#loratorio_txt2img_patch_size") == 4
    assert number(driver, "#loratorio_txt2img_temperature") == 0.2

    # img2img: the same image and values sent there, then generated with a changed patch size and restored again.
    open_ui(driver)
    assert not ticked(driver, "img2img")
    png_info_send(driver, image, "img2img")
    assert number(driver, "#loratorio_img2img_patch_size") == 4
    assert number(driver, "#loratorio_img2img_temperature") == 0.2
    small_run(driver, "img2img")
    set_number(driver, "#loratorio_img2img_patch_size", 2)
    infotext, src = generate(driver, "img2img")
    got = params(infotext)
    assert "LoRAtorio warning" not in got, got["LoRAtorio warning"]
    assert got["LoRAtorio patch size"] == "2" and got["LoRAtorio temperature"] == "0.2", got
    image2 = fetch(src, downloads, "img2img.png")
    open_ui(driver)
    png_info_send(driver, image2, "img2img")
    assert number(driver, "#loratorio_img2img_patch_size") == 2
    assert number(driver, "#loratorio_img2img_temperature") == 0.2


def test_show_maps_adds_one_map_per_lora_to_the_gallery(browser):
    driver = browser
    open_ui(driver)
    small_run(driver, "txt2img")
    set_number(driver, "#txt2img_width", 128)
    set_number(driver, "#txt2img_height", 128)
    expand_and_tick(driver, "txt2img")
    set_number(driver, "#loratorio_txt2img_patch_size", 2)
    set_number(driver, "#loratorio_txt2img_temperature", 0.01)
    show_maps = css(driver, "#loratorio_txt2img_show_maps input[type=checkbox]")
    if not show_maps.is_selected():
        show_maps.click()
    set_prompt(driver, "txt2img", PROMPT)
    infotext, _ = generate(driver, "txt2img")
    assert "LoRAtorio warning" not in params(infotext)
    # Gradio 3's gallery renders its thumbnails twice (the preview strip and a grid, both "displayed" to Selenium):
    # one thumbnail per distinct image.
    def shown(d):
        items, seen = [], set()
        for e in d.find_elements(By.CSS_SELECTOR, "#txt2img_gallery .thumbnail-item"):
            src = next((i.get_attribute("src") for i in e.find_elements(By.TAG_NAME, "img")), None)
            if e.is_displayed() and src not in seen:
                seen.add(src)
                items.append(e)
        return items

    try:
        WebDriverWait(driver, 60).until(lambda d: len(shown(d)) == 3)
    except TimeoutException:
        shot(css(driver, "#txt2img_gallery"), "show_maps_failed.png")
        pytest.fail(f"expected the image and 2 weight maps; the gallery shows {len(shown(driver))} thumbnails; "
                    f"infotext: {infotext[-300:]!r}")
    shown(driver)[1].click()  # show the first LoRA's map large
    time.sleep(1)
    shot(css(driver, "#txt2img_gallery"), "show_maps.png")
