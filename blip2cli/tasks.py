"""Every task the program runs, described once.

What the rest of the program needs to know about a task's outputs lives in its
entry of ``TASKS``: the keys of its records (results), the settings its records
carry (so ``--resume``, ``merge`` and the contact sheet's header see every one),
what identifies one record, the merged file of ``-o DIR`` runs, the CSV/text
schema, the sidecar text and what a contact sheet calls its records.
``parts``, ``html`` and the commands read it from here; adding a task is its
own module plus one entry.

Nothing heavy is imported here: the record functions and schemas are looked up
when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# The settings every record carries (``loader.LoadPlan.settings``), before a task's own.
LOADER_SETTINGS = ("model", "revision", "checkpoint", "dtype", "quantize")


@dataclass(frozen=True)
class Task:
    name: str  # the command
    record_keys: tuple[str, ...]  # the result fields of one record, as its record function makes it
    settings: tuple[str, ...]  # the task's own settings its records carry (beside LOADER_SETTINGS)
    sample: Callable[[], dict]  # one record made by the task's record function (for checks)
    schema: Callable[..., object] | None  # schema.Schema factory (CSV/text columns)
    key_of: Callable[[dict], object] | None = None  # what identifies one record (resume, merge)
    final_name: str | None = None  # the merged file of an -o DIR run (None: no part files)
    sidecar_text: Callable[[dict], list] | None = None  # the texts a sidecar file gets
    kind: str = "records"  # what the contact sheet calls them


# -- the record functions, imported when called ------------------------------------------
def _caption_sample() -> dict:
    from .caption import caption_record

    return caption_record("a.jpg", ["a cat"], None)


def _caption_schema(num_captions: int = 1):
    from .caption import caption_schema

    return caption_schema(num_captions)


def _answer_sample() -> dict:
    from .ask import answer_record

    return answer_record("a.jpg", "what is it?", ["a cat"], None)


def _answer_schema(num_answers: int = 1):
    from .ask import answer_schema

    return answer_schema(num_answers)


def _chat_sample() -> dict:
    from .ask import Turn

    return Turn(1, "a.jpg", "what is it?", "a cat").record()


def _embed_sample() -> dict:
    from .embed import image_record

    return image_record("a.jpg", None, "cannot read it")


def _embed_schema():
    from .embed import embed_schema

    return embed_schema()


def _search_sample() -> dict:
    # blip2 search builds its records in the command (rank, then the store's path).
    return {"rank": 1, "path": "a.jpg", "score": 0.5, "itc": 0.5, "itm": None}


def _search_schema():
    from .embed import search_schema

    return search_schema()


def _score_sample() -> dict:
    return {"path": "a.jpg", "text": "a cat", "itm": 0.9, "itc": 0.4, "error": None}


def _score_schema():
    from .embed import score_schema

    return score_schema()


def _path(record: dict):
    return record["path"]


def _path_and_question(record: dict):
    return (record["path"], record.get("question"))


def _captions(record: dict) -> list:
    return record.get("captions") or []


def _answers(record: dict) -> list:
    return record.get("answers") or []


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("caption", ("path", "caption", "captions", "error"), ("preprocess", "generation"),
         _caption_sample, _caption_schema, key_of=_path, final_name="captions.jsonl",
         sidecar_text=_captions, kind="captions"),
    Task("ask", ("path", "question", "answer", "answers", "error"), ("preprocess", "template", "generation"),
         _answer_sample, _answer_schema, key_of=_path_and_question, final_name="answers.jsonl",
         sidecar_text=_answers, kind="answers"),
    Task("chat", ("turn", "image", "question", "answer", "error"), (), _chat_sample, None, kind="answers"),
    Task("embed", ("path", "dims", "vector", "error"), ("preprocess", "features", "pool"),
         _embed_sample, _embed_schema, key_of=_path, final_name="embeddings.jsonl"),
    Task("search", ("rank", "path", "score", "itc", "itm"), (), _search_sample, _search_schema,
         kind="search results"),
    Task("score", ("path", "text", "itm", "itc", "error"), (), _score_sample, _score_schema),
)}


def run_settings(name: str, *, preprocess: str, gen=None, template: str | None = None,
                 features: str | None = None, pool: str | None = None) -> dict:
    """The task's own settings its records carry (beside the loader's), in the registry's
    order, from a run's values: one function for the CLI, the library and the server.
    ``gen``: a ``caption.GenerationOptions`` (ask's records say ``num_answers``)."""
    generation = None
    if gen is not None:
        if name == "ask":
            from .ask import generation_settings

            generation = generation_settings(gen)
        else:
            generation = gen.describe()
    values = {"preprocess": preprocess, "generation": generation, "template": template,
              "features": features, "pool": pool}
    return {key: values[key] for key in TASKS[name].settings}


def task(name: str) -> Task:
    return TASKS[name]


def final_names() -> dict[str, str]:
    """``{command: merged file name}`` for the tasks that write part files."""
    return {t.name: t.final_name for t in TASKS.values() if t.final_name}


def record_keys() -> dict[str, Callable[[dict], object]]:
    """``{command: key function}``: what identifies one record of each task with part files."""
    return {t.name: t.key_of for t in TASKS.values() if t.key_of is not None}


def settings_keys() -> tuple[str, ...]:
    """Every setting a record may carry, in the contact sheet's header order
    (the loader's, then each task's in registry order, ``generation`` last)."""
    out = list(LOADER_SETTINGS)
    for t in TASKS.values():
        out += [k for k in t.settings if k not in out and k != "generation"]
    return (*out, "generation")


def result_fields() -> frozenset:
    """The keys of any task's records that are results, not settings."""
    return frozenset(k for t in TASKS.values() for k in t.record_keys)


# What the runner adds to any task's record besides settings: the sidecar path, the
# exact bytes of a path that is not UTF-8, a shard sample's shard and key.
RUN_FIELDS = ("sidecar", "path_bytes", "shard", "key", "carry_error")


def record_fields() -> frozenset:
    """The keys of a record the runner writes that are results, not settings (what
    ``--resume`` and ``merge`` do not compare): the record keys of the tasks it runs,
    and what it adds itself."""
    return frozenset({*(k for t in TASKS.values() if t.key_of is not None for k in t.record_keys), *RUN_FIELDS})


def task_of(record: dict) -> Task | None:
    """The task whose records look like ``record``: the first one (registry order) whose
    every own key (beside path and error) the record has, else the one with most of them;
    None when none has any (a contact sheet of plain records)."""
    keys = set(record)
    best, most = None, 0
    for t in TASKS.values():
        own = set(t.record_keys) - {"path", "error"}
        if own <= keys:
            return t
        if len(own & keys) > most:
            best, most = t, len(own & keys)
    return best


__all__ = ["LOADER_SETTINGS", "RUN_FIELDS", "TASKS", "Task", "final_names", "record_fields", "record_keys",
           "result_fields", "settings_keys", "task", "task_of"]
