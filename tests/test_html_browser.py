"""The contact sheet in a real browser: headless Chromium, driven through chromedriver.

A page made by ``blip2 caption --format html`` (tiny checkpoint, the example photos,
a bad file and a file named ``<script>alert(1)<b>.png``) is loaded from a file://
URL; the tests read the DOM (cards, folder groups, error card, thumbnails loaded,
escaping), type into the filter box with real key events, cut the page after a few
cards as an interrupted run would, and check that a screenshot is not blank.

Chromium and chromedriver are Debian's ``chromium`` and ``chromium-driver``, which
``.ci/run`` installs: on a machine without them these tests are skipped, in CI
(``CI`` set) they fail instead, so a missing browser cannot pass unseen.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blip2cli.cli import app

from browser import Browser, find_chromium

runner = CliRunner()
HOSTILE_NAME = "<script>alert(1)<b>.png"
HOSTILE_CAPTION = '</article><script>alert(2)</script><img src=x onerror="alert(3)">'
VISIBLE = "return [...document.querySelectorAll('.card')].filter(c => c.checkVisibility()).length"


@pytest.fixture(scope="module")
def browser():
    chromium, driver = find_chromium()
    if chromium is None or driver is None:
        missing = " and ".join(n for n, p in (("chromium", chromium), ("chromedriver", driver)) if p is None)
        reason = f"{missing} not installed (Debian: apt-get install chromium chromium-driver; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    b = Browser(chromium, driver)
    yield b
    b.close()


@pytest.fixture(scope="module")
def pages(tmp_path_factory, example_images, tiny_opt) -> dict:
    """The embedded page, the --html-links page, and the sheet of a hostile caption."""
    root = tmp_path_factory.mktemp("browser")
    photos = root / "photos"
    (photos / "more").mkdir(parents=True)
    for p in example_images:
        shutil.copy(p, photos / p.name)
    shutil.copy(example_images[0], photos / "more" / HOSTILE_NAME)
    (photos / "more" / "bad.jpg").write_bytes(b"<html>not an image</html>")
    common = ["caption", str(photos), "-m", str(tiny_opt), "--max-new-tokens", "4", "--num-beams", "1", "-q"]
    out = {}
    for name, extra in (("embedded", []), ("links", ["--html-links"])):
        path = root / f"{name}.html"
        result = runner.invoke(app, [*common, "-o", str(path), *extra])
        assert result.exit_code == 1, result.output  # bad.jpg failed, the rest went on
        out[name] = path
    records = root / "hostile.jsonl"
    records.write_text(json.dumps({"path": str(photos / "coffee.png"), "caption": HOSTILE_CAPTION,
                                   "captions": [HOSTILE_CAPTION], "error": None}) + "\n")
    result = runner.invoke(app, ["sheet", str(records), "-o", str(root / "hostile.html")])
    assert result.exit_code == 0, result.output
    out["hostile"] = root / "hostile.html"
    return out


def load(browser, path: Path) -> None:
    browser.open(path.as_uri())
    assert browser.run("return document.readyState") == "complete"


def set_filter(browser, text: str, expect: int) -> int:
    """Type like a person (clear with backspaces, then the keys), wait for the debounce."""
    current = browser.run("return document.getElementById('filter').value")
    browser.type("#filter", "\ue003" * len(current) + text)
    return browser.wait_for(f"var n = ({VISIBLE.replace('return ', '')}); return n === {expect} ? n : 0") or \
        browser.run(VISIBLE)


def test_page_shows_every_card_grouped_with_thumbnails(browser, pages):
    load(browser, pages["embedded"])
    info = browser.run("""
        const cards = [...document.querySelectorAll('.card')];
        return {
          cards: cards.length,
          visible: cards.filter(c => c.checkVisibility()).length,
          errors: [...document.querySelectorAll('.card.error .msg')].map(e => e.textContent),
          headings: [...document.querySelectorAll('.group h2')].map(h => h.textContent),
          images: [...document.querySelectorAll('.card img')].map(i => [i.src.slice(0, 23), i.complete, i.naturalWidth]),
          header: document.querySelector('header').textContent,
        };""")
    assert info["cards"] == info["visible"] == 6
    assert info["errors"] == ["not an image file (looks like HTML)"]
    photos = str(pages["embedded"].parent / "photos")
    assert info["headings"] == [f"{photos}/", f"{photos}/more/", f"{photos}/"]  # input order: more/ before rocket.jpg
    assert len(info["images"]) == 5
    assert all(src == "data:image/jpeg;base64," and done and width > 0 for src, done, width in info["images"])
    assert "float32" in info["header"] and "max_new_tokens=4" in info["header"]


def test_a_script_in_a_file_name_stays_text(browser, pages):
    load(browser, pages["embedded"])
    names = browser.run("return [...document.querySelectorAll('.card .name')].map(n => n.textContent)")
    assert HOSTILE_NAME in names
    assert browser.run("return document.scripts.length") == 1  # the page's own filter script
    assert browser.alert_text() is None


def test_a_script_in_a_caption_stays_text(browser, pages):
    load(browser, pages["hostile"])
    assert browser.run("return document.querySelector('.caption').textContent") == HOSTILE_CAPTION
    assert browser.run("return [document.scripts.length, document.querySelectorAll('img[src=\"x\"]').length, "
                       "document.querySelectorAll('.card').length]") == [1, 0, 1]
    assert browser.alert_text() is None


def test_filter_narrows_the_grid_and_clearing_restores_it(browser, pages):
    load(browser, pages["embedded"])
    assert set_filter(browser, "coffee", 1) == 1
    shown = "[...document.querySelectorAll('.card')].filter(c => c.checkVisibility())"
    assert browser.run(f"return {shown}.map(c => c.querySelector('.name').textContent)") == ["coffee.png"]
    # a folder whose cards are all hidden hides its heading too
    assert browser.run("return [...document.querySelectorAll('.group')].filter(g => g.checkVisibility()).length") == 1
    assert set_filter(browser, "MORE/", 2) == 2  # case-insensitive; the path counts
    assert set_filter(browser, "more/ image", 1) == 1  # every word must match: the error card
    assert set_filter(browser, "<script>", 1) == 1  # the query is text too
    assert set_filter(browser, 'no "such" thing\\', 0) == 0
    assert set_filter(browser, "", 6) == 6
    assert browser.run("return [...document.querySelectorAll('.group')].filter(g => g.checkVisibility()).length") == 3


def test_screenshot_is_not_blank(browser, pages, tmp_path):
    from PIL import Image, ImageStat

    load(browser, pages["embedded"])
    png = browser.screenshot()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.width >= 800 and image.height >= 500
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 1000, "too few colours: the page did not render"
    assert max(ImageStat.Stat(image).stddev) > 20
    # the thumbnails were painted: the cat's card holds many colours
    box = browser.run("const r = document.querySelector('.card img').getBoundingClientRect(); "
                      "return [r.left, r.top, r.right, r.bottom].map(Math.round)")
    assert len(image.crop(tuple(box)).getcolors(maxcolors=1 << 20)) > 500


def test_html_links_load_the_images_relative_to_the_page(browser, pages):
    load(browser, pages["links"])
    images = browser.wait_for("""
        const imgs = [...document.querySelectorAll('.card img')];
        return imgs.every(i => i.complete) && imgs.map(i => [i.getAttribute('src'), i.naturalWidth]);""")
    assert len(images) == 5
    assert all(not src.startswith(("data:", "/", "file:")) and width > 0 for src, width in images), images
    assert ["photos/more/%3Cscript%3Ealert%281%29%3Cb%3E.png" == src for src, _ in images].count(True) == 1


@pytest.mark.parametrize("k", [1, 4])
def test_a_page_cut_after_k_cards_shows_k_cards(browser, pages, tmp_path, k):
    """As a run interrupted after k images leaves it: no closing tags, no footer."""
    page = pages["embedded"].read_text()
    ends = [m.end() for m in re.finditer(r"</article>\n", page)]
    cut = tmp_path / "cut.html"
    cut.write_text(page[: ends[k - 1]])
    assert "</html>" not in cut.read_text()
    load(browser, cut)
    assert browser.run(VISIBLE) == k
    assert browser.run("return [...document.querySelectorAll('.card img')].every(i => i.naturalWidth > 0)")
    assert set_filter(browser, "chelsea", 1 if k >= 2 else 0) == (1 if k >= 2 else 0)  # the filter works there too
