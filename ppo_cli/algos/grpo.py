"""GRPO (Shao et al. 2024, DeepSeekMath): critic-free; each episode's advantage is its return
standardised within its group of episodes that started from the same state.

What GRPO does differently from the actor-critic variants, all of it here: one whole episode per env
per iteration (the rollout is as long as the episode time limit), the envs of a group reset with a
shared seed (so each env gets a seed of its own), no reward scaling (returns are standardised
within each group), group-relative advantages, and a loss with a KL to a frozen reference policy.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from gymnasium.vector import VectorEnv

from ppo_cli import losses
from ppo_cli.advantages import group_relative
from ppo_cli.agent import ActorCritic, Evaluation
from ppo_cli.algos.variant import Variant
from ppo_cli.batch import Batch
from ppo_cli.config import GRPOConfig
from ppo_cli.envs import episode_time_limit
from ppo_cli.episodes import EpisodeLog
from ppo_cli.errors import UserError
from ppo_cli.normalization import RewardScaler
from ppo_cli.rollout import Collector, Rollout, RolloutStorage, check_finite
from ppo_cli.update import SurrogateUpdater


class GRPOUpdater(SurrogateUpdater):
    """GRPO: clipped surrogate on group-relative advantages, plus kl_coef * KL(pi || pi_ref).

    The KL to the frozen reference policy uses the k3 form on the stored actions,
    mean(r - 1 - log r) with r = pi_ref(a|s) / pi(a|s) (Shao et al. 2024, eq. 4). The reference
    is the initial policy, or a copy refreshed every ``ref_update_every`` updates. There is no
    critic: the agent's value network receives no gradient.
    """

    cfg: GRPOConfig

    def reset_state(self) -> None:
        self.reference = copy.deepcopy(self.agent).requires_grad_(False)
        self.updates = 0

    def minibatch_loss(self, out: Evaluation, mb: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            ref_params = self.reference.policy_params(mb.obs, mb.action_masks, mb.memory)
            ref_log_prob = self.reference.dist.log_prob(ref_params, mb.actions)
        log_ratio = ref_log_prob - out.log_prob
        ref_kl = (torch.expm1(log_ratio) - log_ratio).mean()
        eps = self.cfg.clip_eps
        surrogate = losses.clipped_surrogate_loss(out.log_prob, mb.log_probs, mb.advantages, eps)
        terms = {
            "policy_loss": surrogate + self.cfg.kl_coef * ref_kl,
            "surrogate_loss": surrogate,
            "kl_reference": ref_kl,
            "entropy": out.entropy.mean(),
            "clipfrac": losses.clip_fraction(out.log_prob.detach(), mb.log_probs, eps),
        }
        return terms["policy_loss"] - self.cfg.ent_coef * terms["entropy"], terms

    def update(self, batch: Batch) -> dict[str, float]:
        metrics = super().update(batch)
        self.updates += 1
        if self.cfg.ref_update_every and self.updates % self.cfg.ref_update_every == 0:
            self.reference.load_state_dict(self.agent.state_dict())
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "reference": self.reference.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.reference.load_state_dict(state["reference"])


class GroupCollector(Collector):
    """One whole episode per env per iteration, for GRPO (and, with groups of one, for pg).

    At the start of every iteration all envs are reset; the envs of one group (``group_size``
    consecutive envs) get the same seed, so they start from the same state and their episodes
    differ only by the actions sampled. Steps after an env's episode has ended are stored with
    ``valid = False``; collection stops early once every episode has ended.
    """

    def __init__(
        self, envs: VectorEnv, agent: ActorCritic, storage: RolloutStorage, *, group_size: int, seed: int
    ) -> None:
        super().__init__(envs, agent, storage, device=storage.obs.device, seed=seed)
        self.group_size = group_size
        self.seed = seed
        self.iteration = 0

    def group_seeds(self) -> list[int]:
        """Env i's reset seed this iteration: shared within its group, new every iteration."""
        num_groups = self.envs.num_envs // self.group_size
        base = self.seed * 1_000_003 + self.iteration * num_groups
        return [base + i // self.group_size for i in range(self.envs.num_envs)]

    @torch.inference_mode()  # cheaper than no_grad; the storage it writes into stays normal
    def collect(self) -> Rollout:
        s = self.storage
        obs, info = self._reset(self.group_seeds())  # one seed per env
        self.iteration += 1
        self.obs = self._observe(obs)
        self._observe_masks(info)
        act = self._acting()
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
        finished = EpisodeLog()  # every env's episode, in env order
        finished.add(s.host_rewards.sum(axis=0, dtype=np.float64), s.host_valid.sum(axis=0))
        return Rollout(s, (t + 1) * self.envs.num_envs, finished)

    def state_dict(self) -> dict[str, Any]:
        """Every iteration resets all envs from seeds derived from the iteration count: that
        count is the whole state."""
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any], reset_seed: int) -> bool:
        self.iteration = int(state["iteration"])
        return True


class GRPO(Variant):
    schema = GRPOConfig
    updater = GRPOUpdater
    per_env_seeds = True  # the envs of a group share a seed: each env is given its own

    @property
    def algo(self) -> GRPOConfig:
        assert isinstance(self.cfg.algo, GRPOConfig), type(self.cfg.algo)
        return self.cfg.algo

    def rollout_length(self) -> int:
        """The episode time limit, so that every episode ends inside one rollout."""
        limit = episode_time_limit(self.cfg.env)
        if limit is None:
            raise UserError(
                f"env.id: algo=grpo needs episodic envs; {self.cfg.env.id} has no time limit "
                "(set env.max_episode_steps)"
            )
        return limit

    def reward_scaler(self) -> RewardScaler | None:
        return None  # returns are standardised within each group (config.py refuses the key)

    def collector(
        self,
        envs: VectorEnv,
        agent: ActorCritic,
        storage: RolloutStorage,
        reward_scaler: RewardScaler | None,
        seed: int,
    ) -> Collector:
        return GroupCollector(envs, agent, storage, group_size=self.algo.group_size, seed=seed)

    def advantages(self, storage: RolloutStorage) -> tuple[torch.Tensor, torch.Tensor]:
        advantages = group_relative(storage.rewards, storage.valid, self.algo.group_size)
        return advantages, torch.zeros_like(advantages)  # no critic to train
