"""Preallocated rollout storage and the loop that fills it.

One iteration collects ``num_steps`` x ``num_envs`` transitions. Storage is allocated once, on the
training device, and overwritten in place every iteration.

Two autoreset conventions are handled (see ``envs.py``):

* ``SAME_STEP`` (sync/async vector envs): a finished episode's last observation arrives in
  ``info["final_obs"]``; when the episode was *truncated*, V(final_obs) is computed here and used as
  that step's bootstrap value.
* ``NEXT_STEP`` (numpy-vectorised envs): the step after an episode end is a fake transition (action
  ignored, reward 0). It is stored with ``valid = False`` and never reaches a loss. Conveniently, the
  observation stored for the fake step *is* the final observation, so the ordinary
  ``next_values[t] = values[t + 1]`` already bootstraps a truncation correctly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from gymnasium.vector import VectorEnv

from ppo_cli import env_state
from ppo_cli.agent import ActionSample, ActorCritic
from ppo_cli.envs import finished_episodes, uses_next_step_autoreset
from ppo_cli.errors import NonFiniteError
from ppo_cli.normalization import RewardScaler


class RolloutStorage:
    """(T, N, ...) tensors for one iteration of experience, shaped for ``agent``."""

    def __init__(self, num_steps: int, num_envs: int, agent: ActorCritic, device: torch.device) -> None:
        shape = (num_steps, num_envs)
        action_dtype = torch.float32 if agent.continuous else torch.long
        self.obs = torch.zeros((*shape, agent.obs_dim), device=device)
        self.actions = torch.zeros((*shape, *agent.action_shape), dtype=action_dtype, device=device)
        self.log_probs = torch.zeros(shape, device=device)
        self.policy_params = torch.zeros((*shape, agent.policy_param_dim), device=device)
        self.values = torch.zeros(shape, device=device)
        self.next_values = torch.zeros(shape, device=device)
        self.rewards = torch.zeros(shape, device=device)
        self.terminated = torch.zeros(shape, dtype=torch.bool, device=device)
        self.truncated = torch.zeros(shape, dtype=torch.bool, device=device)
        self.valid = torch.ones(shape, dtype=torch.bool, device=device)

    def store_sample(self, t: int, obs: torch.Tensor, sample: ActionSample) -> None:
        """Record step t's (normalised) observations and what the agent did with them."""
        self.obs[t], self.actions[t], self.log_probs[t] = obs, sample.action, sample.log_prob
        self.values[t], self.policy_params[t] = sample.value, sample.policy_params


def check_finite(field: str, values: np.ndarray) -> None:
    """Refuse a NaN or infinity in one step's ``values`` (leading dimension: env index)."""
    finite = np.isfinite(values).reshape(len(values), -1).all(axis=1)
    if not finite.all():
        env_index = int(np.flatnonzero(~finite)[0])
        raise NonFiniteError(f"env {env_index} returned a non-finite {field}: {values[env_index]}")


@dataclass
class RolloutStats:
    """Episodes that finished during one collection (raw returns, before any reward scaling)."""

    env_steps: int = 0
    episode_returns: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)


class Collector:
    """Steps a vector env with an agent and writes the transitions into a storage."""

    def __init__(
        self,
        envs: VectorEnv,
        agent: ActorCritic,
        storage: RolloutStorage,
        reward_scaler: RewardScaler | None,
        bootstrap_truncated: bool,
        device: torch.device,
        seed: int,
    ) -> None:
        self.envs = envs
        self.agent = agent
        self.storage = storage
        self.reward_scaler = reward_scaler
        self.bootstrap_truncated = bootstrap_truncated
        self.device = device
        self.next_step_autoreset = uses_next_step_autoreset(envs)
        obs, _ = envs.reset(seed=seed)
        self.obs = self._observe(obs)
        self.prev_done = torch.zeros(envs.num_envs, dtype=torch.bool, device=device)
        self.all_valid = torch.ones(envs.num_envs, dtype=torch.bool, device=device)

    def _to_tensor(self, array: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.as_tensor(array, dtype=dtype, device=self.device)

    def _observe(self, obs: np.ndarray) -> torch.Tensor:
        """Fold fresh observations into the statistics, then normalise them."""
        check_finite("observation", obs)
        tensor = self._to_tensor(obs)
        if self.agent.obs_normalizer is not None:
            self.agent.obs_normalizer.stats.update(tensor.flatten(1))
        return self.agent.normalize(tensor)

    @torch.inference_mode()  # cheaper than no_grad; the storage it writes into stays normal
    def collect(self) -> RolloutStats:
        """Fill the storage with ``num_steps`` steps of every env."""
        s, stats = self.storage, RolloutStats()
        truncation_values: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for t in range(s.obs.shape[0]):
            valid = ~self.prev_done if self.next_step_autoreset else self.all_valid
            sample = self.agent.sample(self.obs)
            s.store_sample(t, self.obs, sample)
            s.valid[t] = valid
            obs, reward, terminated, truncated, info = self.envs.step(self.agent.env_action(sample.action))
            check_finite("reward", reward)
            s.terminated[t] = self._to_tensor(terminated, torch.bool)
            s.truncated[t] = self._to_tensor(truncated, torch.bool)
            done = s.terminated[t] | s.truncated[t]
            rewards = self._to_tensor(reward)
            if self.reward_scaler is not None:
                rewards = self.reward_scaler(rewards, done, valid)
            s.rewards[t] = rewards
            if truncated.any() and "final_obs" in info and self.bootstrap_truncated:
                truncation_values.append(self._final_values(t, truncated, info["final_obs"]))
            _, returns, lengths = finished_episodes(info)
            stats.episode_returns += returns.tolist()
            stats.episode_lengths += lengths.tolist()
            self.prev_done = done
            self.obs = self._observe(obs)
        s.next_values[:-1] = s.values[1:]
        s.next_values[-1] = self.agent.value(self.obs)
        for t, idx, values in truncation_values:
            s.next_values[t, idx] = values
        stats.env_steps = s.obs.shape[0] * s.obs.shape[1]
        return stats

    def _final_values(
        self, t: int, truncated: np.ndarray, final_obs: np.ndarray
    ) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(t, env indices, V(final_obs)) for the envs cut by a time limit at step t."""
        idx = np.flatnonzero(truncated)
        final = np.stack(list(final_obs[idx]))
        check_finite("final observation", final)
        obs = self.agent.normalize(self._to_tensor(final))
        return t, torch.as_tensor(idx, device=self.device), self.agent.value(obs)

    def state_dict(self) -> dict[str, Any]:
        """What the next collection depends on: the envs' own state (None where it cannot be
        saved, see ``env_state.py``), the current observations, and which envs just finished."""
        return {"obs": self.obs, "prev_done": self.prev_done, "envs": env_state.capture(self.envs)}

    def load_state_dict(self, state: dict[str, Any], reset_seed: int) -> bool:
        """Continue the saved episodes; True if that was exact.

        Where the envs' state was not saved (or does not fit these envs), every env is reset
        with ``reset_seed`` instead and the episodes in flight are lost (their partial returns
        too). Call after the agent's and the reward scaler's state are loaded.
        """
        if state["envs"] is not None and env_state.restore(self.envs, state["envs"]):
            self.obs = state["obs"].to(self.device)
            self.prev_done = state["prev_done"].to(self.device)
            return True
        obs, _ = self.envs.reset(seed=reset_seed)
        self.obs = self._observe(obs)
        self.prev_done.zero_()
        if self.reward_scaler is not None:
            self.reward_scaler.returns.zero_()  # the discounted returns belonged to lost episodes
        return False


class GroupCollector(Collector):
    """One whole episode per env per iteration, for GRPO.

    At the start of every iteration all envs are reset; the envs of one group (``group_size``
    consecutive envs) get the same seed, so they start from the same state and their episodes
    differ only by the actions sampled. Steps after an env's episode has ended are stored with
    ``valid = False``; collection stops early once every episode has ended.
    """

    def __init__(self, envs: VectorEnv, agent: ActorCritic, storage: RolloutStorage, group_size: int,
                 device: torch.device, seed: int) -> None:  # fmt: skip
        super().__init__(envs, agent, storage, None, True, device, seed)
        self.group_size = group_size
        self.seed = seed
        self.iteration = 0

    def group_seeds(self) -> list[int]:
        """Env i's reset seed this iteration: shared within its group, new every iteration."""
        num_groups = self.envs.num_envs // self.group_size
        base = self.seed * 1_000_003 + self.iteration * num_groups
        return [base + i // self.group_size for i in range(self.envs.num_envs)]

    @torch.inference_mode()  # cheaper than no_grad; the storage it writes into stays normal
    def collect(self) -> RolloutStats:
        s, stats = self.storage, RolloutStats()
        # Sync and async vector envs take one seed per env (the annotation says int).
        obs, _ = self.envs.reset(seed=self.group_seeds())  # type: ignore[arg-type]
        self.iteration += 1
        self.obs = self._observe(obs)
        running = torch.ones(self.envs.num_envs, dtype=torch.bool, device=self.device)
        s.valid.zero_()
        for t in range(s.obs.shape[0]):
            sample = self.agent.sample(self.obs)
            s.store_sample(t, self.obs, sample)
            s.valid[t] = running
            obs, reward, terminated, truncated, _ = self.envs.step(self.agent.env_action(sample.action))
            check_finite("reward", reward)
            s.rewards[t] = self._to_tensor(reward) * running
            s.terminated[t] = self._to_tensor(terminated, torch.bool)
            s.truncated[t] = self._to_tensor(truncated, torch.bool)
            running = running & ~(s.terminated[t] | s.truncated[t])
            self.obs = self._observe(obs)
            if not running.any():
                break
        stats.env_steps = (t + 1) * self.envs.num_envs
        stats.episode_returns = (s.rewards * s.valid).sum(dim=0).tolist()
        stats.episode_lengths = s.valid.sum(dim=0).tolist()
        return stats

    def state_dict(self) -> dict[str, Any]:
        """Every iteration resets all envs from seeds derived from the iteration count: that
        count is the whole state."""
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any], reset_seed: int) -> bool:
        self.iteration = int(state["iteration"])
        return True
