"""The input resolver: files, directories, globs, stdin, order, duplicates."""

from __future__ import annotations

import io
import os

import pytest

from blip2cli.sources import InputResolver, looks_like_image_bytes, parse_extensions

PNG_HEAD = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def names(items):
    return [i.name for i in items]


@pytest.fixture
def tree(tmp_path):
    for rel in ["b.jpg", "a.PNG", "c.txt", "sub/z.webp", "sub/deeper/y.gif", ".hidden.jpg",
                ".cache/x.jpg", "b/inner.jpg", "b.jpeg"]:
        touch(tmp_path / rel)
    return tmp_path


def test_directory_walk_is_sorted_recursive_and_skips_hidden(tree):
    got = names(InputResolver().resolve([str(tree)]))
    rel = [os.path.relpath(p, tree) for p in got]
    # depth-first, each directory's entries in code-point order of their names
    assert rel == ["a.PNG", "b/inner.jpg", "b.jpeg", "b.jpg", "sub/deeper/y.gif", "sub/z.webp"]


def test_no_recursive_stays_at_top(tree):
    rel = [os.path.relpath(p, tree) for p in names(InputResolver(recursive=False).resolve([str(tree)]))]
    assert rel == ["a.PNG", "b.jpeg", "b.jpg"]


def test_ext_changes_the_set(tree):
    rel = [os.path.relpath(p, tree) for p in names(InputResolver(extensions=["txt,.GIF"]).resolve([str(tree)]))]
    assert rel == ["c.txt", "sub/deeper/y.gif"]
    assert parse_extensions(None)[0] == "jpg"
    assert parse_extensions(["JPG", "png,webp"]) == ("jpg", "png", "webp")


def test_explicit_file_is_always_tried_whatever_its_extension(tree):
    assert names(InputResolver().resolve([str(tree / "c.txt")])) == [str(tree / "c.txt")]


def test_glob_expanded_by_the_tool_with_double_star(tree):
    got = names(InputResolver().resolve([str(tree / "**" / "*.jpg")]))
    rel = [os.path.relpath(p, tree) for p in got]
    assert rel == ["b/inner.jpg", "b.jpg"]  # sorted, hidden skipped by glob


def test_glob_without_match_becomes_a_failing_item(tree):
    items = list(InputResolver().resolve([str(tree / "*.nothing")]))
    assert len(items) == 1 and "no image files match" in items[0].error


def test_missing_path_becomes_an_item_that_fails_later(tree):
    items = list(InputResolver().resolve([str(tree / "missing.jpg"), str(tree / "b.jpg")]))
    assert names(items) == [str(tree / "missing.jpg"), str(tree / "b.jpg")]


def test_duplicates_removed_first_one_kept(tree):
    b = str(tree / "b.jpg")
    dotted = os.path.join(str(tree), ".", "b.jpg")
    got = names(InputResolver().resolve([b, dotted, str(tree), b]))
    assert got.count(b) == 1 and dotted not in got
    assert got[0] == b  # argument order wins


def test_symlink_loop_survived_and_broken_symlink_kept(tree):
    os.symlink(tree, tree / "sub" / "loop")
    os.symlink(tree / "nowhere.jpg", tree / "broken.jpg")
    got = [os.path.relpath(p, tree) for p in names(InputResolver().resolve([str(tree)]))]
    assert "broken.jpg" in got  # fails as an item later, the user learns about it
    assert len(got) == len(set(got))
    assert got.count("a.PNG") == 1


def test_stdin_newline_separated_paths(tree):
    data = f"{tree / 'b.jpg'}\n\n{tree / 'sub'}\r\n{tree / 'a.PNG'}\n".encode()
    got = names(InputResolver(stdin=io.BytesIO(data)).resolve(["-"]))
    assert [os.path.relpath(p, tree) for p in got] == ["b.jpg", "sub/deeper/y.gif", "sub/z.webp", "a.PNG"]


def test_stdin_nul_separated_paths_with_newlines_in_names(tmp_path):
    weird = touch(tmp_path / "new\nline, \"q\".jpg")
    plain = touch(tmp_path / "plain.jpg")
    data = bytes(weird) + b"\0" + bytes(plain) + b"\0"
    got = names(InputResolver(null_separated=True, stdin=io.BytesIO(data)).resolve(["-"]))
    assert got == [str(weird), str(plain)]


def test_stdin_raw_image_bytes_sniffed(tmp_path):
    items = list(InputResolver(stdin=io.BytesIO(PNG_HEAD + b"rest")).resolve(["-"]))
    assert len(items) == 1 and items[0].name == "-" and items[0].source == PNG_HEAD + b"rest"
    assert looks_like_image_bytes(b"RIFF\0\0\0\0WEBPVP8 ")
    assert looks_like_image_bytes(b"\xff\xd8\xff\xe0")
    assert not looks_like_image_bytes(b"photos/a.jpg\n")


def test_files_from_a_list_file(tree, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text(f"{tree / 'b.jpg'}\n{tree / 'a.PNG'}\n")
    got = names(InputResolver().resolve([], [str(lst)]))
    assert got == [str(tree / "b.jpg"), str(tree / "a.PNG")]


def test_missing_files_from_is_an_input_error(tmp_path):
    from blip2cli.errors import InputError

    with pytest.raises(InputError, match="cannot read the list"):
        list(InputResolver().resolve([], [str(tmp_path / "nope.txt")]))


def test_streaming_stdin_yields_before_eof(tree):
    """Paths are taken as they arrive, not after the producer ends."""

    class Slow(io.RawIOBase):
        def __init__(self):
            self.chunks = [f"{tree / 'b.jpg'}\n".encode()]

        def readable(self):
            return True

        def read1(self, n=-1):
            if not self.chunks:
                raise AssertionError("read past the first line before yielding it")
            chunk = self.chunks[0]
            if 0 <= n < len(chunk):
                self.chunks[0] = chunk[n:]
                return chunk[:n]
            return self.chunks.pop(0)

        def read(self, n=-1):
            return self.read1(n)

    it = InputResolver(stdin=Slow()).resolve(["-"])
    assert next(it).name == str(tree / "b.jpg")


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_interrupt_while_waiting_for_paths_on_stdin_exits_cleanly(tiny_opt, example_images, sig, code):
    """Issue 19 #14: the source thread blocked reading stdin (a terminal) made Python abort at
    shutdown ("Fatal Python error: _enter_buffered_busy", exit 134). It reads with os.read now."""
    import pty
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    master, slave = pty.openpty()  # a terminal, as when the user types paths (a pipe does not show it)
    proc = subprocess.Popen(
        [sys.executable, "-m", "blip2cli", "caption", "-", "--model", str(tiny_opt), "--max-new-tokens", "2",
         "--num-beams", "1", "-f", "jsonl", "--quiet"],
        stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    try:
        os.write(master, f"{example_images[0]}\n".encode())
        line = proc.stdout.readline()  # its record: the run now waits for more paths
        assert b'"caption' in line
        time.sleep(0.3)
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert b"Fatal Python error" not in err, err.decode()
    assert proc.returncode == code, err.decode()


def test_ask_with_the_question_forgotten_is_refused(example_images):
    """Issue 19: `blip2 ask a.jpg b.png` asked "b.png" of a.jpg, exit 0."""
    from typer.testing import CliRunner

    from blip2cli.cli import app

    a, b = str(example_images[0]), str(example_images[1])
    res = CliRunner().invoke(app, ["ask", a, b, "--model", "nowhere"])
    assert res.exit_code == 2, res.output
    assert "question is missing" in res.output and "your question" in res.output


def test_named_inputs_without_images_exit_2(tiny_opt, tmp_path):
    """Issue 19: "no images found in the inputs" was exit 0 for named inputs."""
    from typer.testing import CliRunner

    from blip2cli.cli import app

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image")
    res = CliRunner().invoke(app, ["caption", str(tmp_path / "empty"), "--model", str(tiny_opt)])
    assert res.exit_code == 2, res.output
    assert "no images found in the inputs" in res.output
    res = CliRunner().invoke(app, ["caption", "-", "--model", str(tiny_opt)], input="")
    assert res.exit_code == 0, res.output  # an empty stdin is no usage error


def test_model_not_in_the_cache_points_to_tiny_checkpoint(tmp_path):
    """Issue 19: the offline "not in the local cache" error says how to try blip2 without a download."""
    from typer.testing import CliRunner

    from blip2cli.cli import app

    res = CliRunner().invoke(app, ["caption", str(tmp_path), "--model", "Salesforce/blip2-not-cached", "--offline"])
    assert res.exit_code == 2
    assert "blip2 tiny-checkpoint" in res.stderr
