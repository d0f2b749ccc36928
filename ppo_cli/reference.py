"""A frozen reference policy pi_ref, and the KL(pi || pi_ref) term that keeps the policy near it.

GRPO's loss has one (Shao et al. 2024, eq. 3-4); PPO-Clip takes one with ``algo.ref_kl_coef > 0``,
for fine-tuning a trained agent. The reference is a copy of the agent taken when the updater is
built, so weights loaded into the agent before then (a fine-tuning start) are the reference.

How the KL enters the loss (``algo.kl_loss``) matters for its gradient (Tang & Munos 2025, "On a
few pitfalls in KL divergence gradient estimation for RL"). With log r = log pi_ref - log pi on
actions sampled from pi, and beta the coefficient:

- ``k3``: beta * (r - 1 - log r) added to the loss. Its value estimates KL(pi || pi_ref) without
  bias, but its expected gradient is that of the *forward* KL(pi_ref || pi).
- ``k2``: beta * (log r)^2 / 2 added to the loss. A biased value, but its expected gradient is
  that of the reverse KL(pi || pi_ref), the one it stands for.
- ``k1_in_reward``: beta * log(pi_old / pi_ref) subtracted from every step's advantage, as a
  reward penalty would be: no gradient flows through it, and the policy-gradient estimator turns
  it into the gradient of the reverse KL too.

All three statements are about samples from pi itself: they hold at pi = pi_old, the first epoch
on a rollout; later epochs (ratio != 1) are off-policy and get them only approximately. And each is
the gradient of the KL at the states visited, not of how pi moves the state distribution.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import torch

from ppo_cli import losses
from ppo_cli.agent import ActorCritic
from ppo_cli.batch import Batch
from ppo_cli.config import KL_LOSSES


class ReferenceTerms(NamedTuple):
    """What the reference adds to one minibatch's loss."""

    advantages: torch.Tensor  # per step: A, or A - beta * log(pi_old / pi_ref) for k1_in_reward
    penalty: torch.Tensor  # beta * the (weighted) mean of k3 or k2, with gradients; 0 for k1_in_reward
    kl: torch.Tensor  # the mean k3 estimate of KL(pi || pi_ref), whatever kl_loss: for the log


class ReferencePolicy:
    """A frozen copy of ``agent`` (refreshed to the agent every ``refresh_every`` updates when
    > 0), and the KL term to it that ``kl_loss`` and ``kl_coef`` describe."""

    def __init__(self, agent: ActorCritic, kl_loss: str, kl_coef: float, refresh_every: int = 0) -> None:
        if kl_loss not in KL_LOSSES:
            raise ValueError(f"unknown kl_loss {kl_loss!r}")
        self.agent = agent
        self.kl_loss = kl_loss
        self.kl_coef = kl_coef
        self.refresh_every = refresh_every
        self.frozen = copy.deepcopy(agent).requires_grad_(False)
        self.updates = 0

    def terms(self, log_prob: torch.Tensor, mb: Batch, advantages: torch.Tensor) -> ReferenceTerms:
        """The reference's terms for minibatch ``mb``, whose actions have ``log_prob`` under the
        current policy (with gradients) and the given ``advantages``; the penalty is averaged
        with the minibatch's step weights, as the rest of the loss."""
        with torch.no_grad():
            params = self.frozen.policy_params(mb.obs, mb.action_masks, mb.memory)
            ref_log_prob = self.frozen.dist.log_prob(params, mb.actions)
        kl = losses.kl_terms(ref_log_prob - log_prob)  # of KL(pi || pi_ref), a ~ pi
        logged = kl.k3.detach().mean()
        if self.kl_loss == "k1_in_reward":
            k1_old = losses.kl_terms(ref_log_prob - mb.log_probs).k1  # log(pi_old / pi_ref)
            return ReferenceTerms(advantages - self.kl_coef * k1_old, logged.new_zeros(()), logged)
        per_step = kl.k3 if self.kl_loss == "k3" else kl.k2
        return ReferenceTerms(advantages, self.kl_coef * losses.weighted_mean(per_step, mb.weights), logged)

    def count_update(self) -> None:
        """One more update done: refresh pi_ref to the current policy if one is due."""
        self.updates += 1
        if self.refresh_every and self.updates % self.refresh_every == 0:
            self.refresh()

    def refresh(self) -> None:
        """Make the current policy the reference."""
        self.frozen.load_state_dict(self.agent.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "reference": self.frozen.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.frozen.load_state_dict(state["reference"])
