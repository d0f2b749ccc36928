"""The console scripts: import the command's module with Python's cyclic garbage collector held back.

Starting ``ppo-train`` imports torch, Hydra and gymnasium: about a million long-lived objects
and little garbage. With the default thresholds the cyclic collector walks through all of them
again and again while they are created, and once more when the interpreter exits: a large share
of the start (``benchmarks/RESULTS.md``). So each entry point raises the threshold of the
youngest generation while it imports (collections stay, just rarer: pausing the collector
altogether saves a little more time but keeps the import garbage in memory), then
``gc.freeze()`` moves everything imported into a generation the collector never visits again
(the remedy CPython documents for long-lived objects), and restores the thresholds. What a
command imports to do its work is imported here, not where cli.py uses it, except when ppo-train
is only asked a question (``--help``, ``--cfg``, a completion query: ``cli.answers_at_once``),
which Hydra answers from the configs without torch or gymnasium.

Before that, ``ppo-train`` splits into a supervisor and the trainer (``supervisor.py``), and
SIGINT / SIGTERM get a handler (``signals.py``) from the first instant: one that stops the command
in one line, after the imports if they are running, at once afterwards (the training loop installs
its own, graceful one). A closed stdout counts as SIGPIPE (``signals.StdoutReaderGone``).
"""

from __future__ import annotations

import gc
import importlib
import signal
import sys
from collections.abc import Callable

from ppo_cli import supervisor
from ppo_cli.errors import Interrupted
from ppo_cli.signals import (
    STOP_SIGNALS,
    SUPERVISOR_ECHO_S,
    GracefulStop,
    StdoutReaderGone,
    ignore_stop_signals,
)

IMPORT_THRESHOLD = 10_000  # allocations between collections of the youngest generation (default 700)


def _entry_point(
    name: str, prog: str, *modules: str, supervised: bool = False, questions: bool = False
) -> Callable[[], None]:
    """``modules``: what the command imports to do its work, imported here up front, unless
    (``questions``) its command line only asks Hydra a question (``cli.answers_at_once``)."""

    def main() -> None:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # until handlers are in place
        try:
            if supervised:
                supervisor.supervise(prog)  # only the trainer returns
            echo_window = SUPERVISOR_ECHO_S if supervisor.supervised() else 0.0
            # A first signal while the modules are imported is acted on once they are: an import
            # stopped halfway leaves half-made modules behind, which libraries trip over.
            stop = GracefulStop(echo_window, announce=False).__enter__()  # for the process's life
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if sys.stdout is not None:
            sys.stdout = StdoutReaderGone(sys.stdout)
        thresholds = gc.get_threshold()
        gc.set_threshold(IMPORT_THRESHOLD, *thresholds[1:])
        try:
            cli = importlib.import_module("ppo_cli.cli")
            if not (questions and cli.answers_at_once(sys.argv[1:])):
                for module in modules:
                    importlib.import_module(module)
            command = getattr(cli, name)
        except Interrupted as exc:  # a second signal (cli.py, which reports the others, is not imported)
            _exit(prog, exc)
        finally:
            gc.freeze()
            gc.set_threshold(*thresholds)
        if stop.signum is not None:
            _exit(prog, Interrupted(stop.signum, f"stopped by {signal.Signals(stop.signum).name}"))
        stop.graceful = False  # from here on a signal stops at once, in one line (see cli.py)
        command()

    main.__name__ = name
    return main


def _exit(prog: str, interrupted: Interrupted) -> None:
    ignore_stop_signals()
    print(f"{prog}: {interrupted}", file=sys.stderr)
    sys.exit(interrupted.exit_code)


# What a training run imports (cli.py imports it only there), up front; torch.optim imports
# torch._dynamo at the first optimizer step.
train_main = _entry_point(
    "train_main",
    "ppo-train",
    "torch._dynamo",
    "ppo_cli.train",
    "ppo_cli.sweep",
    supervised=True,
    questions=True,
)
eval_main = _entry_point("eval_main", "ppo-eval", "ppo_cli.evaluate")
compare_main = _entry_point("compare_main", "ppo-compare")
export_main = _entry_point("export_main", "ppo-export")
