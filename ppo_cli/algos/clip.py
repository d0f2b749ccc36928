"""PPO-Clip (Schulman et al. 2017): the clipped surrogate objective; optional value clipping;
dual-clip PPO (Ye et al. 2020) and SPO (Xie et al. 2024) as options of its policy term."""

from __future__ import annotations

import torch

from ppo_cli import losses
from ppo_cli.agent import Evaluation
from ppo_cli.algos.variant import ActorCriticVariant
from ppo_cli.batch import Batch
from ppo_cli.config import ClipConfig
from ppo_cli.update import ActorCriticSurrogateUpdater


class ClipUpdater(ActorCriticSurrogateUpdater):
    """PPO-Clip: the clipped surrogate (optionally dual-clipped), or SPO's penalty objective on
    the same ratio and epsilon; value clipping with the same epsilon. ``clipfrac`` is logged for
    both: for SPO it is the share of ratios its penalty failed to keep inside [1 - eps, 1 + eps]."""

    cfg: ClipConfig

    def policy_loss(self, out: Evaluation, mb: Batch, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, eps = self.cfg, self.cfg.clip_eps
        if cfg.objective == "spo":
            policy_loss = losses.spo_loss(out.log_prob, mb.log_probs, advantages, eps)
        else:
            policy_loss = losses.clipped_surrogate_loss(
                out.log_prob, mb.log_probs, advantages, eps, cfg.dual_clip
            )
        terms = {
            "policy_loss": policy_loss,
            "clipfrac": losses.clip_fraction(out.log_prob.detach(), mb.log_probs, eps),
        }
        if cfg.dual_clip is not None:
            terms["dual_clipfrac"] = losses.dual_clip_fraction(
                out.log_prob.detach(), mb.log_probs, advantages, cfg.dual_clip
            )
        return terms

    def value_clip_eps(self) -> float | None:
        return self.cfg.clip_eps if self.cfg.clip_vloss else None


class Clip(ActorCriticVariant):
    schema = ClipConfig
    updater = ClipUpdater
