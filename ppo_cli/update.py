"""Turn one rollout into parameter updates: epochs x shuffled minibatches of the PPO-Clip objective."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ppo_cli import losses
from ppo_cli.agent import ActorCritic
from ppo_cli.config import ClipConfig
from ppo_cli.rollout import RolloutStorage

# old_approx_kl and approx_kl keep CleanRL's names for k1 and k3; kl_* are every estimate side by side.
LOGGED = (
    "policy_loss",
    "value_loss",
    "entropy",
    "old_approx_kl",
    "approx_kl",
    "clipfrac",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_exact",
)


@dataclass
class Batch:
    """The valid transitions of one rollout, flattened to (B, ...), with their advantage targets."""

    obs: torch.Tensor
    actions: torch.Tensor
    log_probs: torch.Tensor
    policy_params: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    @classmethod
    def from_storage(cls, storage: RolloutStorage, advantages: torch.Tensor, returns: torch.Tensor) -> Batch:
        """Flatten time and env dimensions and drop the fake steps of NEXT_STEP autoreset."""
        valid = storage.valid.flatten()
        keep = None if bool(valid.all()) else valid.nonzero().squeeze(-1)

        def flat(x: torch.Tensor) -> torch.Tensor:
            x = x.flatten(0, 1)
            return x if keep is None else x[keep]

        return cls(
            flat(storage.obs),
            flat(storage.actions),
            flat(storage.log_probs),
            flat(storage.policy_params),
            flat(storage.values),
            flat(advantages),
            flat(returns),
        )

    def __len__(self) -> int:
        return self.obs.shape[0]


def ppo_clip_update(
    agent: ActorCritic,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    cfg: ClipConfig,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Run ``update_epochs`` passes over ``batch`` in ``num_minibatches`` shuffled minibatches.

    With ``target_kl`` set, the approximate KL of each minibatch is checked *before* its optimizer
    step (it is computed from the same forward pass), and the update stops at the first minibatch
    that exceeds it, so no step is ever taken from a policy already too far from pi_old.

    Returns the mean of each logged quantity over all minibatches that ran.
    """
    total = torch.zeros(len(LOGGED), device=batch.obs.device)
    steps = 0
    params = [p for p in agent.parameters() if p.requires_grad]
    for _ in range(cfg.update_epochs):
        order = torch.randperm(len(batch), device=batch.obs.device, generator=generator)
        for idx in torch.tensor_split(order, cfg.num_minibatches):
            out = agent.evaluate(batch.obs[idx], batch.actions[idx])
            old_log_prob = batch.log_probs[idx]
            with torch.no_grad():
                kl = losses.kl_estimates(out.log_prob, old_log_prob)
                kl_exact = agent.exact_kl(batch.policy_params[idx], out.distribution).mean()
            if cfg.target_kl is not None and kl.k3.item() > cfg.target_kl:
                return _means(total, steps, stopped_early=True)
            advantages = batch.advantages[idx]
            if cfg.norm_adv:
                advantages = losses.normalize_advantages(advantages)
            policy_loss = losses.clipped_surrogate_loss(out.log_prob, old_log_prob, advantages, cfg.clip_eps)
            value_loss = losses.value_loss(
                out.value,
                batch.values[idx],
                batch.returns[idx],
                cfg.clip_eps if cfg.clip_vloss else None,
            )
            entropy = out.entropy.mean()
            loss = policy_loss - cfg.ent_coef * entropy + cfg.vf_coef * value_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                clipfrac = losses.clip_fraction(out.log_prob, old_log_prob, cfg.clip_eps)
            # Summed on the device; read back once per update to avoid a host sync per minibatch.
            total += torch.stack(
                [policy_loss, value_loss, entropy, kl.k1, kl.k3, clipfrac, *kl, kl_exact]
            ).detach()
            steps += 1
    return _means(total, steps, stopped_early=False)


def _means(total: torch.Tensor, steps: int, stopped_early: bool) -> dict[str, float]:
    means = dict(zip(LOGGED, (total / max(steps, 1)).tolist(), strict=True))
    means["minibatch_updates"] = float(steps)
    means["early_stop"] = float(stopped_early)
    return means
