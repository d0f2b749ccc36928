"""Evaluation episodes with a frozen agent."""

from __future__ import annotations

import numpy as np
import torch

from ppo_cli.agent import ActorCritic
from ppo_cli.config import EnvConfig
from ppo_cli.envs import finished_episodes, make_vector_env

MAX_PARALLEL_EPISODES = 8


@torch.no_grad()
def evaluate(
    agent: ActorCritic,
    env_cfg: EnvConfig,
    episodes: int,
    deterministic: bool,
    seed: int,
    device: torch.device,
) -> np.ndarray:
    """Returns of ``episodes`` complete episodes (raw rewards), normalisation statistics frozen.

    Episodes run on parallel envs, each with a fixed quota decided up front. Taking "the first N
    episodes to finish" instead would favour short episodes and bias the mean.
    """
    num_envs = min(episodes, MAX_PARALLEL_EPISODES)
    quota = np.full(num_envs, episodes // num_envs)
    quota[: episodes % num_envs] += 1
    returns: list[float] = []
    counted = np.zeros(num_envs, dtype=int)
    envs = make_vector_env(env_cfg, num_envs=num_envs)
    try:
        obs, _ = envs.reset(seed=seed)
        while (counted < quota).any():
            obs_t = agent.normalize(torch.as_tensor(obs, dtype=torch.float32, device=device))
            action = agent.sample(obs_t, deterministic=deterministic).action
            obs, _, _, _, info = envs.step(agent.env_action(action))
            for env_index, episode_return, _ in zip(*finished_episodes(info), strict=True):
                if counted[env_index] < quota[env_index]:
                    counted[env_index] += 1
                    returns.append(float(episode_return))
    finally:
        envs.close()
    return np.asarray(returns)
