"""Vanilla policy gradient (REINFORCE with a learned baseline): one policy step, then critic regression."""

from __future__ import annotations

from ppo_cli.algos.variant import ActorCriticVariant
from ppo_cli.batch import Batch
from ppo_cli.config import PGConfig
from ppo_cli.update import OneStepUpdater, regress_critic


class PGUpdater(OneStepUpdater):
    """REINFORCE with baseline: one policy step, then the critic is regressed on the returns."""

    cfg: PGConfig

    def update(self, batch: Batch) -> dict[str, float]:
        _, terms = self.policy_terms(batch)
        self.step(terms["policy_loss"] - self.cfg.ent_coef * terms["entropy"], terms)
        terms["value_loss"] = regress_critic(self, batch, self.cfg)
        return self.metrics_after_step(batch, terms)


class PG(ActorCriticVariant):
    schema = PGConfig
    updater = PGUpdater
