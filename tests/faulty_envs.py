"""Envs that fail mid-run, importable as ``env.id=faulty_envs:Exploding-v0`` (tests dir on
PYTHONPATH): stand-ins for a simulator that raises, or that takes its process down, in a sweep."""

from __future__ import annotations

import os
import signal

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleEnv


class ExplodingCartPole(CartPoleEnv):
    """CartPole whose 50th step (counted across episodes) raises."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.steps = 0

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.steps += 1
        if self.steps == 50:
            raise RuntimeError("the simulator exploded")
        return super().step(action)


gym.register("Exploding-v0", entry_point=ExplodingCartPole, max_episode_steps=500)


class KilledCartPole(CartPoleEnv):
    """CartPole whose process is killed (SIGKILL, as by the OOM killer) at its 50th step."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.steps = 0

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.steps += 1
        if self.steps == 50:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().step(action)


gym.register("Killed-v0", entry_point=KilledCartPole, max_episode_steps=500)
