"""Configs for tests, composed from the real YAML tree so tests never drift from the defaults."""

from __future__ import annotations

from typing import Any

from hydra import compose, initialize_config_dir

from ppo_cli import cli
from ppo_cli.config import AlgoConfig, TrainConfig, to_train_config


def compose_config(*overrides: str) -> TrainConfig:
    """The checked TrainConfig that ``ppo-train <overrides>`` would run."""
    with initialize_config_dir(config_dir=cli.find_config_dir(), version_base="1.3"):
        return to_train_config(compose("train", overrides=list(overrides)))


def algo_config(name: str, **values: Any) -> AlgoConfig:
    """``algo/<name>.yaml``'s defaults (no env-specific tuning) with ``values`` overridden."""
    overrides = [f"algo.{key}={'null' if value is None else value}" for key, value in values.items()]
    return compose_config(f"algo={name}", "~tuned", *overrides).algo
