"""The web page at ``/`` driven in headless Chromium: synthesise, save a voice, transcribe (upload and
microphone), convert, with a screenshot checked at the end. Skipped where Debian's chromium,
chromium-driver or selenium are missing (``apt-get install chromium chromium-driver``)."""

from __future__ import annotations

import os
import shutil
import struct
import time
from pathlib import Path

import pytest

import gpa
from gpa.server import ServerSettings, create_app
from gpa.server.runner import BackgroundServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
webdriver = pytest.importorskip("selenium.webdriver")
if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
    pytest.skip("needs Debian's chromium and chromium-driver", allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server(mini_dir, tmp_path_factory):
    model = gpa.load(mini_dir, device="cpu")
    settings = ServerSettings(model_name="gpa-mini", voices_dir=tmp_path_factory.mktemp("voices"))
    with BackgroundServer(create_app(model, settings)) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000", "--use-fake-ui-for-media-stream",
                 "--use-fake-device-for-media-stream", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def finish(driver, status_id: str, timeout: float = 90) -> str:
    """Wait for a card's status to say done (or fail with the error it shows)."""
    el = driver.find_element(By.ID, status_id)
    WebDriverWait(driver, timeout).until(lambda d: "done" in el.get_attribute("class")
                                         or "error" in el.get_attribute("class"))
    assert "error" not in el.get_attribute("class"), el.text
    return el.text


def fill(driver, element_id: str, value: str) -> None:
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(value)


def audio_bytes(driver, prefix: str) -> int:
    """Size of the blob behind the card's download link, once its <audio> has loaded it."""
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        f"const a = document.getElementById('{prefix}-audio'); return a.readyState >= 1 && a.duration > 0;"))
    link = driver.find_element(By.ID, f"{prefix}-download")
    assert link.get_attribute("href").startswith("blob:") and link.is_displayed()
    return driver.execute_async_script(
        "const done = arguments[arguments.length - 1]; fetch(document.getElementById(arguments[0] + '-download').href)"
        ".then(r => r.arrayBuffer()).then(b => done(b.byteLength));", prefix)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_page_synthesises_transcribes_and_converts(server, browser, golden_inputs, tmp_path):
    d = browser
    d.get(server.url + "/")
    WebDriverWait(d, 30).until(lambda d: "gpa-mini" in d.find_element(By.ID, "model-info").text)

    # TTS from an uploaded reference clip, then save that clip as a voice
    d.find_element(By.ID, "tts-ref").send_keys(str(golden_inputs["speech0_22k"]))
    fill(d, "tts-text", "Hello from the browser.")
    fill(d, "tts-seed", "0")
    d.find_element(By.CSS_SELECTOR, "#tts details summary").click()
    fill(d, "tts-max-tokens", "100")
    d.find_element(By.ID, "tts-go").click()
    finish(d, "tts-status")
    size = audio_bytes(d, "tts")
    assert size > 44
    assert d.find_element(By.ID, "tts-download").get_attribute("download") == "speech.wav"
    plain_url = d.find_element(By.ID, "tts-download").get_attribute("href")
    d.find_element(By.ID, "tts-stream").click()  # the same request streamed: played as PCM arrives
    d.find_element(By.ID, "tts-go").click()
    finish(d, "tts-status")
    assert d.find_element(By.ID, "tts-download").get_attribute("href") != plain_url
    assert audio_bytes(d, "tts") == size  # the streamed samples, saved as WAV
    d.find_element(By.ID, "tts-stream").click()
    fill(d, "voice-name", "browser-voice")
    d.find_element(By.ID, "voice-save").click()
    finish(d, "tts-status")
    WebDriverWait(d, 10).until(lambda d: "browser-voice" in d.find_element(By.ID, "voices-list").text)
    assert Select(d.find_element(By.ID, "tts-voice")).first_selected_option.text == "browser-voice"
    d.find_element(By.ID, "tts-go").click()  # now with the saved voice
    finish(d, "tts-status")

    # ASR of an uploaded file, then of a microphone recording (Chromium's fake device)
    d.find_element(By.ID, "asr-file").send_keys(str(golden_inputs["speech1_22k"]))
    fill(d, "asr-max-tokens", "12")
    d.find_element(By.ID, "asr-go").click()
    finish(d, "asr-status")
    assert d.find_element(By.ID, "asr-output").text.strip()
    Select(d.find_element(By.ID, "asr-format")).select_by_visible_text("srt")
    d.find_element(By.ID, "asr-record").click()
    time.sleep(1.5)
    d.find_element(By.ID, "asr-record").click()
    assert "recording ready" in finish(d, "asr-status", 30)
    d.find_element(By.ID, "asr-go").click()
    finish(d, "asr-status")
    assert " --> " in d.find_element(By.ID, "asr-output").text

    # VC into the saved voice
    d.find_element(By.ID, "vc-file").send_keys(str(golden_inputs["speech1_8k"]))
    Select(d.find_element(By.ID, "vc-voice")).select_by_visible_text("browser-voice")
    d.find_element(By.CSS_SELECTOR, "#vc details summary").click()
    fill(d, "vc-seed", "1")
    fill(d, "vc-max-tokens", "80")
    d.find_element(By.ID, "vc-go").click()
    finish(d, "vc-status")
    assert audio_bytes(d, "vc") > 44

    shot = tmp_path / "page.png"
    assert d.save_screenshot(str(shot))
    width, height = png_size(shot)
    assert width >= 1000 and height >= 600 and shot.stat().st_size > 20_000  # a rendered page, not a blank one
    if os.environ.get("GPA_TEST_ARTIFACTS"):
        shutil.copy(shot, Path(os.environ["GPA_TEST_ARTIFACTS"]) / "page.png")
    severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
