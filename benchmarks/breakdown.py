"""Where the time of a ppo-cli run goes, for benchmark case (a) (see bench.py).

    python benchmarks/breakdown.py [--iterations 100]

Runs the training loop's own iteration (``ppo_cli.iteration.run_iteration``) in this process,
timing each part: the env's own steps, the rest of the rollout (the policy acting, storage,
bookkeeping), advantages, the update, and what remains (learning rate, batch, report).
Process start-up (imports, config, env and network creation, the first iteration's warm-up)
is measured separately, as the wall time of a whole ``ppo-train`` run of one iteration.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench import CASES, Case, ppo_cli_command  # the script's own directory is on sys.path
from hydra import compose, initialize_config_dir

from ppo_cli.cli import find_config_dir
from ppo_cli.distributed import SINGLE_PROCESS
from ppo_cli.hydra_config import to_train_config
from ppo_cli.iteration import build_state, run_iteration, seed_everything, training_envs


def startup_seconds() -> float:
    """Wall time of a whole ppo-train process that trains a single iteration."""
    case: Case = {**CASES["a"], "total": CASES["a"]["n_envs"] * CASES["a"]["n_steps"]}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = subprocess.run(ppo_cli_command(case, Path(tmp) / "run", 0), capture_output=True, text=True)
        if result.returncode != 0:  # a smoke run in CI: show why
            raise RuntimeError(f"ppo-train exited {result.returncode}: {result.stderr[-2000:]}")
        return time.perf_counter() - start


def timed(totals: dict[str, float], part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, adding the seconds each call takes to ``totals[part]``."""

    def timed_call(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[part] += time.perf_counter() - start

    return timed_call


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=100)
    args = parser.parse_args()
    overrides = [
        arg for arg in ppo_cli_command(CASES["a"], Path("unused"), 0)[1:] if not arg.startswith("hydra.")
    ]
    with initialize_config_dir(config_dir=find_config_dir(), version_base="1.3"):
        cfg = to_train_config(compose("train", overrides=overrides))
    torch.set_num_threads(cfg.torch_threads)
    seed_everything(cfg.seed)
    parts = ["env steps", "acting and storage", "advantages", "update", "iteration"]
    totals = dict.fromkeys(parts, 0.0)
    with training_envs(cfg) as envs:
        state = build_state(cfg, envs, torch.device("cpu"), SINGLE_PROCESS)
        run_iteration(state)  # warm-up, not counted
        envs.step = timed(totals, "env steps", envs.step)  # type: ignore[method-assign]
        collector, variant, updater = state.collector, state.variant, state.updater
        collector.collect = timed(totals, "acting and storage", collector.collect)  # type: ignore[method-assign]
        variant.advantages = timed(totals, "advantages", variant.advantages)  # type: ignore[method-assign]
        updater.update = timed(totals, "update", updater.update)  # type: ignore[method-assign]
        for _ in range(args.iterations):
            timed(totals, "iteration", run_iteration)(state)
    totals["acting and storage"] -= totals["env steps"]
    totals["rest of the iteration"] = totals.pop("iteration") - sum(totals.values())
    per_iteration = {part: seconds / args.iterations * 1e3 for part, seconds in totals.items()}
    iterations_per_run = CASES["a"]["total"] // (CASES["a"]["n_envs"] * CASES["a"]["n_steps"])
    print(f"case (a), per iteration of {CASES['a']['n_envs'] * CASES['a']['n_steps']} env steps:")
    for part, ms in per_iteration.items():
        print(f"  {part:22s} {ms:6.1f} ms  ({ms * iterations_per_run / 1e3:5.1f} s per run)")
    print(f"  {'process start-up':22s} {startup_seconds():6.1f} s (a whole run of one iteration)")


if __name__ == "__main__":
    main()
