"""What keeps a long command's files whole when it is told to stop or its console goes away: SIGTERM
raised as an interruption, like Ctrl-C (so the finished runs are kept and the reports written);
SIGXFSZ ignored (a file-size limit then fails the write with EFBIG, which is reported, instead of
killing the process); and a standard output that may close (``| head``) or fill up (``> /dev/full``)
without stopping the work. No torch.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process gets SIGTERM (``signum``), inside :func:`stop_signals`."""

    def __init__(self, signum: int):
        super().__init__()
        self.signum = signum


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """While inside: SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``); SIGXFSZ is ignored.
    The previous handlers come back on exit. Does nothing outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [(signal.SIGTERM, _raise_terminated)]
    if hasattr(signal, "SIGXFSZ"):
        wanted.append((signal.SIGXFSZ, signal.SIG_IGN))
    previous = {}
    try:
        for sig, handler in wanted:
            previous[sig] = signal.signal(sig, handler)
        yield
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class GuardedStream:
    """A text stream that stops writing, instead of raising, once a write fails (a closed pipe, a full
    device): the error is kept in ``error`` and the stream's file descriptor is pointed at the null
    device, so nothing later (another print, the interpreter's final flush) fails again."""

    def __init__(self, stream):
        self.stream = stream
        self.error: OSError | None = None
        self.target: str | None = None

    def write(self, text: str) -> int:
        if self.error is None:
            try:
                return self.stream.write(text)
            except OSError as exc:
                self._stop(exc)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self.error is None:
            try:
                self.stream.flush()
            except OSError as exc:
                self._stop(exc)

    @property
    def closed_by_reader(self) -> bool:
        """The reader went away (``| head``): a broken pipe, not worth a message."""
        return isinstance(self.error, BrokenPipeError) or getattr(self.error, "errno", None) == errno.EPIPE

    def _stop(self, exc: OSError) -> None:
        self.error = exc
        with contextlib.suppress(Exception):
            fd = self.stream.fileno()
            with contextlib.suppress(OSError):
                self.target = os.readlink(f"/proc/self/fd/{fd}")
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def guarded_stdout() -> Iterator[GuardedStream]:
    """``sys.stdout`` as a :class:`GuardedStream` while inside (rich's consoles write to ``sys.stdout``
    at print time, so every print goes through it)."""
    guard = GuardedStream(sys.stdout)
    sys.stdout = guard
    try:
        yield guard
    finally:
        if sys.stdout is guard:
            sys.stdout = guard.stream
