"""Child processes that never outlive the process that started them.

An env worker stuck in a step, or a trainer whose supervisor is gone, would otherwise run on with
parent 1 (at full CPU, for a spinning simulator), and env workers ignore SIGINT and SIGTERM by
design (see ``envs.py``). So each such child asks to be killed when its parent dies: on Linux
the kernel does it (``prctl(PR_SET_PDEATHSIG, SIGKILL)``); elsewhere (macOS) a daemon thread
polls the parent's pid once a second. Standard library only: the supervisor imports this before
anything heavy.

Linux sends the signal when the *thread* that forked the child ends, not the process: children
must be started from a thread that lives as long as its process (the main thread, as ppo-cli does).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_S = 1.0  # how often the portable fallback looks at its parent


def die_with_parent(parent_pid: int | None) -> None:
    """Kill this process (SIGKILL) as soon as its parent, ``parent_pid``, is gone.

    Call it first thing in the child. A parent that died before the request was made is caught
    by comparing ``os.getppid()`` afterwards (the orphan was already handed to another process).
    ``None``: the parent's pid is not known in advance (a multiprocessing forkserver starts the
    child), so only the Linux request is made.
    """
    if sys.platform.startswith("linux") and _set_parent_death_signal(signal.SIGKILL):
        if parent_pid is not None and os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)
    elif parent_pid is not None:
        watcher = threading.Thread(target=_watch_parent, args=(parent_pid,), name="watch-parent", daemon=True)
        watcher.start()


def _set_parent_death_signal(signum: int) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return bool(libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(POLL_S)
    os.kill(os.getpid(), signal.SIGKILL)
