"""Every variant of the family learns CartPole-v1 through the CLI within a fixed step budget.

Budgets and thresholds (seed 0, the CartPole preset: 8 envs x 32 steps):
clip, penalty, trpo: 100k steps, evaluation mean >= 475; pg, a2c: 100k steps, >= 195.
(clip's own default run is in test_cli.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PPO_TRAIN = str(Path(sys.executable).parent / "ppo-train")


@pytest.mark.parametrize(
    ("algo", "threshold"),
    [("penalty", 475), ("trpo", 475), ("pg", 195), ("a2c", 195)],
)
def test_variant_learns_cartpole(algo: str, threshold: float, tmp_path: Path) -> None:
    result = subprocess.run(
        [PPO_TRAIN, "env=CartPole", f"algo={algo}", "total_timesteps=100000", "seed=0"],
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
    assert summary["global_step"] == 99840
    assert summary["eval_mean"] >= threshold, summary["eval_mean"]
