"""ppo-train as a user runs it: a subprocess, from any directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ppo_cli import load_agent

REPO = Path(__file__).resolve().parents[1]
PPO_TRAIN = shutil.which("ppo-train") or str(Path(sys.executable).parent / "ppo-train")


def ppo_train(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [PPO_TRAIN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def only_run_dir(cwd: Path) -> Path:
    (run_dir,) = (cwd / "runs").iterdir()
    return run_dir


def test_default_cartpole_solves_from_any_directory(tmp_path: Path) -> None:
    """The README's first command: the default CartPole preset reaches an evaluation mean >= 475."""
    result = ppo_train("env=CartPole", "algo=clip", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = only_run_dir(tmp_path)
    assert run_dir.name.startswith("CartPole-v1__clip__s0__")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["eval_mean"] >= 475, summary
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert "evaluation: " in result.stdout
    # The saved agent plays as well as the run's own evaluation said.
    import gymnasium as gym

    env = gym.make("CartPole-v1")
    agent = load_agent(run_dir)
    obs, _ = env.reset(seed=123)
    total, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(int(agent.act(obs)))
        total += float(reward)
        done = terminated or truncated
    assert total >= 400


def test_short_continuous_run(tmp_path: Path) -> None:
    result = ppo_train(
        "env=Pendulum", "total_timesteps=8192", "algo.num_minibatches=16", "eval.episodes=2", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((only_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["global_step"] == 8192
    assert summary["eval_episodes"] == 2
    assert -2000 < summary["eval_mean"] <= 0  # Pendulum's rewards are never positive


def test_bad_input_is_one_line_without_traceback(tmp_path: Path) -> None:
    result = ppo_train("algo.gamma=1.5", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "ppo-train: error: algo.gamma: got 1.5, allowed: a number in (0, 1]"
    summary = json.loads((only_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "algo.gamma" in summary["error"]


def test_user_config_dir_adds_presets(tmp_path: Path) -> None:
    user_configs = tmp_path / "my_configs" / "env"
    user_configs.mkdir(parents=True)
    (user_configs / "TinyCart.yaml").write_text(
        "# @package _global_\nenv:\n  id: CartPole-v1\n  num_envs: 2\n  num_steps: 64\n"
        "total_timesteps: 512\nalgo:\n  num_minibatches: 2\n"
    )
    result = ppo_train(
        "--config-dir", str(tmp_path / "my_configs"), "env=TinyCart", "eval.episodes=1", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((only_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["global_step"] == 512
    assert summary["config"]["env"]["num_envs"] == 2


def test_multirun_writes_one_dir_per_job(tmp_path: Path) -> None:
    result = ppo_train("-m", "seed=0,1", "total_timesteps=512", "eval.episodes=1", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (sweep_dir,) = (tmp_path / "runs" / "multirun").iterdir()
    job_dirs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    # Each job's directory is named by its overrides (hydra.job.override_dirname).
    assert job_dirs == [f"eval.episodes=1,seed={s},total_timesteps=512" for s in (0, 1)]
    for seed, job in enumerate(job_dirs):
        summary = json.loads((sweep_dir / job / "summary.json").read_text())
        assert summary["status"] == "completed"
        assert summary["config"]["seed"] == seed


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the sources")
def test_wheel_ships_configs_inside_the_package(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("ppo_cli-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ppo_cli/configs/train.yaml" in names
    assert "ppo_cli/configs/env/HalfCheetah.yaml" in names
    assert "ppo_cli/configs/algo/clip.yaml" in names
    assert not any(name.startswith("configs/") for name in names)
