"""A run directory: held by one process at a time, and written to only once its run is accepted.

Two processes training into one directory would interleave checkpoints, event files and logs, so
the process that trains a run holds an OS lock on ``<run dir>/.lock`` (:func:`hold`); a second one
is refused in one line naming the holder's pid. The lock is a POSIX record lock (``fcntl``), not
``flock``: the kernel releases it however the holder ends (SIGKILL included), forked children such
as async env workers do not inherit it (a worker cannot keep a dead trainer's run locked), it works
on network filesystems, and ``F_GETLK`` tells the holder's pid, so the lock file is never written.

A command that is refused (a resume whose config differs from the checkpoint's, a new run where
one exists, a second process) must leave the run as it found it. So nothing is written there
before the run is *accepted* (:meth:`RunDirectory.accept`): the files that record the command
(``.hydra/``, which Hydra is told not to write itself: ``hydra.output_subdir: null``) and
``train.log`` are written from then on, and log records made before are held in memory until then.

A population (``hydra/launcher=population``) trains several runs in one process, which has one
root logger: a record made inside :func:`logging_for` goes to that run's ``train.log`` only, one
made outside goes to every run's log the process holds.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import struct
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from ppo_cli.errors import UserError

LOCK_FILE = ".lock"
LOG_FILE = "train.log"
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's, as on the console

# struct flock for F_GETLK: its layout, a query for a write lock on the whole file, where l_pid is.
if sys.platform == "darwin" or "bsd" in sys.platform:  # start, len, pid, type, whence
    _FLOCK = ("qqihh", (0, 0, 0, fcntl.F_WRLCK, os.SEEK_SET), 2)
else:  # Linux: type, whence, start, len, pid (and padding)
    _FLOCK = ("hhqqi4x", (fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0), 4)


class RunDirectory:
    """This process's hold on a run directory, and what to do once the run there is accepted."""

    def __init__(self, path: Path, lock_fd: int | None, created_lock: bool) -> None:
        self.path = path
        self.accepted = False
        self._lock_fd = lock_fd
        self._created_lock = created_lock
        self._on_accept: list[Callable[[], None]] = []

    def when_accepted(self, action: Callable[[], None]) -> None:
        """Run ``action`` when the run is accepted (at once if it already is)."""
        if self.accepted:
            action()
        else:
            self._on_accept.append(action)

    def accept(self) -> None:
        """The run is going ahead: from now on it may write into its directory."""
        if not self.accepted:
            self.accepted = True
            for action in self._on_accept:
                action()
            self._on_accept.clear()

    def release(self) -> None:
        if self._lock_fd is None:
            return
        if self._created_lock and not self.accepted:  # a refused command leaves no lock file behind
            (self.path / LOCK_FILE).unlink(missing_ok=True)
        os.close(self._lock_fd)  # releases the lock
        self._lock_fd = None


_held: dict[Path, RunDirectory] = {}  # this process's run directories, by resolved path


@contextmanager
def hold(run_dir: Path, lock: bool = True) -> Iterator[RunDirectory]:
    """Hold ``run_dir`` for the block (again: the same hold, if this process already holds it).

    ``lock=False`` (the ranks of a torchrun group other than 0, which write nothing) only gives a
    RunDirectory to accept.
    """
    key = run_dir.resolve()
    if key in _held:
        yield _held[key]
        return
    directory = _lock(run_dir) if lock else RunDirectory(run_dir, None, False)
    _held[key] = directory
    try:
        yield directory
    finally:
        del _held[key]
        directory.release()


def _lock(run_dir: Path) -> RunDirectory:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder(fd)
        os.close(fd)
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        who = f"process {holder}" if holder else "another process"
        stop = f"stop it (kill {holder})" if holder else "stop it"
        raise UserError(
            f"{run_dir}: in use by {who} (ppo-train holds {path}); wait for it to end or {stop}, "
            "or choose another hydra.run.dir"
        ) from None
    return RunDirectory(run_dir, fd, created)


def _holder(fd: int) -> int | None:
    """The pid of the process that holds the lock on ``fd``'s file (None if it cannot be told)."""
    layout, query, pid_field = _FLOCK
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(layout, *query))
    except OSError:
        return None
    return int(struct.unpack(layout, answer)[pid_field]) or None


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds (part of) a run: a checkpoint or a summary."""
    return (run_dir / "summary.json").is_file() or any((run_dir / "checkpoints").glob("*.pt"))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename: readers never see half a file.
    Raises OSError (the temp file removed)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """:func:`write_text_atomic` for bytes (a figure)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# The run (resolved directory) whose train.log alone gets the records made now; None: every run's.
_logging_run: ContextVar[Path | None] = ContextVar("logging_run", default=None)


@functools.lru_cache(maxsize=1024)
def _resolved(path: Path) -> Path:
    """``path.resolve()``, once per path: a population enters logging_for at every env step."""
    return path.resolve()


@contextmanager
def logging_for(run_dir: Path) -> Iterator[None]:
    """Records logged in the block belong to ``run_dir``'s ``train.log`` only (see the module's
    docstring); a single run needs no such block."""
    token = _logging_run.set(_resolved(run_dir))
    try:
        yield
    finally:
        _logging_run.reset(token)


class DeferredLogFile(logging.Handler):
    """``train.log``: records are held in memory until :meth:`start` (the run is accepted), then
    written there with everything after them. Appends: a resumed run continues the same log."""

    def __init__(self, path: Path, formatter: logging.Formatter | None = None) -> None:
        super().__init__()
        self.path = path
        self._run = path.parent.resolve()
        self.setFormatter(formatter or logging.Formatter(LOG_FORMAT))
        self._held: list[logging.LogRecord] = []
        self._file: logging.FileHandler | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        owner = _logging_run.get()
        return (owner is None or owner == self._run) and bool(super().filter(record))

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is None:
            self._held.append(record)
        else:
            self._file.emit(record)

    def start(self) -> None:
        self._file = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        self._file.setFormatter(self.formatter or logging.Formatter(LOG_FORMAT))
        for record in self._held:
            self._file.emit(record)
        self._held.clear()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


@contextmanager
def deferred_log(run_dir: Path, directory: RunDirectory) -> Iterator[None]:
    """Log to ``<run dir>/train.log`` from the run's acceptance on (with what came before), in the
    console's format, for the block."""
    root = logging.getLogger()
    console_format = next((h.formatter for h in root.handlers if h.formatter is not None), None)
    handler = DeferredLogFile(run_dir / LOG_FILE, console_format)
    root.addHandler(handler)
    directory.when_accepted(handler.start)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
