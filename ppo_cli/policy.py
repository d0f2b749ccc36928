"""The public Python API: load a trained agent and act with it.

from ppo_cli import load_agent
agent = load_agent("runs/CartPole-v1__clip__s0__20260101-120000")
action = agent.act(obs, deterministic=True)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ppo_cli.agent import ActorCritic
from ppo_cli.checkpoint import load_checkpoint, load_matching, rebuild_spaces, resolve_checkpoint
from ppo_cli.config import AgentConfig


class TrainedAgent:
    """A frozen policy and critic that apply the saved observation normalisation themselves.

    ``obs`` may be one observation or a batch (leading dimension); results follow the same shape.
    """

    def __init__(
        self, network: ActorCritic, obs_shape: tuple[int, ...], config: dict, global_step: int
    ) -> None:
        self.network = network.eval()
        self.obs_shape = obs_shape
        self.config = config
        self.global_step = global_step
        self._device = next(network.parameters()).device

    def _prepare(self, obs: np.ndarray) -> tuple[torch.Tensor, bool]:
        tensor = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=self._device)
        single = tensor.dim() == len(self.obs_shape)
        if single:
            tensor = tensor.unsqueeze(0)
        return self.network.normalize(tensor), single

    @torch.no_grad()
    def act(
        self, obs: np.ndarray, deterministic: bool = True, action_mask: np.ndarray | None = None
    ) -> np.ndarray:
        """The action to send to the environment (clipped to its bounds for Box actions), chosen
        among the allowed ones if an ``action_mask`` is given (as the env reports it in its info)."""
        tensor, single = self._prepare(obs)
        mask = None
        if action_mask is not None:
            mask = torch.as_tensor(np.asarray(action_mask, dtype=bool), device=self._device)
            mask = mask.reshape(len(tensor), -1)
        action = self.network.env_action(self.network.act(tensor, deterministic, mask))
        return action[0] if single else action

    @torch.no_grad()
    def value(self, obs: np.ndarray) -> np.ndarray | float:
        """V(s) as estimated by the critic (in units of the scaled reward if reward scaling was on)."""
        tensor, single = self._prepare(obs)
        values = self.network.value(tensor).cpu().numpy()
        return float(values[0]) if single else values


def load_agent(path: str | Path, device: str = "cpu") -> TrainedAgent:
    """Load the agent of a run directory (its ``checkpoints/last.pt``) or of a checkpoint file."""
    payload = load_checkpoint(path, map_location=device)
    config = payload["config"]
    obs_space, act_space = rebuild_spaces(payload["spaces"])
    env_cfg = config["env"]
    network = ActorCritic(
        obs_space,
        act_space,
        AgentConfig(**config["agent"]),
        env_cfg["normalize_obs"],
        env_cfg["clip_obs"],
    )
    load_matching(network, payload["agent"], "network", resolve_checkpoint(path))
    return TrainedAgent(network.to(device), tuple(obs_space.shape), config, int(payload["global_step"]))
