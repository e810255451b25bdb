"""The files a sweep writes: atomic writes (a reader, or an interrupted run, never sees a half-written
file), numbered backups of earlier results, the output folder's lock, and one-line descriptions of the
operating-system errors a write can meet. Standard library only; no torch.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import re
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lightkv_cli.errors import UserError

#: The lock file a sweep holds in its output folder while it writes there.
LOCK_FILE = ".lightkv.lock"


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file in the same folder and ``os.replace``.

    The folder is created if missing; the file is readable by others (0644), like a plain write. On any
    failure or interruption (an exception, Ctrl-C, a signal turned into an exception) the temporary file
    is removed and ``path`` keeps its previous content.

    Raises:
        OSError: the folder cannot be created or written; its ``filename`` is ``path`` (not the
            temporary file) and its ``errno`` says why (ENOSPC, EFBIG, EACCES, ...).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        if exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path


def describe_os_error(exc: OSError, action: str = "write", path: Path | str | None = None) -> str:
    """One line for a failed file operation, e.g. ``cannot write 'out/results.json': No space left on
    device (ENOSPC)``; ``path`` defaults to the error's ``filename``."""
    target = path if path is not None else exc.filename
    name = errno.errorcode.get(exc.errno or -1)
    meaning = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__)
    where = f" '{target}'" if target is not None else ""
    return f"cannot {action}{where}: {meaning}" + (f" ({name})" if name else "")


def os_error_hint(exc: OSError) -> str:
    """What to do about a failed write, by its errno, in the imperative ("" when there is nothing useful
    to say)."""
    return {
        errno.ENOSPC: "free some space",
        errno.EDQUOT: "free some space (disk quota exceeded)",
        errno.EFBIG: "raise the file-size limit (ulimit -f)",
        errno.EACCES: "make the folder writable",
        errno.EPERM: "make the folder writable",
        errno.EROFS: "make the file system writable",
    }.get(exc.errno or -1, "")


# --------------------------------------------------------------------------------------------------
# Earlier results: numbered backups, temporary files of dead writers.
# --------------------------------------------------------------------------------------------------


def move_aside_numbered(folder: Path, names: Sequence[str]) -> list[Path]:
    """Move those of ``folder/names`` that exist to ``NAME.N.bak``, with one ``N`` for all of them: one
    more than the highest number any of ``names`` already has, so no earlier backup is ever replaced.

    Returns:
        The backups made (empty when none of ``names`` exists).

    Raises:
        OSError: a file cannot be moved.
    """
    folder = Path(folder)
    present = [folder / n for n in names if (folder / n).is_file()]
    if not present:
        return []
    taken = 0
    patterns = [re.compile(re.escape(n) + r"\.(\d+)\.bak") for n in names]
    for entry in folder.iterdir():
        for pattern in patterns:
            m = pattern.fullmatch(entry.name)
            if m:
                taken = max(taken, int(m.group(1)))
    moved = []
    for p in present:
        dest = p.with_name(f"{p.name}.{taken + 1}.bak")
        os.replace(p, dest)
        moved.append(dest)
    return moved


def remove_stale_temp_files(folder: Path, names: Sequence[str]) -> list[Path]:
    """Remove the temporary files :func:`write_text_atomic` leaves when its process is killed outright
    (``.NAME.*.tmp``, for each of ``names``). Call it only while holding the folder's
    :class:`OutputLock`: then no live writer owns them. Returns the files removed."""
    removed = []
    for name in names:
        for p in Path(folder).glob(f".{glob_escape(name)}.*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


# --------------------------------------------------------------------------------------------------
# The output folder's lock.
# --------------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


class OutputLock:
    """The lock of an output folder: while a sweep writes ``results.json`` and the reports there, the
    folder holds ``.lightkv.lock`` with the owner's pid, host, start time and command.

    :meth:`acquire` takes it (at most once; later calls do nothing); leaving the ``with`` block (or
    :meth:`release`) removes it. A lock naming a process that is still running (on this host, or any
    process on another host, which cannot be checked) is refused with one line; a lock left by a
    process that no longer runs is taken over, and :meth:`acquire` returns a note saying so.

    Args:
        folder: the output folder (must exist when :meth:`acquire` is called).
        command: the command line, recorded in the lock for whoever finds it.
    """

    def __init__(self, folder: Path, command: str = ""):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.command = command
        self.held = False
        self._mine: dict | None = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> str | None:
        """Take the lock; return a note when a stale lock was taken over, else None.

        Raises:
            UserError: another sweep holds the folder (the message names its pid and host), or the
                lock cannot be written.
        """
        if self.held:
            return None
        self._mine = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": self.command,
        }
        note = None
        for _ in range(10):
            if self._create():
                self.held = True
                return note
            owner = self._read()
            if owner is None:  # removed meanwhile
                continue
            pid, host = owner.get("pid"), owner.get("host")
            live = isinstance(pid, int) and pid > 0 and (host != self._mine["host"] or _pid_alive(pid))
            if live:
                since = f", since {owner['started']}" if owner.get("started") else ""
                raise UserError(
                    f"--output '{self.folder}' is in use by another lightkv sweep (pid {pid} on {host}{since}); "
                    f"wait for it to finish or give another --output (if that process is not lightkv, delete "
                    f"{self.path})"
                )
            if self._take_over(owner):
                who = f"pid {pid} on {host}" if isinstance(pid, int) else "an unreadable lock file"
                note = f"took over the lock of {self.folder} left by {who}, which is no longer running"
        raise UserError(f"cannot lock --output '{self.folder}': the lock file {self.path} keeps changing")

    def release(self) -> None:
        """Remove the lock if this object holds it (and it still names this process)."""
        if not self.held:
            return
        self.held = False
        owner = self._read()
        if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == self._mine["host"]:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def _create(self) -> bool:
        """Create the lock file with its whole content at once (a hard link of a written temporary
        file); False when one exists."""
        text = json.dumps(self._mine) + "\n"
        try:
            fd, tmp = tempfile.mkstemp(prefix=f"{LOCK_FILE}.", suffix=".tmp", dir=self.folder)
        except OSError as exc:
            raise UserError(f"cannot lock --output: {describe_os_error(exc, path=self.path)}") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError as exc:  # no hard links here (some network or FAT file systems)
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
                    raise UserError(f"cannot lock --output: {describe_os_error(exc, path=self.path)}") from None
            try:
                lock_fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(lock_fd, "w", encoding="utf-8") as f:
                f.write(text)
            return True
        except OSError as exc:
            raise UserError(f"cannot lock --output: {describe_os_error(exc, path=self.path)}") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _read(self) -> dict | None:
        """The lock's owner; ``{}`` for a file that does not parse; None when there is no lock file."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            data = json.loads(text)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _take_over(self, stale: dict) -> bool:
        """Remove the stale lock ``stale``; False when the file changed meanwhile (another sweep's)."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise UserError(f"cannot take over the stale lock: {describe_os_error(exc, 'move', self.path)}") from None
        try:
            try:
                moved = json.loads(aside.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                moved = {}
            if moved == stale or (not isinstance(moved, dict) and stale == {}):
                return True
            with contextlib.suppress(OSError):  # a fresh lock of another sweep: put it back
                os.link(aside, self.path)
            return False
        finally:
            with contextlib.suppress(OSError):
                aside.unlink()
