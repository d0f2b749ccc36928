"""Data-parallel training under torchrun: two ranks on the CPU (gloo), as a user launches them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from support import run

from ppo_cli.distributed import process_group
from ppo_cli.errors import UserError

# Its module fixtures are built once: the whole file runs on one xdist worker (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_distributed")

WORKER = Path(__file__).resolve().parent / "torchrun_worker.py"
SOLVED = 475  # the evaluation mean test_cli asks of the single-process CartPole preset
RANKS = 2


def torchrun_command(out: Path, *overrides: str) -> list[str]:
    """torchrun with RANKS ranks of the worker, which records each rank's end in ``out``."""
    out.mkdir(exist_ok=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}"]
    return [*launcher, str(WORKER), str(out), *overrides]


def torchrun(cwd: Path, *overrides: str, out: str = "ranks") -> dict[int, dict[str, Any]]:
    """Train from ``cwd``; {rank: its final agent and the env steps of its own envs}."""
    result = run(torchrun_command(cwd / out, *overrides), cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return {rank: torch.load(cwd / out / f"rank{rank}.pt", weights_only=True) for rank in range(RANKS)}


def only_run_dir(cwd: Path) -> Path:
    (run_dir,) = (cwd / "runs").iterdir()
    return run_dir


def assert_same_agent(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.slow
def test_two_ranks_train_one_agent_that_solves_cartpole(tmp_path: Path) -> None:
    """CartPole's preset has 16 envs; 2 ranks x 8 envs is the same global batch (and, with
    num_minibatches per rank, the same global minibatch). It solves CartPole in half the preset's
    budget (measured: evaluations 318 at 41k steps, 500 from 46k on), the ranks end with identical
    weights and normalisation statistics, each rank stepped half of the run's env steps, and only
    one run directory is written."""
    overrides = ["env=CartPole", "env.num_envs=8", "total_timesteps=50000", "eval.interval=0"]
    ranks = torchrun(tmp_path, *overrides)  # the final evaluation counts
    assert_same_agent(ranks[0]["agent"], ranks[1]["agent"])
    run_dir = only_run_dir(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["eval_mean"] >= SOLVED, summary
    assert ranks[0]["local_env_steps"] == ranks[1]["local_env_steps"] == summary["global_step"] // 2
    assert summary["global_step"] >= summary["config"]["total_timesteps"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranks", "runs"]  # nothing from rank 1
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("events.")) == [
        ".hydra",
        ".lock",
        "checkpoints",
        "summary.json",
        "train.log",
    ]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert_same_agent(checkpoint["agent"], ranks[0]["agent"])
    assert len(checkpoint["other_ranks"]) == 1


def test_a_sweep_is_refused_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"^-m: a sweep cannot run under torchrun"):
        process_group(["-m", "seed=0,1"]).__enter__()


def assert_same_tree(first: Any, second: Any, where: str = "checkpoint") -> None:
    """Equal nested dicts / lists of tensors, arrays and plain values, bit for bit."""
    assert type(first) is type(second), where
    if isinstance(first, dict):
        assert first.keys() == second.keys(), where
        for key in first:
            assert_same_tree(first[key], second[key], f"{where}.{key}")
    elif isinstance(first, list | tuple):
        assert len(first) == len(second), where
        for i, (a, b) in enumerate(zip(first, second, strict=True)):
            assert_same_tree(a, b, f"{where}[{i}]")
    elif isinstance(first, torch.Tensor):
        assert torch.equal(first, second), where
    else:
        assert first == second, where


PENALTY_PENDULUM_STEPS = 3840  # 15 iterations of 2 ranks x 2 envs x 64 steps
# PPO-Penalty with an early stop on target_kl: every decision averaged over the ranks; Pendulum
# with observation and reward normalisation: statistics merged across ranks.
PENALTY_PENDULUM = [
    "env=Pendulum", "algo=penalty", "algo.target_kl=0.02", "env.normalize_reward=true",
    "env.num_envs=2", "env.num_steps=64", "algo.update_epochs=2", "algo.num_minibatches=4",
    f"total_timesteps={PENALTY_PENDULUM_STEPS}", "checkpoint.interval=1", "eval.episodes=0",
]  # fmt: skip


@pytest.mark.slow
def test_sigterm_then_resume_under_torchrun_is_the_uninterrupted_run(tmp_path: Path) -> None:
    """A scheduler's SIGTERM to torchrun reaches every rank (directly and forwarded); the ranks
    agree to stop after the same iteration and rank 0 checkpoints all of their states. Resumed with
    torchrun, the run ends bit-identical to one never stopped, on every rank."""
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    reference = torchrun(tmp_path, *PENALTY_PENDULUM, f"hydra.run.dir={whole}", out="whole_ranks")
    assert_same_agent(reference[0]["agent"], reference[1]["agent"])

    command = torchrun_command(tmp_path / "stopped_ranks", *PENALTY_PENDULUM, f"hydra.run.dir={stopped}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (stopped / "checkpoints" / "last.pt").exists() and launcher.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGTERM)  # what a scheduler does: the whole process group
    _, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode != 0, stderr[-3000:]
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary
    interrupted_at = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)["global_step"]
    assert 0 < interrupted_at < PENALTY_PENDULUM_STEPS
    # Each rank stops once, at the same step, in one line (torchrun prints its own traceback).
    assert stderr.count(f"ppo-train: stopped by SIGTERM at step {interrupted_at};") == RANKS, stderr[-3000:]
    assert "ppo_cli/" not in stderr, stderr[-3000:]  # no traceback from a rank

    resumed = torchrun(tmp_path, f"resume={stopped}", out="resumed_ranks")
    assert_same_agent(resumed[0]["agent"], resumed[1]["agent"])
    assert_same_agent(resumed[0]["agent"], reference[0]["agent"])
    final_whole = torch.load(whole / "checkpoints" / "last.pt", weights_only=True)
    final_resumed = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)
    for key in ("agent", "optimizer", "updater", "reward_scaler", "rng", "global_step", "other_ranks"):
        assert_same_tree(final_whole[key], final_resumed[key], key)
    assert json.loads((stopped / "summary.json").read_text())["resumed_from"]["exact_env_state"] is True


# TRPO with 2 ranks x 4 envs x 32 steps, 4 iterations; 2 sampled evaluation episodes.
TRPO_CARTPOLE = ["algo=trpo", "env=CartPole", "env.num_envs=4", "total_timesteps=1024", "eval.episodes=2",
                 "eval.deterministic=false"]  # fmt: skip


@pytest.fixture(scope="module")
def trpo_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[int, dict[str, Any]]]]:
    """The same TRPO run twice under torchrun: rank 0 evaluating after every iteration, and only at
    the end. The two tests below check different facts of these launches (each launch starts
    torchrun and two ranks, each importing torch)."""
    cwd = tmp_path_factory.mktemp("trpo")
    ranks = {
        name: torchrun(
            cwd, *TRPO_CARTPOLE, f"eval.interval={interval}", f"hydra.run.dir={name}", out=f"{name}_ranks"
        )
        for name, interval in (("evaluating", 1), ("plain", 0))
    }
    return cwd, ranks


@pytest.mark.slow
def test_trpo_ranks_take_the_same_trust_region_steps(
    trpo_runs: tuple[Path, dict[str, dict[int, dict[str, Any]]]],
) -> None:
    """TRPO's line search decides on the surrogate and KL averaged over ranks: the ranks end with
    the same weights, and the run completes (ranks that disagreed would deadlock)."""
    cwd, ranks = trpo_runs
    for name in ("evaluating", "plain"):
        assert_same_agent(ranks[name][0]["agent"], ranks[name][1]["agent"])
        summary = json.loads((cwd / name / "summary.json").read_text())
        assert summary["status"] == "completed"


@pytest.mark.slow
def test_rank_0_evaluating_on_the_way_changes_no_rank_s_training(
    trpo_runs: tuple[Path, dict[str, dict[int, dict[str, Any]]]],
) -> None:
    """Rank 0 evaluates after every iteration, sampling its actions, while rank 1 waits: both
    ranks end with the weights of the same run evaluated only at the end, which scores the same."""
    cwd, ranks = trpo_runs
    for rank in range(RANKS):
        assert_same_agent(ranks["evaluating"][rank]["agent"], ranks["plain"][rank]["agent"])
    assert (cwd / "evaluating" / "checkpoints" / "best.pt").is_file()
    scores = [
        json.loads((cwd / run / "summary.json").read_text())["eval_mean"] for run in ("evaluating", "plain")
    ]
    assert scores[0] == scores[1]
