"""PPO-Clip (Schulman et al. 2017): the clipped surrogate objective; optional value clipping;
dual-clip PPO (Ye et al. 2020) and SPO (Xie et al. 2024) as options of its policy term; optional
KL to a frozen reference policy (for fine-tuning)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ppo_cli import losses
from ppo_cli.agent import Evaluation
from ppo_cli.algos.variant import ActorCriticVariant
from ppo_cli.batch import Batch
from ppo_cli.config import ClipConfig
from ppo_cli.reference import ReferencePolicy
from ppo_cli.update import ActorCriticSurrogateUpdater


class ClipUpdater(ActorCriticSurrogateUpdater):
    """PPO-Clip: the clipped surrogate (optionally dual-clipped), or SPO's penalty objective on
    the same ratio and epsilon; value clipping with the same epsilon; with ``ref_kl_coef > 0``,
    plus ref_kl_coef * KL(pi || pi_ref) to the policy the run started from (``reference.py``; none
    is kept otherwise). ``clipfrac`` is logged for both objectives: for SPO it is the share of
    ratios its penalty failed to keep inside [1 - eps, 1 + eps]."""

    cfg: ClipConfig

    def reset_state(self) -> None:
        cfg = self.cfg
        self.reference = (
            ReferencePolicy(self.agent, cfg.kl_loss, cfg.ref_kl_coef) if cfg.ref_kl_coef else None
        )

    def minibatch_loss(self, out: Evaluation, mb: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.reference is None:
            return super().minibatch_loss(out, mb)
        # k1_in_reward shapes the advantages before their normalisation, as a reward penalty would.
        ref = self.reference.terms(out.log_prob, mb, mb.advantages)
        loss, terms = super().minibatch_loss(out, dataclasses.replace(mb, advantages=ref.advantages))
        terms["surrogate_loss"] = terms["policy_loss"]
        terms["policy_loss"] = terms["policy_loss"] + ref.penalty
        terms["kl_reference"] = ref.kl
        return loss + ref.penalty, terms

    def policy_loss(self, out: Evaluation, mb: Batch, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, eps = self.cfg, self.cfg.clip_eps
        if cfg.objective == "spo":
            policy_loss = losses.spo_loss(out.log_prob, mb.log_probs, advantages, eps, mb.weights)
        else:
            policy_loss = losses.clipped_surrogate_loss(
                out.log_prob, mb.log_probs, advantages, eps, dual_clip=cfg.dual_clip, weights=mb.weights
            )
        terms = {
            "policy_loss": policy_loss,
            "clipfrac": losses.clip_fraction(out.log_prob.detach(), mb.log_probs, eps, weights=mb.weights),
        }
        if cfg.dual_clip is not None:
            terms["dual_clipfrac"] = losses.dual_clip_fraction(
                out.log_prob.detach(), mb.log_probs, advantages, cfg.dual_clip, mb.weights
            )
        return terms

    def value_clip_eps(self) -> float | None:
        return self.cfg.clip_eps if self.cfg.clip_vloss else None

    def state_dict(self) -> dict[str, Any]:
        return {} if self.reference is None else self.reference.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the reference; a checkpoint saved without one (ref_kl_coef was 0, changed on
        resume) makes the policy it holds, loaded before this, the reference."""
        if self.reference is None:
            super().load_state_dict(state)
        elif state:
            self.reference.load_state_dict(state)
        else:
            self.reference.refresh()


class Clip(ActorCriticVariant):
    schema = ClipConfig
    updater = ClipUpdater
