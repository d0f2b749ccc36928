"""Configs for tests, composed from the real YAML tree so tests never drift from the defaults."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir

from ppo_cli import cli
from ppo_cli.agent import ActorCritic
from ppo_cli.batch import Batch
from ppo_cli.config import AlgoConfig, TrainConfig
from ppo_cli.hydra_config import to_train_config


def compose_config(*overrides: str) -> TrainConfig:
    """The checked TrainConfig that ``ppo-train <overrides>`` would run."""
    with initialize_config_dir(config_dir=cli.find_config_dir(), version_base="1.3"):
        return to_train_config(compose("train", overrides=list(overrides)))


def algo_config(name: str, **values: Any) -> AlgoConfig:
    """``algo/<name>.yaml``'s defaults (no env-specific tuning) with ``values`` overridden."""
    overrides = [f"algo.{key}={'null' if value is None else value}" for key, value in values.items()]
    return compose_config(f"algo={name}", "~tuned", *overrides).algo


def on_policy_batch(
    agent: ActorCritic, obs: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor
) -> Batch:
    """A Batch of actions sampled by ``agent`` itself on ``obs``, as a rollout would store them."""
    with torch.no_grad():
        actions = agent.act(obs)
        params = agent.policy_params(obs)
        log_probs = agent.dist.log_prob(params, actions)
        values = agent.value(obs)
    return Batch(obs, actions, log_probs, params, values, advantages, returns)


def console_script(name: str) -> str:
    """The installed entry point ``name`` (ppo-train, ppo-eval) of this environment."""
    return shutil.which(name) or str(Path(sys.executable).parent / name)


def run(
    command: list[str], cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` as a user would, capturing its output (never raises on a non-zero exit);
    ``env`` adds to the environment."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def ppo_train(
    *args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run([console_script("ppo-train"), *args], cwd, timeout, env)


def one_line_failure(
    main: Callable[[], None],
    argv: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> tuple[int, str]:
    """Run a console entry point in this process with ``argv``; (exit code, its one stderr line).

    Fails the test if the command succeeds or prints anything but exactly one line on stderr.
    """
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert isinstance(exit_info.value.code, int)
    return exit_info.value.code, lines[0]
