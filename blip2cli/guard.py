"""Guards: an output is never one of the run's inputs, and one writer at a time.

Two promises every command keeps before it writes a byte:

* **An output is never an input.** The ``-o`` file, the part file and manifest under
  ``-o DIR``, a sidecar, a vector store and its index, the page of ``blip2 sheet``: none of
  them may be a file the run reads. Files are compared by identity (device and inode), not
  by name, so ``./x``, a hard link or a symlink are caught too. A known list of inputs is
  checked up front: a clash refuses the run (:class:`UsageError`, exit 2) before the model
  loads and before anything is written. Inputs read from stdin are checked one by one as
  they stream: one that is an output becomes an error record and is never read or written.
  An existing output that is an image (by its magic number) is never overwritten either,
  which also covers inputs that stdin has not named yet.
* **No output is another output.** Before the first write a run knows every file it will
  write (its :class:`OutputPlan`: the ``-o`` file, the part files and manifest of ``-o DIR``,
  one file per shard, the ``--metadata`` file, the ``--failed-list`` file, a vector store and
  its index; sidecars are checked as they are planned, one by one) and checks each against
  every input and every other planned file, by identity or, for files not there yet, by
  real path. A clash refuses the run (exit 2, naming both flags) before the model loads.
* **One writer at a time.** A run holds an advisory kernel lock (``flock``, exclusive,
  non-blocking) on what it writes for as long as it writes: a lock file beside an ``-o``
  file or part file (removed again at the end) and the file object itself (so a hard
  link, another name for the same file, is refused too), the folder itself for sidecars
  (nothing is left in photo folders). A second run is refused (exit 2, as for the vector store's
  own lock) while the first goes on unharmed. The kernel drops the lock when the process
  ends, however it ends (``kill -9`` too): there are no stale locks to clean up. Every lock
  of blip2 (these, and the vector store's writer lock) is one primitive, :func:`flock_open`.

Nothing here imports a heavy library; locks are a no-op where ``fcntl`` is missing (Windows).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
from dataclasses import dataclass, replace
from typing import Iterable, Iterator

from .errors import UsageError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]

FileId = tuple[int, int]

BUSY_HINT = "wait for the other run to finish, or write to another output"


class Busy(UsageError):
    """Another process holds the lock on an output (exit 2, like the vector store's lock)."""


# --------------------------------------------------------------------------- #
# Identity and content
# --------------------------------------------------------------------------- #


def file_id(path: str | os.PathLike, *, follow: bool = True) -> FileId | None:
    """(device, inode) of what ``path`` names, or None when it does not exist."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def looks_like_image(path: str | os.PathLike) -> bool:
    """True for an existing regular file whose first bytes are an image format's magic number.

    Strict enough that a text file is never taken for an image (a caption "BMW ..." is
    not a bitmap): BMP needs a known header size, ISO media an image brand.
    """
    try:
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as fh:
            head = fh.read(32)
    except OSError:
        return False
    return image_magic(head)


def image_magic(head: bytes) -> bool:
    if head.startswith((
        b"\xff\xd8\xff",  # JPEG
        b"\x89PNG\r\n\x1a\n",
        b"GIF87a", b"GIF89a",
        b"II*\x00", b"MM\x00*",  # TIFF
        b"II+\x00", b"MM\x00+",  # BigTIFF
        b"\x00\x00\x00\x0cjP  \r\n\x87\n",  # JPEG 2000
        b"\xff\x4f\xff\x51",  # JPEG 2000 codestream
        b"8BPS",  # Photoshop
        b"qoif",
    )):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    if head[:2] == b"BM" and len(head) >= 18:
        return int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124)
    if head[4:8] == b"ftyp":  # HEIF / AVIF
        return head[8:12] in (b"heic", b"heix", b"hevc", b"mif1", b"msf1", b"avif", b"avis")
    if head[:4] == b"\x00\x00\x01\x00" and len(head) >= 6 and head[4:6] != b"\x00\x00":  # ICO
        return True
    return False


def refuse_image_output(path: str | os.PathLike | None, *, what: str = "the output") -> None:
    """An existing image is never overwritten (or appended to) by records or a page."""
    if path is None or str(path) == "-":
        return
    if looks_like_image(path):
        raise UsageError(
            f"{what} {str(path)!r} is an image: writing there would destroy it",
            hint=f"name another file for {what}",
        )


def _clash_message(item_name: str, output: str) -> str:
    return f"the input {item_name!r} is also the output {output!r}: writing would destroy it"


def _refusal(name: str, planned: Planned) -> UsageError:
    """The input ``name`` is a planned output."""
    params = [] if planned.param == "output" else [planned.param]
    return UsageError(
        _clash_message(name, planned.path) if planned.param == "output"
        else f"the input {name!r} is also {planned.what} {planned.path!r} ({planned.param}): writing would destroy it",
        hint="write the output somewhere else, or leave that file out of the inputs", params=params)


# --------------------------------------------------------------------------- #
# Locks
# --------------------------------------------------------------------------- #


def flock_open(path: str | os.PathLike, message: str, *, hint: str | None = BUSY_HINT,
               flags: int = os.O_RDWR | os.O_CREAT, error: type[UsageError] = Busy,
               stable: bool = False, regular: bool = False, strict: bool = False) -> int | None:
    """blip2's one lock: open ``path`` (``flags``; close-on-exec) and take an exclusive,
    non-blocking ``flock`` on it. Returns the locked fd (closing it releases the lock), or
    None where there is nothing to lock with: no ``fcntl`` (Windows), a file system without
    ``flock``, or (``regular``) not a regular file. Raises ``error(message, hint)`` (a
    :class:`Busy`) when another process holds the lock, and the ``OSError`` of a failed open
    (the caller knows what that means for it).

    ``stable``: ``path`` is a lock file that a holder unlinks when it lets go; retry until
    the file locked is the one ``path`` names. ``strict``: any ``flock`` failure counts as
    held (a vector store refuses rather than be written unguarded).
    """
    if fcntl is None:
        return None
    while True:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
        if regular and not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if strict or exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise error(message, hint=hint) from None
            return None  # a file system without flock: nothing to guard with
        if not stable:
            return fd
        # The previous holder may have removed the file between our open and our lock.
        held = os.fstat(fd)
        if (held.st_dev, held.st_ino) == file_id(path):  # (followed as the open did: no endless loop on a link)
            return fd
        os.close(fd)


class FileLock:
    """An exclusive flock on a lock file beside an output, removed again at release.

    The name is short and fixed in length (``.blip2-<hash>.lock``), so any legal output
    name has a legal lock name. After a ``kill -9`` the empty file may stay; it is not a
    stale lock (the kernel lock went with the process) and the next run reuses it.
    """

    def __init__(self, output: str | os.PathLike, *, what: str = "the output file"):
        real = _real(os.fspath(output))
        folder, name = os.path.split(real)
        digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
        self.output = os.fspath(output)
        self.path = os.path.join(folder, f".blip2-{digest}.lock")
        self.what = what
        self._fd: int | None = None
        self._file_fd: int | None = None  # the output's own inode, locked too

    def acquire(self) -> "FileLock":
        if fcntl is None or self._fd is not None:
            return self
        try:
            self._fd = flock_open(self.path, f"another blip2 run is writing {self.what} {self.output!r}",
                                  stable=True)
        except OSError:
            # No lock file possible here (read-only folder, no folder): opening the
            # output itself will fail with the reason, or there is nothing to guard.
            pass
        try:
            self.hold_file()
        except Busy:
            self.release()
            raise
        return self

    def hold_file(self) -> None:
        """Lock the output's file object too, when it exists: another name for it (a hard
        link) has another lock file but the same inode. Call again once the run created it."""
        if fcntl is None:
            return
        if self._file_fd is not None:
            if (os.fstat(self._file_fd).st_dev, os.fstat(self._file_fd).st_ino) == file_id(self.output):
                return
            os.close(self._file_fd)  # replaced since (a resumed file is rewritten): lock the new one
            self._file_fd = None
        try:
            self._file_fd = flock_open(
                self.output, f"another blip2 run is writing {self.what} {self.output!r} (under another name)",
                flags=os.O_RDONLY | getattr(os, "O_NONBLOCK", 0), regular=True)
        except OSError:
            pass  # not there (yet), or unreadable: the lock file alone guards it

    def release(self) -> None:
        if self._file_fd is not None:
            os.close(self._file_fd)
            self._file_fd = None
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still held: a waiting opener sees another inode and retries
        except OSError:
            pass
        os.close(self._fd)  # releases the lock
        self._fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_output(path: str | os.PathLike | None, *, what: str = "the output file") -> FileLock | None:
    """Lock an output file (not stdout, not a device or pipe) for this run."""
    if path is None or str(path) == "-":
        return None
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isfile(path):
        return None  # /dev/null, a FIFO, a terminal: no file to tear
    return FileLock(path, what=what).acquire()


class FolderLock:
    """An exclusive flock on a folder itself (Linux and the BSDs lock directory fds):
    nothing is created in it."""

    def __init__(self, folder: str | os.PathLike, *, what: str = "sidecars in"):
        self.folder = os.fspath(folder)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        if fcntl is None or self._fd is not None:
            return self
        try:
            self._fd = flock_open(self.folder, f"another blip2 run is writing {self.what} {self.folder!r}",
                                  flags=os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as exc:
            if exc.errno == errno.EMFILE and _raise_fd_limit():
                return self.acquire()
            # cannot open it: writing there fails with its own reason
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _raise_fd_limit() -> bool:
    """Sidecars in thousands of folders hold thousands of folder locks: lift the soft limit."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            new = hard if hard != resource.RLIM_INFINITY else soft * 4
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            return new > soft
    except (ImportError, ValueError, OSError):
        pass
    return False


# --------------------------------------------------------------------------- #
# One run
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Planned:
    """One file of a run's output plan: where, what the user calls it, the parameter
    (the core's name; the CLI says the flag) that named it."""

    path: str
    what: str = "the output"
    param: str = "output"
    lock: bool = False  # held against a second writer for the whole run


class OutputPlan(list):
    """Every file a run will write, known before the first write (sidecars excepted:
    they are checked one by one as they are planned, against this plan too)."""

    def add(self, path, what: str = "the output", param: str = "output", *, lock: bool = False) -> None:
        if path is not None and str(path) != "-":
            self.append(Planned(os.fspath(path), what, param, lock))

    def check(self) -> None:
        """Each file against every other one, and never onto an existing image:
        refuses (exit 2, naming both parameters) before anything is written."""
        seen_ids: dict[FileId, Planned] = {}
        seen_real: dict[str, Planned] = {}
        for p in self:
            if looks_like_image(p.path):
                raise UsageError(f"{p.what} {p.path!r} ({p.param}) is an image: writing there would destroy it",
                                 hint=f"name another file for {p.what}", params=[p.param])
            if _special(p.path):
                continue  # /dev/null, a FIFO, a terminal: no file to tear
            ident = file_id(p.path)
            other = (seen_ids.get(ident) if ident is not None else None) or seen_real.get(_real(p.path))
            if other is not None and other != p:
                params = list(dict.fromkeys([other.param, p.param]))
                raise UsageError(
                    f"{p.what} {p.path!r} ({p.param}) is also {other.what} {other.path!r} ({other.param}): "
                    "one would overwrite the other",
                    hint="give each file the run writes its own name", params=params)
            if ident is not None:
                seen_ids.setdefault(ident, p)
            seen_real.setdefault(_real(p.path), p)

    def owner(self, path: str) -> Planned | None:
        """The planned file that ``path`` is (by identity or real path), else None."""
        if not self:
            return None
        ident = file_id(path)
        real = _real(path)
        for p in self:
            if (ident is not None and file_id(p.path) == ident) or _real(p.path) == real:
                return None if _special(p.path) else p
        return None


def _special(path: str) -> bool:
    """An existing thing that is not a regular file (a device, a FIFO, a folder)."""
    return os.path.exists(path) and not os.path.isfile(path)


class RunGuard:
    """What one run reads and holds: its inputs' identities and its locks.

    ``streaming``: the inputs come from stdin (checked one by one; a problem with one
    item becomes its error record); otherwise the list is known and a problem refuses
    the whole run before anything is written. ``locking=False`` (``--dry-run``): the
    checks run, nothing is locked.
    """

    def __init__(self, *, streaming: bool = False, locking: bool = True):
        self.streaming = streaming
        self.locking = locking
        self.input_ids: set[FileId] = set()
        self.outputs = OutputPlan()
        self._locks: list = []
        self._folders: dict[FileId, FolderLock] = {}
        self._mutex = threading.Lock()  # stdin runs plan sidecars on the source thread

    # -- outputs versus inputs ----------------------------------------------
    def plan(self, outputs: OutputPlan) -> None:
        """The run's output plan, checked against itself now and against every input in
        :meth:`screen` (and each sidecar as it is planned); :meth:`hold` locks them."""
        outputs.check()
        self.outputs = outputs

    def hold(self) -> None:
        """Lock the planned files marked ``lock`` (once each), and the file object of each
        locked output created since it was locked (so that a hard link made to it meets
        the lock too)."""
        for p in self.outputs:
            if p.lock:
                self.lock_output(p.path, what=p.what)
        for lock in self._locks:
            lock.hold_file()

    def screen(self, items: Iterable, outputs: Iterable | None = None) -> Iterable:
        """Refuse (known list) or turn into error records (stdin) the items that are outputs.

        ``outputs``: paths this run writes (None, "-" and folders are ignored); by default
        the plan given to :meth:`plan`. Returns a list when the inputs are known, else a
        generator.
        """
        if outputs is None:
            plan = self.outputs
        else:
            plan = OutputPlan()
            for p in outputs:
                plan.add(p)
        outs = [p.path for p in plan]
        named = {p.path: p for p in plan}
        if self.streaming:
            return self._screen_stream(items, outs)
        items = list(items)
        out_ids = _ids(outs)
        out_real = {_real(p): p for p in outs}
        for item in items:
            clash = self._clash(item, out_ids, out_real)
            if clash is not None:
                raise _refusal(item.name, named[clash])
        return items

    def refuse_inputs(self, paths: Iterable) -> None:
        """Files the run reads besides its items (a query image, the files of a vector store
        it searches, a list of inputs): refused (exit 2) when one is a planned output, whether
        or not the items stream."""
        named = {p.path: p for p in self.outputs}
        out_ids, out_real = _ids(named), {_real(p): p for p in named}
        for path in paths:
            if path is None or str(path) == "-":
                continue
            clash = self._clash_path(os.fspath(path), out_ids, out_real)
            if clash is not None:
                raise _refusal(os.fspath(path), named[clash])

    def _screen_stream(self, items: Iterable, outs: list[str]) -> Iterator:
        for item in items:
            # Stat the outputs again for every item: one may appear only once the run opened it.
            clash = self._clash(item, _ids(outs), {_real(p): p for p in outs})
            if clash is not None:
                yield replace(item, error=f"this file is the output {clash!r} of this run; it is not read")
                continue
            yield item

    def _clash(self, item, out_ids: dict, out_real: dict) -> str | None:
        if getattr(item, "error", None) is not None or not isinstance(item.source, str):
            return None
        return self._clash_path(item.source, out_ids, out_real)

    def _clash_path(self, source: str, out_ids: dict, out_real: dict) -> str | None:
        ident = file_id(source)
        if ident is not None:
            self.input_ids.add(ident)
            return out_ids.get(ident)
        return out_real.get(_real(source))  # not there (yet): a dangling link to an output

    def sidecar_problem(self, path: str) -> str | None:
        """Why a sidecar must not be written at ``path`` (an input, another output of the
        run, or any image), else None. Another planned output refuses a known list whole."""
        ident = file_id(path)
        if ident is not None and ident in self.input_ids:
            return f"its sidecar {path} is an input image of this run: it is never overwritten"
        other = self.outputs.owner(path)
        if other is not None:
            message = f"its sidecar {path} is also {other.what} of this run: one would overwrite the other"
            if not self.streaming:  # a known list: refused before anything is written
                raise UsageError(f"{message} ({other.param})", params=[other.param, "output_dir"],
                                 hint="write that output elsewhere, or the sidecars with output_dir")
            return message
        if ident is not None and looks_like_image(path):
            return f"its sidecar {path} is an image: it is never overwritten"
        return None

    # -- locks -----------------------------------------------------------------
    def lock_output(self, path, *, what: str = "the output file") -> None:
        if not self.locking or any(_real(lock.output) == _real(os.fspath(path)) for lock in self._locks):
            return  # held already
        lock = lock_output(path, what=what)
        if lock is not None:
            self._locks.append(lock)

    def lock_folder(self, folder: str, *, create: bool = False) -> str | None:
        """Hold ``folder`` for this run's sidecars. A known list: raises :class:`Busy`;
        stdin: returns the message for the item's error record."""
        if not self.locking:
            return None
        if create:
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError:
                return None  # writing the sidecar will say why
        ident = file_id(folder)
        if ident is None:
            return None
        with self._mutex:
            if ident in self._folders:
                return None
            try:
                lock = FolderLock(folder).acquire()
            except Busy as exc:
                if self.streaming:
                    return exc.message
                raise
            self._folders[ident] = lock
        return None

    def release(self) -> None:
        with self._mutex:
            folders, self._folders = list(self._folders.values()), {}
        for lock in [*self._locks, *folders]:
            try:
                lock.release()
            except OSError:  # pragma: no cover - closing an fd we own
                pass
        self._locks = []


def _ids(paths: Iterable[str]) -> dict[FileId, str]:
    out: dict[FileId, str] = {}
    for p in paths:
        ident = file_id(p)
        if ident is not None:
            out.setdefault(ident, p)
    return out
