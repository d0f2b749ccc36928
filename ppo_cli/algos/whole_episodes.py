"""Whole-episode variants (GRPO, REINFORCE): one whole episode per env per iteration.

What they share, apart from the actor-critic variants' fixed-length rollouts: the rollout is as
long as the episode time limit (so every episode ends inside it), each env is reset at every
iteration with a seed of its own (shared within a group), and no reward scaling (their weights are
the episodes' own returns). :class:`GroupCollector` plays the episodes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium.vector import VectorEnv

from ppo_cli.advantages import group_returns, zero_spread
from ppo_cli.agent import ActorCritic
from ppo_cli.algos.variant import Variant
from ppo_cli.envs import episode_time_limit
from ppo_cli.episodes import EpisodeLog
from ppo_cli.errors import UserError
from ppo_cli.normalization import RewardScaler
from ppo_cli.rollout import Collector, Rollout, RolloutStorage, check_finite


class GroupCollector(Collector):
    """One whole episode per env per iteration (groups of one for pg).

    A pass resets all envs; the envs of one group (``group_size`` consecutive envs) get the same
    seed, so they start from the same state and their episodes differ only by the actions
    sampled. Steps after an env's episode has ended are stored with ``valid = False``; a pass
    stops once every episode has ended.

    DAPO's dynamic sampling (Yu et al. 2025, sec. 3.2), when ``max_passes`` > 0: a group whose
    returns are all equal (tied) carries no learning signal, its advantages are 0. While the
    batch holds such groups, up to ``max_passes`` more passes of every env, each from fresh
    seeds, are played into a spare storage, and their groups with a spread replace the tied
    ones, whole columns at a time (the batch keeps its shape). Tied groups left when the passes
    run out stay in the batch and contribute 0. Every pass's steps are env steps taken, and
    every episode played is reported.
    """

    # Its passes end when every episode has, and dynamic sampling may play more: a population
    # (population.py) collects its members' rollouts whole, one after the other.
    lockstep = False

    def __init__(
        self,
        envs: VectorEnv,
        agent: ActorCritic,
        storage: RolloutStorage,
        *,
        group_size: int,
        seed: int,
        max_passes: int = 0,
    ) -> None:
        super().__init__(envs, agent, storage, device=storage.obs.device, seed=seed)
        self.group_size = group_size
        self.seed = seed
        self.max_passes = max_passes
        self.passes = 0  # passes played so far: each draws new group seeds
        self.spare: RolloutStorage | None = None  # where extra passes are played
        if max_passes:
            self.spare = RolloutStorage(storage.num_steps, envs.num_envs, agent, self.device)
            if storage.action_masks is not None:
                self.spare.track_action_masks()

    def group_seeds(self) -> list[int]:
        """Env i's reset seed for the next pass: shared within its group, new every pass."""
        num_groups = self.envs.num_envs // self.group_size
        base = self.seed * 1_000_003 + self.passes * num_groups
        return [base + i // self.group_size for i in range(self.envs.num_envs)]

    @torch.inference_mode()  # cheaper than no_grad; the storage it writes into stays normal
    def collect(self) -> Rollout:
        batch, episodes = self.storage, EpisodeLog()  # every env's episode, in pass and env order
        env_steps = self._play(episodes)
        tied = self._tied_groups(batch)
        counts: dict[str, int] = {}
        if self.spare is not None:
            counts["dropped_groups"] = 0
            for _ in range(self.max_passes):
                if not tied.any():
                    break
                self.storage = self.spare  # the base class's helpers write into self.storage
                try:
                    env_steps += self._play(episodes)
                finally:
                    self.storage = batch
                fresh = np.flatnonzero(~self._tied_groups(self.spare))
                slots = np.flatnonzero(tied)[: len(fresh)]
                batch.copy_envs(self.spare, self._envs_of(slots), self._envs_of(fresh[: len(slots)]))
                tied[slots] = False
                counts["dropped_groups"] += len(slots)
        counts["tied_groups"] = int(tied.sum())
        return Rollout(batch, env_steps, episodes, counts)

    def _play(self, episodes: EpisodeLog) -> int:
        """One pass: every env plays one episode from its group's seed into ``self.storage``,
        added to ``episodes``; returns the env steps taken."""
        s = self.storage
        obs, info = self._reset(self.group_seeds())  # one seed per env
        self.passes += 1
        self.obs = self._observe(obs)
        self._observe_masks(info)
        act = self.acting()
        running = np.ones(self.envs.num_envs, dtype=bool)
        s.host_valid[:] = False
        s.host_rewards[:] = 0.0
        for t in range(s.num_steps):
            s.host_valid[t] = running
            self._record_masks(t)
            obs, reward, terminated, truncated, info = self._step(act(t, self.obs))
            check_finite("reward", reward)
            s.host_rewards[t] = reward * running
            s.host_terminated[t], s.host_truncated[t] = terminated, truncated
            running = running & ~(terminated | truncated)
            self.obs = self._observe(obs)
            self._observe_masks(info)
            if not running.any():
                break
        self._finish()
        episodes.add(s.host_rewards.sum(axis=0, dtype=np.float64), s.host_valid.sum(axis=0))
        return (t + 1) * self.envs.num_envs

    def _tied_groups(self, storage: RolloutStorage) -> np.ndarray:
        """(groups,) True where the group's returns in ``storage`` are all equal, as
        ``group_relative`` decides it."""
        rewards, valid = torch.from_numpy(storage.host_rewards), torch.from_numpy(storage.host_valid)
        return zero_spread(group_returns(rewards, valid, self.group_size)).numpy()

    def _envs_of(self, groups: np.ndarray) -> np.ndarray:
        """The env indices (columns) of ``groups``, in order."""
        return (groups[:, None] * self.group_size + np.arange(self.group_size)).ravel()

    def state_dict(self) -> dict[str, Any]:
        """Every pass resets all envs from seeds derived from the number of passes so far: that
        count is the whole state."""
        return {"passes": self.passes}

    def load_state_dict(self, state: dict[str, Any], reset_seed: int) -> bool:
        # Saved before dynamic sampling, it counted iterations: one pass each.
        self.passes = int(state["passes"] if "passes" in state else state["iteration"])
        return True


class WholeEpisodeVariant(Variant):
    """A variant that learns from whole episodes, collected by :class:`GroupCollector`."""

    per_env_seeds = True  # every env is reset with a seed of its own (shared within a group)

    @property
    def group_size(self) -> int:
        """How many consecutive envs start each episode from one seed."""
        return 1

    @property
    def max_passes(self) -> int:
        """Extra passes that may replace tied groups (GRPO's dynamic sampling)."""
        return 0

    def rollout_length(self) -> int:
        """The episode time limit, so that every episode ends inside one rollout."""
        limit = episode_time_limit(self.cfg.env)
        if limit is None:
            raise UserError(
                f"env.id: algo={self.cfg.algo.name} needs episodic envs; {self.cfg.env.id} has no "
                "time limit (set env.max_episode_steps)"
            )
        return limit

    def reward_scaler(self) -> RewardScaler | None:
        return None  # the weights are the episodes' own returns (config.py refuses the key)

    def collector(
        self,
        envs: VectorEnv,
        agent: ActorCritic,
        storage: RolloutStorage,
        reward_scaler: RewardScaler | None,
        seed: int,
    ) -> Collector:
        return GroupCollector(
            envs, agent, storage, group_size=self.group_size, seed=seed, max_passes=self.max_passes
        )
