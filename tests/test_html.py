"""The contact sheet without a browser: escaping, progressive writing, folder groups,
thumbnails from the model's decode, links, blip2 sheet over caption / ask / search
records, and JSON Lines left as it was. (tests/test_html_browser.py loads pages in
Chromium.)"""

from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.html import Sheet, Thumbnails, link_for, read_records
from blip2cli.decode import open_image
from blip2cli.images import Thumbnail, make_thumbnail, prepare
from blip2cli.imagespec import ImageSpec
from blip2cli.writers import HtmlWriter, Sink, make_writer

runner = CliRunner()
HOSTILE = '</article><script>alert(1)</script><img src=x onerror="alert(2)">'


def cards(page: str) -> list[str]:
    return re.findall(r"<article .*?</article>", page)


def caption(path, text, error=None):
    return {"path": str(path), "caption": text, "captions": [text] if text else [], "error": error}


# -- escaping ----------------------------------------------------------------------
def test_text_from_records_and_settings_is_escaped():
    sheet = Sheet(title="<b>t</b>", settings={"model": "<script>m</script>", "generation": {"p": '"<x>"'}})
    head = sheet.head()
    card = sheet.card([caption("a/<script>alert(1)<b>.jpg", HOSTILE)])
    assert "<script>m" not in head and "&lt;script&gt;m" in head and "<b>t</b>" not in head
    assert card.count("<script>") == 0 and "<img src=x" not in card
    assert "&lt;script&gt;alert(1)&lt;b&gt;.jpg" in card  # the file name, as text
    assert "&lt;/article&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in card
    # the data-text attribute is double-quoted and its quotes escaped
    attr = re.search(r'data-text="([^"]*)"', card).group(1)
    assert "&quot;alert(2)&quot;" in attr and attr == attr.lower()
    # the page's own script is the only one
    assert (head + card + sheet.tail()).count("<script>") == 1


def test_undecodable_file_name_bytes_keep_the_page_utf8():
    name = os.fsdecode(b"photos/caf\xe9.jpg")  # Latin-1 bytes: a surrogate escape in Python
    sheet = Sheet(title="t", links=True)
    text = sheet.card([caption(name, "x")])
    text.encode("utf-8")  # no lone surrogates left in the page
    assert "caf\ufffd.jpg" in text
    assert 'href="photos/caf%E9.jpg"' in text  # the link still names the real bytes


# -- progressive writing -------------------------------------------------------------
def test_page_grows_one_whole_card_per_record(tmp_path):
    out = tmp_path / "sheet.html"
    sink = Sink(str(out)).open()
    writer = make_writer("html", sink, None, settings={"model": "m", "dtype": "float32"}, command="caption", per_card=1)
    assert isinstance(writer, HtmlWriter)
    head = out.read_text()
    assert head.startswith("<!DOCTYPE html>") and "<h1>blip2 caption</h1>" in head and "float32" in head
    assert "<article" not in head
    for k in range(1, 4):
        writer.write(caption(f"photos/{k}.jpg", f"caption {k}"))
        page = out.read_text()
        assert len(cards(page)) == k and page.endswith("</article>\n") and "</html>" not in page
    writer.write(caption("photos/bad.jpg", None, "truncated JPEG file"))
    writer.close()
    sink.close()
    page = out.read_text()
    assert page.endswith("</html>\n") and len(cards(page)) == 4
    assert 'class="card error"' in page and "truncated JPEG file" in page
    assert "4 images, 1 failed" in page


def test_records_of_one_image_make_one_card():
    def ask(path, q, a):
        return {"path": path, "question": q, "answer": a, "answers": [a], "error": None}

    stream = io.StringIO()
    writer = HtmlWriter(stream, None, per_card=2)
    start = len(stream.getvalue())
    writer.write(ask("a.jpg", "what?", "a cat"))
    assert len(stream.getvalue()) == start  # waits for the image's second answer
    writer.write(ask("a.jpg", "where?", "on a sofa"))
    assert len(cards(stream.getvalue())) == 1  # written as soon as it is whole
    # without per_card, a card is written when the next image starts (blip2 sheet)
    stream = io.StringIO()
    writer = HtmlWriter(stream, None)
    for rec in (ask("a.jpg", "q1", "x"), ask("a.jpg", "q2", "y"), ask("b.jpg", "q1", "z")):
        writer.write(rec)
    assert len(cards(stream.getvalue())) == 1
    writer.close()
    page = stream.getvalue()
    assert len(cards(page)) == 2
    first = cards(page)[0]
    assert first.count("<dt>") == 2 and "q1" in first and "q2" in first


def test_chat_and_score_records_make_cards_too():
    sheet = Sheet(title="t")
    chat = sheet.card([{"turn": 1, "image": "a.jpg", "question": "what?", "answer": "a <cat>", "error": None}])
    assert "<dt>what?</dt><dd>a &lt;cat&gt;</dd>" in chat and 'data-text="a.jpg what? a &lt;cat&gt;"' in chat
    score = sheet.card([{"path": "a.jpg", "text": "a dog", "itm": 0.25, "itc": 0.5, "error": None}])
    assert "a dog" in score and "itm 0.2500 · itc 0.5000" in score


def test_a_heading_whenever_the_folder_changes():
    sheet = Sheet(title="t")
    page = "".join(sheet.card([caption(p, "c")]) for p in ("a/1.jpg", "a/2.jpg", "a/b/3.jpg", "4.jpg", "/5.jpg"))
    assert re.findall(r"<h2[^>]*>(.*?)</h2>", page) == ["a/", "a/b/", "./", "/"]
    assert page.count('<section class="group">') == 4 and page.count("</section>") == 3  # the last stays open
    ranked = Sheet(title="t", group=False)
    page = "".join(ranked.card([{"path": p, "rank": i, "score": 0.5}]) for i, p in enumerate(("a/1.jpg", "b/2.jpg")))
    assert "<h2" not in page and page.count("<section") == 1


def test_link_for_is_relative_to_the_page_and_percent_encoded(tmp_path):
    base = tmp_path / "out"
    assert link_for("-") is None
    assert link_for(str(tmp_path / "photos" / "a b#1?.jpg"), base=str(base)) == "../photos/a%20b%231%3F.jpg"
    assert link_for("x/é.jpg", root=str(tmp_path), base=str(tmp_path)) == "x/%C3%A9.jpg"
    # a file name that looks like a URL scheme stays a relative path
    assert link_for("javascript:alert(1)", base=".") == "javascript%3Aalert%281%29"


# -- thumbnails: from the model's decode ---------------------------------------------
def test_thumbnail_comes_with_the_model_input_which_is_unchanged(example_images):
    spec = ImageSpec()
    for path in example_images:
        arr, thumb = prepare(path, spec, thumbnail=160)
        assert (arr == prepare(path, spec)).all()
        assert isinstance(thumb, Thumbnail) and max(thumb.width, thumb.height) == 160
        w, h = open_image(path).size
        assert abs(thumb.width / thumb.height - w / h) < 0.02  # aspect kept, not squashed
        assert thumb.data_uri().startswith("data:image/jpeg;base64,")
        assert open_image(thumb.jpeg).size == (thumb.width, thumb.height)
        assert len(thumb.jpeg) < 12_000


@pytest.mark.parametrize("preprocess", ["fast", "reference"])
def test_image_stage_leaves_a_thumbnail_under_the_items_name(example_images, preprocess):
    from types import SimpleNamespace

    from blip2cli.images import ImageStage

    store = Thumbnails()
    stage = ImageStage(SimpleNamespace(image_spec=ImageSpec()), preprocess, store)
    plain = ImageStage(SimpleNamespace(image_spec=ImageSpec()), preprocess)
    path = example_images[1]
    got, expected = stage.prepare(path, key="photos/coffee.png"), plain.prepare(path, key="photos/coffee.png")
    if preprocess == "fast":
        assert (got == expected).all()  # the model's input is the same
    else:
        assert got.size == expected.size and got.tobytes() == expected.tobytes()
    assert len(store) == 1 and isinstance(store.take("photos/coffee.png"), Thumbnail)
    stage.prepare(path)  # no key (chat, embed): no thumbnail
    assert len(store) == 0


def test_small_images_are_not_enlarged():
    from PIL import Image

    thumb = make_thumbnail(Image.new("RGB", (40, 20), "red"))
    assert (thumb.width, thumb.height) == (40, 20)


# -- the commands --------------------------------------------------------------------
@pytest.fixture(scope="module")
def photos(tmp_path_factory, example_images) -> Path:
    root = tmp_path_factory.mktemp("sheet") / "photos"
    (root / "more").mkdir(parents=True)
    for p in example_images:
        shutil.copy(p, root / p.name)
    shutil.copy(example_images[0], root / "more" / "<script>alert(1)<b>.png")
    (root / "more" / "bad.jpg").write_bytes(b"not an image")
    return root


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def test_caption_html_page_and_jsonl_unchanged(photos, tiny_opt, tmp_path):
    page_path = tmp_path / "sheet.html"
    jsonl_path = tmp_path / "captions.jsonl"
    common = [photos, "-m", tiny_opt, "--max-new-tokens", "5", "--num-beams", "1", "-q"]
    html_run = run("caption", *common, "-o", page_path)  # format from the extension
    jsonl_run = run("caption", *common, "-o", jsonl_path)
    assert html_run.exit_code == jsonl_run.exit_code == 1, html_run.output  # bad.jpg
    page = page_path.read_text()
    records = [json.loads(line) for line in jsonl_path.read_text().splitlines()]
    assert len(cards(page)) == len(records) == 6
    assert page.count("data:image/jpeg;base64,") == 5 and page.count('class="card error"') == 1
    assert "<h1>blip2 caption</h1>" in page and str(tiny_opt) in page and "num_beams=1" in page
    # the captions on the page are the records' captions
    for record in records:
        if record["caption"]:
            assert f'<p class="caption">{html.escape(record["caption"])}</p>' in page
    # JSON Lines holds exactly the record, no thumbnail
    keys = {"path", "caption", "captions", "error", "model", "revision", "checkpoint", "dtype", "quantize", "preprocess", "generation"}
    assert all(set(r) == keys for r in records)
    assert page.endswith("</html>\n")


def test_caption_html_links(photos, tiny_opt, tmp_path):
    out = tmp_path / "pages" / "sheet.html"
    out.parent.mkdir()
    result = run("caption", photos, "-m", tiny_opt, "--max-new-tokens", "3", "-q", "-f", "html", "--html-links", "-o", out)
    assert result.exit_code == 1, result.output
    page = out.read_text()
    assert "data:image" not in page
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 5 and all(not s.startswith(("/", "file:")) for s in srcs)
    from urllib.parse import unquote

    for src in srcs:  # each link, followed from the page's folder, is the image
        assert (out.parent / unquote(src)).resolve().is_file(), src
    assert any("%3Cscript%3E" in s for s in srcs)


def test_html_links_needs_html(photos, tiny_opt):
    result = run("caption", photos, "-m", tiny_opt, "--html-links", "-f", "jsonl")
    assert result.exit_code == 2 and "--html-links applies to --format html" in result.output


def test_ask_html_one_card_per_image(photos, tiny_opt, tmp_path):
    out = tmp_path / "answers.html"
    result = run("ask", photos / "chelsea.png", photos / "coffee.png", "-q", "what is it?", "-q", "<i>where</i>?",
                 "-m", tiny_opt, "--max-new-tokens", "3", "--quiet", "-o", out)
    assert result.exit_code == 0, result.output
    page = out.read_text()
    found = cards(page)
    assert len(found) == 2 and all(c.count("<dt>") == 2 for c in found)
    assert "<dt>&lt;i&gt;where&lt;/i&gt;?</dt>" in page and "template" in page


def test_search_and_score_point_at_blip2_sheet(photos):
    result = run("score", photos / "chelsea.png", "a cat", "-o", "scores.html")
    assert result.exit_code == 2 and "blip2 sheet" in result.output


# -- blip2 sheet ----------------------------------------------------------------------
def write_jsonl(path: Path, records, tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def test_sheet_from_caption_records(photos, tmp_path):
    records = [caption(photos / "chelsea.png", "a cat"), caption(photos / "gone.jpg", "was here"),
               caption(photos / "more" / "bad.jpg", None, "not an image file")]
    for r in records:
        r.update(model="Salesforce/blip2-opt-2.7b", dtype="float16")
    src = write_jsonl(tmp_path / "captions.jsonl", records, tail='{"path": "torn')
    result = run("sheet", src, "-o", tmp_path / "sheet.html")
    assert result.exit_code == 0, result.output
    assert "3 images (1 failed, 1 images not found)" in result.output and "skipped 1 lines" in result.output
    page = (tmp_path / "sheet.html").read_text()
    found = cards(page)
    assert len(found) == 3 and page.count("data:image/jpeg") == 1
    assert 'class="card missing"' in found[1] and "no such file" in found[1] and "was here" in found[1]
    assert 'class="card error"' in found[2]
    assert "Salesforce/blip2-opt-2.7b" in page and "<title>captions.jsonl</title>" in page


def test_sheet_from_ask_records_on_stdin_with_links(photos, tmp_path, monkeypatch):
    monkeypatch.chdir(photos.parent)
    lines = "".join(json.dumps({"path": f"photos/{n}", "question": q, "answer": "x", "answers": ["x"], "error": None}) + "\n"
                    for n in ("chelsea.png", "coffee.png") for q in ("q1?", "q2?"))
    result = run("sheet", "-", "--html-links", "-o", "out.html", input=lines)
    assert result.exit_code == 0, result.output
    page = (photos.parent / "out.html").read_text()
    assert len(cards(page)) == 2 and "data:image" not in page
    assert re.findall(r'<img src="([^"]+)"', page) == ["photos/chelsea.png", "photos/coffee.png"]
    assert "answers, blip2 sheet" in page


def test_sheet_from_search_records_keeps_the_ranking(photos, tmp_path):
    hits = [{"rank": i + 1, "path": str(photos / n), "score": s, "itc": s, "itm": None}
            for i, (n, s) in enumerate([("rocket.jpg", 0.41), ("more/<script>alert(1)<b>.png", 0.3), ("coffee.png", 0.2)])]
    result = run("sheet", write_jsonl(tmp_path / "hits.jsonl", hits), "-o", tmp_path / "hits.html", "-q")
    assert result.exit_code == 0 and result.output == ""
    page = (tmp_path / "hits.html").read_text()
    found = cards(page)
    assert [re.search(r"#(\d+)", c).group(1) for c in found] == ["1", "2", "3"]
    assert "score 0.4100" in found[0] and "<h2" not in page and page.count("data:image/jpeg") == 3


def test_sheet_of_a_file_that_is_not_json_lines(tmp_path):
    src = tmp_path / "notes.txt"
    src.write_text("hello\nworld\n")
    result = run("sheet", src)
    assert result.exit_code == 2 and "holds no JSON Lines records" in result.output
    assert run("sheet", tmp_path / "nope.jsonl").exit_code == 2


def test_read_records_skips_records_without_a_path():
    fh = io.StringIO('{"text": "a cat", "embedding": []}\n\n{"image": "a.jpg", "question": "q"}\n[1]\n')
    bad = []
    assert [r.get("image") for r in read_records(fh, on_bad_line=bad.append)] == ["a.jpg"]
    assert bad == [4]


def test_thumbnails_store_hands_each_over_once():
    store = Thumbnails(size=96)
    store.put("a.jpg", "no such file")
    assert store.size == 96 and store.take("a.jpg") == "no such file" and store.take("a.jpg") is None


def test_sheet_tells_a_fifo_or_a_non_image_from_a_missing_image(photos, tmp_path):
    """Issue 19 (cosmetic): a FIFO or a text file named .jpg is there but is no image; only a
    path that does not exist is "not found"."""
    import os

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    records = [caption(fifo, "a pipe"), caption(text, "a text"), caption(tmp_path / "gone.jpg", "gone")]
    src = write_jsonl(tmp_path / "captions.jsonl", records)
    result = run("sheet", src, "-o", tmp_path / "sheet.html")
    assert result.exit_code == 0, result.output
    assert "3 images (1 images not found, 2 files not readable as images)" in result.output
    page = (tmp_path / "sheet.html").read_text()
    assert "not a regular file (a named pipe)" in page and "not an image file (looks like text)" in page
