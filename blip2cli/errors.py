"""Our own exceptions, and the exit codes they map to.

Commands raise these; ``cli.main`` is the one place that turns them into a
message on stderr (with the next thing to try) and an exit code. Per-image
failures are not exceptions at this level: they become error records.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

# Exit codes, documented in the README.
EXIT_OK = 0
EXIT_ITEMS_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # SIGINT, as shells report it (128 + 2)
EXIT_TERMINATED = 143  # SIGTERM (128 + 15)
EXIT_BROKEN_PIPE = 141  # stdout closed by the reader (128 + SIGPIPE)


class Blip2Error(Exception):
    """An error we can explain to the user. ``hint`` says what to do next."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str | None = None, *, params=()):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.params = tuple(params)

    def reworded(self, spell) -> "Blip2Error":
        """The same error (same class) with each name in ``params`` respelt by a front
        end: ``spell(name, value)`` for ``name=value`` (``name='value'``) in the text,
        ``spell(name, None)`` for a bare name. The core words its messages with the
        parameters' Python names (``num_beams must be at least 1``, ``device='cuda:3'``);
        the CLI shows its flags (``--num-beams``, ``--device cuda:3``)."""
        import copy
        import re

        def respell(text: str | None) -> str | None:
            if text is None:
                return None
            for name in sorted(self.params, key=len, reverse=True):
                text = re.sub(rf"\b{re.escape(name)}=('[^']*'|[^\s,;)]+)",
                              lambda m: spell(name, _unquoted(m.group(1))), text)
                text = re.sub(rf"(?<![-\w.\[]){re.escape(name)}\b(?![.-]\w)", lambda m: spell(name, None), text)
            return text

        clone = copy.copy(self)
        clone.message, clone.hint = respell(self.message) or self.message, respell(self.hint)
        clone.args = (clone.message,)
        return clone

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class UsageError(Blip2Error):
    """Options that contradict each other or make no sense."""


class OptionError(UsageError, ValueError):
    """An impossible option value, worded with the parameters' Python names
    (``num_beams must be at least 1``; hints as ``num_beams=3``). ``params`` lists
    the names a message uses, so a front end can respell them (``reworded``): the
    CLI shows its flags (``--num-beams``). A ``ValueError`` for library callers."""


def _unquoted(value: str) -> str:
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == "'" else value


class InputError(Blip2Error):
    """An input argument that cannot be resolved at all (not a per-image failure)."""


class ModelError(Blip2Error):
    """The model cannot be found, is not a BLIP-2 checkpoint, or cannot be loaded as asked."""


class DeviceError(Blip2Error):
    """A device or dtype that this machine cannot provide."""


class OutputError(Blip2Error):
    """The output cannot be written (unwritable path, disk full)."""

    exit_code = EXIT_ITEMS_FAILED


class Interrupted(BaseException):
    """Raised from a signal handler (SIGTERM): stop the run, keep what is written, exit 143.

    A ``BaseException``, like ``KeyboardInterrupt`` (Ctrl-C): the signal can arrive
    anywhere in the main thread -- while it waits for a decode, inside a library --
    and no ``except Exception`` on the way (one bad image, one failed load) may
    take it for an ordinary error and carry on. Only the places that mean to stop
    catch it (``commands.common.handles_errors``, a store that commits first).
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the run like Ctrl-C does (finished records stay), exit 143."""

    def handler(signum, frame):  # pragma: no cover - exercised through subprocess tests
        raise Interrupted(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. some test runners)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
