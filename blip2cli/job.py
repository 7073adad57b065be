"""A job: one command's run from resolved inputs to written records.

Joins what every model command does around the pipeline, in this order:
plan the model load (cheap, no weights) → settle ``--resume`` against the
existing output → drop items whose sidecar exists (``--existing skip``) →
``--dry-run`` stops here → load the weights (skipped when nothing is left) →
run the pipeline into the writer (JSON Lines / CSV / text, plus sidecars).

Every record carries the settings that made it (model, revision, dtype,
quantization, preprocessing, generation options), which is also what
``--resume`` compares.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from . import console
from .errors import UsageError


@dataclass
class JobResult:
    stats: Any = None  # pipeline.Stats, None when nothing ran
    skipped_existing: int = 0
    resumed: int = 0
    dry_run: bool = False


@dataclass
class Job:
    command: str
    load_options: Any  # loader.LoadOptions
    make_task: Callable[[Any], Any]  # LoadedModel -> pipeline Task
    schema: Any  # writers.Schema
    fmt: str
    output: Path | None = None
    extra_settings: dict = field(default_factory=dict)
    architectures: tuple = ()
    quiet: bool = False
    batch_size: int | None = None
    workers: int | None = None
    sidecar: Any = None  # sidecar.SidecarPolicy or None
    sidecar_text: Callable[[dict], list] = lambda r: r.get("captions") or []
    resume: bool = False
    dry_run: bool = False
    fail_fast: bool = False
    keys_of_item: Callable = lambda item: [item.name]
    key_of_record: Callable = lambda record: record["path"]
    description: str = "processing"
    seed: int | None = None

    def check(self) -> None:
        """Option combinations that cannot work, before anything is read."""
        if self.resume:
            if self.output is None:
                raise UsageError(
                    "--resume needs an output file to resume from",
                    hint=f"blip2 {self.command} ... -o results.jsonl --resume",
                )
            if self.fmt != "jsonl":
                raise UsageError(
                    f"--resume works with JSON Lines output, not {self.fmt}",
                    hint="write to a .jsonl file (or pass --format jsonl); sidecar runs resume "
                    "through --existing skip",
                )

    def run(self, items: Iterable, total: int | None) -> JobResult:
        from .loader import load, plan
        from .pipeline import run
        from .writers import Sink, make_writer

        self.check()
        result = JobResult(dry_run=self.dry_run)
        kwargs = {"architectures": self.architectures} if self.architectures else {}
        load_plan = plan(self.load_options, task=self.command, **kwargs)
        settings = {**load_plan.settings(), **self.extra_settings}

        appending = False
        if self.resume:
            from .resume import load_resume

            state = load_resume(str(self.output), settings, self.key_of_record)
            result.resumed = state.kept
            appending = os.path.exists(self.output) and os.path.getsize(self.output) > 0
            if state.kept or state.retried or state.torn:
                notes = [f"{state.kept} already done"]
                if state.retried:
                    notes.append(f"{state.retried} failed before and will be retried")
                if state.torn:
                    notes.append("a torn last record was removed")
                console.message(f"resuming {self.output}: " + ", ".join(notes))
            items = state.pending(items, self.keys_of_item)

        if self.sidecar is not None:
            from .sidecar import plan as plan_sidecars

            def on_skip(item, path):
                result.skipped_existing += 1
                if self.dry_run:
                    self._dry_line("skip", path, item.name)

            items = plan_sidecars(items, self.sidecar, on_skip)

        if self.dry_run:
            n = 0
            for item in items:
                n += 1
                if item.error is not None:
                    self._dry_line("fail", item.error, item.name)
                elif self.sidecar is not None:
                    path = self.sidecar.path_for(item)
                    self._dry_line(self.sidecar.action(path), path, item.name)
                else:
                    self._dry_line(self.command, item.name)
            console.message(
                f"dry run: {n} to {self.command}"
                + (f", {result.skipped_existing} skipped (sidecar exists)" if self.sidecar is not None else "")
                + (f", {result.resumed} already done" if self.resume else "")
            )
            return result

        if total is not None:
            items = list(items)
            total = len(items)
            if total == 0:
                self._report_skips(result)
                return result  # nothing left: the weights are never read

        loaded = load(self.load_options, load_plan=load_plan)
        if self.seed is not None:
            import torch

            torch.manual_seed(self.seed)
        task = _Recorded(self.make_task(loaded), settings, self.sidecar)
        sink = Sink(str(self.output) if self.output is not None else None, append=appending).open()
        from .console import Reporter

        reporter = Reporter(quiet=self.quiet, total=total, description=self.description)
        from .commands.common import sigterm_as_interrupt
        from .options import default_batch_size, default_workers

        try:
            writer = make_writer(self.fmt, sink, self.schema, header=not appending)
            if self.sidecar is not None:
                from .sidecar import SidecarWriter

                writer = SidecarWriter(self.sidecar, writer, text_of=self.sidecar_text)
            with sigterm_as_interrupt():
                result.stats = run(
                    items,
                    task,
                    writer,
                    batch_size=self.batch_size or default_batch_size(loaded.device.type),
                    workers=self.workers or default_workers(),
                    reporter=reporter,
                    fail_fast=self.fail_fast,
                )
        finally:
            reporter.close()
            sink.close()
        self._report_skips(result)
        return result

    def _report_skips(self, result: JobResult) -> None:
        if result.skipped_existing:
            console.message(
                f"skipped {result.skipped_existing} images whose sidecar already exists "
                "(--existing overwrite|append|prepend to redo them)"
            )

    @staticmethod
    def _dry_line(*fields: str) -> None:
        from .writers import escape_text

        print("\t".join(escape_text(f) for f in fields), flush=True)


class _Recorded:
    """Adds the run's settings (and the sidecar path) to every record of a task."""

    def __init__(self, task, settings: dict, sidecar):
        self.task = task
        self.settings = settings
        self.sidecar = sidecar

    def prepare(self, item):
        return self.task.prepare(item)

    def run_batch(self, prepared):
        return self.task.run_batch(prepared)

    def record(self, item, result, error):
        made = self.task.record(item, result, error)
        for record in made if isinstance(made, list) else [made]:
            if self.sidecar is not None and not record.get("error"):
                record["sidecar"] = self.sidecar.path_for(item)
            record.update(self.settings)
        return made
