"""The contact sheet: one self-contained HTML page of thumbnails and their text.

``Sheet`` formats the page in pieces -- the head (styles, the filter script and
the run's settings), one card per image, the closing tags -- so that
``writers.HtmlWriter`` can write it progressively: each card is written and
flushed whole, and a page cut after any card is still a page a browser shows
(browsers close what an unterminated document leaves open; nothing is hidden
until a script at the end runs).

* Thumbnails: small JPEGs (``images.make_thumbnail``) embedded as data URIs, made
  where the image is decoded for the model and handed over through a
  ``Thumbnails`` store keyed by the record's path (never part of a record, so
  JSON Lines / CSV / text output is unchanged); or, with ``links``, an ``<img>``
  linked relative to the page's folder.
* Cards are grouped by folder: a heading whenever the folder changes (inputs come
  folder by folder, in the resolver's order).
* The filter box rewrites one ``<style>`` rule per (debounced) keystroke: every card
  carries its lower-cased text in ``data-text``, and the rule hides the cards whose
  text lacks a word of the query (``[data-text*="word"]``). No script walks the
  cards; the browser's selector matching does the work, and a CSS counter shows how
  many cards are visible. With ``content-visibility: auto`` and lazy images, the
  browser lays out and paints only the cards on screen: 10,000 cards stay usable.
* Everything from a record or the settings is escaped (``html.escape``, attributes
  double-quoted): a ``<script>`` in a caption or a file name stays text.

``render_records`` builds the same page from existing JSON Lines records
(``blip2 sheet``), decoding each image for its thumbnail in a thread pool.

Light at import time (stdlib only): Pillow comes in through ``images`` when a
thumbnail is made.
"""

from __future__ import annotations

import html as _html
import json
import os
import threading
import time
from collections import deque
from typing import IO, Iterable, Iterator
from urllib.parse import quote

from . import __version__
from .images import THUMBNAIL_SIZE  # images imports nothing heavy at module level
from .tasks import settings_keys

# The settings a record carries (job._Recorded adds them), in header order: every
# task's, from the task registry (features and pool too).
SETTINGS_KEYS = settings_keys()


def esc(value: object) -> str:
    """Text for HTML content and double-quoted attributes. Undecodable bytes of a file
    name (surrogate escapes) become U+FFFD, so the page stays valid UTF-8."""
    text = "" if value is None else str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return _html.escape(text, quote=True)


def record_path(record: dict) -> str:
    """The image a record is about: ``path`` (caption, ask, search), ``image`` (chat)."""
    path = record.get("path")
    if path is None:
        path = record.get("image")
    return "" if path is None else str(path)


class Thumbnails:
    """Thumbnails waiting for their card: made in the decode threads, taken by the writer.

    A value is an ``images.Thumbnail``, ``None`` (no preview could be made) or a
    string: why there is no image to show (``blip2 sheet``: "no such file").
    Entries live from an image's decode to its record being written, so at most
    about two batches are held."""

    def __init__(self, size: int = THUMBNAIL_SIZE):
        self.size = size
        self._lock = threading.Lock()
        self._items: dict[str, object] = {}

    def put(self, key: str, value) -> None:
        with self._lock:
            self._items[key] = value

    def take(self, key: str):
        with self._lock:
            return self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


def link_for(path: str, *, root: str = ".", base: str = ".") -> str | None:
    """The URL of the image ``path`` (relative to ``root``) from a page in the folder
    ``base``: a relative, percent-encoded path; None for image bytes from stdin."""
    if not path or path == "-":
        return None
    target = os.path.abspath(os.path.join(root, path))
    try:
        rel = os.path.relpath(target, os.path.abspath(base))
    except ValueError:  # another drive (Windows): only an absolute URL reaches it
        from pathlib import Path

        return Path(target).as_uri()
    return quote(os.fsencode(rel.replace(os.sep, "/")), safe="/")


STYLE = """
:root{color-scheme:light;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;background:#f3f4f6}
body{margin:0}
header{position:sticky;top:0;z-index:1;background:#fff;border-bottom:1px solid #d0d7de;padding:.6em 9em .6em 1em}
header h1{font-size:1.05em;margin:0 1em .2em 0;display:inline-block}
header .sub{color:#59636e;font-size:.9em}
header dl{display:flex;flex-wrap:wrap;gap:0 1.2em;margin:.2em 0 .4em;font-size:.82em;color:#59636e}
header dl div{display:flex;gap:.3em}
header dt{font-weight:600}
header dd{margin:0;overflow-wrap:anywhere}
#filter{font:inherit;width:min(32em,100%);padding:.35em .6em;border:1px solid #8c959f;border-radius:6px;box-sizing:border-box}
main{counter-reset:shown;padding:0 1em 3em}
main::after{content:counter(shown) " shown";position:fixed;top:.8em;right:1em;z-index:2;font-size:.85em;color:#59636e}
.group h2{font-size:.92em;font-weight:600;color:#59636e;margin:1.3em 0 .5em;overflow-wrap:anywhere}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(176px,1fr));gap:.8em}
.card{counter-increment:shown;background:#fff;border-radius:6px;box-shadow:0 1px 2px rgba(0,0,0,.12);overflow:hidden}
.card .in{content-visibility:auto;contain-intrinsic-block-size:auto 250px}
.thumb{display:flex;align-items:center;justify-content:center;height:170px;background:#e6e8eb}
.thumb img{max-width:100%;max-height:170px}
.thumb.none{color:#59636e;font-size:.85em;text-align:center;padding:0 .8em}
.text{padding:.45em .6em .6em;overflow-wrap:anywhere}
.name{font-size:.78em;color:#59636e;margin-bottom:.2em}
.text p,.text ol,.text dl{margin:.15em 0}
.text ol{padding-left:1.3em;color:#424a53}
.text dt{font-size:.85em;color:#59636e}
.text dd{margin:0 0 .3em}
.card.error{box-shadow:0 0 0 2px #cf222e}
.card.error .thumb{background:#ffebe9;color:#a40e26}
.msg{color:#a40e26}
.card.missing .thumb{background:#fff8c5;color:#7d4e00}
.score{font-variant-numeric:tabular-nums}
footer{color:#59636e;font-size:.85em;padding:0 1em 2em}
"""

# The filter: one rule in #filter-rule per keystroke (debounced), matched by the browser.
# In the head, listening on the document, so it works before (and without) the end of
# the page: a page cut short by an interrupted run filters too.
SCRIPT = """
(function () {
  var timer = 0;
  function apply(query) {
    var words = query.toLowerCase().split(/\\s+/).filter(Boolean);
    var has = words.map(function (w) { return '[data-text*="' + CSS.escape(w) + '"]'; }).join('');
    document.getElementById('filter-rule').textContent = has
      ? '.card:not(' + has + '),.group:not(:has(.card' + has + ')){display:none}' : '';
  }
  function changed(e) {
    if (!e.target || e.target.id !== 'filter') return;
    var query = e.target.value;
    clearTimeout(timer);
    timer = setTimeout(function () { apply(query); }, 60);
  }
  document.addEventListener('input', changed);
  document.addEventListener('change', changed);
  document.addEventListener('keydown', function (e) {
    var box = document.getElementById('filter');
    if (e.key === '/' && box && document.activeElement !== box) { e.preventDefault(); box.focus(); }
  });
  window.addEventListener('pageshow', function () {  // a query the browser restored
    var box = document.getElementById('filter');
    if (box && box.value) apply(box.value);
  });
})();
"""


def _format_setting(value) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in value.items())
    return str(value)


class Sheet:
    """The page in pieces: ``head()``, ``card(records)`` for each image, ``tail()``."""

    def __init__(
        self,
        *,
        title: str,
        subtitle: str = "",
        settings: dict | None = None,
        thumbnails: Thumbnails | None = None,
        links: bool = False,
        root: str = ".",
        base: str = ".",
        group: bool = True,
    ):
        self.title = title
        self.subtitle = subtitle
        self.settings = settings or {}
        self.thumbnails = thumbnails
        self.links = links
        self.root = root
        self.base = base
        self.group = group
        self.cards = 0
        self.errors = 0
        self.missing = 0  # blip2 sheet: records whose image is gone
        self.unreadable = 0  # blip2 sheet: records whose image is there but no image (a FIFO, a text file)
        self._folder: str | None = None  # the open group's folder

    # -- the head: everything a browser needs before the first card ------------
    def head(self) -> str:
        rows = []
        for key in SETTINGS_KEYS:
            value = self.settings.get(key)
            if value is None or value == {}:
                continue
            rows.append(f"<div><dt>{esc(key)}</dt><dd>{esc(_format_setting(value))}</dd></div>")
        when = time.strftime("%Y-%m-%d %H:%M")
        sub = f'<span class="sub">{esc(self.subtitle)}</span>' if self.subtitle else ""
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<meta name="generator" content="blip2 {esc(__version__)}">\n'
            f"<title>{esc(self.title)}</title>\n"
            f"<style>{STYLE}</style>\n"
            '<style id="filter-rule"></style>\n'
            f"<script>{SCRIPT}</script>\n"
            "</head>\n<body>\n<header>\n"
            f"<h1>{esc(self.title)}</h1>{sub}\n"
            f'<dl class="settings">{"".join(rows)}<div><dt>written</dt><dd>{esc(when)}</dd></div></dl>\n'
            '<input id="filter" type="search" placeholder="Filter by words in the path or text (press /)" '
            'aria-label="Filter" autocomplete="off">\n'
            "</header>\n<main>\n"
        )

    # -- one card: the records of one image ------------------------------------
    def card(self, records: list[dict]) -> str:
        first = records[0]
        path = record_path(first)
        error = next((r.get("error") for r in records if r.get("error")), None)
        thumb = self.thumbnails.take(path) if self.thumbnails is not None else None
        link = link_for(path, root=self.root, base=self.base)
        self.cards += 1
        classes = "card"
        if error:
            self.errors += 1
            classes += " error"
            picture = '<div class="thumb none">could not read this image</div>'
        elif isinstance(thumb, str):  # blip2 sheet: the image is gone, or is no image
            if os.path.lexists(path):
                self.unreadable += 1
            else:
                self.missing += 1
            classes += " missing"
            picture = f'<div class="thumb none">{esc(thumb)}</div>'
        elif self.links and link is not None:
            picture = f'<a class="thumb" href="{esc(link)}"><img src="{esc(link)}" alt="" loading="lazy" decoding="async"></a>'
        elif thumb is not None:
            img = (f'<img src="{thumb.data_uri()}" width="{thumb.width}" height="{thumb.height}" alt="" '
                   'loading="lazy" decoding="async">')
            picture = f'<a class="thumb" href="{esc(link)}">{img}</a>' if link else f'<div class="thumb">{img}</div>'
        else:
            picture = '<div class="thumb none">no preview</div>'
        body, words = _body(records, error)
        name = os.path.basename(path) if self.group else path
        text = " ".join(" ".join([path, *words]).split()).lower()
        out = []
        folder = _folder_of(path) if self.group else ""
        if self._folder is None or folder != self._folder:
            if self._folder is not None:
                out.append("</div></section>\n")
            heading = f'<h2 title="{esc(folder)}">{esc(folder)}</h2>' if self.group else ""
            out.append(f'<section class="group">{heading}<div class="grid">\n')
            self._folder = folder
        out.append(
            f'<article class="{classes}" data-text="{esc(text)}"><div class="in">{picture}'
            f'<div class="text"><div class="name" title="{esc(path)}">{esc(name or "-")}</div>{body}</div>'
            "</div></article>\n"
        )
        return "".join(out)

    def tail(self) -> str:
        close = "</div></section>\n" if self._folder is not None else ""
        empty = "<p>No images.</p>\n" if not self.cards else ""
        failed = f", {self.errors} failed" if self.errors else ""
        return (
            f"{close}{empty}</main>\n"
            f"<footer>{self.cards} images{failed}. Written by blip2 {esc(__version__)}.</footer>\n"
            "</body>\n</html>\n"
        )


def _folder_of(path: str) -> str:
    if path == "-":
        return "standard input"
    folder = os.path.dirname(path)
    if not folder:
        return "./"
    return folder if folder.endswith(("/", os.sep)) else folder + "/"


def _body(records: list[dict], error: str | None) -> tuple[str, list[str]]:
    """The card's text as HTML, and its words for the filter."""
    if error:
        return f'<p class="msg">{esc(error)}</p>', ["error", error]
    parts: list[str] = []
    words: list[str] = []
    qa: list[str] = []
    for r in records:
        if r.get("question") is not None:  # ask, chat
            answers = r.get("answers") or ([r["answer"]] if r.get("answer") is not None else [])
            more = "".join(f"<br><small>{esc(a)}</small>" for a in answers[1:])
            qa.append(f"<dt>{esc(r['question'])}</dt><dd>{esc(answers[0] if answers else '')}{more}</dd>")
            words += [str(r["question"]), *map(str, answers)]
        elif "captions" in r or "caption" in r:  # caption
            captions = r.get("captions") or ([r["caption"]] if r.get("caption") is not None else [])
            if captions:
                parts.append(f'<p class="caption">{esc(captions[0])}</p>')
            if len(captions) > 1:
                parts.append("<ol start=\"2\">" + "".join(f"<li>{esc(c)}</li>" for c in captions[1:]) + "</ol>")
            words += map(str, captions)
        elif "score" in r:  # search
            rank = f"#{esc(r['rank'])} · " if r.get("rank") is not None else ""
            extra = "".join(
                f" · {k} {_number(r[k])}" for k in ("itc", "itm") if r.get(k) is not None and r[k] != r["score"]
            )
            parts.append(f'<p class="score">{rank}score {_number(r["score"])}{extra}</p>')
        elif r.get("text") is not None:  # score
            parts.append(f'<p class="caption">{esc(r["text"])}</p>'
                         f'<p class="score">itm {_number(r.get("itm"))} · itc {_number(r.get("itc"))}</p>')
            words.append(str(r["text"]))
    if qa:
        parts.append(f'<dl class="qa">{"".join(qa)}</dl>')
    return "".join(parts), words


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return esc(value)


# -- blip2 sheet: the page from JSON Lines records ------------------------------
def read_records(fh: IO[str], *, on_bad_line=None) -> Iterator[dict]:
    """Records of a JSON Lines file, in order. A line that is not a JSON object (a
    torn last line, a stray message) is skipped and told to ``on_bad_line(number)``;
    a record without a path (``blip2 embed --text``) is skipped silently."""
    for number, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if on_bad_line is not None:
                on_bad_line(number)
            continue
        if record_path(record):
            yield record


def settings_of(record: dict) -> dict:
    return {k: record[k] for k in SETTINGS_KEYS if record.get(k) is not None}


def kind_of(record: dict) -> str:
    """What a contact sheet calls records like this one: the kind of the task that makes
    them (``tasks.TASKS``)."""
    from .tasks import task_of

    task = task_of(record)
    return task.kind if task is not None else "records"


def _sheet_thumbnail(path: str, size: int):
    """Decode one image for ``blip2 sheet``: a Thumbnail, or the reason there is none."""
    from .decode import ImageError, open_image
    from .images import make_thumbnail

    try:
        return make_thumbnail(open_image(path, draft_size=(size, size)), size)
    except ImageError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad image must not end the sheet
        return f"cannot read this image ({type(exc).__name__})"


def render_records(
    records: Iterable[dict],
    writer,
    thumbnails: Thumbnails,
    *,
    root: str = ".",
    links: bool = False,
    workers: int = 4,
) -> int:
    """Write ``records`` through the html ``writer``, each image's thumbnail decoded in a
    thread pool kept a few images ahead (with ``links``, only checked to exist).
    Returns the number of records written."""
    from .workers import DecodePool

    lookahead = max(8, workers * 4)
    pending: deque = deque()
    written = 0
    last = None

    def drain(keep: int) -> None:
        nonlocal written
        while len(pending) > keep:
            record, path, future = pending.popleft()
            if future is not None:
                thumbnails.put(path, future.result())
            writer.write(record)
            written += 1

    # Daemon threads, never waited for: a read stuck on a slow file system cannot keep an
    # interrupted ``blip2 sheet`` alive (a ThreadPoolExecutor joins its threads at exit).
    pool = DecodePool(workers, name="blip2-sheet")
    try:
        for record in records:
            path = record_path(record)
            future = None
            if path != last and path != "-" and not record.get("error"):
                target = os.path.join(root, path)
                if links:
                    if not os.path.exists(target):
                        thumbnails.put(path, "no such file")
                else:
                    future = pool.submit(_sheet_thumbnail, target, thumbnails.size)
            last = path
            pending.append((record, path, future))
            drain(lookahead)
        drain(0)
    finally:
        for _, _, future in pending:
            if future is not None:
                future.cancel()
        pool.shutdown()
    return written
