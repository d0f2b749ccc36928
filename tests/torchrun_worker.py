"""``ppo-train`` as one rank under torchrun, recording what the rank ended with (for test_distributed).

``torchrun ... tests/torchrun_worker.py <out dir> <ppo-train arguments>`` trains through the real
entry point, then writes ``<out dir>/rank<r>.pt``: the rank's final agent state and the env steps
its own envs took. Only a test can see a rank other than 0 this way: those write nothing else.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from ppo_cli import train as train_module
from ppo_cli.cli import train_main
from ppo_cli.iteration import TrainingState
from ppo_cli.rollout import Collector, Rollout

built: list[TrainingState] = []
local_env_steps = 0
_build_state = train_module.build_state
_collect = Collector.collect


def _recording_build_state(*args: Any, **kwargs: Any) -> TrainingState:
    state = _build_state(*args, **kwargs)
    built.append(state)
    return state


def _counting_collect(self: Collector) -> Rollout:
    global local_env_steps
    rollout = _collect(self)
    local_env_steps += rollout.env_steps
    return rollout


if __name__ == "__main__":
    out = Path(sys.argv.pop(1))
    train_module.build_state = _recording_build_state  # type: ignore[assignment]
    Collector.collect = _counting_collect  # type: ignore[method-assign]
    try:
        train_main()
    finally:
        if built:
            record = {"agent": built[0].agent.state_dict(), "local_env_steps": local_env_steps}
            torch.save(record, out / f"rank{os.environ['RANK']}.pt")
