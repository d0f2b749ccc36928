"""GRPO (Shao et al. 2024, DeepSeekMath): critic-free; each episode's advantage is its return
standardised within its group of episodes that started from the same state.

What GRPO does differently from the actor-critic variants, all of it here: one whole episode per env
per iteration (the rollout is as long as the episode time limit), the envs of a group reset with a
shared seed (so each env gets a seed of its own), no reward scaling (returns are standardised
within each group), group-relative advantages (with DAPO's resampling of tied groups), and a loss
with a KL to a frozen reference policy.
"""

from __future__ import annotations

from typing import Any

import torch

from ppo_cli import losses
from ppo_cli.advantages import group_relative
from ppo_cli.agent import Evaluation
from ppo_cli.algos.whole_episodes import WholeEpisodeVariant
from ppo_cli.batch import Batch
from ppo_cli.config import GRPOConfig
from ppo_cli.reference import ReferencePolicy
from ppo_cli.rollout import RolloutStorage
from ppo_cli.update import SurrogateUpdater


class GRPOUpdater(SurrogateUpdater):
    """GRPO: clipped surrogate on group-relative advantages, plus kl_coef * KL(pi || pi_ref).

    The KL to the frozen reference policy (``reference.py``) enters as ``kl_loss`` says: by
    default the k3 form on the stored actions, r - 1 - log r with r = pi_ref(a|s) / pi(a|s)
    (Shao et al. 2024, eq. 4). The reference is the initial policy, or a copy refreshed every
    ``ref_update_every`` updates. Every term is averaged over the steps as ``loss_agg`` says,
    through the batch's step weights (:meth:`GRPO.loss_weights`). There is no critic: the agent's
    value network receives no gradient.
    """

    cfg: GRPOConfig

    def reset_state(self) -> None:
        cfg = self.cfg
        self.reference = ReferencePolicy(self.agent, cfg.kl_loss, cfg.kl_coef, cfg.ref_update_every)

    def minibatch_loss(self, out: Evaluation, mb: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ref = self.reference.terms(out.log_prob, mb, mb.advantages)
        low, high = self.cfg.clip_range
        surrogate = losses.clipped_surrogate_loss(
            out.log_prob, mb.log_probs, ref.advantages, low, clip_eps_high=high, weights=mb.weights
        )
        terms = {
            "policy_loss": surrogate + ref.penalty,
            "surrogate_loss": surrogate,
            "kl_reference": ref.kl,
            "entropy": losses.weighted_mean(out.entropy, mb.weights),
            "clipfrac": losses.clip_fraction(out.log_prob.detach(), mb.log_probs, low, high),
        }
        return terms["policy_loss"] - self.cfg.ent_coef * terms["entropy"], terms

    def update(self, batch: Batch) -> dict[str, float]:
        metrics = super().update(batch)
        self.reference.count_update()
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return self.reference.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference.load_state_dict(state)


class GRPO(WholeEpisodeVariant):
    schema = GRPOConfig
    updater = GRPOUpdater

    @property
    def algo(self) -> GRPOConfig:
        assert isinstance(self.cfg.algo, GRPOConfig), type(self.cfg.algo)
        return self.cfg.algo

    @property
    def group_size(self) -> int:
        return self.algo.group_size

    @property
    def max_passes(self) -> int:
        return self.algo.dynamic_sampling_max_passes

    def loss_weights(self, storage: RolloutStorage) -> torch.Tensor:
        """Step weights that make the loss's mean the ``loss_agg`` aggregate (each env's column
        of the storage holds one episode)."""
        return losses.episode_step_weights(storage.valid, self.algo.loss_agg)

    def advantages(self, storage: RolloutStorage) -> tuple[torch.Tensor, torch.Tensor]:
        algo = self.algo
        advantages = group_relative(
            storage.rewards,
            storage.valid,
            algo.group_size,
            leave_one_out=algo.baseline == "leave_one_out",
            divide_by_std=algo.adv_std == "group",
        )
        return advantages, torch.zeros_like(advantages)  # no critic to train
