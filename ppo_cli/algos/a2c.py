"""A2C (Mnih et al. 2016, synchronous): one step on policy + value loss per short rollout."""

from __future__ import annotations

import torch

from ppo_cli import losses
from ppo_cli.agent import Evaluation
from ppo_cli.algos.variant import ActorCriticVariant
from ppo_cli.batch import Batch
from ppo_cli.config import A2CConfig
from ppo_cli.update import OneStepUpdater


class A2CUpdater(OneStepUpdater):
    """A2C: one step per rollout on -mean(log pi * A) - c2 * H + c1 * 0.5 * mean((V - R)^2)."""

    cfg: A2CConfig

    def update(self, batch: Batch) -> dict[str, float]:
        out = self.agent.evaluate(batch.obs, batch.actions, batch.action_masks, batch.memory)
        loss, terms = self.batch_loss(out, batch)
        self.step(loss, terms)
        return self.metrics_after_step(batch, terms)

    def batch_loss(self, out: Evaluation, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, {name: term to log}) of the evaluation ``out`` of the whole ``batch``."""
        terms = self.policy_terms_of(out, batch)
        terms["value_loss"] = losses.value_loss(out.value, batch.values, batch.returns, None, batch.weights)
        loss = (
            terms["policy_loss"]
            - self.cfg.ent_coef * terms["entropy"]
            + self.cfg.vf_coef * terms["value_loss"]
        )
        return loss, terms


class A2C(ActorCriticVariant):
    schema = A2CConfig
    updater = A2CUpdater
