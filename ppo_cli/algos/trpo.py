"""TRPO (Schulman et al. 2015): a natural-gradient policy step inside a KL trust region (see
``trust_region.py``), then critic regression."""

from __future__ import annotations

import torch

from ppo_cli import losses
from ppo_cli.algos.variant import ActorCriticVariant
from ppo_cli.batch import Batch
from ppo_cli.config import TRPOConfig
from ppo_cli.trust_region import StepResult, TrustRegion, trust_region_step
from ppo_cli.update import OneStepUpdater, regress_critic


class TRPOUpdater(OneStepUpdater):
    """TRPO: one trust-region step of the policy (see ``trust_region.py``), then critic regression."""

    cfg: TRPOConfig

    def update(self, batch: Batch) -> dict[str, float]:
        def policy() -> torch.Tensor:
            return self.agent.policy_params(batch.obs, batch.action_masks, batch.memory)

        result = trust_region_step(
            self.agent.actor_parameters(),
            lambda: self.surrogate_of(policy(), batch),
            lambda: self.mean_kl_of(policy(), batch),
            self.region,
            self.parallel.average,
        )
        return self.metrics_of(batch, regress_critic(self, batch, self.cfg), result)

    @property
    def region(self) -> TrustRegion:
        """How the policy step is taken (its config's keys)."""
        cfg = self.cfg
        return TrustRegion(
            cfg.max_kl, cfg.cg_iterations, cfg.cg_damping, cfg.line_search_steps, cfg.backtrack_coef
        )

    def surrogate_of(self, policy_params: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The objective TRPO maximises, for the policy whose output on ``batch`` is
        ``policy_params``: mean(rho * A) + ent_coef * mean entropy (means weighted by
        ``batch.weights``, as a population's padded batches are)."""
        cfg = self.cfg
        advantages = batch.advantages
        if cfg.norm_adv:
            advantages = losses.normalize_advantages(advantages, weights=batch.weights)
        log_prob, entropy = self.agent.dist.log_prob_entropy(policy_params, batch.actions)
        surrogate = -losses.surrogate_loss(log_prob, batch.log_probs, advantages, batch.weights)
        return surrogate + cfg.ent_coef * losses.weighted_mean(entropy, batch.weights)

    def mean_kl_of(self, policy_params: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The mean KL(pi_old || pi) over ``batch`` for the policy whose output is ``policy_params``."""
        return losses.weighted_mean(self.agent.dist.kl(batch.policy_params, policy_params), batch.weights)

    def metrics_of(self, batch: Batch, value_loss: torch.Tensor, result: StepResult) -> dict[str, float]:
        """The logged quantities of an update that took ``result``'s policy step and fitted the
        critic to a mean loss of ``value_loss``."""
        _, terms = self.policy_terms(batch)
        terms["value_loss"] = value_loss
        metrics = self.metrics_after_step(batch, terms)
        metrics.update(
            surrogate_improvement=result.surrogate_after - result.surrogate_before,
            line_search_fraction=result.step_fraction,
        )
        return metrics


class TRPO(ActorCriticVariant):
    schema = TRPOConfig
    updater = TRPOUpdater
