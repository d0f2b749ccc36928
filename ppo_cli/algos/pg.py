"""Monte-Carlo policy gradient (REINFORCE, Williams 1992): whole episodes, one policy step on
-mean(log pi(a_t|s_t) * (psi_t - b_t)) per iteration, then (``baseline=value``) critic regression.

What it does differently from the actor-critic variants, all of it here: one whole episode per env
per iteration, each env reset with a seed of its own (GRPO's collector with groups of one), the
rollout as long as the episode time limit, weights that are Monte-Carlo returns (nothing
bootstrapped: see ``advantages.monte_carlo_weights``), and a critic trained only when it is the
baseline.
"""

from __future__ import annotations

import torch

from ppo_cli.advantages import monte_carlo_weights
from ppo_cli.agent import Evaluation
from ppo_cli.algos.whole_episodes import WholeEpisodeVariant
from ppo_cli.batch import Batch
from ppo_cli.config import PGConfig
from ppo_cli.rollout import RolloutStorage
from ppo_cli.update import OneStepUpdater, regress_critic


class PGUpdater(OneStepUpdater):
    """One policy step on the whole batch; the critic is regressed on the weights psi_t only
    when it is the baseline (``baseline=value``), and is left untouched otherwise."""

    cfg: PGConfig

    def update(self, batch: Batch) -> dict[str, float]:
        out = self.agent.evaluate(batch.obs, batch.actions, batch.action_masks, batch.memory)
        loss, terms = self.batch_loss(out, batch)
        self.step(loss, terms)
        if self.regresses_critic:
            terms["value_loss"] = regress_critic(self, batch, self.cfg)
        return self.metrics_after_step(batch, terms)

    def batch_loss(self, out: Evaluation, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, {name: term to log}) of the policy step on the evaluation ``out`` of ``batch``."""
        terms = self.policy_terms_of(out, batch)
        return terms["policy_loss"] - self.cfg.ent_coef * terms["entropy"], terms

    @property
    def regresses_critic(self) -> bool:
        return self.cfg.baseline == "value"


class PG(WholeEpisodeVariant):
    schema = PGConfig
    updater = PGUpdater

    @property
    def algo(self) -> PGConfig:
        assert isinstance(self.cfg.algo, PGConfig), type(self.cfg.algo)
        return self.cfg.algo

    def advantages(self, storage: RolloutStorage) -> tuple[torch.Tensor, torch.Tensor]:
        algo = self.algo
        return monte_carlo_weights(
            storage.rewards, storage.valid, storage.values, algo.gamma, algo.returns, algo.baseline
        )
