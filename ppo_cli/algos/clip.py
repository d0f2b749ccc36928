"""PPO-Clip (Schulman et al. 2017): the clipped surrogate objective; optional value clipping."""

from __future__ import annotations

import torch

from ppo_cli import losses
from ppo_cli.agent import Evaluation
from ppo_cli.algos.variant import ActorCriticVariant
from ppo_cli.batch import Batch
from ppo_cli.config import ClipConfig
from ppo_cli.update import ActorCriticSurrogateUpdater


class ClipUpdater(ActorCriticSurrogateUpdater):
    """PPO-Clip: the clipped surrogate; value clipping with the same epsilon."""

    cfg: ClipConfig

    def policy_loss(self, out: Evaluation, mb: Batch, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
        eps = self.cfg.clip_eps
        return {
            "policy_loss": losses.clipped_surrogate_loss(out.log_prob, mb.log_probs, advantages, eps),
            "clipfrac": losses.clip_fraction(out.log_prob.detach(), mb.log_probs, eps),
        }

    def value_clip_eps(self) -> float | None:
        return self.cfg.clip_eps if self.cfg.clip_vloss else None


class Clip(ActorCriticVariant):
    schema = ClipConfig
    updater = ClipUpdater
