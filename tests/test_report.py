"""The evaluation report holds every section for every model, and every picture in it loads in
a real headless Chromium (Debian's ``chromium`` package driven by playwright)."""

import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from deepfake_dist.evaluation.report import SECTIONS

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PER_RUN_FIGURES = ("confusion", "reliability", "curves", "gradcam", "features")


def test_report_has_every_section_and_its_pictures(evaluated):
    out = evaluated["out"]
    md = (out / "report.md").read_text()
    html = (out / "index.html").read_text()
    headings = re.findall(r"^#+ (.+)$", md, flags=re.MULTILINE)
    for section in SECTIONS:
        assert section in headings, section
    per_run = ("Metrics", "Per source", "Calibration", "Robustness", "Training curves", "Grad-CAM", "Feature maps",
               "Model card")
    for section in per_run:
        assert headings.count(section) == 2, section  # one per detector
        assert html.count(f"<h3>{section}</h3>") == 2, section
    assert "pytest evaluated" in md and "pytest evaluated" in html  # the command that made it
    assert "Not drawn" not in md and "Not measured" not in md
    # the model card names the training data by manifest id and holds the config
    for row in evaluated["rows"]:
        assert f"{row['params']:,}" in md
    assert md.count("| faces | ") == 0 and "manifest id" in md and "model:\n  args:" in md
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    expected = {"roc.png", "pr.png"} | {f"{f}-{r['run']}.png" for f in PER_RUN_FIGURES for r in evaluated["rows"]}
    assert set(images) == expected
    for name in images:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) > 100
    assert html.count("<img ") == len(images) and "src=\"data:image/png;base64," in html


def test_report_renders_with_all_images_in_headless_chromium(evaluated, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    page_file = tmp_path / "index.html"  # alone: the page must not need the PNGs beside it
    shutil.copy(evaluated["out"] / "index.html", page_file)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(page_file.as_uri())
            page.wait_for_load_state("load")
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
            headings = page.eval_on_selector_all("h2, h3", "hs => hs.map(h => h.textContent)")
        finally:
            browser.close()
    assert len(widths) == 2 + len(PER_RUN_FIGURES) * len(evaluated["rows"])
    assert all(w > 0 for w in widths), widths
    assert "Comparison" in headings and headings.count("Grad-CAM") == 2
