"""How every variant of the family turns a batch into parameter updates: the shared machinery.

:class:`Updater` owns the optimizer step (gradient averaging across ranks, norm clipping, the
non-finite check); :class:`SurrogateUpdater` runs epochs x shuffled minibatches on a ratio
objective; :class:`OneStepUpdater` takes one policy step per rollout; :func:`regress_critic`
fits a separate critic. Each variant's own loss lives in its module under ``ppo_cli/algos/``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from ppo_cli import losses
from ppo_cli.agent import ActorCritic, Evaluation
from ppo_cli.batch import Batch
from ppo_cli.config import ActorCriticConfig, AlgoConfig, EpochKeys, PGConfig, SurrogateConfig
from ppo_cli.distributed import SINGLE_PROCESS, DataParallel
from ppo_cli.distributions import ActionDistribution
from ppo_cli.errors import NonFiniteError


class Updater(ABC):
    """Turns one rollout's Batch into parameter updates for one variant of the family.

    State that must survive from one iteration to the next (PPO-Penalty's beta) lives here and
    goes into checkpoints through :meth:`state_dict`. Under data parallelism (``parallel``, see
    ``distributed.py``) gradients, and the numbers decisions are taken on, are averaged over the
    ranks; the metrics returned are those averages.
    """

    # The attributes of that state that its loss reads as numbers: a population (population.py)
    # passes each member's value into the members' batched loss.
    member_state: tuple[str, ...] = ()

    def __init__(
        self,
        agent: ActorCritic,
        optimizer: torch.optim.Optimizer,
        cfg: AlgoConfig,
        parallel: DataParallel = SINGLE_PROCESS,
    ) -> None:
        self.agent = agent
        self.optimizer = optimizer
        self.cfg = cfg
        self.parallel = parallel
        self.params = [p for p in agent.parameters() if p.requires_grad]
        # What the optimizer steps: the agent's packed tensors (see packing.py) or its parameters.
        self.stepped = [p for group in optimizer.param_groups for p in group["params"]]
        self.reset_state()

    def reset_state(self) -> None:  # noqa: B027 (most variants keep no state: nothing to do)
        """Set the variant's own state (what :meth:`state_dict` holds) to its start."""

    def step(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """One optimizer step on ``loss`` with the global gradient norm clipped to
        ``max_grad_norm``; a non-finite loss or gradient stops training before the step.

        Parameters that ``loss`` does not depend on get no gradient, so the optimizer leaves them
        alone. ``terms`` are the loss's parts, named in the error when one of them is not finite.
        Under data parallelism the gradient is the ranks' mean, and a non-finite loss on any rank
        stops them all (its mean, averaged with the gradient, is then not finite either).
        """
        for param in self.params:
            param.grad = None
        loss.backward()
        for pack in self.agent.packs:
            pack.gather_grad()
        mean_loss = self.parallel.average_gradients(self.stepped, loss)
        grad_norm = nn.utils.clip_grad_norm_(self.stepped, self.cfg.max_grad_norm)
        if not bool(torch.isfinite(mean_loss) & torch.isfinite(grad_norm)):  # one device sync per step
            raise NonFiniteError(self._non_finite_report(loss, terms))
        self.optimizer.step()

    def _non_finite_report(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> str:
        if not torch.isfinite(loss):
            values = {name: float(value.detach()) for name, value in terms.items()}
            bad = [f"{name}={value:g}" for name, value in values.items() if not math.isfinite(value)]
            return f"the loss is {float(loss.detach()):g} (non-finite terms: {', '.join(bad) or 'none'})"
        for name, param in self.agent.named_parameters():
            if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
                return f"the gradient of {name} is not finite (loss {float(loss.detach()):g})"
        return "the gradient norm is not finite"

    @abstractmethod
    def update(self, batch: Batch) -> dict[str, float]:
        """Update the agent; returns the quantities to log (means over the minibatches that ran)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; stateless variants accept only ``{}``."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")


class SurrogateUpdater(Updater):
    """Epochs x shuffled minibatches on a ratio objective (PPO-Clip, PPO-Penalty, GRPO).

    With ``target_kl`` set, the k3 estimate of KL(pi_old || pi) of each minibatch is checked
    *before* its optimizer step (it comes from the same forward pass), and the update stops at the
    first minibatch that exceeds it, so no step is ever taken from a policy already too far away.

    The logged losses are means over the minibatches that ran; the logged KL estimates are
    measured once, after the update, over the whole batch: how far this iteration moved the policy.
    """

    @property
    def epochs(self) -> EpochKeys:
        """The variant's epoch keys (its schema has them: clip, penalty, grpo)."""
        assert isinstance(self.cfg, EpochKeys), type(self.cfg)
        return self.cfg

    @abstractmethod
    def minibatch_loss(self, out: Evaluation, mb: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to minimise, {name: term to log}) for the minibatch ``mb``."""

    def update(self, batch: Batch) -> dict[str, float]:
        cfg = self.epochs
        logged: list[torch.Tensor] = []  # one row of logged terms per minibatch
        names: list[str] = []
        stopped_early = False
        for _ in range(cfg.update_epochs):
            for mb in batch.shuffled_minibatches(cfg.num_minibatches):
                out = self.agent.evaluate(mb.obs, mb.actions, mb.action_masks, mb.memory)
                if cfg.target_kl is not None:
                    k3 = losses.kl_estimates(out.log_prob.detach(), mb.log_probs).k3
                    if self.parallel.average(k3).item() > cfg.target_kl:
                        stopped_early = True
                        break
                loss, terms = self.minibatch_loss(out, mb)
                self.step(loss, terms)
                names = list(terms)
                # Kept on the device; read back once per update, not once per minibatch.
                logged.append(torch.stack([value.detach() for value in terms.values()]))
            if stopped_early:
                break
        means = torch.stack(logged).mean(dim=0).tolist() if logged else []
        metrics = dict(zip(names, means, strict=True))
        metrics.update(minibatch_updates=float(len(logged)), early_stop=float(stopped_early))
        return self.finish_update(batch, metrics)

    def finish_update(self, batch: Batch, metrics: dict[str, float]) -> dict[str, float]:
        """After the epochs: ``metrics`` (the minibatches' means) with the KL this update moved
        the policy by, averaged over the ranks. A variant whose state follows the update
        (PPO-Penalty's beta) adapts it here; a population (``population.py``) calls this per member."""
        metrics.update(measure_kl(self.agent, batch))
        return self.parallel.average_metrics(metrics)


class ActorCriticSurrogateUpdater(SurrogateUpdater):
    """PPO-Clip and PPO-Penalty: policy term + c1 * value loss - c2 * entropy, GAE advantages."""

    cfg: SurrogateConfig

    @abstractmethod
    def policy_loss(self, out: Evaluation, mb: Batch, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"policy_loss": ..., <extra logged terms>}`` for one minibatch; may carry gradients."""

    def value_clip_eps(self) -> float | None:
        return None

    def minibatch_loss(self, out: Evaluation, mb: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        advantages = mb.advantages
        if cfg.norm_adv:
            advantages = losses.normalize_advantages(advantages, weights=mb.weights)
        terms = self.policy_loss(out, mb, advantages)
        value_clip = self.value_clip_eps()
        terms["value_loss"] = losses.value_loss(out.value, mb.values, mb.returns, value_clip, mb.weights)
        terms["entropy"] = losses.weighted_mean(out.entropy, mb.weights)
        loss = terms["policy_loss"] - cfg.ent_coef * terms["entropy"] + cfg.vf_coef * terms["value_loss"]
        return loss, terms


class KLTerms(NamedTuple):
    """The sample estimates of KL(pi_old || pi) and its exact value, for one minibatch."""

    k1: torch.Tensor
    k2: torch.Tensor
    k3: torch.Tensor
    exact: torch.Tensor

    @classmethod
    def measure(
        cls, dist: ActionDistribution, out: Evaluation, old_log_prob: torch.Tensor, old_params: torch.Tensor
    ) -> KLTerms:
        """All four for the samples behind ``out`` (with gradients, if ``out`` has them)."""
        exact = dist.kl(old_params, out.policy_params).mean()
        return cls(*losses.kl_estimates(out.log_prob, old_log_prob), exact)


@torch.no_grad()
def measure_kl(agent: ActorCritic, batch: Batch) -> dict[str, float]:
    """Every KL estimate between pi_old and the current policy over the whole batch, as logged:
    under ``kl_*``, plus CleanRL's names for k1 and k3 so curves overlay."""
    kl = KLTerms.measure(
        agent.dist,
        agent.evaluate(batch.obs, batch.actions, batch.action_masks, batch.memory),
        batch.log_probs,
        batch.policy_params,
    )
    values = {f"kl_{name}": float(value) for name, value in kl._asdict().items()}
    return {**values, "old_approx_kl": values["kl_k1"], "approx_kl": values["kl_k3"]}


class OneStepUpdater(Updater):
    """Variants that take a single policy step per rollout (A2C, PG, TRPO), on the whole batch."""

    cfg: ActorCriticConfig | PGConfig

    @property
    def regresses_critic(self) -> bool:
        """Whether the policy step is followed by :func:`regress_critic` (PG's learned baseline):
        a population (``population_update.py``) regresses its members' critics together."""
        return False

    def policy_terms(self, batch: Batch) -> tuple[Evaluation, dict[str, torch.Tensor]]:
        out = self.agent.evaluate(batch.obs, batch.actions, batch.action_masks, batch.memory)
        return out, self.policy_terms_of(out, batch)

    def policy_terms_of(self, out: Evaluation, batch: Batch) -> dict[str, torch.Tensor]:
        """The policy-gradient loss and the entropy of the evaluation ``out`` of ``batch``."""
        advantages = batch.advantages
        if self.cfg.norm_adv:
            advantages = losses.normalize_advantages(advantages, weights=batch.weights)
        return {
            "policy_loss": losses.policy_gradient_loss(out.log_prob, advantages, batch.weights),
            "entropy": losses.weighted_mean(out.entropy, batch.weights),
        }

    def metrics_after_step(self, batch: Batch, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """The logged terms plus how far the single step moved the policy (every KL estimate)."""
        metrics = {key: float(value.detach()) for key, value in terms.items()}
        return self.parallel.average_metrics({**metrics, **measure_kl(self.agent, batch)})


class CriticRegression(Protocol):
    """The keys of a critic fitted apart from the policy step (pg, trpo)."""

    vf_coef: float
    value_epochs: int
    value_minibatches: int


def regress_critic(updater: Updater, batch: Batch, cfg: CriticRegression) -> torch.Tensor:
    """``value_epochs`` x ``value_minibatches`` regression steps of V on the returns; mean loss.

    Only the critic receives gradients here, so the policy is untouched whatever the optimizer.
    """
    value_losses = []
    for _ in range(cfg.value_epochs):
        order = torch.randperm(len(batch), device=batch.obs.device)
        for idx in torch.tensor_split(order, cfg.value_minibatches):
            value = updater.agent.value(batch.obs[idx])
            loss, terms = critic_regression_loss(cfg, value, batch.values[idx], batch.returns[idx])
            updater.step(loss, terms)
            value_losses.append(terms["value_loss"].detach())
    return torch.stack(value_losses).mean()


def critic_regression_loss(
    cfg: CriticRegression,
    value: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(vf_coef * the value loss of V's ``value`` on the ``returns``, {"value_loss": that loss}):
    the loss of one step of :func:`regress_critic` (a population's members take theirs together)."""
    value_loss = losses.value_loss(value, old_values, returns, None, weights)
    return cfg.vf_coef * value_loss, {"value_loss": value_loss}
