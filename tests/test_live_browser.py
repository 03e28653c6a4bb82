"""The page of `memflow live --serve` in a real headless Chromium: it plays the video as it is made, and a
prompt typed in its box becomes a segment of the session (and of its replay script)."""

from __future__ import annotations

import signal

import pytest
import yaml

from .cdp import find_chromium, headless_page
from .cli_helpers import TAE
from .live import start_live

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (.ci/run installs Debian's chromium)")

FRAME = "Number(document.getElementById('frame').textContent)"


def test_the_page_plays_the_session_and_its_prompt_box_steers_it(tmp_path):
    target = tmp_path / "live.mp4"
    process = start_live("--prompt", "a lighthouse at dusk", "-o", target, "--serve", "127.0.0.1:0", *TAE)  # the page
    try:
        assert process.stderr is not None
        url = None
        while url is None:
            line = process.stderr.readline()
            assert line or process.poll() is None, process.communicate()
            if line.startswith("watch and steer: "):
                url = line.split(": ", 1)[1].strip()
        with headless_page(CHROMIUM, tmp_path / "profile") as page:
            page.call("Page.enable")
            page.call("Page.navigate", url=url)
            # frames come and the counter the page keeps advances; the <img> has decoded them
            first = page.wait_for(f"{FRAME} > 0 && {FRAME}", timeout=120)
            page.wait_for(f"{FRAME} >= {first + 16}", timeout=120)
            assert page.evaluate("document.getElementById('screen').naturalWidth") == 96
            shots = [page.call("Page.captureScreenshot")["data"] for _ in range(2)]
            page.wait_for(f"{FRAME} >= {first + 32}", timeout=120)
            shots.append(page.call("Page.captureScreenshot")["data"])
            assert len(set(shots)) > 1  # the picture changes
            assert page.evaluate("document.getElementById('prompt').textContent") == "a lighthouse at dusk"
            # a prompt typed in the box and sent
            page.evaluate("document.getElementById('next').value = 'a whale breaches beyond the rocks';"
                          "document.querySelector('#send button').click(); true")  # fmt: skip
            said = page.wait_for("document.getElementById('said').textContent", timeout=30)
            assert said == "queued: a whale breaches beyond the rocks"
            page.wait_for("document.getElementById('timeline').textContent.includes('(page): a whale breaches')",
                          timeout=120)  # fmt: skip
            page.wait_for("document.getElementById('prompt').textContent === 'a whale breaches beyond the rocks'",
                          timeout=120)  # fmt: skip
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    story = yaml.safe_load(target.with_suffix(".yaml").read_text())
    prompts = [segment["prompt"] for segment in story["segments"]]
    assert prompts == ["a lighthouse at dusk", "a whale breaches beyond the rocks"]
    assert "page: a whale breaches beyond the rocks" in stderr
