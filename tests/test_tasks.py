"""The task registry (blip2cli/tasks.py) is complete and agrees with what each task's
record functions, schemas, part files, resume and the contact sheet actually do."""

from __future__ import annotations

import pytest

from blip2cli import html, parts, resume
from blip2cli.tasks import LOADER_SETTINGS, TASKS, final_names, record_keys, result_fields, settings_keys

COMMANDS = ("caption", "ask", "chat", "embed", "search", "score")


def test_every_command_has_an_entry():
    assert set(TASKS) == set(COMMANDS)
    for name, task in TASKS.items():
        assert task.name == name


@pytest.mark.parametrize("name", COMMANDS)
def test_an_entry_matches_the_records_its_task_makes(name):
    task = TASKS[name]
    sample = task.sample()
    assert tuple(sample) == task.record_keys  # same keys, same order
    assert task.kind
    assert not set(task.settings) & set(task.record_keys)  # a setting is never a result
    if task.schema is not None:
        schema = task.schema()
        assert schema.columns[0] in task.record_keys
        assert len(schema.row(sample)) == len(schema.columns)
        assert schema.text(sample)
    if task.key_of is not None:
        assert task.key_of(sample) is not None
    if task.sidecar_text is not None:
        assert task.sidecar_text(sample) == ["a cat"]


def test_the_cli_commands_exist_for_every_task():
    from blip2cli.cli import app

    registered = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert set(COMMANDS) <= registered


def test_part_files_and_merge_read_the_registry():
    assert parts.FINAL_NAMES == final_names() == {"caption": "captions.jsonl", "ask": "answers.jsonl",
                                                  "embed": "embeddings.jsonl"}
    assert set(parts.RECORD_KEYS) == set(record_keys()) == set(parts.FINAL_NAMES)
    ask = TASKS["ask"].sample()
    assert parts.RECORD_KEYS["ask"](ask) == (ask["path"], ask["question"])
    assert parts.RECORD_KEYS["caption"](TASKS["caption"].sample()) == "a.jpg"


def test_the_contact_sheet_shows_every_setting_of_every_task():
    """Before the registry, the sheet's header dropped an embed run's features and pool."""
    for task in TASKS.values():
        assert set(task.settings) <= set(html.SETTINGS_KEYS)
    assert set(LOADER_SETTINGS) <= set(html.SETTINGS_KEYS)
    assert html.SETTINGS_KEYS == settings_keys() and html.SETTINGS_KEYS[-1] == "generation"
    record = {**TASKS["embed"].sample(), "model": "m", "preprocess": "fast", "features": "qformer", "pool": "mean"}
    assert html.settings_of(record) == {"model": "m", "preprocess": "fast", "features": "qformer", "pool": "mean"}


@pytest.mark.parametrize("name", ["caption", "ask", "embed"])
def test_resume_tells_results_from_settings_as_the_registry_does(name):
    task = TASKS[name]
    settings = {key: "x" for key in (*LOADER_SETTINGS, *task.settings)}
    record = {**task.sample(), **settings}
    assert set(task.record_keys) <= resume.record_fields()
    assert resume.settings_of(record) == settings
    assert resume.differences(record, settings) == []
    for key in settings:  # every setting is compared
        assert resume.differences(record, {**settings, key: "y"})


def test_no_setting_is_also_a_result_of_another_task():
    assert not set(settings_keys()) & result_fields()


@pytest.mark.unit
def test_run_settings_are_the_registrys_in_its_order():
    """One function makes a task's own settings for the CLI, the library and the server."""
    from blip2cli.caption import GenerationOptions
    from blip2cli.tasks import TASKS, run_settings

    gen = GenerationOptions(num_captions=2, num_beams=3)
    made = {
        "caption": run_settings("caption", preprocess="fast", gen=gen),
        "ask": run_settings("ask", preprocess="exact", gen=gen, template="Q: {question} A:"),
        "embed": run_settings("embed", preprocess="fast", features="itc", pool="mean"),
    }
    for name, settings in made.items():
        assert tuple(settings) == TASKS[name].settings
    assert made["caption"]["generation"]["num_captions"] == 2
    assert made["ask"]["generation"]["num_answers"] == 2 and "num_captions" not in made["ask"]["generation"]
    assert made["ask"]["template"] == "Q: {question} A:" and made["embed"]["pool"] == "mean"
