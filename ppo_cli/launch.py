"""The console scripts: import the command's module with Python's cyclic garbage collector paused.

Starting ``ppo-train`` imports torch, Hydra and gymnasium: about a million long-lived objects
and almost no garbage. The cyclic collector would still walk through all of them, again and
again while they are created and once more when the interpreter exits: over a second of a
three-second start on a 2-core machine. So each entry point pauses the collector while it
imports, then ``gc.freeze()`` moves everything imported into a generation the collector never
visits (the remedy CPython documents for long-lived objects), and resumes collecting.
"""

from __future__ import annotations

import gc
import importlib
from collections.abc import Callable


def _entry_point(name: str, *modules: str) -> Callable[[], None]:
    def main() -> None:
        gc.disable()
        try:
            for module in modules:
                importlib.import_module(module)
            command = getattr(importlib.import_module("ppo_cli.cli"), name)
        finally:
            gc.freeze()
            gc.enable()
        command()

    main.__name__ = name
    return main


# torch.optim imports torch._dynamo at the first optimizer step; ppo-train imports it up front.
train_main = _entry_point("train_main", "torch._dynamo")
eval_main = _entry_point("eval_main")
compare_main = _entry_point("compare_main")
