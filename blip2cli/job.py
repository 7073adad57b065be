"""A job: one command's run from resolved inputs to written records.

Joins what every model command does around the pipeline, in this order:
plan the model load (cheap, no weights) → settle ``--resume`` against the
existing output → drop items whose sidecar exists (``--existing skip``) →
``--dry-run`` stops here → load the weights (skipped when nothing is left) →
run the pipeline into the writer (JSON Lines / CSV / text / an HTML
contact sheet, plus sidecars).

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
    missing: int = 0  # inputs without a record after a merge
    merged: Path | None = None


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
    shard: str | None = None  # "--shard I/N"
    html: dict = field(default_factory=dict)  # --format html: the writer's options (thumbnails, links, per_card)
    wrappers: list = field(default_factory=list)  # writer -> writer, outermost: --metadata, --failed-list
    samples: Any = None  # webdataset.SampleReader for tar shard inputs (--carry, --ext); None: the defaults
    tar_inputs: bool | None = None  # are tar shards among the inputs (None: not resolved yet)

    def parts_mode(self) -> bool:
        """-o DIR, --shard or a launcher: records go to part files under the directory."""
        if self.shard is not None or _launched():
            return True
        out = self.output
        return out is not None and (out.is_dir() or getattr(out, "wants_directory", False)
                                    or str(out).endswith(("/", os.sep)))

    def check(self) -> None:
        """Option combinations that cannot work, before anything is read."""
        if self.parts_mode():
            if self.output is None:
                raise UsageError(
                    "shard and multi-process runs need an output directory",
                    hint=f"`blip2 {self.command} photos/ -o out/ --shard 0/4`", params=["shard"],
                )
            if self.output.exists() and not self.output.is_dir():
                raise UsageError(f"-o {self.output} must be a directory here (part files go inside it)")
            if self.fmt not in ("jsonl",) and not (self.fmt == "parquet" and self.tar_inputs is not False):
                raise UsageError(
                    f"an output directory holds JSON Lines part files, not {self.fmt}",
                    hint="drop format (or use format='jsonl')", params=["format"],
                )
            if self.resume:
                raise UsageError("an output directory always resumes: drop resume", params=["resume"])
            return
        if self.tar_inputs and self.sidecar is not None:
            raise UsageError("sidecar does not work with tar shards as inputs (their images are no files)",
                             hint="write records instead: -o captions.jsonl (each record names its shard and key)",
                             params=["sidecar"])
        if self.resume:
            if self.output is None:
                raise UsageError(
                    "resume needs an output file to carry on from",
                    hint=f"`blip2 {self.command} ... -o results.jsonl --resume`", params=["resume"],
                )
            if self.fmt != "jsonl":
                raise UsageError(
                    f"resume works with JSON Lines output, not {self.fmt}",
                    hint="write to a .jsonl file (or pass format='jsonl'); sidecar runs carry on "
                    "through existing='skip'", params=["resume", "format", "existing"],
                )

    def run(self, items: Iterable, total: int | None) -> JobResult:
        """Locks taken on the way (the output file, sidecar folders) are held to the end."""
        from .guard import RunGuard

        guard = RunGuard(streaming=total is None, locking=not self.dry_run)
        try:
            return self._run(items, total, guard)
        finally:
            guard.release()

    def _outputs(self, shard) -> list:
        """Every file this run writes besides sidecars: none of them may be an input."""
        if shard is None:
            return [self.output] if self.output is not None else []
        from .parts import PartsDir

        parts = PartsDir(self.output, self.command)
        return [parts.part(shard), parts.parts / "manifest.json", parts.parts / "inputs.jsonl", parts.final]

    def _run(self, items: Iterable, total: int | None, guard) -> JobResult:
        from .guard import refuse_image_output
        from .loader import load, plan
        from .pipeline import run
        from .writers import Sink, make_writer

        if total is not None:
            items = list(items)
            self.tar_inputs = any(getattr(i, "tar", False) for i in items)
        self.check()
        result = JobResult(dry_run=self.dry_run)
        if self.tar_inputs and self.parts_mode():  # -o DIR: one output file per shard
            from .webdataset import run_per_shard

            return run_per_shard(self, items, guard, result)
        shard = None
        if self.parts_mode():
            from .parts import Shard, launched_shard, local_device, parse_shard

            if total is None:
                raise UsageError(
                    "an output directory needs a list of inputs to divide: stdin cannot be split",
                    hint="write the list to a file and pass it as files_from", params=["files_from"],
                )
            shard = parse_shard(self.shard) if self.shard is not None else launched_shard()
            if shard is None:  # one process into a directory: itself is the whole job
                shard = Shard(0, 1, launched=True)
            self.load_options.device = local_device(shard, self.load_options.device)
        # Before anything is read or written: no output is an input (a known list is
        # refused here; stdin items are screened as they come), and no one else writes it.
        items = guard.screen(items, self._outputs(shard))
        if self.tar_inputs is not False:  # shards become their samples as they are read
            from .webdataset import SampleReader

            if self.tar_inputs:
                total = None
            items = (self.samples or SampleReader()).expand(items)
        if shard is None:
            refuse_image_output(self.output)
            if not self.dry_run or self.resume:  # --resume rewrites the file, even in a dry run
                guard.lock_output(self.output)
        elif not self.dry_run:
            from .parts import PartsDir

            part = PartsDir(self.output, self.command).part(shard)
            try:
                part.parent.mkdir(parents=True, exist_ok=True)  # DIR/.parts: the lock lives there
            except OSError:
                pass  # writing the manifest says why
            guard.lock_output(part, what="the part file")
        kwargs = {"architectures": self.architectures} if self.architectures else {}
        load_plan = plan(self.load_options, task=self.command, **kwargs)
        settings = {**load_plan.settings(), **self.extra_settings}

        appending = False
        sink_path = self.output
        parts = None
        done: set = set()
        if shard is not None:
            from .parts import PartsDir
            from .resume import load_resume

            items = list(items)
            parts = PartsDir(self.output, self.command)
            if not (shard.launched and shard.index != 0) and not self.dry_run:
                parts.write_manifest([i.name for i in items], settings)
            start, end = shard.bounds(len(items))
            done = parts.done_keys(settings, self.key_of_record)
            mine = [i for i in items[start:end] if not all(k in done for k in self.keys_of_item(i))]
            result.resumed = (end - start) - len(mine)
            sink_path = parts.part(shard)
            if not self.dry_run:
                load_resume(str(sink_path), settings, self.key_of_record)  # own file: cut a torn tail
            appending = True
            if result.resumed:
                console.message(f"part {shard.index}/{shard.count}: {result.resumed} inputs already done")
            items, total = mine, len(mine)
        elif self.resume:
            from .resume import load_resume

            state = load_resume(str(self.output), settings, self.key_of_record)
            done = state.done
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

            items = plan_sidecars(items, self.sidecar, on_skip, guard=guard)

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
                self._after_parts(shard, parts, result)
                return result  # nothing left: the weights are never read

        loaded = load(self.load_options, load_plan=load_plan)
        if self.seed is not None:
            import torch

            torch.manual_seed(self.seed)
        task = _Recorded(self.make_task(loaded), settings, self.sidecar)
        sink = Sink(str(sink_path) if sink_path is not None else None, append=appending,
                    hint=self._full_hint(shard), hint_params=("resume",)).open()
        from .console import Reporter

        reporter = Reporter(quiet=self.quiet, total=total, description=self.description)
        from .errors import sigterm_as_interrupt
        from .defaults import default_batch_size, default_workers

        failed = True
        try:
            # The contact sheet's header shows the settings before the first record.
            options = {"settings": settings, "command": self.command, **self.html} if self.fmt == "html" else {}
            writer = make_writer(self.fmt, sink, self.schema, header=not appending, **options)
            if done:
                writer = _SkipDone(writer, done, self.key_of_record)
            if self.sidecar is not None:
                from .sidecar import SidecarWriter

                writer = SidecarWriter(self.sidecar, writer, text_of=self.sidecar_text, guard=guard)
            for wrap in self.wrappers:  # they see each record as written (a sidecar error too)
                writer = wrap(writer)
            with sigterm_as_interrupt():
                result.stats = run(
                    items,
                    task,
                    writer,
                    batch_size=self.batch_size or default_batch_size(loaded.device.type),
                    workers=self.workers or default_workers(),
                    reporter=reporter,
                    fail_fast=self.fail_fast,
                    **({"queue_size": QUEUE_SAMPLES} if self.tar_inputs is not False else {}),
                )
            writer.close()  # html: the last card and the closing tags (a cut page shows without them)
            failed = False
        finally:
            reporter.close()
            sink.close(quiet=failed)  # an error while closing never hides the one on its way out
        self._report_skips(result)
        self._after_parts(shard, parts, result)
        return result

    def _full_hint(self, shard) -> str:
        """What to do after a write error (disk full): where the run will carry on."""
        if shard is not None:
            return "free some space, then run the same command again: it carries on after the last whole record"
        if self.fmt == "jsonl":
            return ("free some space, then run the same command with resume: it carries on "
                    "after the last whole record")
        return f"free some space, then run the command again ({self.fmt} output cannot resume; JSON Lines can)"

    def _after_parts(self, shard, parts, result: JobResult) -> None:
        """Launched processes meet, then process 0 merges; a manual shard says what is next."""
        if shard is None:
            return
        if not shard.launched:
            console.message(
                f"shard {shard.index}/{shard.count} done; when every shard is: blip2 merge {self.output}"
            )
            return
        if shard.count > 1:
            from .parts import wait_for_everyone

            wait_for_everyone()
        if shard.index == 0:
            written, missing = parts.merge(self.key_of_record)
            result.merged, result.missing = parts.final, len(missing)
            console.message(f"merged {written} records into {parts.final}")
            if missing:
                console.message(f"{len(missing)} inputs have no record yet (first: {missing[0]})")

    def _report_skips(self, result: JobResult) -> None:
        if result.skipped_existing:
            console.message(
                f"skipped {result.skipped_existing} images whose sidecar already exists "
                "(set existing to overwrite, append or prepend to redo them)"
            )

    @staticmethod
    def _dry_line(*fields: str) -> None:
        from .writers import escape_text

        print("\t".join(escape_text(f) for f in fields), flush=True)


# Tar shard samples read ahead of the decode at most (each holds its image's bytes).
QUEUE_SAMPLES = 256


def _launched() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


class _SkipDone:
    """Drops records already in the output (ask: the done questions of an image redone
    for its missing ones), so nothing is written twice."""

    def __init__(self, inner, done: set, key_of_record: Callable):
        self.inner = inner
        self.done = done
        self.key_of_record = key_of_record

    def write(self, record: dict) -> None:
        if not record.get("error") and self.key_of_record(record) in self.done:
            return
        self.inner.write(record)

    def close(self) -> None:
        self.inner.close()


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
            if item.fields:  # a shard sample: shard, key, --carry members
                record.update(item.fields)
            if self.sidecar is not None and not record.get("error"):
                record["sidecar"] = self.sidecar.path_for(item)
            record.update(self.settings)
        return made
