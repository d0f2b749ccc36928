"""The console scripts: import the command's module with Python's cyclic garbage collector held back.

Starting ``ppo-train`` imports torch, Hydra and gymnasium: about a million long-lived objects
and little garbage. With the default thresholds the cyclic collector walks through all of them
again and again while they are created, and once more when the interpreter exits: over a second
of a three-second start on a 2-core machine. So each entry point raises the threshold of the
youngest generation while it imports (collections stay, just ~15x rarer: pausing the collector
altogether saves a little more time but keeps the import garbage, +9 MB of peak memory), then
``gc.freeze()`` moves everything imported into a generation the collector never visits again
(the remedy CPython documents for long-lived objects), and restores the thresholds.
"""

from __future__ import annotations

import gc
import importlib
from collections.abc import Callable

IMPORT_THRESHOLD = 10_000  # allocations between collections of the youngest generation (default 700)


def _entry_point(name: str, *modules: str) -> Callable[[], None]:
    def main() -> None:
        thresholds = gc.get_threshold()
        gc.set_threshold(IMPORT_THRESHOLD, *thresholds[1:])
        try:
            for module in modules:
                importlib.import_module(module)
            command = getattr(importlib.import_module("ppo_cli.cli"), name)
        finally:
            gc.freeze()
            gc.set_threshold(*thresholds)
        command()

    main.__name__ = name
    return main


# torch.optim imports torch._dynamo at the first optimizer step; ppo-train imports it up front.
train_main = _entry_point("train_main", "torch._dynamo")
eval_main = _entry_point("eval_main")
compare_main = _entry_point("compare_main")
