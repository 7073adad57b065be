"""Scale-out: part files, shards, and merging them (``-o DIR``, ``--shard i/N``,
``accelerate launch``).

The sorted input list is cut into ``N`` contiguous slices; the process (or
shard) with index ``i`` (0-based) captions slice ``i`` and appends its records
to its own part file, ``DIR/.parts/part-0000i-of-0000N.jsonl``, one whole
record at a time. ``DIR/.parts/manifest.json`` + ``inputs.jsonl`` record the
command and the ordered input list, so that ``blip2 merge DIR`` can join the
parts into ``DIR/captions.jsonl`` (``answers.jsonl``, ``embeddings.jsonl``) in
input order, each input once, atomically, and say what is missing.

A run into a directory always resumes: inputs with a successful record in any
part file (whatever number of processes wrote it, with the same settings) are
skipped; a torn last line is ignored, and the input redone.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .errors import UsageError
from .fsutil import atomic_write
from .shardfiles import shard_stem
from .tasks import final_names, record_keys

PARTS = ".parts"
PART_RE = re.compile(r"^part-(\d{5})-of-(\d{5})\.jsonl$")
# The merged file of each command, and what identifies one of its records (ask: one
# record per image and question): from the task registry.
FINAL_NAMES: dict[str, str] = final_names()
RECORD_KEYS: dict[str, Callable[[dict], object]] = record_keys()


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    launched: bool = False  # started by a launcher (accelerate/torchrun): merge at the end

    def bounds(self, n: int) -> tuple[int, int]:
        """Contiguous, balanced: slice sizes differ by at most one; nothing dropped."""
        return n * self.index // self.count, n * (self.index + 1) // self.count


def parse_shard(text: str) -> Shard:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise UsageError(f"shard={text!r}: expected I/N, e.g. shard='0/8'", params=["shard"])
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or not 0 <= index < count:
        raise UsageError(
            f"shard={text!r}: the index must be between 0 and {count - 1}",
            hint=f"shards are numbered from 0: shard='0/{count}' ... shard='{count - 1}/{count}'",
            params=["shard"],
        )
    return Shard(index, count)


def launched_shard() -> Shard | None:
    """The process's place when started by accelerate launch / torchrun (WORLD_SIZE > 1)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    if world <= 1:
        return None
    state = _partial_state()
    return Shard(state.process_index, state.num_processes, launched=True)


def _partial_state():
    import torch
    from accelerate import PartialState

    # On a machine without GPUs a plain PartialState() makes every process think
    # it is alone; cpu=True gives a real (gloo) process group.
    return PartialState(cpu=not torch.cuda.is_available())


def local_device(shard: Shard | None, requested: str) -> str:
    """Under a launcher each process takes its own GPU."""
    if shard is None or not shard.launched or requested not in ("auto", "cuda"):
        return requested
    import torch

    if not torch.cuda.is_available():
        return requested
    return f"cuda:{_partial_state().local_process_index}"


def wait_for_everyone(poll: float = 0.05) -> None:
    """A barrier that signals can still interrupt.

    A blocking barrier sits in C++ where Python's SIGTERM handler never runs:
    when another process dies, the launcher's SIGTERM to the ones already
    waiting would go unheard and the restart (--max_restarts) would hang. So
    the barrier is asynchronous and polled.
    """
    import time

    import torch.distributed as dist

    _partial_state()
    if not dist.is_available() or not dist.is_initialized():
        return
    work = dist.barrier(async_op=True)
    while not work.is_completed():
        time.sleep(poll)
    work.wait()


def _blob(text: str) -> bytes:
    """A name as SQLite stores it in ``merge``: its UTF-8 bytes, surrogate escapes included
    (SQLite's text cannot hold a lone surrogate)."""
    return text.encode("utf-8", "surrogateescape")


class PartsDir:
    def __init__(self, root: str | Path, command: str):
        self.root = Path(root)
        self.command = command
        self.parts = self.root / PARTS

    @property
    def final(self) -> Path:
        return self.root / FINAL_NAMES.get(self.command, f"{self.command}.jsonl")

    def part(self, shard: Shard) -> Path:
        return self.parts / f"part-{shard.index:05d}-of-{shard.count:05d}.jsonl"

    def part_files(self) -> list[Path]:
        if not self.parts.is_dir():
            return []
        return sorted(p for p in self.parts.iterdir() if PART_RE.match(p.name))

    # -- manifest ------------------------------------------------------------
    def write_manifest(self, names: list[str], settings: dict) -> None:
        """Record the command and the ordered inputs; refuse a directory started otherwise."""
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"-o {self.root}: a file is in the way; a directory is needed here")
        self.parts.mkdir(parents=True, exist_ok=True)
        manifest = self.parts / "manifest.json"
        inputs = self.parts / "inputs.jsonl"
        body = "".join(json.dumps(n, ensure_ascii=False) + "\n" for n in names)
        if manifest.exists() and inputs.exists():
            old = json.loads(manifest.read_text(encoding="utf-8"))
            if old.get("command") != self.command:
                raise UsageError(f"{self.root} holds a `blip2 {old.get('command')}` run, not `{self.command}`")
            if inputs.read_text(encoding="utf-8", errors="surrogateescape") != body:
                raise UsageError(
                    f"{self.root} was started with other inputs",
                    hint="use the same inputs (and order) as the first run, or another output directory",
                )
            return
        atomic_write(inputs, body)
        atomic_write(manifest, json.dumps({"command": self.command, "inputs": len(names), "settings": settings},
                                           ensure_ascii=False, indent=1) + "\n")

    def read_inputs(self) -> list[str]:
        inputs = self.parts / "inputs.jsonl"
        if not inputs.exists():
            raise UsageError(f"{self.root} has no {PARTS}/inputs.jsonl: not a blip2 output directory")
        return [json.loads(l) for l in inputs.read_text(encoding="utf-8", errors="surrogateescape").splitlines() if l]

    def read_manifest(self) -> dict:
        manifest = self.parts / "manifest.json"
        if not manifest.exists():
            raise UsageError(f"{self.root} has no {PARTS}/manifest.json: not a blip2 output directory")
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"{manifest} cannot be read ({exc})",
                             hint="it is written by the first run into the directory; rerun one shard to write it") from None
        if not isinstance(data, dict) or not isinstance(data.get("command"), str):
            raise UsageError(f"{manifest} is not a blip2 manifest")
        return data

    def read_command(self) -> str:
        return self.read_manifest()["command"]

    def check_settings(self, settings: dict) -> None:
        """Refuse a run whose settings differ from those the directory was started with."""
        from .resume import differences

        if not (self.parts / "manifest.json").exists():
            return
        started = self.read_manifest().get("settings")
        if not isinstance(started, dict):
            return  # written before manifests held settings: the records are compared instead
        diff = differences(started, settings)
        if diff:
            raise UsageError(
                f"{self.root} was started with other settings ({'; '.join(diff)}); "
                "this run would mix them",
                hint="run with the same options as the first run, or use another output directory",
            )

    # -- records -------------------------------------------------------------
    def numbered_records(self) -> Iterable[tuple[Path, int, dict]]:
        """(part file, line number, record) for every whole record of every part file.

        A torn last line (a process killed mid-write, or one still writing) is
        ignored; anything else that is not a blip2 record is an error naming the
        part file and line."""
        for path, number, record, *_ in self._located_records():
            yield path, number, record

    def _located_records(self) -> Iterable[tuple[Path, int, dict, int, int, bytes]]:
        """As ``numbered_records``, with each record's byte offset and length in its part
        file, and the line's bytes; the files are read a line at a time (memory: one record)."""
        for path in self.part_files():
            offset = 0
            with open(path, "rb") as f:
                for number, raw in enumerate(f, 1):
                    start, offset = offset, offset + len(raw)
                    if not raw.endswith(b"\n"):
                        break  # after the last newline: a torn record
                    if not raw.strip():
                        continue
                    try:
                        record = json.loads(raw.decode("utf-8", "surrogateescape"))
                    except ValueError:
                        record = None
                    if not isinstance(record, dict) or not isinstance(record.get("path"), str):
                        what = "not JSON" if record is None else 'without a "path"'
                        raise UsageError(
                            f"{path} line {number} is not a blip2 record ({what})",
                            hint=f"part files hold only what blip2 wrote: remove that line, or remove {path.name} "
                            "and rerun its shard",
                        )
                    yield path, number, record, start, len(raw), raw

    def records(self) -> Iterable[dict]:
        """Every whole record of every part file (torn last lines ignored)."""
        for _, _, record in self.numbered_records():
            yield record

    def _check_record(self, path: Path, number: int, record: dict, settings: dict, *, then: str, now: str,
                      hint: str) -> None:
        from .resume import differences

        diff = differences(record, settings, then=then, now=now)
        if diff:
            raise UsageError(
                f"{path} line {number} was made with other settings ({'; '.join(diff)})",
                hint=hint,
            )

    def done_keys(self, settings: dict, key_of_record: Callable) -> set:
        self.check_settings(settings)
        done = set()
        for path, number, record in self.numbered_records():
            self._check_record(
                path, number, record, settings, then="in the part", now="now",
                hint="run with the same options as before, or use another output directory",
            )
            if not record.get("error"):
                done.add(key_of_record(record))
        return done

    def merge(self, key_of_record: Callable) -> tuple[int, list[str]]:
        """Write the final output in input order; return (records written, missing inputs).

        Every record's settings are compared with the manifest's (the first run's):
        a mix is refused, naming the part file, line and setting, before anything
        is written. Per input (and question), the first success wins, else the first
        record.

        Streaming: the records are not held in memory. A temporary SQLite database
        beside the parts (``.parts/.merge-*.sqlite``, removed afterwards) holds, per
        record, its input name, key, whether it failed and where it is (part file,
        offset, length); it is grouped and joined with the input list on disk, and
        the chosen records are read back from the part files into the output, which
        replaces the old one atomically. Memory stays flat whatever the number of
        records (``benchmarks/merge_scale.py``); the missing inputs are listed."""
        import sqlite3
        import tempfile

        from .resume import plain

        settings = self.read_manifest().get("settings")
        standard = plain(settings) if isinstance(settings, dict) else None
        if not (self.parts / "inputs.jsonl").exists():
            self.read_inputs()  # raises: not a blip2 output directory
        fd, db_path = tempfile.mkstemp(prefix=".merge-", suffix=".sqlite", dir=self.parts)
        os.close(fd)
        db = None
        try:
            db = sqlite3.connect(db_path)
            for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE", "cache_size=-32000"):
                db.execute(f"PRAGMA {pragma}")
            # raw: the line is already what the output holds (json.dumps(record, ensure_ascii=False)):
            # copied as bytes, not parsed and written again
            # names and keys are stored as their UTF-8 bytes (surrogate escapes: the file name's own bytes)
            db.execute("CREATE TABLE rec(seq INTEGER PRIMARY KEY, name BLOB, key BLOB, err INTEGER, "
                       "file INTEGER, off INTEGER, len INTEGER, raw INTEGER)")
            db.execute("CREATE TABLE inp(pos INTEGER PRIMARY KEY, name BLOB)")
            files = self._index_records(db, key_of_record, settings, standard)
            self._index_inputs(db)
            # per (input, key): where its key first appears, and the record that wins
            db.execute(f"CREATE TABLE grp AS SELECT name, MIN(seq) AS first, MIN(err * {1 << 40} + seq) AS best "
                       "FROM rec GROUP BY name, key")
            db.execute("CREATE INDEX grp_name ON grp(name, first)")
            rows = db.execute(f"SELECT inp.name, rec.file, rec.off, rec.len, rec.raw FROM inp "
                              f"LEFT JOIN grp ON grp.name = inp.name "
                              f"LEFT JOIN rec ON rec.seq = grp.best % {1 << 40} ORDER BY inp.pos, grp.first")
            written, missing = self._write_final(rows, files)
        finally:
            if db is not None:
                db.close()
            os.unlink(db_path)
        return written, missing

    def _index_records(self, db, key_of_record: Callable, settings, standard) -> list[Path]:
        """Fill ``rec`` with every part's records (checking each one's settings); returns the
        part files, indexed by ``rec.file``."""
        from .resume import plain, settings_of

        files: list[Path] = []
        file_ids: dict[Path, int] = {}
        batch: list = []
        for seq, (path, number, record, off, length, line) in enumerate(self._located_records()):
            if not isinstance(settings, dict):  # an old manifest: the first record sets the standard
                settings = settings_of(record)
                standard = plain(settings)
            if settings_of(record) != standard:  # equal settings have no differences: the common case
                self._check_record(
                    path, number, record, settings, then="in the part", now="in the manifest",
                    hint=f"rerun that shard with the directory's settings (delete {path.name} first), "
                    "or merge only parts made the same way",
                )
            try:
                key = key_of_record(record)
            except KeyError as exc:
                raise UsageError(f"{path} line {number} is not a blip2 `{self.command}` record "
                                 f"(no {exc.args[0]!r})") from None
            if path not in file_ids:
                file_ids[path] = len(files)
                files.append(path)
            try:
                raw = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "surrogateescape") == line
            except UnicodeEncodeError:  # written the slow way (which says what is wrong)
                raw = False
            key = "s" + key if isinstance(key, str) else json.dumps(key, ensure_ascii=False)  # grouped as text
            batch.append((seq, _blob(record["path"]), _blob(key),
                          1 if record.get("error") else 0, file_ids[path], off, length, raw))
            if len(batch) >= 50_000:
                db.executemany("INSERT INTO rec VALUES (?, ?, ?, ?, ?, ?, ?, ?)", batch)
                batch = []
        db.executemany("INSERT INTO rec VALUES (?, ?, ?, ?, ?, ?, ?, ?)", batch)
        return files

    def _index_inputs(self, db) -> None:
        """Fill ``inp`` with the input list, in order."""
        with open(self.parts / "inputs.jsonl", encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            batch, pos = [], 0
            for text in f:
                if text.rstrip("\n"):
                    batch.append((pos, _blob(json.loads(text))))
                    pos += 1
                    if len(batch) >= 10_000:
                        db.executemany("INSERT INTO inp VALUES (?, ?)", batch)
                        batch = []
            db.executemany("INSERT INTO inp VALUES (?, ?)", batch)

    def _write_final(self, rows, files: list[Path]) -> tuple[int, list[str]]:
        """Copy the chosen records (re-serialised as ``merge`` always wrote them) into
        a temporary file beside the output, then rename it over the output. With inputs
        missing, nothing is written (0 records; the temporary file removed)."""
        from .fsutil import replacing

        handles = [open(p, "rb") for p in files]
        written, missing = 0, []
        try:
            with replacing(self.final) as tmp, open(tmp, "wb") as out:
                for name, file, off, length, raw in rows:
                    if file is None:
                        missing.append(name.decode("utf-8", "surrogateescape"))
                        continue
                    if missing:
                        continue  # nothing will be written: only the missing ones are still counted
                    src = handles[file]
                    src.seek(off)
                    line = src.read(length)
                    if raw:  # already as merge writes it (checked when it was read)
                        out.write(line)
                    else:
                        record = json.loads(line.decode("utf-8", "surrogateescape"))
                        out.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "surrogateescape"))
                    written += 1
                if missing:  # nothing partial under the final name (an older whole one stays)
                    raise _Incomplete
                out.flush()
                os.fsync(out.fileno())
        except _Incomplete:
            written = 0
        finally:
            for h in handles:
                h.close()
        return written, missing


class _Incomplete(Exception):
    """Inputs without a record: the merged file is not written."""


SHARD_STATE = ".shards"  # -o DIR with shard files as inputs: DIR/.shards/manifest.json, one output per shard


def shard_outputs_dir(root: Path) -> bool:
    """Is ``root`` the ``-o DIR`` of a run over shard files (tars, Parquet files)?"""
    return (Path(root) / SHARD_STATE / "manifest.json").exists() and not (Path(root) / PARTS / "manifest.json").exists()


def merge_shard_outputs(root: Path) -> tuple[Path, int, list[str]]:
    """``blip2 merge DIR`` over the per-shard outputs of ``-o DIR/`` runs with tar or Parquet
    inputs (one or several ``--shard I/N`` runs): every shard's records, in the order of the
    shards, into ``DIR/<final name>`` (``captions.jsonl`` ...), written atomically. Every
    record's settings are compared with the manifest's. Returns (final, records, missing
    shards); with shards missing nothing is written."""
    from .fsutil import replacing
    from .resume import plain, settings_of
    root = Path(root)
    state = PartsDir(root, "caption")
    state.parts = root / SHARD_STATE
    manifest = state.read_manifest()
    command = manifest.get("command", "caption")
    state.command = command
    settings = manifest.get("settings")
    standard = plain(settings) if isinstance(settings, dict) else None
    names = state.read_inputs()
    final = state.final
    outputs, missing = [], []
    for name in names:
        stem = shard_stem(name)
        found = [root / f"{stem}{ext}" for ext in (".jsonl", ".parquet") if (root / f"{stem}{ext}").exists()]
        if not found:
            missing.append(name)
        elif found[0] == final:
            raise UsageError(f"the shard {name!r} wrote {final.name}, the merged file's own name",
                             hint="rename that shard's output and the shard, or merge by hand")
        else:
            outputs.append(found[0])
    if missing:
        return final, 0, missing
    written = 0
    with replacing(final) as tmp, open(tmp, "wb") as out:
        for path in outputs:
            for number, record in enumerate(_records_of(path, settings if isinstance(settings, dict) else None), 1):
                if standard is None:
                    standard = plain(settings_of(record))
                    settings = standard
                if settings_of(record) != standard:
                    state._check_record(path, number, record, standard, then="in the shard's output",
                                        now="in the manifest", hint=f"redo that shard with the directory's "
                                        f"settings (delete {path.name} first)")
                out.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "surrogateescape"))
                written += 1
        out.flush()
        os.fsync(out.fileno())
    return final, written, missing


def _records_of(path: Path, settings: dict | None = None) -> Iterable[dict]:
    """A shard's output, JSON Lines or Parquet, a record at a time (Parquet: a row group at a time).

    The Parquet writer keeps nested settings (``generation``, ``carry``) as JSON text: those
    the manifest holds as objects or lists are read back as such. (A carried ``json`` member
    stays the JSON text it is in the Parquet file.)"""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        nested = [k for k, v in (settings or {}).items() if isinstance(v, (dict, list))]
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=1000):
            for row in batch.to_pylist():
                for key in nested:
                    if isinstance(row.get(key), str):
                        try:
                            row[key] = json.loads(row[key])
                        except ValueError:
                            pass  # compared as it is: the difference is named
                yield row
        return
    with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
