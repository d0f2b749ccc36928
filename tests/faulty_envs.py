"""An env that crashes mid-run, importable as ``env.id=faulty_envs:Exploding-v0`` (tests dir on
PYTHONPATH): a stand-in for a simulator that dies inside a sweep."""

from __future__ import annotations

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
