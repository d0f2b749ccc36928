"""Stop at an iteration boundary on SIGINT / SIGTERM, so that the last checkpoint is the current one.

The first signal only raises a flag: the training loop finishes the iteration it is in (a few
seconds at most, plus its evaluation if one is due), writes a checkpoint, and stops. A second
signal, or any signal once the final checkpoint is written, stops at once: nothing is lost that a
checkpoint holds.
Cluster schedulers send SIGTERM some time before SIGKILL; Ctrl-C sends SIGINT. A reader that
goes away (``ppo-train ... | head -1``) is taken as SIGPIPE would be by any Unix tool, but without
losing the iteration: see :class:`StdoutReaderGone`.

Under torchrun each rank receives a terminal's Ctrl-C (or a scheduler's signal to the whole
process group) twice: directly, and forwarded by torchrun's agent a moment later; so does a
trainer from its supervisor (``supervisor.py``), within milliseconds. So there, the same signal
again within ``echo_window`` seconds of the last one is taken for that echo, not for a second
request: also after a signal that stopped the process, whose clean-up an echo must not interrupt.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import threading
import time
from types import FrameType, TracebackType
from typing import Any, ClassVar, TextIO

from ppo_cli import supervisor
from ppo_cli.errors import Interrupted

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
TORCHRUN_ECHO_S = 2.0  # how late torchrun's agent may forward a signal a rank already got
SUPERVISOR_ECHO_S = 0.5  # the same for ppo-train's supervisor, which forwards at once


class GracefulStop:
    """A context manager that turns SIGINT/SIGTERM into a request checked by the caller.

    Outside the main thread (where Python cannot install handlers) it does nothing. With
    ``graceful=False`` every signal stops at once (raises :class:`Interrupted`); ``announce``: log
    the first request and how to stop at once.
    """

    # The last signal this process took, and when: signals are the process's, not one handler's,
    # so an echo is recognised across nested handlers (the command's, then the training loop's).
    _last: ClassVar[tuple[int, float]] = (0, -float("inf"))
    _active: ClassVar[list[GracefulStop]] = []  # entered and not yet left, innermost last

    def __init__(self, echo_window: float = 0.0, graceful: bool = True, announce: bool = True) -> None:
        self.signum: int | None = None
        self.graceful = graceful
        self.echo_window = echo_window
        self.announce = announce
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        last_signum, last_at = GracefulStop._last
        now = time.monotonic()
        if signum == last_signum and now - last_at < self.echo_window:
            return
        GracefulStop._last = (signum, now)
        if self.requested or not self.graceful:
            raise Interrupted(signum, f"stopped by {name}")
        self.signum = signum
        if self.announce:
            log.warning("%s received: stopping after this iteration (send it again to stop at once)", name)

    @classmethod
    def request(cls, signum: int) -> None:
        """Act on ``signum`` as the innermost active handler would on receiving it (none: ignore)."""
        if cls._active:
            cls._active[-1]._handle(signum, None)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
            GracefulStop._active.append(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._previous:
            GracefulStop._active.remove(self)
        self._previous.clear()


def ignore_stop_signals() -> None:
    """The process is ending because a stop signal stopped it: later copies of one (the
    supervisor's forwarded echo arriving late on a loaded machine, another Ctrl-C) have nothing
    left to stop. Ignored, they cannot kill it either while the interpreter shuts down (which
    puts back the default handlers, under which SIGTERM kills), so its exit code and its one
    line stay its own."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def training_stop(distributed: bool) -> GracefulStop:
    """The training loop's GracefulStop, with the echo window of whatever may forward it a
    signal it already got: torchrun's agent (``distributed``), ppo-train's supervisor, or none."""
    if distributed:
        return GracefulStop(TORCHRUN_ECHO_S)
    return GracefulStop(SUPERVISOR_ECHO_S if supervisor.supervised() else 0.0)


class StdoutReaderGone(io.TextIOBase):
    """``sys.stdout``, for which a reader that went away (a closed pipe) is a stop request.

    Python ignores SIGPIPE: a write to a closed pipe raises ``BrokenPipeError`` instead, which
    logging reports with a traceback at every later log line, and ``print`` raises. Here the first
    such write sends stdout to ``os.devnull`` from then on (the log file still gets every line) and
    counts as SIGPIPE for :class:`GracefulStop`: training stops at the end of the iteration with a
    checkpoint, as for Ctrl-C, and the command exits 141 (128 + SIGPIPE) with its one line on
    stderr.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._reader_gone()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._reader_gone()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.stream.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self.stream.errors

    def __getattr__(self, name: str) -> Any:  # buffer, errors, ...: the real stream's
        return getattr(self.stream, name)

    def _reader_gone(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())  # what is still buffered goes there too
        os.close(devnull)
        GracefulStop.request(signal.SIGPIPE)
