"""ppo-train as two processes: the trainer, and a small parent that outlives it to report its crash.

A crash in native code (SIGSEGV in a simulator, torch or a driver) or the out-of-memory killer's
SIGKILL ends a process without running any more of its Python: no ``summary.json``, no one-line
report, and the shell's "Segmentation fault". So ``ppo-train`` forks first thing, before torch,
CUDA, torch.distributed or any thread exists: the child trains; the parent (a bare interpreter:
standard library only) waits for it. The child tells the parent, over a pipe, which run it is in and each
checkpoint it writes (a few bytes per checkpoint, nothing per step). When the child dies of a
signal, the parent records that in the run's ``summary.json`` (:func:`crash_summary`), prints one
line and exits 128 + the signal; otherwise it exits as the child did, and stays invisible.

Signals: the parent forwards SIGINT and SIGTERM to the child. Where the child got the signal
itself too (Ctrl-C in a terminal, a scheduler signalling the process group), the trainer takes
the forwarded copy for an echo (``signals.py``), as it does for torchrun's. Under torchrun each rank
is such a pair; rank 0's parent reports. The child dies with its parent (``processes.py``). In a
multirun whose jobs run in this process (the basic launcher), the crash is the running job's.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from ppo_cli.errors import UserError
from ppo_cli.processes import die_with_parent
from ppo_cli.rundir import LOG_FILE

FORWARDED = (signal.SIGINT, signal.SIGTERM)
NATIVE_CRASH = "a crash in native code: an env, a simulator, torch"
CRASH_HINTS: dict[int, str] = {
    **dict.fromkeys((signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE), NATIVE_CRASH),
    signal.SIGABRT: "aborted by native code: an env, a simulator, torch",
    signal.SIGKILL: "killed from outside: the out-of-memory killer, or kill -9",
}
READER_WAIT_S = 2.0  # for the last reports still in the pipe once the trainer is gone

_channel: int | None = None  # in the trainer: the write end of the pipe to its supervisor
_fatal_log: IO[str] | None = None  # in the trainer: the run's log, opened for faulthandler


def supervise(prog: str) -> None:
    """Fork: return in the child, which goes on to train; in the parent, wait for the child and
    exit as it did (never returns). Does nothing where there is no fork (Windows).

    Call it with SIGINT and SIGTERM blocked (``signal.pthread_sigmask``): the parent unblocks them
    once it forwards them, the child once it has its own handlers.
    """
    global _channel
    if not hasattr(os, "fork"):
        return
    read_end, write_end = os.pipe()  # not inherited by programs the trainer starts (O_CLOEXEC)
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        die_with_parent(parent)
        _channel = write_end
        return
    os.close(write_end)
    sys.exit(_Supervisor(child, read_end, prog).wait())


def supervised() -> bool:
    """True in a trainer whose signals may come twice: directly, and forwarded by its supervisor."""
    return _channel is not None


def run_started(run_dir: Path, summary: dict[str, Any]) -> None:
    """Tell the supervisor (if any) that this process now trains in ``run_dir``, accepted there,
    with ``summary`` as ``summary.json`` would be written now; and have a fatal error's stack
    trace (faulthandler) appended to the run's ``train.log``, unless faulthandler already writes
    somewhere (``PYTHONFAULTHANDLER``, a sweep's job file)."""
    global _fatal_log
    if _channel is None:
        return
    if not faulthandler.is_enabled():
        with contextlib.suppress(OSError):  # no log then; the run reports the directory's fault itself
            _fatal_log = open(run_dir / LOG_FILE, "a", encoding="utf-8")  # noqa: SIM115 (closed in run_ended)
            faulthandler.enable(file=_fatal_log, all_threads=True)
    _report(run_dir=str(run_dir), summary=summary, log=_fatal_log and _fatal_log.name)


def checkpoint_saved(path: Path, global_step: int) -> None:
    """Tell the supervisor (if any) where the newest checkpoint is."""
    _report(checkpoint=str(path), global_step=global_step)


def run_ended() -> None:
    """Tell the supervisor (if any) that ``summary.json`` holds the run's outcome; the log file may
    close now, so faulthandler stops writing to it."""
    global _fatal_log
    if _channel is None:
        return
    if _fatal_log is not None:
        faulthandler.disable()
        _fatal_log.close()
        _fatal_log = None
    _report(finished=True)


def _report(**fields: Any) -> None:
    if _channel is None:
        return
    data = (json.dumps(fields, default=str) + "\n").encode()
    try:
        while data:
            data = data[os.write(_channel, data) :]
    except OSError:  # the supervisor is gone: this process is about to be killed anyway
        pass


def crash_summary(run: dict[str, Any], signum: int, forwarded: bool) -> dict[str, Any]:
    """What ``summary.json`` says of a run whose process died of ``signum``, from the last reports
    (``run``: ``summary`` as the trainer started it, the last ``checkpoint`` and its ``global_step``)."""
    summary = dict(run.get("summary", {}))
    if "global_step" in run:
        summary["global_step"] = run["global_step"]
    summary["status"] = "interrupted" if forwarded else "failed"
    summary["error"] = f"the training process died of {signal.Signals(signum).name}"
    if "started_at" in run:
        summary["wall_time_s"] = round(time.time() - run["started_at"], 2)
    return summary


def last_checkpoint(run: dict[str, Any]) -> str | None:
    """The newest checkpoint of the run: written by this process, or the one it resumed from."""
    resumed = run.get("summary", {}).get("resumed_from") or {}
    return run.get("checkpoint") or resumed.get("checkpoint")


class _Supervisor:
    def __init__(self, child: int, read_end: int, prog: str) -> None:
        self.child = child
        self.prog = prog  # the command's name, which starts the line it prints
        self.forwarded: set[int] = set()
        self.run: dict[str, Any] = {}
        self.reader = threading.Thread(target=self._read, args=(read_end,), name="reports", daemon=True)

    def wait(self) -> int:
        """The child's exit code, or 128 + the signal that killed it (after reporting it)."""
        self.reader.start()
        for forwarded in FORWARDED:
            signal.signal(forwarded, self._forward)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        _, status = os.waitpid(self.child, 0)
        for forwarded in FORWARDED:  # nothing left to forward to; the report below must not be cut short
            signal.signal(forwarded, signal.SIG_IGN)
        if os.WIFEXITED(status):
            return os.WEXITSTATUS(status)
        signum = os.WTERMSIG(status)
        self.reader.join(READER_WAIT_S)
        print(f"{self.prog}: {self._describe(signum)}", file=sys.stderr, flush=True)
        return 128 + signum

    def _forward(self, signum: int, frame: object) -> None:
        self.forwarded.add(signum)
        with contextlib.suppress(ProcessLookupError):  # reaped already: the parent is on its way out
            os.kill(self.child, signum)

    def _read(self, read_end: int) -> None:
        with os.fdopen(read_end, "rb") as reports:
            for line in reports:
                message = json.loads(line)
                if "run_dir" in message:  # a new run (the next job of a multirun) starts
                    self.run = {"started_at": time.time()}
                self.run.update(message)

    def _describe(self, signum: int) -> str:
        """The one line for a child that died of ``signum``; records the crash in its run."""
        name = signal.Signals(signum).name
        forwarded = signum in self.forwarded
        run = self.run
        active = "run_dir" in run and not run.get("finished")
        if forwarded:
            line = f"stopped by {name}"
        else:
            hint = CRASH_HINTS.get(signum)
            where = f"{run['run_dir']}: " if active else ""
            line = f"error: {where}the training process died of {name}" + (f" ({hint})" if hint else "")
            if active and run.get("log") and signum != signal.SIGKILL:
                line += f"; its stack trace is in {run['log']}"
        if not active:
            return line
        run_dir = Path(run["run_dir"])
        try:
            write_crash_summary(run_dir, crash_summary(run, signum, forwarded))
        except UserError as exc:  # e.g. a full disk: say so, and still tell where the checkpoint is
            line += f"; {exc}"
        checkpoint = last_checkpoint(run)
        if checkpoint is None:
            return f"{line}; no checkpoint was written"
        from ppo_cli.resume import resume_command  # as write_crash_summary: torch, on the way out only

        return f"{line}; last checkpoint: {checkpoint}; resume with: {resume_command(run_dir)}"


def write_crash_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Write ``summary`` as the run's ``summary.json``. Imported only here, on the way out of a
    crash: ``logger`` brings torch, which the supervisor never imports otherwise."""
    from ppo_cli.logger import write_summary

    write_summary(run_dir, summary)
