"""What the training loop asks of a variant of the family, answered by one object per variant.

The loop (``iteration.py``) never names a variant. It asks the variant of its config how long a
rollout is, whether the envs need one reset seed each, which collector fills the rollout, whether
rewards are scaled, how advantages and critic targets are estimated, how the loss weighs the
steps, and which updater learns from the batch. :class:`ActorCriticVariant` gives the answers of
the variants with a learned critic (fixed rollouts of ``env.num_steps`` steps, GAE); a variant
that differs (GRPO) overrides them in its own module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from gymnasium.vector import VectorEnv

from ppo_cli.advantages import gae_and_critic_targets
from ppo_cli.agent import ActorCritic
from ppo_cli.config import ActorCriticConfig, AlgoConfig, TrainConfig
from ppo_cli.distributed import DataParallel
from ppo_cli.normalization import RewardScaler
from ppo_cli.rollout import Collector, RolloutStorage
from ppo_cli.update import Updater


class Variant(ABC):
    """One variant of the family for the run ``cfg`` describes."""

    schema: ClassVar[type[AlgoConfig]]  # its config schema (config.ALGO_SCHEMAS)
    updater: ClassVar[type[Updater]]  # what learns from each batch
    per_env_seeds: ClassVar[bool] = False  # the envs are reset with a list of seeds, one per env

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def rollout_length(self) -> int:
        """Steps per env per iteration (the storage's length)."""

    @abstractmethod
    def reward_scaler(self) -> RewardScaler | None:
        """The scaler of the stored rewards, or None when rewards are learned from as they come."""

    @abstractmethod
    def collector(
        self,
        envs: VectorEnv,
        agent: ActorCritic,
        storage: RolloutStorage,
        reward_scaler: RewardScaler | None,
        seed: int,
    ) -> Collector:
        """What fills ``storage`` each iteration, resetting ``envs`` first from ``seed``."""

    @abstractmethod
    def advantages(self, storage: RolloutStorage) -> tuple[torch.Tensor, torch.Tensor]:
        """(advantages, critic targets), each (T, N), of the rollout in ``storage``."""

    def loss_weights(self, storage: RolloutStorage) -> torch.Tensor | None:
        """Each step's weight (T, N) in the loss's mean over the steps, or None for a plain mean."""
        return None

    def make_updater(
        self, agent: ActorCritic, optimizer: torch.optim.Optimizer, parallel: DataParallel
    ) -> Updater:
        return self.updater(agent, optimizer, self.cfg.algo, parallel)


class ActorCriticVariant(Variant):
    """A learned critic: rollouts of ``env.num_steps`` steps of every env (episodes run on across
    iterations), GAE(gamma, lambda) advantages, the critic's targets as ``algo.critic_target`` picks
    (the lambda-returns by default), and reward scaling when ``env.normalize_reward``."""

    @property
    def algo(self) -> ActorCriticConfig:
        assert isinstance(self.cfg.algo, ActorCriticConfig), type(self.cfg.algo)
        return self.cfg.algo

    def rollout_length(self) -> int:
        return self.cfg.env.num_steps

    def reward_scaler(self) -> RewardScaler | None:
        env = self.cfg.env
        if not env.normalize_reward:
            return None
        return RewardScaler(env.num_envs, self.algo.gamma, env.clip_reward)  # on the CPU: see its docstring

    def collector(
        self,
        envs: VectorEnv,
        agent: ActorCritic,
        storage: RolloutStorage,
        reward_scaler: RewardScaler | None,
        seed: int,
    ) -> Collector:
        return Collector(
            envs,
            agent,
            storage,
            device=storage.obs.device,
            seed=seed,
            reward_scaler=reward_scaler,
            bootstrap_truncated=self.algo.bootstrap_truncated,
            games_in_info=self.cfg.env.atari.enabled,  # episodes end at lost lives: report whole games
        )

    def advantages(self, storage: RolloutStorage) -> tuple[torch.Tensor, torch.Tensor]:
        algo = self.algo
        terminated = storage.terminated
        if not algo.bootstrap_truncated:  # the old behaviour: a time limit counts as terminal
            terminated = terminated | storage.truncated
        return gae_and_critic_targets(
            storage.rewards,
            storage.values,
            storage.next_values,
            terminated,
            storage.truncated,
            algo.gamma,
            algo.gae_lambda,
            algo.critic_target,
        )
