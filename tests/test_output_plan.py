"""One rule for every file a run writes (issue 19, cases 1-4).

Before the first write the runner knows the run's output plan (the ``-o`` file, the part
files, manifest and final file of ``-o DIR``, one output per shard, the ``--metadata`` file,
the ``--failed-list`` file; sidecars as they are planned) and checks each planned file
against every input and every other planned file, by (device, inode) or, for a file not
there yet, by real path: a clash refuses the run (exit 2, naming the flags) before the
model loads and before any file is opened. One lock per file object: another name for
the same file (a hard link) meets the lock of the first run.

One test per output kind; each fails on the code before the rule.
"""

from __future__ import annotations

import os
import shutil

import pytest

from blip2cli import writers

from helpers import FAST, cli, jsonl, snapshot



# -- the failed list ---------------------------------------------------------------------
def test_failed_list_onto_an_input_photo_is_refused_before_it_is_opened(tiny_opt, photos, no_model):
    before = snapshot(photos)
    res = cli("caption", photos, "--model", tiny_opt, "--failed-list", photos / "chelsea.png", "-f", "jsonl", *FAST)
    assert res.exit_code == 2, res.output
    assert "--failed-list" in res.stderr and "chelsea.png" in res.stderr
    assert snapshot(photos) == before  # not truncated, nothing added


def test_failed_list_onto_an_image_that_is_no_input_is_refused(tiny_opt, photos, tmp_path, example_images, no_model):
    victim = tmp_path / "victim.png"
    shutil.copy(example_images[0], victim)
    res = cli("caption", photos / "coffee.png", "--model", tiny_opt, "--failed-list", victim, "-f", "jsonl", *FAST)
    assert res.exit_code == 2, res.output
    assert "is an image" in res.stderr and "--failed-list" in res.stderr
    assert victim.read_bytes() == example_images[0].read_bytes()


@pytest.mark.parametrize("link", [False, True], ids=["same-name", "hard-link"])
def test_failed_list_that_is_the_output_file_is_refused(tiny_opt, photos, tmp_path, no_model, link):
    out = tmp_path / "fl.jsonl"
    out.write_text('{"path": "kept", "error": null}\n')
    other = out
    if link:
        other = tmp_path / "fl.txt"
        os.link(out, other)
    res = cli("caption", photos, "--model", tiny_opt, "-o", out, "--failed-list", other, *FAST)
    assert res.exit_code == 2, res.output
    assert "--failed-list" in res.stderr and "--output" in res.stderr
    assert out.read_text() == '{"path": "kept", "error": null}\n'


def test_failed_list_that_is_the_final_file_of_an_output_directory_is_refused(tiny_opt, photos, tmp_path, no_model):
    out = tmp_path / "out"
    res = cli("caption", photos, "--model", tiny_opt, "-o", f"{out}/", "--failed-list", out / "captions.jsonl", *FAST)
    assert res.exit_code == 2, res.output
    assert "--failed-list" in res.stderr and not (out / "captions.jsonl").exists()


def test_failed_list_that_is_a_shard_output_is_refused(tiny_opt, tmp_path, example_images, no_model):
    import io
    import tarfile

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tf:
        data = example_images[0].read_bytes()
        info = tarfile.TarInfo("k0.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    res = cli("caption", shards / "00000.tar", "--model", tiny_opt, "-o", f"{out}/",
              "--failed-list", out / "00000.jsonl", *FAST)
    assert res.exit_code == 2, res.output
    assert "--failed-list" in res.stderr and "the records of a shard" in res.stderr


def test_embed_failed_list_onto_an_input_is_refused(tiny_opt, photos, tmp_path, no_model):
    before = snapshot(photos)
    res = cli("embed", photos, "--model", tiny_opt, "-o", tmp_path / "v.jsonl", "--failed-list", photos / "coffee.png")
    assert res.exit_code == 2, res.output
    assert "--failed-list" in res.stderr and snapshot(photos) == before


# -- sidecars ------------------------------------------------------------------------------
def test_a_sidecar_that_is_the_output_file_is_refused(tiny_opt, tmp_path, example_images, no_model):
    sc = tmp_path / "sc"
    sc.mkdir()
    for i in range(2):
        shutil.copy(example_images[i], sc / f"p{i}.png")
    res = cli("caption", sc, "--sidecar", "--model", tiny_opt, "-o", sc / "p0.txt", "-f", "jsonl", *FAST)
    assert res.exit_code == 2, res.output
    assert "sidecar" in res.stderr and "(--output)" in res.stderr
    assert sorted(p.name for p in sc.iterdir()) == ["p0.png", "p1.png"]  # nothing written


def test_a_sidecar_that_is_the_failed_list_is_refused(tiny_opt, photos, no_model):
    res = cli("caption", photos, "--sidecar", "--model", tiny_opt, "--failed-list", photos / "coffee.txt",
              "-f", "jsonl", *FAST)
    assert res.exit_code == 2, res.output
    assert "--failed-list" in res.stderr and not (photos / "coffee.txt").exists()


def test_a_sidecar_from_stdin_that_is_the_output_file_is_an_error_record(tiny_opt, tmp_path, example_images):
    sc = tmp_path / "sc"
    sc.mkdir()
    for i in range(2):
        shutil.copy(example_images[i], sc / f"p{i}.png")
    out = sc / "p0.txt"
    res = cli("caption", "-", "--sidecar", "--model", tiny_opt, "-o", out, "-f", "jsonl", *FAST,
              input=f"{sc / 'p0.png'}\n{sc / 'p1.png'}\n")
    assert res.exit_code == 1, res.output
    recs = jsonl(out.read_text())  # the records survive: the sidecar was never written over them
    assert "is also the output file" in recs[0]["error"]
    assert recs[1]["error"] is None and (sc / "p1.txt").exists()


# -- --metadata ------------------------------------------------------------------------------
def test_metadata_file_that_is_the_output_file_is_refused(tiny_opt, photos, no_model):
    res = cli("caption", photos, "--metadata", "--model", tiny_opt, "-o", photos / "metadata.jsonl", *FAST)
    assert res.exit_code == 2, res.output
    assert "--metadata" in res.stderr and "--output" in res.stderr
    assert not (photos / "metadata.jsonl").exists()


def test_metadata_file_that_is_an_input_is_refused(tiny_opt, photos, example_images, no_model):
    shutil.copy(example_images[0], photos / "metadata.jsonl")  # an image under that name: an input
    before = snapshot(photos)
    res = cli("caption", photos, "--metadata", "--model", tiny_opt,
              "--ext", "png,jsonl", *FAST)
    assert res.exit_code == 2, res.output
    assert "--metadata" in res.stderr and snapshot(photos) == before


# -- one lock per file object ------------------------------------------------------------------
def test_a_hard_link_to_the_output_of_a_running_job_is_refused(tiny_opt, photos, tmp_path, monkeypatch):
    a = tmp_path / "a.jsonl"
    a.write_text("")
    b = tmp_path / "b.jsonl"
    os.link(a, b)
    seen = {}
    real = writers.JsonlWriter.write

    def write(self, record):
        if "second" not in seen:
            seen["second"] = cli("caption", photos, "--model", tiny_opt, "-o", b, "-b", "1", *FAST)
        return real(self, record)

    monkeypatch.setattr(writers.JsonlWriter, "write", write)
    res = cli("caption", photos, "--model", tiny_opt, "-o", a, "-b", "1", *FAST)
    assert res.exit_code == 0, res.output
    assert seen["second"].exit_code == 2 and "another blip2 run is writing" in seen["second"].stderr
    recs = jsonl(a.read_text())
    assert len(recs) == 4 and all(r["error"] is None for r in recs)  # whole, once each


def test_a_hard_link_made_after_the_output_was_created_is_refused_too(tiny_opt, photos, tmp_path, monkeypatch):
    a = tmp_path / "a.jsonl"  # not there when the first run starts
    b = tmp_path / "b.jsonl"
    seen = {}
    real = writers.JsonlWriter.write

    def write(self, record):
        if "second" not in seen:
            os.link(a, b)
            seen["second"] = cli("caption", photos, "--model", tiny_opt, "-o", b, "-b", "1", *FAST)
        return real(self, record)

    monkeypatch.setattr(writers.JsonlWriter, "write", write)
    res = cli("caption", photos, "--model", tiny_opt, "-o", a, "-b", "1", *FAST)
    assert res.exit_code == 0, res.output
    assert seen["second"].exit_code == 2, seen["second"].output
    assert len(jsonl(a.read_text())) == 4


# -- frictions found beside the rule (issue 19, cosmetic) ---------------------------------------
def test_csv_disk_full_message_does_not_count_the_header_as_a_record(tmp_path):
    import errno

    from blip2cli.caption import caption_schema
    from blip2cli.errors import OutputError

    sink = writers.Sink(str(tmp_path / "x.csv")).open()
    writer = writers.make_writer("csv", sink, caption_schema(1))
    writer.write({"path": "a.png", "captions": ["a cat"], "error": None})
    real = sink._fh

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(real, name)

    sink._fh = Full()
    with pytest.raises(OutputError, match="holds the 1 whole records"):
        writer.write({"path": "b.png", "captions": ["a dog"], "error": None})
    sink._fh = real
    sink.close()


def test_dry_run_says_fail_for_a_sidecar_whose_name_is_too_long(tiny_opt, tmp_path, example_images, no_model):
    folder = tmp_path / "long"
    folder.mkdir()
    image = folder / ("a" * 250 + ".png")  # its sidecar a...a.caption: 258 bytes, over 255
    shutil.copy(example_images[0], image)
    res = cli("caption", image, "--model", tiny_opt, "--sidecar", "--sidecar-ext", ".caption", "--dry-run", *FAST)
    assert res.exit_code == 0, res.output
    action = res.stdout.split("\t")[0]
    assert action == "fail" and "too long" in res.stdout


@pytest.mark.parametrize("command", ["sheet", "embed"])
def test_an_image_as_output_hint_does_not_suggest_a_jsonl_file_where_it_is_wrong(command, tmp_path, example_images,
                                                                                no_model):
    victim = tmp_path / "victim.png"
    shutil.copy(example_images[0], victim)
    records = tmp_path / "r.jsonl"
    records.write_text('{"path": "a.png", "caption": "a cat", "captions": ["a cat"], "error": null}\n')
    args = [records] if command == "sheet" else [example_images[1]]
    res = cli(command, *args, "-o", victim)
    assert res.exit_code == 2, res.output
    assert "is an image" in res.stderr and "results.jsonl" not in res.stderr
    assert victim.read_bytes() == example_images[0].read_bytes()


# -- the plan itself (no model) ------------------------------------------------------------------
def test_output_plan_compares_files_not_there_yet_by_real_path_and_leaves_devices_alone(tmp_path):
    from blip2cli.errors import UsageError
    from blip2cli.guard import OutputPlan

    (tmp_path / "sub").mkdir()
    plan = OutputPlan()
    plan.add(tmp_path / "a.jsonl", "the output file", "output")
    plan.add(tmp_path / "sub" / ".." / "a.jsonl", "the failed list", "failed_list")
    with pytest.raises(UsageError) as exc:
        plan.check()
    assert list(exc.value.params) == ["output", "failed_list"] and not (tmp_path / "a.jsonl").exists()
    devices = OutputPlan()
    devices.add(os.devnull, "the output file", "output")
    devices.add(os.devnull, "the failed list", "failed_list")
    devices.add("-", "the output file", "output")  # stdout is no file
    devices.check()
    assert [p.path for p in devices] == [os.devnull, os.devnull]


def test_failed_list_that_is_the_manifest_of_an_output_directory_is_refused(tiny_opt, photos, tmp_path, no_model):
    out = tmp_path / "out"
    res = cli("caption", photos, "--model", tiny_opt, "-o", f"{out}/", "--failed-list", out / ".parts" / "manifest.json",
              *FAST)
    assert res.exit_code == 2, res.output
    assert "--failed-list" in res.stderr and "manifest" in res.stderr


# -- a vector store is one kind of output plan -----------------------------------------------------
def test_embed_into_a_store_lists_its_failures_and_guards_the_failed_list(tiny_itm, photos, tmp_path):
    bad = photos / "bad.png"
    bad.write_bytes(b"<html>not an image</html>")
    store = tmp_path / "v.safetensors"
    res = cli("embed", photos, "-m", tiny_itm, "-o", store, "--failed-list", store)
    assert res.exit_code == 2 and "--failed-list" in res.stderr and not store.exists()
    failed = tmp_path / "failed.txt"
    res = cli("embed", photos, "-m", tiny_itm, "-o", store, "--failed-list", failed)
    assert res.exit_code == 1, res.output
    assert failed.read_text() == f"{bad}\n" and store.exists()
