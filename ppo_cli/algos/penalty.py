"""PPO-Penalty (Schulman et al. 2017, section 4): a KL penalty instead of the clip, beta adaptive or fixed."""

from __future__ import annotations

from typing import Any

import torch

from ppo_cli import losses
from ppo_cli.agent import Evaluation
from ppo_cli.algos.variant import ActorCriticVariant
from ppo_cli.batch import Batch
from ppo_cli.config import PenaltyConfig
from ppo_cli.update import ActorCriticSurrogateUpdater


class PenaltyUpdater(ActorCriticSurrogateUpdater):
    """PPO-Penalty: -mean(rho * A) + beta * KL(pi_old || pi), KL from ``algo.kl_estimator``.

    beta starts at ``kl_coef``; with ``adaptive`` it follows :func:`losses.adaptive_kl_coef` after
    every iteration, driven by the KL between pi_old and the updated policy over the whole batch.
    """

    cfg: PenaltyConfig
    member_state = ("beta",)

    def reset_state(self) -> None:
        self.beta = self.cfg.kl_coef

    def policy_loss(self, out: Evaluation, mb: Batch, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
        estimator = self.cfg.kl_estimator  # only the one the penalty uses, with gradients
        if estimator == "exact":
            penalty = losses.weighted_mean(
                self.agent.dist.kl(mb.policy_params, out.policy_params), mb.weights
            )
        else:
            penalty = getattr(losses.kl_estimates(out.log_prob, mb.log_probs, mb.weights), estimator)
        surrogate = losses.surrogate_loss(out.log_prob, mb.log_probs, advantages, mb.weights)
        return {"policy_loss": surrogate + self.beta * penalty, "surrogate_loss": surrogate}

    def finish_update(self, batch: Batch, metrics: dict[str, float]) -> dict[str, float]:
        metrics = super().finish_update(batch, metrics)
        metrics["kl_beta"] = self.beta  # the beta this iteration's update used
        if self.cfg.adaptive:
            measured = metrics[f"kl_{self.cfg.kl_estimator}"]  # over the batch, after the update
            metrics["kl_after_update"] = measured
            self.beta = losses.adaptive_kl_coef(
                self.beta,
                measured,
                self.cfg.kl_target,
                self.cfg.beta_factor,
                self.cfg.kl_tolerance,
                (self.cfg.beta_min, self.cfg.beta_max),
            )
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])


class Penalty(ActorCriticVariant):
    schema = PenaltyConfig
    updater = PenaltyUpdater
