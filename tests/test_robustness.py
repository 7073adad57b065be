"""Folder tagging that survives anything: sidecars, resume, bad input, interruption.

Everything runs through the CLI as a user types it, on the tiny OPT checkpoint.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image


from helpers import FAST, cli, jsonl


IMAGES = ["chelsea.png", "coffee.png", "sub/astronaut.png", "sub/rocket.jpg"]


# -- sidecars ------------------------------------------------------------------
def test_sidecar_beside_each_image_equals_the_caption(tiny_opt, photos):
    res = cli("caption", photos, "--model", tiny_opt, "--sidecar", "-f", "jsonl", *FAST)
    assert res.exit_code == 0, res.output
    records = jsonl(res.stdout)
    assert [os.path.relpath(r["path"], photos) for r in records] == IMAGES
    for r in records:
        side = Path(r["path"]).with_suffix(".txt")
        assert r["sidecar"] == str(side)
        assert side.read_text() == r["caption"] + "\n"
    assert not list(photos.rglob("*.tmp")) and not list(photos.rglob(".*"))  # no temp files left


def test_sidecar_ext_and_output_dir_mirror_the_tree(tiny_opt, photos, tmp_path):
    out = tmp_path / "captions"
    res = cli("caption", photos, "--model", tiny_opt, "--output-dir", out, "--sidecar-ext", "caption", *FAST)
    assert res.exit_code == 0, res.output
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(str(Path(i).with_suffix(".caption")) for i in IMAGES)
    assert not list(photos.rglob("*.caption"))  # nothing beside the images


def test_existing_policies(tiny_opt, photos):
    side = photos / "chelsea.txt"
    side.write_text("keep me\n")
    res = cli("caption", photos / "chelsea.png", photos / "coffee.png", "--model", tiny_opt, "--sidecar",
              "-f", "jsonl", *FAST)
    assert res.exit_code == 0
    assert side.read_text() == "keep me\n"  # default skip: never destroyed
    assert [Path(r["path"]).name for r in jsonl(res.stdout)] == ["coffee.png"]  # not even captioned
    assert "skipped 1 images whose sidecar already exists" in res.stderr
    caption = (photos / "coffee.txt").read_text().strip()

    res = cli("caption", photos / "chelsea.png", "--model", tiny_opt, "--sidecar", "--existing", "append", *FAST,
              "-f", "jsonl")
    new = jsonl(res.stdout)[0]["caption"]
    assert side.read_text() == f"keep me, {new}\n"
    res = cli("caption", photos / "chelsea.png", "--model", tiny_opt, "--sidecar", "--existing", "prepend", *FAST,
              "--separator", " | ")
    assert side.read_text() == f"{new} | keep me, {new}\n"
    res = cli("caption", photos / "coffee.png", "--model", tiny_opt, "--sidecar", "--existing", "overwrite", *FAST,
              "--prefix", "sks photo, ", "--suffix", ", 4k")
    assert (photos / "coffee.txt").read_text() == f"sks photo, {caption}, 4k\n"


def test_dry_run_lists_and_writes_nothing_without_loading(tiny_opt, photos, monkeypatch):
    (photos / "chelsea.txt").write_text("old\n")

    def no_load(*a, **k):
        raise AssertionError("--dry-run must not load the model")

    monkeypatch.setattr("blip2cli.loader.load", no_load)
    res = cli("caption", photos, "--model", tiny_opt, "--sidecar", "--dry-run")
    assert res.exit_code == 0, res.output
    lines = [l.split("\t") for l in res.stdout.splitlines()]
    assert lines[0] == ["skip", str(photos / "chelsea.txt"), str(photos / "chelsea.png")]
    assert [l[0] for l in lines[1:]] == ["write"] * 3
    assert sorted(p.name for p in photos.rglob("*.txt")) == ["chelsea.txt"]


def test_sidecar_collisions_and_impossible_sidecars_are_error_records(tiny_opt, photos, example_images):
    shutil.copy(example_images[0], photos / "coffee.jpg")  # coffee.png and coffee.jpg -> coffee.txt
    named_txt = photos / "note.txt"
    shutil.copy(example_images[1], named_txt)  # an image whose sidecar would be itself
    res = cli("caption", photos / "coffee.png", photos / "coffee.jpg", named_txt, "--model", tiny_opt,
              "--sidecar", "-f", "jsonl", *FAST)
    assert res.exit_code == 1
    recs = jsonl(res.stdout)
    assert recs[0]["error"] is None
    assert "also the sidecar of" in recs[1]["error"]
    assert "would be the image itself" in recs[2]["error"]
    assert named_txt.read_bytes() == example_images[1].read_bytes()


def test_sidecar_never_lands_outside_the_output_dir(tiny_opt, photos, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.chdir(photos / "sub")
    escape = os.path.join("..", "..", "photos", "chelsea.png")  # a path that climbs out of the cwd
    res = cli("caption", escape, "--model", tiny_opt, "--output-dir", out, "-f", "jsonl", *FAST)
    assert res.exit_code == 0, res.output
    rec = jsonl(res.stdout)[0]
    assert Path(rec["sidecar"]).resolve().parent == out.resolve()
    assert not (tmp_path / "chelsea.txt").exists()


def test_sidecar_options_without_sidecar_are_usage_errors(tiny_opt, photos):
    res = cli("caption", photos, "--model", tiny_opt, "--prefix", "sks ")
    assert res.exit_code == 2 and "--sidecar" in res.stderr


# -- resume ----------------------------------------------------------------------
def test_resume_skips_done_redoes_torn_and_failed(tiny_opt, photos, tmp_path):
    out = tmp_path / "caps.jsonl"
    broken = photos / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    res = cli("caption", photos, "--model", tiny_opt, "-o", out, *FAST)
    assert res.exit_code == 1
    full = jsonl(out.read_text())
    assert len(full) == 5 and full[0]["model"] == str(tiny_opt) and full[0]["generation"]["num_beams"] == 1
    assert full[0]["dtype"] == "float32" and full[0]["quantize"] == "none"
    # simulate a crash: keep two records and half of the third
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    shutil.copy(photos / "coffee.png", broken)  # the broken file is fixed meanwhile
    res = cli("caption", photos, "--model", tiny_opt, "-o", out, "--resume", *FAST)
    assert res.exit_code == 0, res.output
    assert "a torn last record was removed" in res.stderr
    final = jsonl(out.read_text())
    paths = [r["path"] for r in final]
    assert sorted(paths) == sorted(r["path"] for r in full) and len(paths) == len(set(paths))
    assert all(r["error"] is None for r in final)
    by_path = {r["path"]: r["caption"] for r in full if not r["error"]}
    assert all(r["caption"] == by_path[r["path"]] for r in final if r["path"] in by_path)


def test_resume_when_all_done_does_not_load_the_model(tiny_opt, photos, tmp_path, monkeypatch):
    out = tmp_path / "caps.jsonl"
    assert cli("caption", photos, "--model", tiny_opt, "-o", out, *FAST).exit_code == 0
    before = out.read_bytes()
    monkeypatch.setattr("blip2cli.loader.load", lambda *a, **k: pytest.fail("loaded the model"))
    res = cli("caption", photos, "--model", tiny_opt, "-o", out, "--resume", *FAST)
    assert res.exit_code == 0 and out.read_bytes() == before
    assert "nothing left to do" in res.stderr


def test_resume_refuses_other_settings_and_other_formats(tiny_opt, photos, tmp_path):
    out = tmp_path / "caps.jsonl"
    assert cli("caption", photos / "chelsea.png", "--model", tiny_opt, "-o", out, *FAST).exit_code == 0
    res = cli("caption", photos, "--model", tiny_opt, "-o", out, "--resume", "--max-new-tokens", "7",
              "--num-beams", "1")
    assert res.exit_code == 2 and "max_new_tokens: 5 then, 7 now" in res.stderr
    res = cli("caption", photos, "--model", tiny_opt, "-o", tmp_path / "x.csv", "--resume")
    assert res.exit_code == 2 and "JSON Lines" in res.stderr
    res = cli("caption", photos, "--model", tiny_opt, "--resume")
    assert res.exit_code == 2 and "needs an output file" in res.stderr


def blip2_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("blip2")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "blip2cli"]


@pytest.mark.slow
def test_kill_9_then_resume_every_image_exactly_once(tiny_opt, example_images, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    names = []
    for i in range(120):
        src = example_images[i % len(example_images)]
        os.link(src, folder / f"{i:04d}{src.suffix}")
        names.append(str(folder / f"{i:04d}{src.suffix}"))
    out = tmp_path / "out.jsonl"
    args = [str(folder), "--model", str(tiny_opt), "-o", str(out), "-b", "2", "-j", "1",
            "--max-new-tokens", "12", "--min-new-tokens", "12", "--num-beams", "1"]
    proc = subprocess.Popen([*blip2_cmd(), "caption", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be killed"
    proc.kill()  # SIGKILL: no handler runs
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    first = out.read_bytes().count(b"\n")
    assert 4 <= first < 120
    res = cli("caption", *args, "--resume")
    assert res.exit_code == 0, res.output
    final = jsonl(out.read_text())
    assert sorted(r["path"] for r in final) == sorted(names)  # every image exactly once
    assert [r["path"] for r in final[:first]] == names[:first]


# -- faults ----------------------------------------------------------------------
def test_fail_fast_stops_at_the_first_failure(tiny_opt, photos, tmp_path):
    bad = photos / "bad.png"
    bad.write_bytes(b"")
    res = cli("caption", photos / "chelsea.png", bad, photos / "coffee.png", "--model", tiny_opt,
              "--fail-fast", "-f", "jsonl", *FAST)
    assert res.exit_code == 1
    assert [Path(r["path"]).name for r in jsonl(res.stdout)] == ["chelsea.png", "bad.png"]


def test_full_disk_is_a_clear_error(tiny_opt, photos):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    res = cli("caption", photos, "--model", tiny_opt, "-o", "/dev/full", "-f", "jsonl", *FAST)
    assert res.exit_code == 1
    assert "No space left on device" in res.stderr and "Traceback" not in res.output


def test_disk_full_mid_run_leaves_only_whole_records(tiny_opt, photos, tmp_path, monkeypatch):
    from blip2cli import writers

    out = tmp_path / "caps.jsonl"
    real = writers.Sink.write_record
    calls = {"n": 0}

    def flaky(self, text):
        calls["n"] += 1
        if calls["n"] == 3:  # the third record: half of it lands, then the disk is full
            self._fh.write(text[: len(text) // 2].encode())
            self._fh.flush()
            err = OSError(errno.ENOSPC, "No space left on device")
            self._fh = _Raising(self._fh, err)
        return real(self, text)

    class _Raising:
        def __init__(self, fh, err):
            self.fh, self.err = fh, err

        def write(self, data):
            raise self.err

        def flush(self):
            pass

        def truncate(self, n):
            return self.fh.truncate(n)

        def close(self):
            self.fh.close()

    monkeypatch.setattr(writers.Sink, "write_record", flaky)
    res = cli("caption", photos, "--model", tiny_opt, "-o", out, "-b", "1", *FAST)
    assert res.exit_code == 1 and "No space left on device" in res.stderr
    assert "holds the 2 whole records" in res.stderr
    data = out.read_text()
    assert data.endswith("\n") and len(jsonl(data)) == 2


# -- bad input ---------------------------------------------------------------------
def _png_bomb(path: Path) -> None:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def make_bad_and_odd(folder: Path, photo: Path) -> tuple[dict, dict]:
    """Files that must fail (name -> words in the reason) and odd ones that must work."""
    folder.mkdir()
    good = Image.open(photo).convert("RGB")
    jpeg = io.BytesIO()
    good.save(jpeg, "JPEG")
    png = io.BytesIO()
    good.save(png, "PNG")
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (folder / "text.jpg").write_text("just some words\n")
    (folder / "page.jpg").write_text("<!DOCTYPE html><html><body>404</body></html>")
    _png_bomb(folder / "bomb.png")
    os.symlink(folder / "nowhere.jpg", folder / "broken-link.jpg")
    must_fail = {
        "zero.jpg": "empty",
        "truncated.jpg": "truncated",
        "truncated.png": "truncated",
        "text.jpg": "not an image",
        "page.jpg": "HTML",
        "bomb.png": "decompression-bomb",
        "broken-link.jpg": "broken symbolic link",
    }
    good.convert("CMYK").save(folder / "cmyk.jpg", "JPEG")
    grey16 = Image.fromarray(
        (__import__("numpy").asarray(good.convert("L"), dtype="uint16") * 257).astype("uint16")
    )
    grey16.save(folder / "grey16.png")
    good.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png", transparency=0)
    good.convert("LA").save(folder / "grey-alpha.png")
    frames = [good, good.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    frames[0].save(folder / "animated.webp", save_all=True, append_images=frames[1:])
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "one-pixel.png")
    good.resize((4000, 20)).save(folder / "very-wide.jpg")
    (folder / "dir.jpg").mkdir()  # a directory with an image name: walked, not an error
    shutil.copy(photo, folder / "dir.jpg" / "inside.png")
    os.symlink(folder, folder / "loop")  # a symlink loop in the walk
    must_work = ["cmyk.jpg", "grey16.png", "palette.png", "grey-alpha.png", "animated.gif", "animated.webp",
                 "one-pixel.png", "very-wide.jpg", "dir.jpg/inside.png"]
    return must_fail, must_work


def test_bad_input_gives_error_records_and_the_rest_goes_on(tiny_opt, example_images, tmp_path):
    folder = tmp_path / "mess"
    must_fail, must_work = make_bad_and_odd(folder, example_images[0])
    res = cli("caption", folder, "--model", tiny_opt, "-f", "jsonl", "-b", "4", *FAST)
    assert res.exit_code == 1
    recs = {os.path.relpath(r["path"], folder): r for r in jsonl(res.stdout)}
    assert set(recs) == set(must_fail) | set(must_work)
    for name, words in must_fail.items():
        assert recs[name]["caption"] is None
        assert words.lower() in recs[name]["error"].lower(), (name, recs[name]["error"])
        assert f"{folder / name}: " in res.stderr  # one line naming the file and the reason
    for name in must_work:
        assert recs[name]["error"] is None and recs[name]["caption"], name
    assert f"{len(must_fail)} of {len(recs)} images failed" in res.stderr


def test_unreadable_file_is_an_error_record(tiny_opt, photos):
    if os.geteuid() == 0:
        pytest.skip("root reads any file; tests/test_images.py covers the message")
    locked = photos / "locked.png"
    shutil.copy(photos / "chelsea.png", locked)
    locked.chmod(0)
    res = cli("caption", locked, "--model", tiny_opt, "-f", "jsonl", *FAST)
    assert res.exit_code == 1 and "permission denied" in jsonl(res.stdout)[0]["error"]


def test_exif_rotation_the_model_sees_the_upright_image(tiny_opt, example_images, tmp_path):
    upright = Image.open(example_images[3]).convert("RGB")
    upright.save(tmp_path / "upright.png")
    # stored rotated, with an EXIF tag saying how to turn it back (orientation 6: rotate 90 CW to view)
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "tagged.png", exif=exif)
    stored.save(tmp_path / "untagged.png")
    res = cli("caption", tmp_path / "upright.png", tmp_path / "tagged.png", tmp_path / "untagged.png",
              "--model", tiny_opt, "-f", "jsonl", *FAST)
    up, tagged, untagged = (r["caption"] for r in jsonl(res.stdout))
    assert tagged == up  # lossless: exactly the upright pixels
    assert untagged != up  # and the model does notice orientation


@pytest.mark.parametrize("fmt", ["text", "jsonl", "csv", "html"])
def test_awkward_paths_survive_every_format(tiny_opt, example_images, tmp_path, fmt):
    names = ["with space.png", "ünïcødé 猫.png", "comma, here.png", 'quote "q".png', "new\nline.png"]
    for n in names:
        shutil.copy(example_images[0], tmp_path / n)
    paths = [str(tmp_path / n) for n in names]
    res = cli("caption", *paths, "--model", tiny_opt, "-f", fmt, *FAST)
    assert res.exit_code == 0, res.output
    if fmt == "jsonl":
        got = [r["path"] for r in jsonl(res.stdout)]
    elif fmt == "csv":
        got = [r["path"] for r in csv.DictReader(io.StringIO(res.stdout, newline=""))]
    elif fmt == "html":  # the full path of each card, as text in its name's title
        import html
        import re

        got = [html.unescape(t) for t in re.findall(r'<div class="name" title="([^"]*)"', res.stdout)]
    else:
        lines = res.stdout.split("\n")[:-1]
        assert len(lines) == len(names)
        got = [l.split("\t")[0].replace("\\n", "\n") for l in lines]
    assert got == paths


# -- the same machinery for ask ---------------------------------------------------
def test_ask_sidecar_holds_the_answer(tiny_opt, photos):
    res = cli("ask", photos / "chelsea.png", "what is this?", "--model", tiny_opt, "--sidecar", "-f", "jsonl", *FAST)
    assert res.exit_code == 0, res.output
    rec = jsonl(res.stdout)[0]
    assert (photos / "chelsea.txt").read_text() == rec["answer"] + "\n"
    res = cli("ask", photos / "chelsea.png", "--model", tiny_opt, "--sidecar", "-q", "a?", "-q", "b?")
    assert res.exit_code == 2 and "one question" in res.stderr


def test_ask_resume_redoes_only_missing_questions(tiny_opt, photos, tmp_path):
    out = tmp_path / "answers.jsonl"
    args = ["ask", photos / "chelsea.png", photos / "coffee.png", "-q", "what?", "-q", "where?", "--model", tiny_opt,
            "-o", out, *FAST]
    assert cli(*args).exit_code == 0
    full = jsonl(out.read_text())
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]))  # the last (coffee, where?) pair is missing
    res = cli(*args, "--resume")
    assert res.exit_code == 0, res.output
    final = jsonl(out.read_text())
    assert sorted((r["path"], r["question"]) for r in final) == sorted((r["path"], r["question"]) for r in full)
    assert len(final) == 4 and final[3] == full[3]
