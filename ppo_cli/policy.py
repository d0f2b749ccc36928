"""The public Python API: load a trained agent and act with it.

from ppo_cli import load_agent
agent = load_agent("runs/CartPole-v1__clip__s0__20260101-120000")   # checkpoint="best": best.pt
action = agent.act(obs, deterministic=True)

A recurrent agent (agent=lstm|gru) acts from a state that each call updates:
state = agent.initial_state()        # at the start of every episode
action = agent.act(obs, state=state)

Code written for Stable-Baselines3 can call ``action, state = agent.predict(obs, state)`` instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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

    def initial_state(self, num_envs: int | None = None) -> torch.Tensor:
        """A recurrent agent's state at the start of an episode, for one env (``None``) or a
        batch of ``num_envs``: pass it to :meth:`act`, which updates it in place, and start from
        a fresh one (or zero its row) when an episode ends. Empty for feed-forward agents."""
        state = self.network.initial_state(1 if num_envs is None else num_envs)
        return state[0] if num_envs is None else state

    def _state(self, state: torch.Tensor | None, single: bool) -> torch.Tensor | None:
        if self.network.core is None:
            return None
        if state is None:
            raise ValueError("a recurrent agent acts from a state: pass state=agent.initial_state()")
        return state.unsqueeze(0) if single else state  # a view: updates reach the caller's tensor

    @torch.no_grad()
    def act(
        self,
        obs: np.ndarray,
        deterministic: bool = True,
        action_mask: np.ndarray | None = None,
        state: torch.Tensor | None = None,
    ) -> np.ndarray:
        """The action to send to the environment (clipped to its bounds for Box actions), chosen
        among the allowed ones if an ``action_mask`` is given (as the env reports it in its info).
        A recurrent agent needs its ``state`` (:meth:`initial_state`), which this updates."""
        tensor, single = self._prepare(obs)
        mask = None
        if action_mask is not None:
            mask = torch.as_tensor(np.asarray(action_mask, dtype=bool), device=self._device)
            mask = mask.reshape(len(tensor), -1)
        raw = self.network.act(tensor, deterministic, mask, self._state(state, single))
        action = self.network.env_action(raw)
        return action[0] if single else action

    @torch.no_grad()
    def value(self, obs: np.ndarray, state: torch.Tensor | None = None) -> np.ndarray | float:
        """V(s) as estimated by the critic (in units of the scaled reward if reward scaling was on);
        a recurrent agent's from its ``state`` before ``obs`` (left unchanged)."""
        tensor, single = self._prepare(obs)
        values = self.network.step_value(tensor, self._state(state, single)).cpu().numpy()
        return float(values[0]) if single else values

    def predict(
        self,
        observation: np.ndarray,
        state: torch.Tensor | None = None,
        episode_start: np.ndarray | bool | None = None,
        deterministic: bool = True,
        action_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, torch.Tensor | None]:
        """``(action, state)``, as Stable-Baselines3's ``model.predict`` returns them, so code
        written for SB3 runs with a ppo-cli agent: :meth:`act` for ``observation`` (one or a
        batch), and the recurrent state after it (None for feed-forward agents).

        Unlike :meth:`act` it leaves ``state`` unchanged and returns the next one. As in SB3, a
        recurrent agent starts from zeros when ``state`` is None, and ``episode_start`` (a bool,
        or one per env) zeroes the state of the envs whose episode starts with ``observation``.
        Differences from SB3: ``deterministic`` defaults to True (the policy's mode, as
        ``ppo-eval`` acts); the state is a tensor (:meth:`initial_state`), not a tuple of arrays;
        ``action_mask`` takes the allowed actions, as sb3-contrib's ``MaskablePPO`` does.
        """
        if self.network.core is None:
            return self.act(observation, deterministic, action_mask), None
        single = np.ndim(observation) == len(self.obs_shape)
        state = self.initial_state(None if single else len(observation)) if state is None else state.clone()
        if episode_start is not None:
            starts = torch.as_tensor(np.asarray(episode_start, dtype=bool), device=state.device)
            state[starts] = 0.0
        return self.act(observation, deterministic, action_mask, state), state


def load_agent(path: str | Path, device: str = "cpu", checkpoint: str = "last") -> TrainedAgent:
    """Load the agent of a run directory or of a checkpoint file. Of a run directory,
    ``checkpoint`` chooses ``last`` (``checkpoints/last.pt``) or ``best`` (``checkpoints/best.pt``,
    the agent of the run's best evaluation)."""
    file = resolve_checkpoint(path, checkpoint)
    return agent_from_checkpoint(load_checkpoint(file, map_location=device), file, device)


def agent_from_checkpoint(payload: dict[str, Any], source: Path, device: str = "cpu") -> TrainedAgent:
    """The agent of a checkpoint already read (by :func:`load_checkpoint`) from ``source``."""
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
    load_matching(network, payload["agent"], "network", source)
    return TrainedAgent(network.to(device), tuple(obs_space.shape), config, int(payload["global_step"]))
