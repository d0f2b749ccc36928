"""A2C (Mnih et al. 2016, synchronous): one step on policy + value loss per short rollout."""

from __future__ import annotations

from ppo_cli import losses
from ppo_cli.algos.variant import ActorCriticVariant
from ppo_cli.batch import Batch
from ppo_cli.config import A2CConfig
from ppo_cli.update import OneStepUpdater


class A2CUpdater(OneStepUpdater):
    """A2C: one step per rollout on -mean(log pi * A) - c2 * H + c1 * 0.5 * mean((V - R)^2)."""

    cfg: A2CConfig

    def update(self, batch: Batch) -> dict[str, float]:
        out, terms = self.policy_terms(batch)
        terms["value_loss"] = losses.value_loss(out.value, batch.values, batch.returns, None)
        self.step(
            terms["policy_loss"]
            - self.cfg.ent_coef * terms["entropy"]
            + self.cfg.vf_coef * terms["value_loss"],
            terms,
        )
        return self.metrics_after_step(batch, terms)


class A2C(ActorCriticVariant):
    schema = A2CConfig
    updater = A2CUpdater
