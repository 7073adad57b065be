"""What a newcomer reads first: ``--help`` (sections, metavars, usage lines, the
command list at 80 columns), the one-line summary at the end of a run, and ask
records that name their settings as ask's options do (``num_answers``)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import typer
from typer.testing import CliRunner

from blip2cli.cli import Command, app

runner = CliRunner()
FAST = ["--max-new-tokens", "3", "--num-beams", "1"]


def leaf_commands(command=None, path=()) -> dict[str, object]:
    """Every command a user can run ("caption", "models download", ...) -> its click command."""
    command = command or typer.main.get_command(app)
    subcommands = getattr(command, "commands", None)
    if not subcommands:
        return {" ".join(path): command}
    out = {}
    for name, sub in subcommands.items():
        out.update(leaf_commands(sub, (*path, name)))
    return out


COMMANDS = list(leaf_commands())
# The commands whose options the issue names: each must show these sections.
PANELS = {
    "caption": ["Inputs", "Model", "Generation", "Output", "Performance"],
    "ask": ["Inputs", "Questions", "Model", "Generation", "Output", "Performance"],
    "chat": ["Model", "Generation", "Output", "Performance"],
    "embed": ["Inputs", "Model", "Output", "Performance"],
    "search": ["Inputs", "Search", "Model", "Output", "Performance"],
    "score": ["Model", "Output", "Performance"],
    "bench": ["Model", "Generation", "Performance"],
}


def help_text(*args: str, columns: int = 80) -> str:
    result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.output


def click_command(name: str):
    return leaf_commands()[name]


def sections(text: str) -> dict[str, list[str]]:
    """The help's sections: heading (a line "Name:" at column 0) -> its lines."""
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.fullmatch(r"([A-Z][A-Za-z ,/-]*):", line)
        if m:
            current = m.group(1)
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return out


# -- blip2 --help ---------------------------------------------------------------
def test_root_help_lists_every_command_on_one_uncut_line_at_80_columns():
    text = help_text()
    lines = [l for l in sections(text)["Commands"] if l.strip()]
    names = list(typer.main.get_command(app).commands)
    assert {"caption", "ask", "embed", "search", "score", "chat", "bench", "merge", "sheet"} <= set(names)
    assert sorted(l.split()[0] for l in lines) == sorted(names)  # one line each: nothing wrapped
    for line in lines:
        assert len(line) <= 80, line
        assert "..." not in line and "\u2026" not in line, f"summary cut: {line!r}"
        assert len(line.split(None, 1)[1]) > 10  # a real summary, not an empty column


# -- sections -------------------------------------------------------------------
@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_of_every_command_names_a_help_section(name):
    params = [p for p in click_command(name).params if isinstance(p, typer.core.TyperOption)]
    unnamed = [p.opts[0] for p in params if not getattr(p, "rich_help_panel", None)]
    assert not unnamed, f"{name}: options without a help section: {unnamed}"
    assert isinstance(click_command(name), Command)  # which prints those sections


@pytest.mark.parametrize("name", list(PANELS))
def test_help_shows_each_option_under_its_section(name):
    text = help_text(name, columns=200)
    found = sections(text)
    for title in PANELS[name]:
        assert found.get(title), f"blip2 {name} --help has no {title!r} section:\n{text}"
    assert found["Options"] == [l for l in found["Options"] if "--help" in l or not l.strip()]  # only --help
    for param in click_command(name).params:
        if not isinstance(param, typer.core.TyperOption):
            continue
        body = found.get(param.rich_help_panel, [])
        assert any(re.match(rf"\s+(-\w, )?{re.escape(param.opts[-1])}\b", l) or
                   re.match(rf"\s+{re.escape(param.opts[0])}\b", l) for l in body), (
            f"{param.opts} not under {param.rich_help_panel!r} in blip2 {name} --help"
        )


def test_caption_sections_come_in_reading_order():
    order = list(sections(help_text("caption", columns=200)))
    expected = ["Arguments", "Inputs", "Model", "Generation", "Output", "Performance"]
    assert [t for t in order if t in expected] == expected


# -- metavars and usage lines ---------------------------------------------------
TYPE_NAMES = re.compile(r"<(str|int|float|bool|path|Path|dir|file|list)\b|list\[|int range|float range")


@pytest.mark.parametrize("name", COMMANDS)
def test_no_python_type_names_as_placeholders(name):
    text = help_text(*name.split(), columns=200)
    assert not TYPE_NAMES.search(text), TYPE_NAMES.search(text).group(0)
    command = click_command(name)
    ctx = typer.core._click.Context(command, info_name=name)
    for param in command.params:
        if not isinstance(param, typer.core.TyperOption):
            continue  # an argument's column is its usage name (checked below)
        column = param.get_help_record(ctx)[0]
        assert "<" not in column and "list[" not in column and "range" not in column, (name, column)
        if not param.is_flag:
            assert param.metavar and column.endswith(f" {param.metavar}"), f"{name} {param.opts}: no metavar"


USAGE = {
    "caption": "[IMAGES]...",
    "ask": "[IMAGES]... [QUESTION]",
    "embed": "[IMAGES]...",
    "search": "[QUERY] [IMAGES]...",
    "score": "IMAGE [TEXTS]...",
    "chat": "IMAGE",
    "merge": "DIR",
    "sheet": "FILE",
    "tiny-checkpoint": "DIR",
    "bench": "",
}


@pytest.mark.parametrize("name", COMMANDS)
def test_usage_lines_write_arguments_in_upper_case_the_same_way(name):
    usage = next(l for l in help_text(*name.split(), columns=200).splitlines() if l.startswith("Usage:"))
    assert usage.startswith(f"Usage: blip2 {name} [OPTIONS]")
    arguments = usage.removeprefix(f"Usage: blip2 {name} [OPTIONS]").strip()
    if name in USAGE:
        assert arguments == USAGE[name]
    for token in arguments.split():
        # NAME (required), [NAME] (optional), [NAME]... (any number): no {NAME}, no lower case.
        assert re.fullmatch(r"\[?[A-Z][A-Z_]*\]?(\.\.\.)?", token), (name, token)


# -- the summary at the end of a run ----------------------------------------------
@pytest.fixture
def photos(tmp_path, example_images):
    root = tmp_path / "photos"
    root.mkdir()
    shutil.copy(example_images[0], root / "chelsea.png")
    shutil.copy(example_images[1], root / "coffee.png")
    return root


def cli(*args):
    return runner.invoke(app, [*map(str, args)])


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def test_a_successful_run_ends_on_a_summary_naming_the_output(tiny_opt, photos, tmp_path):
    out = tmp_path / "out.jsonl"
    res = cli("caption", photos, "-m", tiny_opt, *FAST, "-o", out)
    assert res.exit_code == 0, res.stderr
    assert re.fullmatch(r"blip2: captioned 2 images in \d+\.\d s \(\d+\.\d/s\) -> " + re.escape(str(out)),
                        last_line(res.stderr)), res.stderr
    assert len(out.read_text().splitlines()) == 2


def test_quiet_keeps_the_summary_out(tiny_opt, photos, tmp_path):
    res = cli("caption", photos, "-m", tiny_opt, *FAST, "-o", tmp_path / "out.jsonl", "--quiet")
    assert res.exit_code == 0 and "captioned" not in res.stderr


def test_failures_in_text_output_point_at_the_messages_not_the_file(tiny_opt, photos, tmp_path):
    out = tmp_path / "rerun.txt"
    res = cli("caption", photos, photos / "missing.png", "-m", tiny_opt, *FAST, "-o", out)
    assert res.exit_code == 1
    assert "missing.png" not in out.read_text()  # text output keeps no error records...
    line = last_line(res.stderr)
    assert line.startswith("blip2: 1 of 3 images failed")
    assert "see the messages above" in line and "error records are in" not in line  # ...so none is promised
    assert "missing.png" in res.stderr  # and the message above is there


def test_failures_in_csv_output_name_the_file_that_holds_the_error_records(tiny_opt, photos, tmp_path):
    out = tmp_path / "out.csv"
    res = cli("caption", photos, photos / "missing.png", "-m", tiny_opt, *FAST, "-o", out)
    assert res.exit_code == 1
    assert last_line(res.stderr) == f"blip2: 1 of 3 images failed; error records are in {out}"
    assert "missing.png" in out.read_text()  # the promise holds


def test_sidecar_runs_say_where_the_sidecars_went(tiny_opt, photos, tmp_path):
    res = cli("caption", photos, "-m", tiny_opt, *FAST, "--sidecar")
    assert res.exit_code == 0, res.stderr
    assert last_line(res.stderr).endswith("-> sidecars (.txt) beside the images")
    assert (photos / "chelsea.txt").is_file()
    caps = tmp_path / "caps"
    res = cli("caption", photos, "-m", tiny_opt, *FAST, "--output-dir", caps, "--sidecar-ext", ".cap")
    assert res.exit_code == 0, res.stderr
    assert last_line(res.stderr).endswith(f"-> sidecars (.cap) under {caps}")
    assert (caps / "chelsea.cap").is_file()


# -- ask records: num_answers, as the option --------------------------------------
def test_ask_records_name_num_answers_and_resume_reads_older_files(tiny_opt, photos, tmp_path):
    out = tmp_path / "answers.jsonl"
    res = cli("ask", photos / "chelsea.png", "what is it?", "-m", tiny_opt, *FAST, "-o", out)
    assert res.exit_code == 0, res.stderr
    assert "answered questions about 1 image" in last_line(res.stderr)
    (record,) = [json.loads(l) for l in out.read_text().splitlines()]
    assert record["generation"]["num_answers"] == 1 and "num_captions" not in record["generation"]

    # A file written before the rename (generation.num_captions) resumes: the
    # done image is kept, only the new one is asked.
    old = dict(record, generation={("num_captions" if k == "num_answers" else k): v
                                   for k, v in record["generation"].items()})
    out.write_text(json.dumps(old) + "\n")
    res = cli("ask", photos / "chelsea.png", photos / "coffee.png", "what is it?", "-m", tiny_opt, *FAST,
              "-o", out, "--resume")
    assert res.exit_code == 0, res.stderr
    assert "1 already done" in res.stderr
    records = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["path"] for r in records] == [str(photos / "chelsea.png"), str(photos / "coffee.png")]
    assert records[0] == old


def test_the_old_name_still_counts_as_a_difference_when_the_value_differs():
    from blip2cli.resume import differences

    assert differences({"generation": {"num_captions": 1}}, {"generation": {"num_answers": 1}}) == []
    assert differences({"generation": {"num_captions": 1}}, {"generation": {"num_answers": 2}}) == [
        "generation.num_answers: 1 then, 2 now"
    ]
    # caption records keep num_captions, as --num-captions
    assert differences({"generation": {"num_captions": 1}}, {"generation": {"num_captions": 2}})
