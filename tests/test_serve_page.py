"""The page at ``/`` in a real headless Chromium: choose an image, see P(fake) and the overlay."""

from __future__ import annotations

import shutil

import pytest
from deploy_setup import live_server, one_thread

from deepfake_dist.options import ServeOptions

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.mark.parametrize("label, verdict", [("fake", "Likely FAKE"), ("real", "Likely REAL")])
def test_page_shows_probability_and_gradcam_overlay(deploy_run, deploy_shards, tmp_path, label, verdict):
    if not shutil.which(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    from deepfake_dist.serve.app import create_app

    image = max((deploy_shards[1] / label).glob("*.png"))
    with one_thread(), live_server(create_app(ServeOptions(checkpoint=deploy_run))) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function("document.getElementById('model').textContent.startsWith('model cnn')")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#result", state="visible", timeout=60_000)
            probability = float(page.inner_text("#probability"))
            assert 0.0 <= probability <= 1.0
            assert page.inner_text("#verdict") == verdict
            assert (probability >= 0.5) == (label == "fake")
            src = page.get_attribute("#overlay", "src")
            assert src.startswith("data:image/png;base64,")
            size = page.evaluate("() => { const i = document.getElementById('overlay');"
                                 " return [i.complete, i.naturalWidth, i.naturalHeight]; }")
            assert size == [True, 256, 256]  # the overlay decoded and rendered
            assert page.inner_text("#error") == ""
            page.screenshot(path=str(tmp_path / f"page-{label}.png"))
        finally:
            browser.close()
