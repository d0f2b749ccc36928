"""Every variant of the family learns CartPole-v1 through the CLI within a fixed step budget.

Budgets and thresholds (seed 0, the CartPole preset: 8 envs x 32 steps):
penalty, trpo: 45k steps, evaluation mean >= 475 (measured at 45k: 500 on each of seeds 0-2, for
both); a2c: 60k steps, >= 195 (seeds 0-2: 485, 500, 391); grpo: 60k steps (one whole episode per
env per iteration), >= 195 (seeds 0-2: 500, 468, 500); pg (REINFORCE with a learned baseline, its
own CartPole preset: 16 envs, one whole episode each per iteration): 100k steps of its 300k, >= 195
(at 60k seeds 0-2 scored 290, 309, 223: too close to the threshold). A random policy scores ~22.
(clip's default run is in test_cli.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here trains through the CLI

PPO_TRAIN = str(Path(sys.executable).parent / "ppo-train")


@pytest.mark.parametrize(
    ("algo", "threshold", "budget"),
    [
        ("penalty", 475, ["total_timesteps=45000"]),
        ("trpo", 475, ["total_timesteps=45000"]),
        ("pg", 195, ["total_timesteps=100000"]),
        ("a2c", 195, ["total_timesteps=60000"]),
        ("grpo", 195, ["total_timesteps=60000"]),
    ],
)
def test_variant_learns_cartpole(algo: str, threshold: float, budget: list[str], tmp_path: Path) -> None:
    result = subprocess.run(
        # The threshold is on the final evaluation; interim ones (test_evaluator.py) only cost time.
        [PPO_TRAIN, "env=CartPole", f"algo={algo}", "seed=0", "eval.interval=0", *budget],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    budget = int(next(arg for arg in budget if arg.startswith("total_timesteps=")).partition("=")[2])
    overshoot = summary["config"]["env"]["num_envs"] * 500  # the last iteration's, at most
    assert budget <= summary["global_step"] < budget + overshoot
    assert summary["eval_mean"] >= threshold, summary["eval_mean"]
