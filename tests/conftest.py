"""Shared test setup: single-threaded torch and a fixed seed for every test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppo_cli.config import AgentConfig

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def small_agent_cfg() -> AgentConfig:
    """Tiny networks keep every test fast."""
    return AgentConfig(actor_hidden=[8, 8], critic_hidden=[8, 8], activation="tanh")
