"""TRPO (Schulman et al. 2015): a natural-gradient policy step inside a KL trust region (see
``trust_region.py``), then critic regression."""

from __future__ import annotations

import torch

from ppo_cli import losses
from ppo_cli.algos.variant import ActorCriticVariant
from ppo_cli.batch import Batch
from ppo_cli.config import TRPOConfig
from ppo_cli.trust_region import trust_region_step
from ppo_cli.update import OneStepUpdater, regress_critic


class TRPOUpdater(OneStepUpdater):
    """TRPO: one trust-region step of the policy (see ``trust_region.py``), then critic regression."""

    cfg: TRPOConfig

    def update(self, batch: Batch) -> dict[str, float]:
        cfg = self.cfg
        advantages = losses.normalize_advantages(batch.advantages) if cfg.norm_adv else batch.advantages

        def surrogate() -> torch.Tensor:
            params = self.agent.policy_params(batch.obs, batch.action_masks, batch.memory)
            log_prob, entropy = self.agent.dist.log_prob_entropy(params, batch.actions)
            return (
                -losses.surrogate_loss(log_prob, batch.log_probs, advantages) + cfg.ent_coef * entropy.mean()
            )

        def mean_kl() -> torch.Tensor:
            new_params = self.agent.policy_params(batch.obs, batch.action_masks, batch.memory)
            return self.agent.dist.kl(batch.policy_params, new_params).mean()

        result = trust_region_step(
            self.agent.actor_parameters(),
            surrogate,
            mean_kl,
            cfg.max_kl,
            cfg.cg_iterations,
            cfg.cg_damping,
            cfg.line_search_steps,
            cfg.backtrack_coef,
            self.parallel.average,
        )
        _, terms = self.policy_terms(batch)
        terms["value_loss"] = regress_critic(self, batch, cfg)
        metrics = self.metrics_after_step(batch, terms)
        metrics.update(
            surrogate_improvement=result.surrogate_after - result.surrogate_before,
            line_search_fraction=result.step_fraction,
        )
        return metrics


class TRPO(ActorCriticVariant):
    schema = TRPOConfig
    updater = TRPOUpdater
