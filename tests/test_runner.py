"""The one runner (issue 18, item 1): one place runs a job, and nothing below it runs one.

* ``webdataset.py`` only reads shards: it imports neither the runner nor anything that
  writes (``parts``, ``writers``), inside functions included;
* no module joins the runner, the task registry, resume, the pipeline or the writers in an
  import circle (imports inside functions counted);
* ``blip2 embed``, ``caption`` and ``ask`` hand one ``Job`` to the runner: none of them
  calls ``pipeline.run`` or makes a reporter itself;
* the pipeline's protocol and the registry's entries are two names (``Stage``, ``Task``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "blip2cli"


def _imports(path: Path) -> set[str]:
    """Every blip2cli module a file imports, at any depth (function bodies too)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module else []
            names += [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out.update(n for n in names if n.startswith("blip2cli."))
    return out


def _graph() -> dict[str, set[str]]:
    files = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p
             for p in [*PACKAGE.glob("*.py"), *PACKAGE.glob("commands/*.py")] if p.name != "__init__.py"}
    return {m: {t for t in _imports(p) if t in files and t != m} for m, p in files.items()}


def _reaches(graph: dict, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_webdataset_only_reads():
    imported = _imports(PACKAGE / "webdataset.py")
    for writer_side in ("blip2cli.job", "blip2cli.parts", "blip2cli.writers", "blip2cli.pipeline"):
        assert writer_side not in imported, writer_side


def test_the_runner_and_the_registry_are_in_no_import_circle():
    graph = _graph()
    for module in ("job", "tasks", "resume", "pipeline", "writers", "schema", "guard", "embedstore", "html",
                   "parts", "caption", "ask", "embed"):
        name = f"blip2cli.{module}"
        assert name not in _reaches(graph, name), f"{name} imports itself through a circle"


def test_commands_hand_a_job_to_the_runner():
    for command in ("caption", "ask", "embed"):
        source = (PACKAGE / "commands" / f"{command}.py").read_text(encoding="utf-8")
        assert "Job(" in source
        for own_run in ("pipeline import", "Reporter(", "sigterm_as_interrupt", "torch.manual_seed"):
            assert own_run not in source, (command, own_run)


def test_one_concept_named_task():
    from blip2cli import pipeline, tasks

    assert hasattr(pipeline, "Stage") and not hasattr(pipeline, "Task")
    assert tasks.Task.__module__ == "blip2cli.tasks"


def test_a_launched_merge_with_inputs_missing_says_nothing_was_merged(tmp_path, capsys):
    """The merge writes nothing under the final name while inputs lack a record: the runner
    must not report a merged file (it used to say "merged 0 records into ...")."""
    from blip2cli.job import Job, JobResult
    from blip2cli.parts import Shard

    class Parts:
        final = tmp_path / "captions.jsonl"

        def __init__(self, missing):
            self.missing = missing

        def merge(self, key_of_record):
            return (0, self.missing) if self.missing else (3, [])

    job = Job(command="caption", load_options=None, make_task=lambda loaded: None, schema=None, fmt="jsonl",
              output=tmp_path)
    result = JobResult()
    job._after_parts(Shard(0, 1, launched=True), Parts(["b.jpg", "c.jpg"]), result)
    err = capsys.readouterr().err
    assert result.merged is None and result.missing == 2
    assert "not merged: 2 inputs have no record yet (first: b.jpg)" in err and "merged 0" not in err
    result = JobResult()
    job._after_parts(Shard(0, 1, launched=True), Parts([]), result)
    assert result.merged == Parts.final and result.missing == 0
    assert f"merged 3 records into {Parts.final}" in capsys.readouterr().err
