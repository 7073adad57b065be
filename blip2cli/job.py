"""The one runner: a command's run from resolved inputs to written records.

A command parses its flags and hands one :class:`Job` over; the job does what every
model run does around the pipeline, once, in this order: plan the model load (cheap,
no weights) → the output plan (every file the run writes, checked against every input
and every other output, then locked: ``guard``) → settle ``--resume`` / the part files
of ``-o DIR`` / the per-shard outputs → drop items whose sidecar exists (``--existing
skip``) → ``--dry-run`` stops here → load the weights (skipped when nothing is left) and
seed → :func:`run_pipeline` (the reporter, SIGTERM as an interruption) into the writer
(JSON Lines / CSV / text / Parquet / an HTML contact sheet, plus sidecars, ``--metadata``,
``--failed-list``) or into a vector store (``embedstore.StoreOutput``).

Every record carries the settings that made it (model, revision, dtype,
quantization, preprocessing, generation options), which is also what
``--resume`` compares.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from . import console
from .errors import Blip2Error, UsageError
from .parts import SHARD_STATE  # DIR/.shards: the manifest and the part file of each unfinished shard


class RecordWriter(Protocol):
    """What the pipeline writes records into: a format's writer, or one wrapping it."""

    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


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
    make_task: Callable[[Any], Any]  # LoadedModel -> pipeline.Stage
    schema: Any  # schema.Schema
    fmt: str
    output: Path | None = None
    extra_settings: dict = field(default_factory=dict)
    architectures: tuple = ()
    quiet: bool = False
    batch_size: int | None = None
    workers: int | None = None
    sidecar: Any = None  # sidecar.SidecarPolicy or None
    sidecar_text: Callable[[dict], list] | None = None  # None: the task's own (tasks.TASKS)
    resume: bool = False
    dry_run: bool = False
    fail_fast: bool = False
    keys_of_item: Callable = lambda item: [item.name]
    key_of_record: Callable | None = None  # None: the task's own (tasks.TASKS)
    description: str = "processing"
    seed: int | None = None
    shard: str | None = None  # "--shard I/N"
    html: dict = field(default_factory=dict)  # --format html: the writer's options (thumbnails, links, per_card)
    wrappers: list = field(default_factory=list)  # writer -> writer, outermost: --metadata, --failed-list
    samples: Any = None  # webdataset.SampleReader for tar shard inputs (--carry, --ext); None: the defaults
    tar_inputs: bool | None = None  # are tar shards among the inputs (None: not resolved yet)
    store: Any = None  # embedstore.StoreOutput: the records go into a vector store instead
    lead: Callable[[Any], Iterable[dict]] | None = None  # task -> records written before the items' (embed's texts)
    server: Any = None  # client.Remote: a `blip2 serve` is the model (make_task gets None; no weights here)

    def __post_init__(self):
        # What identifies a record and what its sidecar says: the task registry's, once.
        if self.key_of_record is None:
            self.key_of_record = self.task.key_of or _path_of
        if self.sidecar_text is None:
            self.sidecar_text = self.task.sidecar_text or _no_texts

    @property
    def record_key(self) -> Callable:
        """``key_of_record``, which ``__post_init__`` has filled."""
        key = self.key_of_record
        assert key is not None
        return key

    @property
    def out(self) -> Path:
        """``output`` where the run needs one (``check`` has refused a run without it)."""
        out = self.output
        assert out is not None
        return out

    @property
    def task(self):
        """The command's entry in the task registry (``tasks.TASKS``)."""
        from .tasks import TASKS

        return TASKS[self.command]

    def parts_mode(self) -> bool:
        """-o DIR, --shard or a launcher: records go to part files under the directory."""
        if self.store is not None:
            return False  # a store folder is the store
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
            return  # resume: an output directory always resumes, so it is the no-op it says
        if self.tar_inputs and self.sidecar is not None:
            raise UsageError("sidecar does not work with tar shards as inputs (their images are no files)",
                             hint="write records instead: -o captions.jsonl (each record names its shard and key)",
                             params=["sidecar"])
        if self.resume:
            if self.output is None:
                raise UsageError(
                    "resume needs an output file to carry on from",
                    hint=f"`blip2 {self.command} ... -o {self.task.final_name or 'records.jsonl'} --resume`",
                    params=["resume"],
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

    def output_plan(self, shard, names=()):
        """Every file this run writes besides sidecars (checked as they are planned):
        none may be an input or another of them, each is refused if it is an image."""
        from .guard import OutputPlan

        plan = OutputPlan()
        if self.store is not None:
            plan.extend(self.store.planned())
        elif self.tar_inputs and self.parts_mode():  # one output per shard, and its part file
            from .parts import PartsDir

            state = PartsDir(self.output, self.command)
            state.parts = self.output / SHARD_STATE
            plan.add(state.parts / "manifest.json", "the manifest")
            plan.add(state.parts / "inputs.jsonl", "the list of inputs")
            for name in names:
                plan.add(self.output / shard_output(name, self.fmt), "the records of a shard")
                plan.add(shard_part(state, name), "the part file of a shard")
        elif shard is None:
            plan.add(self.output, "the output file", "output", lock=True)
        else:
            from .parts import PartsDir

            parts = PartsDir(self.output, self.command)
            plan.add(parts.part(shard), "the part file", "output", lock=True)
            plan.add(parts.parts / "manifest.json", "the manifest")
            plan.add(parts.parts / "inputs.jsonl", "the list of inputs")
            plan.add(parts.final, "the merged file")
        for wrap in self.wrappers:  # --metadata, --failed-list
            for planned in getattr(wrap, "planned", ()):
                plan.append(planned)
        return plan

    def _run(self, items: Iterable, total: int | None, guard) -> JobResult:
        if total is not None:
            items = list(items)
            self.tar_inputs = any(getattr(i, "tar", False) for i in items)
        self.check()
        if self.fmt == "parquet" and self.samples is not None and self.samples.carry:
            from dataclasses import replace  # carried columns typed before the first record

            known = items if total is not None else None
            self.schema = replace(self.schema, types={**self.schema.types, **self.samples.carry_types(known)})
        result = JobResult(dry_run=self.dry_run)
        if self.tar_inputs and self.parts_mode():  # -o DIR: one output file per shard
            return self._run_per_shard(list(items), guard, result)
        shard = self._shard(total)
        # Before anything is read or written: every file of the plan is no input (a known
        # list is refused here; stdin items are screened as they come) and no other
        # output, and no one else writes it.
        guard.plan(self.output_plan(shard))
        items = guard.screen(items)
        if self.tar_inputs is not False:  # shards become their samples as they are read
            from .webdataset import SampleReader

            if self.tar_inputs:
                total = None
            items = (self.samples or SampleReader()).expand(items)
        if shard is not None and not self.dry_run:
            try:
                from .parts import PartsDir

                PartsDir(self.out, self.command).parts.mkdir(parents=True, exist_ok=True)  # the lock lives there
            except OSError:
                pass  # writing the manifest says why
        guard.hold()
        load_plan, settings = self._settings()
        if self.store is not None:  # a vector store: it selects what it lacks, then commits
            loaded, task = self._start(load_plan, settings)

            def into_store(selected, n, sink, on_interrupt=None):
                writer = sink
                for wrap in self.wrappers:  # --failed-list
                    writer = wrap(writer)
                guard.hold()
                stats = self._pipe(selected, task, writer, self._reporter(n), loaded, on_interrupt=on_interrupt)
                writer.close()
                return stats

            result.stats = self.store.fill(items, task, total, into_store)
            return result

        parts, done, appending = None, set(), False
        if shard is not None:
            parts, mine, done = self._shard_items(shard, items, settings, result)
            items, total, appending = mine, len(mine), True
        elif self.resume:
            items, done, appending = self._resumed_items(items, settings, result)
        if self.sidecar is not None:
            from .sidecar import plan as plan_sidecars

            def on_skip(item, path):
                result.skipped_existing += 1
                if self.dry_run:
                    self._dry_line("skip", path, item.name)

            items = plan_sidecars(items, self.sidecar, on_skip, guard=guard)
        if self.dry_run:
            self._dry_run(items, result)
            return result
        if total is not None:
            items = list(items)
            total = len(items)
        if total == 0 and self.lead is None:  # nothing left: the weights are never read
            self._report_skips(result)
            self._after_parts(shard, parts, result)
            return result
        sink_path = parts.part(shard) if parts is not None else self.output
        result.stats = self._write(items, total, guard, load_plan, settings, sink_path, appending, done, shard)
        self._report_skips(result)
        self._after_parts(shard, parts, result)
        return result

    def _shard(self, total):
        """The slice of the inputs this process takes in an output directory (None: no directory)."""
        if not self.parts_mode():
            return None
        from .parts import Shard, launched_shard, local_device, parse_shard

        if total is None:
            raise UsageError(
                "an output directory needs a list of inputs to divide: stdin cannot be split",
                hint="write the list to a file and pass it as files_from", params=["files_from"],
            )
        shard = parse_shard(self.shard) if self.shard is not None else launched_shard()
        if shard is None:  # one process into a directory: itself is the whole job
            shard = Shard(0, 1, launched=True)
        if self.server is None:
            self.load_options.device = local_device(shard, self.load_options.device)
        return shard

    def _shard_items(self, shard, items, settings: dict, result: JobResult):
        """(the parts directory, this shard's items not done yet, the done keys)."""
        from .parts import PartsDir
        from .resume import load_resume

        items = list(items)
        parts = PartsDir(self.out, self.command)
        if not (shard.launched and shard.index != 0) and not self.dry_run:
            parts.write_manifest([i.name for i in items], settings)
        start, end = shard.bounds(len(items))
        done = parts.done_keys(settings, self.record_key)
        mine = [i for i in items[start:end] if not all(k in done for k in self.keys_of_item(i))]
        result.resumed = (end - start) - len(mine)
        if not self.dry_run:
            load_resume(str(parts.part(shard)), settings, self.record_key)  # own file: cut a torn tail
        if result.resumed:
            console.message(f"part {shard.index}/{shard.count}: {result.resumed} inputs already done")
        return parts, mine, done

    def _resumed_items(self, items, settings: dict, result: JobResult):
        """--resume: (the items not done yet, the done keys, whether the file has records)."""
        from .resume import load_resume

        output = self.out
        state = load_resume(str(output), settings, self.record_key)
        result.resumed = state.kept
        appending = os.path.exists(output) and os.path.getsize(output) > 0
        if state.kept or state.retried or state.torn:
            notes = [f"{state.kept} already done"]
            if state.retried:
                notes.append(f"{state.retried} failed before and will be retried")
            if state.torn:
                notes.append("a torn last record was removed")
            console.message(f"resuming {self.output}: " + ", ".join(notes))
        return state.pending(items, self.keys_of_item), state.done, appending

    def _dry_run(self, items, result: JobResult) -> None:
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

    def _write(self, items, total, guard, load_plan, settings: dict, sink_path, appending: bool, done: set, shard):
        """Load, then the pipeline into the writers (records, sidecars, --metadata, --failed-list)."""
        from .writers import Sink, make_writer

        loaded, task = self._start(load_plan, settings)
        sink = Sink(str(sink_path) if sink_path is not None else None, append=appending,
                    hint=self._full_hint(shard), hint_params=("resume",)).open()
        failed = True
        try:
            # The contact sheet's header shows the settings before the first record.
            options = {"settings": settings, "command": self.command, **self.html} if self.fmt == "html" else {}
            writer: RecordWriter = make_writer(self.fmt, sink, self.schema, header=not appending, **options)
            for record in self.lead(task.task) if self.lead is not None else ():  # embed's texts
                writer.write(record)
            if done:
                writer = _SkipDone(writer, done, self.record_key)
            if self.sidecar is not None:
                from .sidecar import SidecarWriter

                writer = SidecarWriter(self.sidecar, writer, text_of=self.sidecar_text, guard=guard)
            for wrap in self.wrappers:  # they see each record as written (a sidecar error too)
                writer = wrap(writer)
            guard.hold()  # the files just created: their inodes too
            try:
                stats = self._pipe(items, task, writer, self._reporter(total), loaded)
            except Blip2Error as exc:  # the run ends here (a server gone): say where it carries on
                self._say_carry_on(exc, sink, shard)
                raise
            writer.close()  # html: the last card and the closing tags (a cut page shows without them)
            failed = False
        finally:
            sink.close(quiet=failed)  # an error while closing never hides the one on its way out
        return stats

    # -- what every way of running shares: once each --------------------------
    def _start(self, load_plan, settings: dict):
        """Read the weights, seed, and the task that adds the settings to each record."""
        if self.server is not None:  # the server's model: its records, the settings checked
            stage = self.make_task(None)
            stage.expect(settings)
            return None, _Recorded(stage, settings, self.sidecar)
        from .loader import load

        loaded = load(self.load_options, load_plan=load_plan)
        if self.seed is not None:
            import torch

            torch.manual_seed(self.seed)
        return loaded, _Recorded(self.make_task(loaded), settings, self.sidecar)

    def _reporter(self, total):
        from .console import Reporter

        return Reporter(quiet=self.quiet, total=total, description=self.description)

    def _pipe(self, items, task, writer, reporter, loaded, *, on_interrupt=None, close: bool = True):
        """The pipeline, with the reporter and SIGTERM as an interruption (finished records stay
        written; ``on_interrupt`` runs first, e.g. a vector store commits what it has)."""
        from .defaults import default_batch_size, default_workers

        if self.batch_size:
            batch_size = self.batch_size
        else:
            batch_size = self.server.batch_size if self.server is not None else default_batch_size(loaded.device.type)
        return run_pipeline(items, task, writer, reporter=reporter, fail_fast=self.fail_fast, batch_size=batch_size,
                            workers=self.workers or default_workers(), on_interrupt=on_interrupt,
                            close=close, queue_size=QUEUE_SAMPLES if self.tar_inputs is not False else None)

    def _settings(self):
        """The load plan (no weights read) and the settings every record carries."""
        if self.server is not None:  # the server's model: its settings, no load plan here
            return None, {**self.server.settings(), **self.extra_settings}
        from .loader import plan

        kwargs = {"architectures": self.architectures} if self.architectures else {}
        load_plan = plan(self.load_options, task=self.command, **kwargs)
        return load_plan, {**load_plan.settings(), **self.extra_settings}

    # -- -o DIR with shard inputs --------------------------------------------------
    def _check_per_shard(self, items: list) -> None:
        plain = [i.name for i in items if not getattr(i, "tar", False)]
        if plain:
            raise UsageError(
                f"-o {self.output} with tar shards writes one file per shard; {plain[0]!r} is not a shard",
                hint="caption the shards and the other images in separate runs",
            )
        if self.sidecar is not None:
            raise UsageError("sidecar does not work with tar shards as inputs (their images are no files)",
                             params=["sidecar"])
        if self.fmt not in ("jsonl", "parquet"):
            raise UsageError(f"per-shard outputs are JSON Lines or Parquet, not {self.fmt}",
                             hint="drop format, or use format='parquet'", params=["format"])
        if self.fmt == "parquet":
            from .parquet import require_pyarrow

            require_pyarrow()
        stems: dict[str, str] = {}
        for name in (i.name for i in items):
            out = shard_output(name, self.fmt)
            if out in stems and stems[out] != name:
                raise UsageError(f"{stems[out]!r} and {name!r} would both write {out}",
                                 hint="give each shard a different file name, or run them into separate directories")
            stems[out] = name

    def _run_per_shard(self, items: list, guard, result: JobResult) -> JobResult:
        """``-o DIR`` with shard inputs: each shard's records into ``DIR/<name>.<ext>``.

        The run always resumes, as ``-o DIR`` does: a shard whose output exists is done
        (delete the file to redo it); a shard with a part file in ``DIR/.shards`` goes on
        after its last whole record (its failed samples retried); the settings are
        compared with those the directory was started with (and with each part's
        records). ``--shard I/N`` and launcher ranks take whole shards (contiguous slices
        of the sorted shard list)."""
        from .parts import PartsDir

        self._check_per_shard(items)
        names = [i.name for i in items]
        guard.plan(self.output_plan(None, names))
        guard.screen(items)
        guard.hold()
        shard = self._shard(len(names))
        load_plan, settings = self._settings()
        state = PartsDir(self.out, self.command)
        state.parts = Path(self.out) / SHARD_STATE
        if not self.dry_run:
            state.write_manifest(names, settings)  # refuses another command, other inputs
        state.check_settings(settings)
        start, end = shard.bounds(len(names))
        todo = self._shards_todo(names[start:end], state, settings, guard, result)
        if result.resumed:
            console.message(f"{result.resumed} of {end - start} shards already done in {self.output}")
        if self.dry_run:
            console.message(f"dry run: {len(todo)} shards to {self.command}, {result.resumed} done")
            return result
        if todo:
            result.stats = self._write_shards(todo, guard, load_plan, settings)
            if not self.quiet:
                console.message(f"{len(todo)} shard outputs written in {self.output}")
        _meet(shard)
        return result

    def _shards_todo(self, names: list, state, settings: dict, guard, result: JobResult) -> list:
        """[(shard, its output, its part file, the keys done in it)] for the shards not finished."""
        from .resume import load_resume

        todo = []
        for name in names:
            final, part = Path(self.out) / shard_output(name, self.fmt), shard_part(state, name)
            if final.exists():
                result.resumed += 1
                if self.dry_run:
                    self._dry_line("skip", str(final), name)
                continue
            done: set = set()
            if part.exists():
                guard.lock_output(part, what="the part file")  # before its records are read
                done = load_resume(str(part), settings, self.record_key).done
            todo.append((name, final, part, done))
            if self.dry_run:
                self._dry_line(self.command, name, str(final))
        return todo

    def _write_shards(self, todo: list, guard, load_plan, settings: dict):
        """Load once, then each shard through the pipeline into its part file, promoted
        (atomically) when the shard is finished. Returns the summed Stats."""
        from .pipeline import Stats
        from .webdataset import SampleReader
        from .writers import Sink, make_writer

        loaded, task = self._start(load_plan, settings)
        reader = self.samples or SampleReader()
        reporter = self._reporter(None)
        switch = outer = _Switch()
        for wrap in self.wrappers:
            outer = wrap(outer)
        guard.hold()
        total = Stats()
        try:
            for name, final, part, done in todo:
                part.parent.mkdir(parents=True, exist_ok=True)
                guard.lock_output(part, what="the part file")
                sink = Sink(str(part), append=part.exists(), hint=self._full_hint(True)).open()
                failed = True
                try:
                    writer = make_writer("jsonl", sink, self.schema)
                    switch.inner = _SkipDone(writer, done, self.record_key) if done else writer
                    pending = (s for s in reader.samples(name)
                               if not all(k in done for k in self.keys_of_item(s)))
                    stats = self._pipe(pending, task, outer, reporter, loaded, close=False)
                    failed = False
                finally:
                    sink.close(quiet=failed)
                _add(total, stats)
                _promote(part, final, self.fmt, self.schema)
                if self.fail_fast and stats.failed:
                    break
            outer.close()
        finally:
            reporter.close()
        return total

    def _say_carry_on(self, exc, sink, shard) -> None:
        """An error that ends a run after records were written: the hint says they are
        whole and how to go on from them (JSON Lines and part files resume)."""
        from .errors import OutputError

        how = self._carry_on(shard)
        if isinstance(exc, OutputError) or sink.path is None or not sink.records or how is None:
            return  # an output error says it itself (writers.Sink)
        done = f"the {sink.records} records before it are whole in {sink.path}; {how}"
        exc.hint = f"{exc.hint}; {done}" if exc.hint else done
        exc.params = tuple(dict.fromkeys([*exc.params, "resume"]))

    def _carry_on(self, shard) -> str | None:
        """How a run stopped part way carries on from its records (None: it cannot, it reruns)."""
        if shard is not None:
            return "run the same command again: it carries on after the last whole record"
        if self.fmt == "jsonl":
            return "run the same command with resume: it carries on after the last whole record"
        return None

    def _full_hint(self, shard) -> str:
        """What to do after a write error (disk full): where the run will carry on."""
        how = self._carry_on(shard)
        if how is not None:
            return f"free some space, then {how}"
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
            result.missing = len(missing)
            if missing:  # the merge writes nothing under the final name then
                console.message(f"not merged: {len(missing)} inputs have no record yet (first: {missing[0]}); "
                                "run the same command again to finish them")
                return
            result.merged = parts.final
            console.message(f"merged {written} records into {parts.final}")

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


def run_pipeline(items, task, writer, *, reporter, batch_size: int, workers: int, fail_fast: bool = False,
                 queue_size: int | None = None, on_interrupt: Callable[[], None] | None = None,
                 close: bool = True):
    """``pipeline.run`` as every run of the program makes it: SIGTERM becomes an
    interruption like Ctrl-C, ``on_interrupt`` runs before it goes on (the progress line
    closed first), and the reporter is closed at the end (``close=False``: the caller
    closes it, one reporter over several runs)."""
    from .errors import Interrupted, sigterm_as_interrupt
    from .pipeline import run

    try:
        with sigterm_as_interrupt():
            try:
                return run(items, task, writer, batch_size=batch_size, workers=workers, reporter=reporter,
                           fail_fast=fail_fast, **({"queue_size": queue_size} if queue_size else {}))
            except (KeyboardInterrupt, Interrupted):
                if on_interrupt is not None:
                    reporter.close()
                    on_interrupt()
                raise
    finally:
        if close:
            reporter.close()


def _path_of(record: dict):
    return record["path"]


def _no_texts(record: dict) -> list:
    return []


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
        if hasattr(task, "submit_batch"):  # a server's stage: batches sent ahead (pipeline.py)
            self.submit_batch = task.submit_batch
            self.in_flight = task.in_flight
        if hasattr(task, "close"):
            self.close = task.close

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


# -- -o DIR with shard inputs: one output per shard ---------------------------------


def shard_output(name: str, fmt: str) -> str:
    """The file name of a shard's output in ``-o DIR``: its stem, then the format's extension."""
    from .shardfiles import shard_stem

    return shard_stem(name) + (".parquet" if fmt == "parquet" else ".jsonl")


def shard_part(state, name: str) -> Path:
    """Where a shard's records go while it runs (not beside manifest.json, inputs.jsonl)."""
    from .shardfiles import shard_stem

    return state.parts / "parts" / f"{shard_stem(name)}.jsonl"


class _Switch:
    """The writer the pipeline writes to: the current shard's writer (swapped per shard)."""

    def __init__(self):
        self.inner = None

    def write(self, record: dict) -> None:
        self.inner.write(record)

    def close(self) -> None:
        pass


def _meet(shard) -> None:
    if shard.launched and shard.count > 1:
        from .parts import wait_for_everyone

        wait_for_everyone()


def _add(total, stats) -> None:
    total.done += stats.done
    total.failed += stats.failed
    total.seconds += stats.seconds
    for k, v in stats.stage_seconds.items():
        total.stage_seconds[k] = total.stage_seconds.get(k, 0.0) + v
    total.batch_seconds += stats.batch_seconds
    total.batch_size_reduced_to = stats.batch_size_reduced_to or total.batch_size_reduced_to


def _promote(part, final, fmt: str, schema) -> None:
    """A finished shard's part file into place, atomically (JSON Lines: renamed; Parquet:
    written beside the final name from the part's records, then renamed)."""
    if fmt == "jsonl":
        with open(part, "rb") as f:
            os.fsync(f.fileno())
        os.replace(part, final)
        return
    import json

    from .fsutil import replacing
    from .parquet import ParquetWriter
    from .writers import Sink

    with replacing(final) as tmp:
        sink = Sink(tmp).open()
        try:
            writer = ParquetWriter(sink, schema)
            with open(part, "rb") as f:
                for raw in f:
                    if raw.strip():
                        writer.write(json.loads(raw.decode("utf-8", "surrogateescape")))
            writer.close()
        finally:
            sink.close()
    os.unlink(part)
